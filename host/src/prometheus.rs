//! The Prometheus text of `/metrics`, written from one table of metric
//! families: each has its name, type, help and where its samples come
//! from. Adding a metric is adding a row.

use std::fmt::Write as _;
use std::sync::atomic::Ordering;

use eventstream_core::metrics::{Counter, Histogram, Snapshot};
use eventstream_core::wire::Reason;
use eventstream_core::Class;

use crate::endpoint::{HttpStats, MAX_ANSWERS_PER_SEC, STATUSES};
use crate::shared::{RingGauge, Shared};

/// What a scrape reads from.
pub struct Ctx<'a> {
    /// The server's shared state and gauges.
    pub shared: &'a Shared,
    /// The counters and latency histograms as of this scrape.
    pub snap: &'a Snapshot,
    /// The endpoint's own counters.
    pub http: &'a HttpStats,
}

/// A family's Prometheus type.
#[derive(Clone, Copy)]
enum Kind {
    Counter,
    Gauge,
    Summary,
}

/// Emits labeled samples: (label value, sample).
type EachLabeled = fn(&Ctx, &mut dyn FnMut(&str, f64));
/// Emits latency summaries: (labels, histogram in ns).
type EachLatency = fn(&Ctx, &mut dyn FnMut(&str, &Histogram));

