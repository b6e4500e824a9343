//! The inline layout: the three processors run on the ingest thread, into
//! the storage rings; storage is stepped here for small amounts and by its
//! own thread for large ones (`StorageMode`).

use std::io;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventstream_core::dedup::DedupRef;
use eventstream_core::pipeline::{Event, StorageItem, ToStorage, Work};
use eventstream_core::process::{
    BatchProcessor, RealtimeProcessor, Sweeper, TransactionalProcessor,
};
use eventstream_core::ring::Producer;
use eventstream_core::Class;

use super::Downstream;
use crate::processors::{sweep_step, sweeper};
use crate::shared::{Phase, Shared};
use crate::writer::{Storage, StorageMode};

/// With `StorageMode::Shared`, ingest writes at most this many events of
/// one loop itself; more wake the storage thread, so under load the two
/// threads split the work.
const INGEST_WRITE_MAX: usize = 256;

/// The processors, run by ingest itself, and storage's stepping.
pub struct Inline {
    realtime: RealtimeProcessor<'static>,
    transactional: TransactionalProcessor<'static>,
    batch: BatchProcessor<'static, Event<'static>>,
    dedup: DedupRef<'static>,
    /// Ingest -> storage rings, by class.
    storage_tx: [Producer<'static, StorageItem<'static>>; 3],
    /// Room the batch storage ring needs before a batch event is taken.
    batch_need: usize,
    sweeper: Sweeper,
    /// Storage, which ingest steps (`Ingest`, `Shared`) or only wakes.
    storage: Arc<Mutex<Storage>>,
    mode: StorageMode,
    /// Events pushed to storage since the last step.
    pushed: usize,
    shared: Arc<Shared>,
}

/// What the inline layout is built from.
pub struct InlineParts {
    /// The realtime processor.
    pub realtime: RealtimeProcessor<'static>,
    /// The transactional processor (it holds the dedup table's inserter).
    pub transactional: TransactionalProcessor<'static>,
    /// The batch processor.
    pub batch: BatchProcessor<'static, Event<'static>>,
    /// The dedup table (prefetches).
    pub dedup: DedupRef<'static>,
    /// Ingest -> storage rings, by class.
    pub storage_tx: [Producer<'static, StorageItem<'static>>; 3],
    /// The dedup sweep period.
    pub sweep_every: Duration,
    /// Storage.
    pub storage: Arc<Mutex<Storage>>,
    /// Who steps storage.
    pub mode: StorageMode,
    /// Shared state.
    pub shared: Arc<Shared>,
}

impl Inline {
    /// The layout from its parts.
    pub fn new(p: InlineParts) -> Self {
        let mut batch = p.batch;
        let batch_need = ToStorage::room_needed(&batch.windows().config());
        Self {
            realtime: p.realtime,
            transactional: p.transactional,
            batch,
            dedup: p.dedup,
            storage_tx: p.storage_tx,
            batch_need,
            sweeper: sweeper(p.sweep_every),
            storage: p.storage,
            mode: p.mode,
            pushed: 0,
            shared: p.shared,
        }
    }

    /// Whether ingest steps storage now: always with `StorageMode::Ingest`;
    /// with `Shared` while the storage thread sleeps (so the two do not
    /// take turns while both are busy) and the shutdown has not reached
    /// storage.
    fn ingest_writes(&self) -> bool {
        match self.mode {
            StorageMode::Thread => false,
            StorageMode::Ingest => true,
            StorageMode::Shared => {
                self.shared.wake.storage.is_parked() && self.shared.phase() != Phase::Stop
            }
        }
    }

    /// Timed work: windows past their age, the oldest one while draining
    /// or when the pool is empty, and the dedup sweep. Returns whether
    /// anything went to the batch storage ring.
    fn tick(&mut self, now: u64) -> bool {
        let flush = self.shared.phase() >= Phase::Drain
            || self.shared.life.pool_starved.load(Ordering::Relaxed);
        let mut moved = false;
        let [_, _, out] = &mut self.storage_tx;
        if out.has_room(self.batch_need) {
            moved = self.batch.tick(now, flush, &mut ToStorage { out });
        }
        sweep_step(&mut self.sweeper, &mut self.transactional, now);
        moved
    }

