//! The report: the table and the JSON, from one set of quantiles.

use super::*;

/// The quantiles every latency report gives, with their JSON keys.
pub(super) const QUANTILES: [(&str, Option<f64>); 4] = [
    ("p50", Some(0.5)),
    ("p99", Some(0.99)),
    ("p999", Some(0.999)),
    ("max", None),
];

/// `h`'s p50, p99, p99.9 and max in microseconds.
pub(super) fn quantiles_us(h: &Histogram) -> [f64; 4] {
    QUANTILES.map(|(_, q)| q.map_or(h.max(), |q| h.quantile(q)) as f64 / 1e3)
}

pub(super) fn lat_json(h: &Histogram) -> String {
    let mut o = String::from("{");
    for (i, ((key, _), v)) in QUANTILES.iter().zip(quantiles_us(h)).enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(o, "{sep}\"{key}\":{v:.1}");
    }
    o.push('}');
    o
}

impl Report {
    /// Events per second: acked ones with `--ack`, else sent ones.
    pub fn events_per_sec(&self, ack: bool) -> f64 {
        let n = if ack {
            self.stored + self.duplicate
        } else {
            self.sent
        };
        n as f64 / self.seconds.max(1e-9)
    }

    /// Latency of realtime and transactional events together.
    pub fn overall(&self) -> Histogram {
        let mut h = self.latency[0].clone();
        h.merge(&self.latency[1]);
        h
    }

    /// The one-object JSON form.
    pub fn json(&self, ack: bool) -> String {
        let rejected: u64 = self.rejected.iter().sum();
        let mut by_reason = String::new();
        for &r in Reason::errors() {
            let n = self.rejected[r.code() as usize];
            if n > 0 {
                if !by_reason.is_empty() {
                    by_reason.push(',');
                }
                let _ = write!(by_reason, "\"{}\":{n}", r.name());
            }
        }
        format!(
            "{{\"sent\":{},\"stored\":{},\"duplicate\":{},\"rejected\":{rejected},\"rejected_by_reason\":{{{by_reason}}},\"fatal\":{},\"missing_acks\":{},\"unexpected_acks\":{},\"seconds\":{:.3},\"events_per_sec\":{:.0},\"latency_us\":{},\"latency_us_by_class\":{{\"realtime\":{},\"transactional\":{},\"batch\":{}}},\"send_lag_us\":{}}}",
            self.sent,
            self.stored,
            self.duplicate,
            self.fatal,
            self.missing,
            self.unexpected,
            self.seconds,
            self.events_per_sec(ack),
            lat_json(&self.overall()),
            lat_json(&self.latency[0]),
            lat_json(&self.latency[1]),
            lat_json(&self.latency[2]),
            lat_json(&self.send_lag),
        )
    }

    /// The human table.
    pub fn table(&self, ack: bool) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "sent            {}", self.sent);
        if ack {
            let _ = writeln!(o, "stored          {}", self.stored);
            let _ = writeln!(o, "duplicate       {}", self.duplicate);
            for &r in Reason::errors() {
                let n = self.rejected[r.code() as usize];
                if n > 0 {
                    let _ = writeln!(o, "rejected {:<14} {n}", r.name());
                }
            }
            let _ = writeln!(o, "fatal           {}", self.fatal);
            let _ = writeln!(o, "missing acks    {}", self.missing);
        }
        let _ = writeln!(o, "seconds         {:.3}", self.seconds);
        let _ = writeln!(o, "events/s        {:.0}", self.events_per_sec(ack));
        // One row of quantiles, in microseconds.
        let row = |o: &mut String, name: &str, h: &Histogram| {
            let _ = write!(o, "{name:<18}");
            for v in quantiles_us(h) {
                let _ = write!(o, " {v:>8.1}");
            }
            o.push('\n');
        };
        if ack {
            let _ = writeln!(o, "ack latency (us)        p50      p99    p99.9      max");
            row(&mut o, "  rt+tx", &self.overall());
            for c in Class::ALL {
                row(&mut o, &format!("  {}", c.name()), &self.latency[c.index()]);
            }
            let _ = writeln!(o, "  (batch events wait for their window; reported apart)");
        }
        row(&mut o, "send lag (us)", &self.send_lag);
        o
    }
}
