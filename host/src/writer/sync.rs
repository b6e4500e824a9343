//! The sync thread (fsyncs per policy, writeback kicks, page-cache drop)
//! and the prefill thread.

use super::*;

/// Runs the prefill thread (`--fsync always`): keeps one segment made
/// ahead of use ready for the next roll (see [`Prefill`]). After a failure
/// (one log line) rolls go on with plain segments.
pub fn run_prefill(prefill: Arc<Prefill>, shared: Arc<Shared>) {
    loop {
        if shared.phase() == Phase::Stop {
            prefill.discard();
            return;
        }
        if prefill.idle() {
            shared
                .wake
                .prefill
                .park(None, || !prefill.idle() || shared.phase() == Phase::Stop);
            continue;
        }
        if let Err(e) = prefill.make_one(|| shared.phase() == Phase::Stop) {
            eprintln!(
                "eventstream: cannot make a segment ahead of use: {e}; rolling to plain segments from now on"
            );
            return;
        }
    }
}

/// Whether `bytes` appended in `ns` nanoseconds run at `min_rate` bytes
/// per second or faster.
pub(super) fn appends_fast(bytes: u64, ns: u64, min_rate: u64) -> bool {
    u128::from(bytes) * 1_000_000_000 >= u128::from(min_rate) * u128::from(ns)
}

/// The least append rate (bytes per second) at which the sync thread drops
/// written-back pages from the page cache, per `--drop-written-pages`;
/// `None`: never.
pub fn drop_min_rate(arg: DropPages) -> Option<u64> {
    match arg {
        DropPages::Auto => Some(DROP_MIN_RATE),
        DropPages::Always => Some(0),
        DropPages::Never => None,
    }
}