    /// Writes what the processors produced (`pushed` events), when ingest
    /// writes (`ingest_writes`); with `Shared`, only up to
    /// `INGEST_WRITE_MAX` events, and the storage thread is woken for more.
    /// Otherwise the storage thread is woken. Returns whether it wrote.
    fn step_storage(&mut self, pushed: usize) -> bool {
        let mode = self.mode;
        let mut left = pushed > 0;
        let small = mode == StorageMode::Ingest || pushed <= INGEST_WRITE_MAX;
        let mut stepped = false;
        if small && self.ingest_writes() {
            if let Ok(mut s) = self.storage.try_lock() {
                let budget = match mode {
                    StorageMode::Ingest => usize::MAX,
                    _ => INGEST_WRITE_MAX,
                };
                stepped = (pushed > 0 || s.has_work()) && s.step(budget);
                left = mode == StorageMode::Shared && s.has_work();
            }
        }
        if left && mode != StorageMode::Ingest {
            self.shared.wake.storage.wake();
        }
        stepped
    }
}

impl Downstream for Inline {
    fn room(&mut self) -> bool {
        let need = self.batch_need;
        let [rt, tx, b] = &mut self.storage_tx;
        rt.has_room(1) && tx.has_room(1) && b.has_room(need)
    }

    fn push(&mut self, class: Class, ev: Event<'static>, now: u64) -> bool {
        let now_ms = now / 1_000_000;
        self.pushed += 1;
        let work = match class {
            Class::Batch => {
                let [_, _, out] = &mut self.storage_tx;
                self.batch.handle(ev, now, &mut (), &mut ToStorage { out });
                return true;
            }
            Class::Realtime => Work::decided(ev, |f| self.realtime.handle(f, now_ms, &mut ())),
            Class::Transactional => {
                Work::decided_hinted(ev, |f| self.transactional.handle_hinted(f, now_ms, &mut ()))
            }
        };
        // Room was checked before decoding.
        self.storage_tx
            .get_mut(class.index())
            .is_some_and(|out| out.push(StorageItem::from(work)).is_ok())
    }

    fn wants_prefetch(&self) -> bool {
        true
    }

    fn prefetch(&self, class: Class, event_id: u64) {
        match class {
            Class::Realtime => self.dedup.prefetch(event_id),
            Class::Transactional => self.dedup.prefetch_insert(event_id),
            Class::Batch => {}
        }
    }

    fn step(&mut self, now: u64) -> bool {
        if self.tick(now) {
            // A closed window: at most a batch of events.
            self.pushed += 1;
        }
        let pushed = std::mem::take(&mut self.pushed);
        self.step_storage(pushed)
    }

    fn next_deadline(&mut self, now: u64) -> Option<u64> {
        // The next window to close by age, or the dedup sweep; while
        // draining, every millisecond until the windows are flushed.
        let mut next = self
            .batch
            .next_deadline()
            .unwrap_or(u64::MAX)
            .min(self.sweeper.next_deadline());
        if self.shared.phase() >= Phase::Drain && self.batch.held() > 0 {
            next = next.min(now + 1_000_000);
        }
        if self.ingest_writes() {
            if let Some(t) = self.storage.try_lock().ok().and_then(|s| s.timeout(now)) {
                next = next.min(now.saturating_add(t.as_nanos().min(u64::MAX as u128) as u64));
            }
        }
        (next != u64::MAX).then_some(next)
    }

    fn has_work(&mut self) -> bool {
        let finishing = self.mode == StorageMode::Ingest
            && self.shared.phase() == Phase::Stop
            && !self.shared.life.storage_done.load(Ordering::Acquire);
        finishing
            || (self.ingest_writes() && self.storage.try_lock().is_ok_and(|mut s| s.has_work()))
    }

    fn finish(&mut self) -> io::Result<bool> {
        if self.mode != StorageMode::Ingest {
            return Ok(false);
        }
        // Storage has no thread: its final fsync and held acks.
        match self.storage.try_lock() {
            Ok(mut s) => Ok(s.done() && s.finish().map_err(io::Error::other)?),
            Err(_) => Ok(false),
        }
    }
}