/// Where a family's samples come from.
enum Samples {
    /// One sample.
    One(fn(&Ctx) -> f64),
    /// One sample per class (label `class`), from the snapshot.
    PerClass(fn(Class) -> Counter),
    /// Samples under one label: the label's name, and a function that
    /// emits (label value, sample) pairs.
    Labeled(&'static str, EachLabeled),
    /// A latency summary in seconds: emits (labels, histogram in ns).
    Latency(EachLatency),
}

/// One metric family.
struct Family {
    name: &'static str,
    kind: Kind,
    help: &'static str,
    samples: Samples,
}

/// The forwarder's lag: events, seconds (zeros without --forward).
fn forward_lag(c: &Ctx) -> (f64, f64) {
    c.shared
        .forward
        .lag(c.shared.readers.tail.get())
        .map_or((0.0, 0.0), |(events, secs)| (events as f64, secs))
}

fn relaxed(a: &std::sync::atomic::AtomicU64) -> f64 {
    a.load(Ordering::Relaxed) as f64
}

// The throttled counter's help states the endpoint's answer rate.
const _: () = assert!(MAX_ANSWERS_PER_SEC == 1000);

/// Every family `/metrics` serves, in order.
static FAMILIES: &[Family] = &[
    Family {
        name: "eventstream_events_received_total",
        kind: Kind::Counter,
        help: "Valid events read from producers, per class.",
        samples: Samples::PerClass(Counter::Received),
    },
    Family {
        name: "eventstream_events_stored_total",
        kind: Kind::Counter,
        help: "Events written to the log, per class.",
        samples: Samples::PerClass(Counter::Stored),
    },
    Family {
        name: "eventstream_duplicates_total",
        kind: Kind::Counter,
        help: "Events answered DUPLICATE, per class.",
        samples: Samples::PerClass(Counter::Duplicate),
    },
    Family {
        name: "eventstream_rejected_total",
        kind: Kind::Counter,
        help: "Frames or events rejected, per reason code.",
        samples: Samples::Labeled("reason", |c, out| {
            for &r in Reason::errors() {
                out(
                    &r.name().to_ascii_lowercase(),
                    c.snap.get(Counter::Rejected(r)) as f64,
                );
            }
        }),
    },
    Family {
        name: "eventstream_batches_total",
        kind: Kind::Counter,
        help: "Batch records written.",
        samples: Samples::One(|c| c.snap.get(Counter::Batches) as f64),
    },
    Family {
        name: "eventstream_received_bytes_total",
        kind: Kind::Counter,
        help: "Bytes read from producers.",
        samples: Samples::One(|c| c.snap.get(Counter::BytesReceived) as f64),
    },
    Family {
        name: "eventstream_stored_bytes_total",
        kind: Kind::Counter,
        help: "Frame bytes written to the log.",
        samples: Samples::One(|c| c.snap.get(Counter::BytesStored) as f64),
    },
    Family {
        name: "eventstream_legacy_keepalives_total",
        kind: Kind::Counter,
        help: "Legacy keep-alive frames.",
        samples: Samples::One(|c| c.snap.get(Counter::KeepAlives) as f64),
    },
    Family {
        name: "eventstream_legacy_skipped_total",
        kind: Kind::Counter,
        help: "Legacy frames skipped (also counted under their reason).",
        samples: Samples::One(|c| c.snap.get(Counter::LegacySkipped) as f64),
    },
    Family {
        name: "eventstream_idle_closed_total",
        kind: Kind::Counter,
        help: "Producer connections closed after --idle-timeout with nothing in flight.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.idle_closed)),
    },
    Family {
        name: "eventstream_connections_accepted_total",
        kind: Kind::Counter,
        help: "Producer connections accepted.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.connections_total)),
    },
    Family {
        name: "eventstream_connections_refused_total",
        kind: Kind::Counter,
        help: "Connections refused at accept (limit or out of descriptors).",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.connections_refused)),
    },
    Family {
        name: "eventstream_frame_timeouts_total",
        kind: Kind::Counter,
        help: "Connections closed for a frame half-received past --frame-timeout.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.frame_timeouts)),
    },
    Family {
        name: "eventstream_fsync_total",
        kind: Kind::Counter,
        help: "fsyncs of the log.",
        samples: Samples::One(|c| relaxed(&c.shared.progress.fsyncs)),
    },
    Family {
        name: "eventstream_storage_failures_total",
        kind: Kind::Counter,
        help: "Failed log writes.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.storage_failures)),
    },
    Family {
        name: "eventstream_connections",
        kind: Kind::Gauge,
        help: "Open producer connections.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.connections)),
    },
    Family {
        name: "eventstream_pool_free_slots",
        kind: Kind::Gauge,
        help: "Event pool slots not held by an event in flight.",
        samples: Samples::One(|c| c.shared.pool_free() as f64),
    },
    Family {
        name: "eventstream_pool_slots",
        kind: Kind::Gauge,
        help: "Event pool slots.",
        samples: Samples::One(|c| c.shared.pool_slots as f64),
    },
    Family {
        name: "eventstream_log_next_offset",
        kind: Kind::Gauge,
        help: "Offset the next stored event gets.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.next_offset)),
    },
    Family {
        name: "eventstream_log_start_offset",
        kind: Kind::Gauge,
        help: "The first retained offset.",
        samples: Samples::One(|c| {
            c.shared
                .readers
                .tail
                .get()
                .map_or(0.0, |t| t.first_offset() as f64)
        }),
    },
    Family {
        name: "eventstream_log_end_offset",
        kind: Kind::Gauge,
        help: "The next offset to become visible to readers (under --fsync always: once durable).",
        samples: Samples::One(|c| {
            c.shared
                .readers
                .tail
                .get()
                .map_or(0.0, |t| t.visible().offset as f64)
        }),
    },
    Family {
        name: "eventstream_reader_sessions",
        kind: Kind::Gauge,
        help: "Open read sessions.",
        samples: Samples::One(|c| relaxed(&c.shared.readers.sessions)),
    },
    Family {
        name: "eventstream_reader_sessions_total",
        kind: Kind::Counter,
        help: "Read sessions opened.",
        samples: Samples::One(|c| relaxed(&c.shared.readers.sessions_total)),
    },
    Family {
        name: "eventstream_reader_bytes_sent_total",
        kind: Kind::Counter,
        help: "Record bytes sent to read sessions.",
        samples: Samples::One(|c| relaxed(&c.shared.readers.bytes_sent)),
    },
    Family {
        name: "eventstream_reader_errors_total",
        kind: Kind::Counter,
        help: "Read sessions refused or closed, by reason (OUT_OF_RANGE, BAD_REQUEST, FENCED, ...).",
        samples: Samples::Labeled("reason", |c, out| {
            for &r in Reason::errors() {
                if let Some(n) = c.shared.readers.errors.get(r as usize) {
                    out(&r.name().to_ascii_lowercase(), relaxed(n));
                }
            }
        }),
    },
    Family {
        name: "eventstream_consumer_group_committed_offset",
        kind: Kind::Gauge,
        help: "A consumer group's committed offset.",
        samples: Samples::Labeled("group", |c, out| {
            if let Some(g) = c.shared.readers.groups.get() {
                for (name, offset) in g.committed() {
                    out(&name, offset as f64);
                }
            }
        }),
    },
    Family {
        name: "eventstream_consumer_group_lag_events",
        kind: Kind::Gauge,
        help: "Events between a consumer group's committed offset and the log's end.",
        samples: Samples::Labeled("group", |c, out| {
            let end = c
                .shared
                .readers
                .tail
                .get()
                .map_or(0, |t| t.visible().offset);
            if let Some(g) = c.shared.readers.groups.get() {
                for (name, offset) in g.committed() {
                    out(&name, end.saturating_sub(offset) as f64);
                }
            }
        }),
    },
    Family {
        name: "eventstream_forward_up",
        kind: Kind::Gauge,
        help: "1 while the forwarder is connected to NATS with its stream found (0 also without --forward).",
        samples: Samples::One(|c| f64::from(u8::from(c.shared.forward.up.load(Ordering::Relaxed)))),
    },
    Family {
        name: "eventstream_forward_published_total",
        kind: Kind::Counter,
        help: "Messages the forwarder published (publishes again after a failure included).",
        samples: Samples::One(|c| relaxed(&c.shared.forward.published)),
    },
    Family {
        name: "eventstream_forward_acked_total",
        kind: Kind::Counter,
        help: "Forwarded events JetStream stored as new.",
        samples: Samples::One(|c| relaxed(&c.shared.forward.acked)),
    },
    Family {
        name: "eventstream_forward_duplicates_total",
        kind: Kind::Counter,
        help: "Forwarded messages JetStream's duplicate window dropped (published again after a restart or a failure, or a transactional id another server forwarded).",
        samples: Samples::One(|c| relaxed(&c.shared.forward.duplicates)),
    },
    Family {
        name: "eventstream_forward_failures_total",
        kind: Kind::Counter,
        help: "Publishes that failed or timed out (each publishes again from the oldest unacked event).",
        samples: Samples::One(|c| relaxed(&c.shared.forward.failures)),
    },
    Family {
        name: "eventstream_forward_skipped_events_total",
        kind: Kind::Counter,
        help: "Events retention deleted before they were forwarded (the log was over twice --retention-bytes).",
        samples: Samples::One(|c| relaxed(&c.shared.forward.skipped)),
    },
    Family {
        name: "eventstream_forward_acked_offset",
        kind: Kind::Gauge,
        help: "Every event below this offset is in the stream.",
        samples: Samples::One(|c| relaxed(&c.shared.forward.acked_offset)),
    },
    Family {
        name: "eventstream_forward_lag_events",
        kind: Kind::Gauge,
        help: "Stored events not yet acked by JetStream.",
        samples: Samples::One(|c| forward_lag(c).0),
    },
    Family {
        name: "eventstream_forward_lag_seconds",
        kind: Kind::Gauge,
        help: "Age of the oldest stored event not yet acked by JetStream (0 when caught up).",
        samples: Samples::One(|c| forward_lag(c).1),
    },
    Family {
        name: "eventstream_log_bytes",
        kind: Kind::Gauge,
        help: "Bytes in all log segments.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.log_bytes)),
    },
    Family {
        name: "eventstream_log_lost_offsets",
        kind: Kind::Gauge,
        help: "Offsets lost to --repair (damaged records or missing segments), as damaged/report lists them.",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.log_lost_offsets)),
    },
    Family {
        name: "eventstream_storage_failed",
        kind: Kind::Gauge,
        help: "1 while log writes fail (retried each second).",
        samples: Samples::One(|c| f64::from(u8::from(c.shared.gauges.storage_failed.load(Ordering::Relaxed)))),
    },
    Family {
        name: "eventstream_dedup_entries",
        kind: Kind::Gauge,
        help: "Ids in the dedup table (counted at most once a second, when scraped).",
        samples: Samples::One(|c| relaxed(&c.shared.gauges.dedup_entries)),
    },
    Family {
        name: "eventstream_dedup_window_effective_seconds",
        kind: Kind::Gauge,
        help: "The dedup window the table really offers (shrinks when full ids are evicted).",
        samples: Samples::One(|c| {
            f64::from(c.shared.gauges.dedup_effective_ms.load(Ordering::Relaxed)) / 1000.0
        }),
    },
    Family {
        name: "eventstream_ring_depth",
        kind: Kind::Gauge,
        help: "Items waiting in each ring.",
        samples: Samples::Labeled("ring", |c, out| {
            for ring in RingGauge::ALL {
                out(ring.name(), c.shared.gauges.depth(ring) as f64);
            }
        }),
    },
    Family {
        name: "eventstream_fsync_seconds",
        kind: Kind::Summary,
        help: "fsync latency of the log.",
        samples: Samples::Latency(|c, out| {
            let h = c
                .shared
                .progress.fsync_latency
                .lock()
                .map(|h| h.clone())
                .unwrap_or_default();
            out("", &h);
        }),
    },
    Family {
        name: "eventstream_ingest_to_stored_seconds",
        kind: Kind::Summary,
        help: "Latency from ingest to stored (written, or fsynced with --fsync always), per class.",
        samples: Samples::Latency(|c, out| {
            for class in Class::ALL {
                out(
                    &format!("class=\"{}\"", class.name()),
                    c.snap.latency(class),
                );
            }
        }),
    },
    Family {
        name: "eventstream_metrics_requests_total",
        kind: Kind::Counter,
        help: "Requests the /metrics endpoint answered, per status code.",
        samples: Samples::Labeled("code", |c, out| {
            for (code, n) in STATUSES.iter().zip(c.http.answers) {
                out(&code.to_string(), n as f64);
            }
        }),
    },
    Family {
        name: "eventstream_metrics_requests_throttled_total",
        kind: Kind::Counter,
        help: "Requests that waited because the endpoint answers at most 1000 per second.",
        samples: Samples::One(|c| c.http.throttled as f64),
    },
    Family {
        name: "eventstream_metrics_connections_closed_total",
        kind: Kind::Counter,
        help: "Metric connections the endpoint closed: a request or answer past its deadline or an idle keep-alive (deadline), or the longest waiter when all were taken (evicted).",
        samples: Samples::Labeled("reason", |c, out| {
            out("deadline", c.http.deadline_closes as f64);
            out("evicted", c.http.evictions as f64);
        }),
    },
    Family {
        name: "eventstream_metrics_connections",
        kind: Kind::Gauge,
        help: "Open connections to the /metrics endpoint.",
        samples: Samples::One(|c| c.http.open as f64),
    },
    Family {
        name: "eventstream_tls_connections",
        kind: Kind::Gauge,
        help: "Open TLS connections (producers, readers, handshakes under way).",
        samples: Samples::One(|c| tls(c, |t| relaxed(&t.open))),
    },
    Family {
        name: "eventstream_tls_handshakes_total",
        kind: Kind::Counter,
        help: "TLS handshakes completed.",
        samples: Samples::One(|c| tls(c, |t| relaxed(&t.handshakes))),
    },
    Family {
        name: "eventstream_tls_handshake_failures_total",
        kind: Kind::Counter,
        help: "TLS handshakes failed, by cause (timeout: not done within --frame-timeout; peer_alert: the client refused our certificate; client_cert, no_client_cert: with --tls-client-ca; malformed: not TLS).",
        samples: Samples::Labeled("cause", |c, out| {
            for (i, cause) in crate::tls::Cause::ALL.iter().enumerate() {
                out(cause.name(), tls(c, |t| relaxed(&t.failures[i])));
            }
        }),
    },
    Family {
        name: "eventstream_tls_reload_failures_total",
        kind: Kind::Counter,
        help: "SIGHUP reloads of the TLS certificate and key that failed (the old ones stay).",
        samples: Samples::One(|c| tls(c, |t| relaxed(&t.reload_failures))),
    },
    Family {
        name: "eventstream_auth_failures_total",
        kind: Kind::Counter,
        help: "Connections refused for a wrong or missing token (FATAL UNAUTHORIZED to producers, ERROR UNAUTHORIZED to readers, legacy clients closed).",
        samples: Samples::One(|c| {
            let readers = relaxed(&c.shared.readers.errors[Reason::Unauthorized as usize]);
            c.snap.get(Counter::Rejected(Reason::Unauthorized)) as f64 + readers
        }),
    },
    Family {
        name: "eventstream_forbidden_total",
        kind: Kind::Counter,
        help: "Requests outside their token's rights: events (REJECTED FORBIDDEN) and read sessions (ERROR FORBIDDEN).",
        samples: Samples::Labeled("kind", |c, out| {
            out("event", c.snap.get(Counter::Rejected(Reason::Forbidden)) as f64);
            out("read", relaxed(&c.shared.readers.errors[Reason::Forbidden as usize]));
        }),
    },
];