/// Runs the sync thread: fsyncs the log per the policy (under `always`,
/// starting two fsyncs at least `commit_delay` apart) and publishes how far
/// it is synced, waking whichever thread runs storage (`wake_ingest`:
/// ingest, which then steps storage itself or leaves it to a running
/// storage thread), and drops written-back pages from the page cache while
/// appends run at `drop_min_rate` or faster. Under `never` it fsyncs only
/// the directory after a roll or a delete. A failed fsync ends the process.
pub fn run_sync(
    policy: FsyncPolicy,
    commit_delay: Duration,
    drop_min_rate: Option<u64>,
    wake_ingest: bool,
    targets: Arc<SyncTargets>,
    tail: Arc<LogTail>,
    shared: Arc<Shared>,
) {
    let mut last_sync = monotonic_ns();
    let mut last_start = 0u64;
    // Fault injection for tests and drills: EVENTSTREAM_FAIL_FSYNC_AFTER=N
    // makes the fsync after N good ones fail with EIO, as a dying disk would.
    let fail_after: Option<u64> = std::env::var("EVENTSTREAM_FAIL_FSYNC_AFTER")
        .ok()
        .and_then(|v| v.parse().ok());
    if let Some(n) = fail_after {
        eprintln!(
            "eventstream: fault injection: fsync number {} will fail",
            n + 1
        );
    }
    let mut done: u64 = 0;
    // The end of the last writeback range started, and when.
    let mut kicked = 0;
    let mut kicked_at = monotonic_ns();
    // The active segment's cached pages below `dropped` were dropped.
    let mut dropped: (Option<Arc<File>>, u64) = (None, 0);
    loop {
        if shared.phase() == Phase::Stop {
            return;
        }
        let kick_to = shared.progress.kick_to.load(Ordering::Acquire);
        if kick_to != kicked {
            let from = shared.progress.kick_from.load(Ordering::Relaxed);
            let active = targets.active();
            // Under `always` the fsyncs write everything back (a kick would
            // only make the next one wait for a whole range); there the
            // kicks only pace the drop.
            if policy != FsyncPolicy::Always {
                start_writeback(&active, from, kick_to);
            }
            let now = monotonic_ns();
            // Bytes appended since the last kick seen (after a roll, this
            // range's).
            let bytes = if kick_to > kicked {
                kick_to - kicked
            } else {
                kick_to.saturating_sub(from)
            };
            let drop = drop_min_rate
                .is_some_and(|r| appends_fast(bytes, now.saturating_sub(kicked_at), r));
            kicked = kick_to;
            kicked_at = now;
            // Pages whose writeback started DROP_LAG bytes ago are clean
            // by now, normally: drop them from the page cache
            // (`drop_cached`) while appends are fast; when slow, they are
            // passed over for good. A page still under writeback is kept by
            // the kernel, so the last DROP_RETRY bytes already passed are
            // asked again (a busy disk finishes writeback later than
            // DROP_LAG). The old segment's File is let go at the first kick
            // after a roll.
            if !dropped.0.as_ref().is_some_and(|f| Arc::ptr_eq(f, &active)) {
                dropped = (Some(active.clone()), 0);
            }
            // Never past the slowest reader's position (what a follower
            // has not read yet stays cached).
            let limit = tail.drop_limit(tail.written.load().base, from.saturating_sub(DROP_LAG));
            if limit > dropped.1 {
                if drop {
                    drop_cached(&active, dropped.1.saturating_sub(DROP_RETRY), limit);
                }
                dropped.1 = limit;
            }
        }
        let written = shared.progress.written.load(Ordering::Acquire);
        let synced = shared.progress.synced.load(Ordering::Acquire);
        match policy {
            FsyncPolicy::Never => {
                if let Err(e) = targets.sync_owed() {
                    eprintln!("eventstream: fatal: fsync of the data dir failed: {e}; exiting");
                    std::process::exit(1);
                }
                shared
                    .wake
                    .sync
                    .park(None, || shared.phase() == Phase::Stop);
                continue;
            }
            FsyncPolicy::Always => {
                if written == synced {
                    shared.wake.sync.park(None, || {
                        shared.progress.written.load(Ordering::Acquire) != synced
                            || shared.phase() == Phase::Stop
                    });
                    continue;
                }
                let due = last_start.saturating_add(commit_delay.as_nanos() as u64);
                if sleep_until(&shared, due) {
                    continue;
                }
            }
            FsyncPolicy::Interval(ms) => {
                if written == synced {
                    shared.progress.sync_idle.store(true, Ordering::Relaxed);
                    shared.wake.sync.park(None, || {
                        shared.progress.written.load(Ordering::Acquire) != synced
                            || shared.phase() == Phase::Stop
                    });
                    shared.progress.sync_idle.store(false, Ordering::Relaxed);
                    continue;
                }
                if sleep_until(&shared, last_sync + ms * 1_000_000) {
                    continue;
                }
            }
        }
        // Read the target first: every byte it counts is in a segment
        // that `sync` then covers (the active one, or one a roll closed).
        let target = shared.progress.written.load(Ordering::Acquire);
        let position = tail.written.load();
        let t0 = monotonic_ns();
        last_start = t0;
        let result = if fail_after == Some(done) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            targets.sync()
        };
        done += 1;
        if let Err(e) = result {
            eprintln!("eventstream: fatal: fsync failed: {e}; exiting (start-up recovery will check the log)");
            std::process::exit(1);
        }
        let took = monotonic_ns() - t0;
        last_sync = monotonic_ns();
        shared.progress.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = shared.progress.fsync_latency.lock() {
            h.record(took);
        }
        shared.progress.synced.fetch_max(target, Ordering::AcqRel);
        tail.publish_durable(position);
        // Held acks wait on storage's thread, or on ingest's.
        if wake_ingest {
            shared.wake.ingest.wake_for_acks();
        } else {
            shared.wake.storage.wake();
        }
    }
}

/// Parks the sync thread until `due` (monotonic ns) or the stop; false if
/// `due` has passed already.
fn sleep_until(shared: &Shared, due: u64) -> bool {
    let now = monotonic_ns();
    if now >= due {
        return false;
    }
    shared
        .wake
        .sync
        .park(Some(Duration::from_nanos(due - now)), || {
            shared.phase() == Phase::Stop
        });
    true
}
