//! The housekeeping thread: the Prometheus `/metrics` endpoint, the
//! one-line summary on stderr every second, and the dedup window gauge.
//! It is off the hot path and may allocate (a bounded amount per second).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eventstream_core::dedup::DedupRef;
use eventstream_core::metrics::{Counter, Histogram, Snapshot};
use eventstream_core::wire::Reason;
use eventstream_core::Class;

use crate::shared::{Shared, RING_NAMES, STOP};
use crate::sys::{monotonic_ns, syscall};

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
pub fn render(shared: &Shared, snap: &Snapshot) -> String {
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
    let counters: [(&str, &str, u64); 5] = [
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
    let gauges: [(&str, &str, f64); 8] = [
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
            "eventstream_storage_failed",
            "1 while log writes fail (retried each second).",
            u8::from(shared.storage_failed.load(Ordering::Relaxed)) as f64,
        ),
        (
            "eventstream_dedup_entries",
            "Ids in the dedup table (counted at each scrape).",
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
    for (i, name) in RING_NAMES.iter().enumerate() {
        let _ = writeln!(
            o,
            "eventstream_ring_depth{{ring=\"{name}\"}} {}",
            shared.ring_depth[i].load(Ordering::Relaxed)
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
    let depth = |i: usize| shared.ring_depth[i].load(Ordering::Relaxed);
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

/// Runs housekeeping until shutdown.
pub fn run_housekeeping(listener: TcpListener, dedup: DedupRef<'static>, shared: Arc<Shared>) {
    let mut prev = shared.registry.snapshot();
    let mut prev_line_at = monotonic_ns();
    let mut last_printed_counters = String::new();
    let mut last_warning = 0u64;
    let window_ms = dedup.window_ms();
    loop {
        if shared.phase() == STOP {
            return;
        }
        let now = monotonic_ns();
        let next = prev_line_at + 1_000_000_000;
        let wait_ms = (next.saturating_sub(now) / 1_000_000).min(1000) as i32;
        let mut pfd = libc::pollfd {
            fd: listener.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ready = syscall!(poll(&mut pfd, 1, wait_ms.max(1))).unwrap_or(0);
        if ready > 0 {
            if let Ok((stream, _)) = listener.accept() {
                // Counting the table walks all of it (milliseconds at the
                // default 2M ids): done per scrape, not every second.
                shared
                    .dedup_entries
                    .store(dedup.occupied() as u64, Ordering::Relaxed);
                serve_http(stream, &shared);
            }
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
        let line = summary_line(&shared, &snap, &prev, secs);
        // Print while anything moves; an idle server prints its last
        // state once.
        let key = line.split('|').next().unwrap_or("").to_string()
            + &shared.connections.load(Ordering::Relaxed).to_string();
        if key != last_printed_counters {
            eprintln!("{line}");
            last_printed_counters = key;
        }
        prev = snap;
    }
}

fn serve_http(mut stream: std::net::TcpStream, shared: &Shared) {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(1)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut req = [0u8; 2048];
    let mut got = 0;
    while got < req.len() {
        match stream.read(&mut req[got..]) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                got += n;
                if req[..got].windows(4).any(|w| w == b"\r\n\r\n") {
                    break;
                }
            }
        }
    }
    let line = req[..got].split(|&b| b == b'\n').next().unwrap_or(&[]);
    let line = String::from_utf8_lossy(line);
    let mut parts = line.split_whitespace();
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let (status, ctype, body) =
        if method == "GET" && (path == "/metrics" || path.starts_with("/metrics?")) {
            let snap = shared.registry.snapshot();
            (
                "200 OK",
                "text/plain; version=0.0.4; charset=utf-8",
                render(shared, &snap),
            )
        } else {
            (
                "404 Not Found",
                "text/plain; charset=utf-8",
                "not found; try GET /metrics\n".to_string(),
            )
        };
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = stream.write_all(head.as_bytes());
    let _ = stream.write_all(body.as_bytes());
}