/// A TLS figure (0 without `--tls-listen`).
fn tls(c: &Ctx, f: impl Fn(&crate::tls::TlsStats) -> f64) -> f64 {
    c.shared.tls.get().map_or(0.0, |t| f(&t.stats))
}

/// Writes one latency summary (ns recorded, seconds served).
fn summary(out: &mut String, name: &str, labels: &str, h: &Histogram) {
    const SCALE: f64 = 1e-9;
    let sep = if labels.is_empty() { "" } else { "," };
    for (q, label) in [(0.5, "0.5"), (0.99, "0.99"), (0.999, "0.999")] {
        let v = if h.count() == 0 {
            0.0
        } else {
            h.quantile(q) as f64 * SCALE
        };
        let _ = writeln!(out, "{name}{{{labels}{sep}quantile=\"{label}\"}} {v}");
    }
    let braces = if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    };
    let _ = writeln!(out, "{name}_sum{braces} {}", h.sum() as f64 * SCALE);
    let _ = writeln!(out, "{name}_count{braces} {}", h.count());
}

/// The Prometheus text of everything the server counts.
pub fn render(ctx: &Ctx) -> String {
    let mut o = String::with_capacity(8192);
    for f in FAMILIES {
        let kind = match f.kind {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Summary => "summary",
        };
        let _ = writeln!(o, "# HELP {} {}", f.name, f.help);
        let _ = writeln!(o, "# TYPE {} {kind}", f.name);
        let name = f.name;
        match &f.samples {
            Samples::One(v) => {
                let _ = writeln!(o, "{name} {}", v(ctx));
            }
            Samples::PerClass(counter) => {
                for c in Class::ALL {
                    let v = ctx.snap.get(counter(c));
                    let _ = writeln!(o, "{name}{{class=\"{}\"}} {v}", c.name());
                }
            }
            Samples::Labeled(label, each) => each(ctx, &mut |value, v| {
                let _ = writeln!(o, "{name}{{{label}=\"{value}\"}} {v}");
            }),
            Samples::Latency(each) => each(ctx, &mut |labels, h| summary(&mut o, name, labels, h)),
        }
    }
    o
}
