//! The housekeeping thread: the Prometheus `/metrics` endpoint (see
//! `endpoint`), the one-line summary on stderr every second, and the dedup
//! window gauge.
//! It is off the hot path and may allocate (a bounded amount per second).

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eventstream_core::dedup::DedupRef;
use eventstream_core::metrics::{Counter, Histogram, Snapshot};
use eventstream_core::wire::Reason;
use eventstream_core::Class;

use crate::endpoint::{Endpoint, HttpStats};
use crate::prometheus;
use crate::shared::{Phase, RingGauge, Shared};
use crate::sys::monotonic_ns;

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
    let depth = |i: usize| shared.gauges.depth(RingGauge::ALL[i]);
    let f = &shared.forward;
    let forward = match f.lag(shared.readers.tail.get()) {
        Some((events, secs)) => format!(
            " | fwd lag {events} ev {secs:.1}s{}",
            if f.up.load(Ordering::Relaxed) {
                ""
            } else {
                " (down)"
            }
        ),
        None => String::new(),
    };
    format!(
        "eventstream: in {:.0}/s stored {:.0}/s dup {} rej {} | p50 {} p99 {} p99.9 {} | rings rt {} tx {} b {} st {} | pool free {} | conns {}{}",
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
        shared.gauges.connections.load(Ordering::Relaxed),
        forward,
    )
}

/// Runs housekeeping until shutdown: the `/metrics` endpoint (which never
/// waits on a client), and once a second the summary line, the effective
/// dedup window and its warning.
pub fn run_housekeeping(
    listener: TcpListener,
    metrics_token: Option<Vec<u8>>,
    dedup: DedupRef<'static>,
    shared: Arc<Shared>,
) {
    let mut endpoint = match Endpoint::new(listener, metrics_token.as_deref()) {
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
                .gauges
                .dedup_entries
                .store(dedup.occupied() as u64, Ordering::Relaxed);
        }
        let snap = shared.registry.snapshot();
        prometheus::render(&prometheus::Ctx {
            shared: &shared,
            snap: &snap,
            http,
        })
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
        if shared.life.reload_requested.swap(false, Ordering::AcqRel) {
            reload(&shared);
        }
        let now = monotonic_ns();
        if now < next {
            continue;
        }
        let secs = (now - prev_line_at) as f64 / 1e9;
        prev_line_at = now;
        let effective = dedup.effective_window_ms();
        shared
            .gauges
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

/// SIGHUP: reads the `--auth` file again and wakes ingest and the reader
/// thread to close the connections of revoked tokens.
fn reload(shared: &Shared) {
    if let Some(tls) = shared.tls.get() {
        tls.reload();
    }
    let Some(state) = shared.auth.get() else {
        if shared.tls.get().is_none() {
            eprintln!("eventstream: SIGHUP: nothing to reload (no --auth, no TLS)");
        }
        return;
    };
    match state.reload() {
        Ok(n) => {
            eprintln!("eventstream: SIGHUP: --auth reloaded, {n} tokens");
            shared.wake.ingest.wake_always();
            if let Some(w) = shared.readers_waker.get() {
                w.notify();
            }
        }
        Err(e) => eprintln!("eventstream: SIGHUP: {e}; the tokens stay as they were"),
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
        shared.gauges.connections_total.load(Ordering::Relaxed),
        shared.gauges.connections.load(Ordering::Relaxed),
    ]
}
