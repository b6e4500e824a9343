//! The housekeeping thread: the Prometheus `/metrics` endpoint (see
//! `endpoint`), the one-line summary on stderr every second, and the dedup
//! window gauge.
//! It is off the hot path and may allocate (a bounded amount per second).

use std::fmt::Write as _;
use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eventstream_core::dedup::DedupRef;
use eventstream_core::metrics::{Counter, Histogram, Snapshot};
use eventstream_core::wire::Reason;
use eventstream_core::Class;

use crate::endpoint::{Endpoint, HttpStats, MAX_ANSWERS_PER_SEC, STATUSES};
use crate::shared::{Phase, RingGauge, Shared};
use crate::sys::monotonic_ns;

fn header(out: &mut String, name: &str, kind: &str, help: &str) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
}

fn summary(out: &mut String, name: &str, labels: &str, h: &Histogram, scale: f64) {
    let sep = if labels.is_empty() { "" } else { "," };
    for (q, label) in [(0.5, "0.5"), (0.99, "0.99"), (0.999, "0.999")] {
        let v = if h.count() == 0 {
            0.0
        } else {
            h.quantile(q) as f64 * scale
        };
        let _ = writeln!(out, "{name}{{{labels}{sep}quantile=\"{label}\"}} {v}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum() as f64 * scale);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count());
}

/// The Prometheus text of everything the server counts.
pub fn render(shared: &Shared, snap: &Snapshot, http: &HttpStats) -> String {
    let mut o = String::with_capacity(8192);
    let per_class = |o: &mut String, name: &str, help: &str, f: fn(Class) -> Counter| {
        header(o, name, "counter", help);
        for c in Class::ALL {
            let _ = writeln!(o, "{name}{{class=\"{}\"}} {}", c.name(), snap.get(f(c)));
        }
    };
    per_class(
        &mut o,
        "eventstream_events_received_total",
        "Valid events read from producers, per class.",
        Counter::Received,
    );
    per_class(
        &mut o,
        "eventstream_events_stored_total",
        "Events written to the log, per class.",
        Counter::Stored,
    );
    per_class(
        &mut o,
        "eventstream_duplicates_total",
        "Events answered DUPLICATE, per class.",
        Counter::Duplicate,
    );
    header(
        &mut o,
        "eventstream_rejected_total",
        "counter",
        "Frames or events rejected, per reason code.",
    );
    for &r in Reason::errors() {
        let _ = writeln!(
            o,
            "eventstream_rejected_total{{reason=\"{}\"}} {}",
            r.name().to_ascii_lowercase(),
            snap.get(Counter::Rejected(r))
        );
    }
    let plain: [(&str, &str, u64); 5] = [
        (
            "eventstream_batches_total",
            "Batch records written.",
            snap.get(Counter::Batches),
        ),
        (
            "eventstream_received_bytes_total",
            "Bytes read from producers.",
            snap.get(Counter::BytesReceived),
        ),
        (
            "eventstream_stored_bytes_total",
            "Frame bytes written to the log.",
            snap.get(Counter::BytesStored),
        ),
        (
            "eventstream_legacy_keepalives_total",
            "Legacy keep-alive frames.",
            snap.get(Counter::KeepAlives),
        ),
        (
            "eventstream_legacy_skipped_total",
            "Legacy frames skipped (also counted under their reason).",
            snap.get(Counter::LegacySkipped),
        ),
    ];
    for (name, help, v) in plain {
        header(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
    let counters: [(&str, &str, u64); 6] = [
        (
            "eventstream_idle_closed_total",
            "Producer connections closed after --idle-timeout with nothing in flight.",
            shared.idle_closed.load(Ordering::Relaxed),
        ),
        (
            "eventstream_connections_accepted_total",
            "Producer connections accepted.",
            shared.connections_total.load(Ordering::Relaxed),
        ),
        (
            "eventstream_connections_refused_total",
            "Connections refused at accept (limit or out of descriptors).",
            shared.connections_refused.load(Ordering::Relaxed),
        ),
        (
            "eventstream_frame_timeouts_total",
            "Connections closed for a frame half-received past --frame-timeout.",
            shared.frame_timeouts.load(Ordering::Relaxed),
        ),
        (
            "eventstream_fsync_total",
            "fsyncs of the log.",
            shared.fsyncs.load(Ordering::Relaxed),
        ),
        (
            "eventstream_storage_failures_total",
            "Failed log writes.",
            shared.storage_failures.load(Ordering::Relaxed),
        ),
    ];
    for (name, help, v) in counters {
        header(&mut o, name, "counter", help);
        let _ = writeln!(o, "{name} {v}");
    }
    let gauges: [(&str, &str, f64); 9] = [
        (
            "eventstream_connections",
            "Open producer connections.",
            shared.connections.load(Ordering::Relaxed) as f64,
        ),
        (
            "eventstream_pool_free_slots",
            "Event pool slots not held by an event in flight.",
            shared.pool_free() as f64,
        ),
        (
            "eventstream_pool_slots",
            "Event pool slots.",
            shared.pool_slots as f64,
        ),
        (
            "eventstream_log_next_offset",
            "Offset the next stored event gets.",
            shared.next_offset.load(Ordering::Relaxed) as f64,
        ),
        (
            "eventstream_log_bytes",
            "Bytes in all log segments.",
            shared.log_bytes.load(Ordering::Relaxed) as f64,
        ),
        (
            "eventstream_log_lost_offsets",
            "Offsets lost to --repair (damaged records or missing segments), as damaged/report lists them.",
            shared.log_lost_offsets.load(Ordering::Relaxed) as f64,
        ),
        (
            "eventstream_storage_failed",
            "1 while log writes fail (retried each second).",
            u8::from(shared.storage_failed.load(Ordering::Relaxed)) as f64,
        ),
        (
            "eventstream_dedup_entries",
            "Ids in the dedup table (counted at most once a second, when scraped).",
            shared.dedup_entries.load(Ordering::Relaxed) as f64,
        ),
        (
            "eventstream_dedup_window_effective_seconds",
            "The dedup window the table really offers (shrinks when full ids are evicted).",
            f64::from(shared.dedup_effective_ms.load(Ordering::Relaxed)) / 1000.0,
        ),
    ];
    for (name, help, v) in gauges {
        header(&mut o, name, "gauge", help);
        let _ = writeln!(o, "{name} {v}");
    }
    header(
        &mut o,
        "eventstream_ring_depth",
        "gauge",
        "Items waiting in each ring.",
    );
    for ring in RingGauge::ALL {
        let _ = writeln!(
            o,
            "eventstream_ring_depth{{ring=\"{}\"}} {}",
            ring.name(),
            shared.depth(ring)
        );
    }
    header(
        &mut o,
        "eventstream_fsync_seconds",
        "summary",
        "fsync latency of the log.",
    );
    let fsync = shared
        .fsync_latency
        .lock()
        .map(|h| h.clone())
        .unwrap_or_default();
    summary(&mut o, "eventstream_fsync_seconds", "", &fsync, 1e-9);
    header(
        &mut o,
        "eventstream_ingest_to_stored_seconds",
        "summary",
        "Latency from ingest to stored (written, or fsynced with --fsync always), per class.",
    );
    for c in Class::ALL {
        summary(
            &mut o,
            "eventstream_ingest_to_stored_seconds",
            &format!("class=\"{}\"", c.name()),
            snap.latency(c),
            1e-9,
        );
    }
    header(
        &mut o,
        "eventstream_metrics_requests_total",
        "counter",
        "Requests the /metrics endpoint answered, per status code.",
    );
    for (code, n) in STATUSES.iter().zip(http.answers) {
        let _ = writeln!(
            o,
            "eventstream_metrics_requests_total{{code=\"{code}\"}} {n}"
        );
    }
    header(
        &mut o,
        "eventstream_metrics_requests_throttled_total",
        "counter",
        &format!(
            "Requests that waited because the endpoint answers at most {MAX_ANSWERS_PER_SEC} per second."
        ),
    );
    let _ = writeln!(
        o,
        "eventstream_metrics_requests_throttled_total {}",
        http.throttled
    );
    header(
        &mut o,
        "eventstream_metrics_connections_closed_total",
        "counter",
        "Metric connections the endpoint closed: a request or answer past its deadline or an idle keep-alive (deadline), or the longest waiter when all were taken (evicted).",
    );
    for (reason, n) in [
        ("deadline", http.deadline_closes),
        ("evicted", http.evictions),
    ] {
        let _ = writeln!(
            o,
            "eventstream_metrics_connections_closed_total{{reason=\"{reason}\"}} {n}"
        );
    }
    header(
        &mut o,
        "eventstream_metrics_connections",
        "gauge",
        "Open connections to the /metrics endpoint.",
    );
    let _ = writeln!(o, "eventstream_metrics_connections {}", http.open);
    o
}

fn us(ns: u64) -> String {
    if ns >= 10_000_000 {
        format!("{}ms", ns / 1_000_000)
    } else {
        format!("{}us", ns / 1_000)
    }
}

/// The one-line summary: rates since `prev`, latency quantiles, ring
/// depths, pool free.
pub fn summary_line(shared: &Shared, snap: &Snapshot, prev: &Snapshot, secs: f64) -> String {
    let sum = |s: &Snapshot, f: fn(Class) -> Counter| -> u64 {
        Class::ALL.iter().map(|&c| s.get(f(c))).sum()
    };
    let rate = |now: u64, before: u64| (now.saturating_sub(before)) as f64 / secs.max(1e-3);
    let rejected: u64 = Reason::errors()
        .iter()
        .map(|&r| snap.get(Counter::Rejected(r)))
        .sum();
    let mut lat = Histogram::new();
    for c in Class::ALL {
        lat.merge(snap.latency(c));
    }
    let depth = |i: usize| shared.depth(RingGauge::ALL[i]);
    format!(
        "eventstream: in {:.0}/s stored {:.0}/s dup {} rej {} | p50 {} p99 {} p99.9 {} | rings rt {} tx {} b {} st {} | pool free {} | conns {}",
        rate(sum(snap, Counter::Received), sum(prev, Counter::Received)),
        rate(sum(snap, Counter::Stored), sum(prev, Counter::Stored)),
        sum(snap, Counter::Duplicate),
        rejected,
        us(lat.quantile(0.5)),
        us(lat.quantile(0.99)),
        us(lat.quantile(0.999)),
        depth(0),
        depth(1),
        depth(2),
        depth(3) + depth(4) + depth(5),
        shared.pool_free(),
        shared.connections.load(Ordering::Relaxed),
    )
}

/// Runs housekeeping until shutdown: the `/metrics` endpoint (which never
/// waits on a client), and once a second the summary line, the effective
/// dedup window and its warning.
pub fn run_housekeeping(listener: TcpListener, dedup: DedupRef<'static>, shared: Arc<Shared>) {
    let mut endpoint = match Endpoint::new(listener) {
        Ok(e) => Some(e),
        Err(e) => {
            eprintln!("eventstream: metrics endpoint failed, serving no metrics: {e}");
            None
        }
    };
    let mut prev = shared.registry.snapshot();
    let mut prev_line_at = monotonic_ns();
    let mut last_printed = None;
    let mut last_warning = 0u64;
    // When the dedup occupancy was last counted: the count walks the whole
    // table, so scrapes reuse it for up to a second.
    let mut occupancy_at: Option<u64> = None;
    let window_ms = dedup.window_ms();
    let mut render_now = |http: &HttpStats| {
        let now = monotonic_ns();
        if occupancy_at.is_none_or(|at| now.saturating_sub(at) >= OCCUPANCY_TTL_NS) {
            occupancy_at = Some(now);
            shared
                .dedup_entries
                .store(dedup.occupied() as u64, Ordering::Relaxed);
        }
        render(&shared, &shared.registry.snapshot(), http)
    };
    loop {
        if shared.phase() == Phase::Stop {
            return;
        }
        let now = monotonic_ns();
        let next = prev_line_at + 1_000_000_000;
        // Wake for the next line, the endpoint's next deadline, and at
        // least every 100 ms to see a shutdown.
        let until = endpoint
            .as_ref()
            .and_then(Endpoint::next_deadline)
            .map_or(next, |d| d.min(next));
        let wait_ms = (until.saturating_sub(now).div_ceil(1_000_000)).clamp(1, 100) as i32;
        match endpoint.as_mut() {
            Some(e) => e.poll(wait_ms, monotonic_ns, &mut render_now),
            None => std::thread::sleep(Duration::from_millis(wait_ms as u64)),
        }
        let now = monotonic_ns();
        if now < next {
            continue;
        }
        let secs = (now - prev_line_at) as f64 / 1e9;
        prev_line_at = now;
        let effective = dedup.effective_window_ms();
        shared
            .dedup_effective_ms
            .store(effective, Ordering::Relaxed);
        if effective < window_ms && now.saturating_sub(last_warning) > 60_000_000_000 {
            last_warning = now;
            eprintln!(
                "eventstream: warning: dedup table full; ids evicted, effective window {:.1}s of {:.1}s (raise --dedup-capacity)",
                f64::from(effective) / 1000.0,
                f64::from(window_ms) / 1000.0
            );
        }
        let snap = shared.registry.snapshot();
        // Print each second in which anything moved (an event, an answer,
        // a connection); an idle server prints its last state once.
        let key = activity(&shared, &snap);
        if last_printed != Some(key) {
            eprintln!("{}", summary_line(&shared, &snap, &prev, secs));
            last_printed = Some(key);
        }
        prev = snap;
    }
}

/// How long a counted dedup occupancy serves scrapes.
const OCCUPANCY_TTL_NS: u64 = 1_000_000_000;

/// The cumulative counts the summary line moves with.
fn activity(shared: &Shared, snap: &Snapshot) -> [u64; 4] {
    let sum = |f: fn(Class) -> Counter| -> u64 { Class::ALL.iter().map(|&c| snap.get(f(c))).sum() };
    let rejected: u64 = Reason::errors()
        .iter()
        .map(|&r| snap.get(Counter::Rejected(r)))
        .sum();
    [
        sum(Counter::Received) + rejected,
        sum(Counter::Stored) + sum(Counter::Duplicate),
        shared.connections_total.load(Ordering::Relaxed),
        shared.connections.load(Ordering::Relaxed),
    ]
}
