//! The processor threads: realtime, transactional and batch, each the
//! core's state machine between its class ring and its storage ring.
//!
//! Costs per event: no allocation, no lock, no syscall; one fence and one
//! load per batch of items to wake the next thread if it sleeps.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eventstream_core::batch::BatchWindows;
use eventstream_core::dedup::{DedupHint, DedupRef};
use eventstream_core::pipeline::{Event, StorageItem, ToStorage, Work};
use eventstream_core::process::{
    BatchProcessor, RealtimeProcessor, Sweeper, TransactionalProcessor,
};
use eventstream_core::ring::{Consumer, Producer};
use eventstream_core::Class;

use crate::shared::{Phase, RingGauge, Shared};
use crate::sys::{monotonic_ns, Backoff, Parker};

/// Items a processor moves per step.
const STEP: usize = 256;

/// A single-event processor: realtime or transactional.
pub enum Singles {
    /// Realtime (`check`).
    Realtime(RealtimeProcessor<'static>),
    /// Transactional (`insert`), with its sweep period.
    Transactional(TransactionalProcessor<'static>, Duration),
}

/// Dedup slots one sweep step walks (about half a millisecond), so a sweep
/// never stops its thread for a whole table (40-90 ms for the default one).
const SWEEP_SLICE: usize = 16_384;

/// The dedup sweep every `every`, a slice per step (the core's `Sweeper`).
pub fn sweeper(every: Duration) -> Sweeper {
    let every_ns = every.as_nanos().min(u64::MAX as u128) as u64;
    Sweeper::new(monotonic_ns(), every_ns, SWEEP_SLICE)
}

/// One sweep step; a pass that freed ids says so in one line.
pub fn sweep_step(sw: &mut Sweeper, p: &mut TransactionalProcessor<'_>, now: u64) {
    if let Some(freed @ 1..) = sw.step(p, now) {
        eprintln!("eventstream: dedup sweep freed {freed} expired ids");
    }
}

/// How many events ahead a processor prefetches the dedup slots of.
const PREFETCH_AHEAD: usize = 8;

/// Runs a realtime or transactional processor until shutdown.
pub fn run_singles(
    mut proc: Singles,
    dedup: DedupRef<'static>,
    mut rx: Consumer<'static, Event<'static>>,
    mut tx: Producer<'static, StorageItem<'static>>,
    shared: Arc<Shared>,
) {
    let (class, me): (Class, &Parker) = match proc {
        Singles::Realtime(_) => (Class::Realtime, &shared.wake.realtime),
        Singles::Transactional(..) => (Class::Transactional, &shared.wake.transactional),
    };
    let mut sweeper = match &proc {
        Singles::Transactional(_, every) => Some(sweeper(*every)),
        Singles::Realtime(_) => None,
    };
    let mut backoff = Backoff::new(shared.idle_spin_ns);
    loop {
        let now = monotonic_ns();
        let now_ms = now / 1_000_000;
        let room = tx.free_len().min(STEP);
        let mut moved = 0;
        for _ in 0..room {
            if let Some(f) = rx.peek(PREFETCH_AHEAD).map(Event::frame) {
                match class {
                    Class::Transactional => dedup.prefetch_insert(f.event_id()),
                    _ => dedup.prefetch(f.event_id()),
                }
            }
            let Some(ev) = rx.pop() else { break };
            let work = Work::decided_hinted(ev, |f| match &mut proc {
                Singles::Realtime(p) => (p.handle(f, now_ms, &mut ()), DedupHint::NONE),
                Singles::Transactional(p, _) => p.handle_hinted(f, now_ms, &mut ()),
            });
            let _ = tx.push(StorageItem::from(work));
            moved += 1;
        }
        if let (Some(sw), Singles::Transactional(p, _)) = (&mut sweeper, &mut proc) {
            sweep_step(sw, p, now);
        }
        if moved > 0 {
            shared.gauges.set_depth(RingGauge::Class(class), rx.len());
            shared.wake.storage.wake();
            shared.wake.ingest.wake_for_room();
            backoff.reset();
            continue;
        }
        if shared.phase() == Phase::Stop && rx.is_empty() {
            return;
        }
        if backoff.idle() {
            shared.gauges.set_depth(RingGauge::Class(class), rx.len());
            let timeout = sweeper
                .as_ref()
                .map(|sw| Duration::from_nanos(sw.next_deadline().saturating_sub(monotonic_ns())));
            me.park(timeout, || {
                (!rx.is_empty() && tx.has_room(1)) || shared.phase() == Phase::Stop
            });
            backoff.reset();
        }
    }
}

/// Runs the batch processor until shutdown: windows close on count, on age,
/// early when ingest is short of pool slots, and all at once on shutdown.
pub fn run_batch(
    windows: BatchWindows<'static, Event<'static>>,
    mut rx: Consumer<'static, Event<'static>>,
    mut tx: Producer<'static, StorageItem<'static>>,
    shared: Arc<Shared>,
) {
    let mut proc = BatchProcessor::new(windows);
    let need = ToStorage::room_needed(&proc.windows().config());
    let mut backoff = Backoff::new(shared.idle_spin_ns);
    loop {
        let now = monotonic_ns();
        let mut moved = false;
        for _ in 0..STEP {
            if !tx.has_room(need) {
                break;
            }
            let Some(ev) = rx.pop() else { break };
            proc.handle(ev, now, &mut (), &mut ToStorage { out: &mut tx });
            moved = true;
        }
        let flush =
            shared.phase() >= Phase::Drain || shared.life.pool_starved.load(Ordering::Relaxed);
        if tx.has_room(need) {
            moved |= proc.tick(now, flush, &mut ToStorage { out: &mut tx });
        }
        if moved {
            shared
                .gauges
                .set_depth(RingGauge::Class(Class::Batch), rx.len());
            shared.wake.storage.wake();
            shared.wake.ingest.wake_for_room();
            backoff.reset();
            continue;
        }
        if shared.phase() == Phase::Stop && rx.is_empty() && proc.held() == 0 {
            return;
        }
        if backoff.idle() {
            shared
                .gauges
                .set_depth(RingGauge::Class(Class::Batch), rx.len());
            let timeout = proc
                .next_deadline()
                .map(|d| Duration::from_nanos(d.saturating_sub(monotonic_ns())));
            let held = proc.held();
            shared.wake.batch.park(timeout, || {
                (!rx.is_empty() && tx.has_room(need))
                    || shared.phase() == Phase::Stop
                    || (held > 0
                        && tx.has_room(need)
                        && (shared.phase() >= Phase::Drain
                            || shared.life.pool_starved.load(Ordering::Relaxed)))
            });
            backoff.reset();
        }
    }
}
