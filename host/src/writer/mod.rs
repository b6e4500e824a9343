//! The storage thread and the sync thread.
//!
//! Storage takes the processors' work, builds log records into one large
//! buffer, writes the buffer with one syscall as soon as its input runs dry
//! (so batching grows with load and latency stays low when quiet), then
//! answers every event in it. With `--fsync always` the acks wait for the
//! sync thread's fsync covering their bytes (group commit).
//!
//! Costs per event: no allocation, no lock, no syscall; the buffers and
//! queues are sized at start.
//!
//! Submodules: `answer` (the write path: records answered, written, acks
//! released) and `sync` (the sync and prefill threads).

use std::collections::VecDeque;
use std::fs::File;
use std::sync::atomic::{fence, Ordering};
use std::sync::{Arc, Mutex, TryLockError};
use std::time::Duration;

use eventstream_core::answer::{AckOut, Answers, Deferred, Fifo, Held, Owed};
use eventstream_core::dedup::DedupRef;
use eventstream_core::metrics::{Counter, FINE};
use eventstream_core::pipeline::{peek_event, peek_kind, take_unit, Event, StorageItem, Unit};
use eventstream_core::record::{RecordBuilder, RecordKind, RECORD_HEADER_LEN};
use eventstream_core::ring::{Consumer, Producer};
use eventstream_core::wire::Ack;
use eventstream_core::Class;

use crate::settings::{DropPages, FsyncPolicy};
use crate::shared::{Phase, RingGauge, Shared};
use crate::storage::{drop_cached, start_writeback, Log, LogTail, Prefill, SyncTargets};
use crate::sys::{monotonic_ns, Backoff};

mod answer;
mod sync;

pub use sync::{drop_min_rate, run_prefill, run_sync};

/// Bytes of records gathered before a write.
const WRITE_BYTES: usize = 1 << 20;
/// Events answered per write at most.
const MAX_PENDING: usize = 16 * 1024;
/// Duplicates waiting for their original's offset.
const MAX_DEFERRED: usize = 4096;
/// How often retention runs between rolls (for `--retention-age`).
const RETENTION_EVERY_NS: u64 = 60_000_000_000;
/// How many items ahead storage asks the CPU to start loading what it
/// reads next: the frame bytes it copies (ring items), the dedup slots it
/// sets offsets in (answers).
const PREFETCH_AHEAD: usize = 8;
/// A failed log is tried again after this long.
const RETRY_NS: u64 = 1_000_000_000;
/// How far behind the newest writeback range the log's cached pages are
/// dropped: four ranges back (1 MiB each), whose writeback has normally
/// finished by then; a page still under writeback just stays cached.
const DROP_LAG: u64 = 4 << 20;
/// How far behind the last drop a drop reaches again, for pages that were
/// still under writeback then (sixteen 1 MiB ranges).
const DROP_RETRY: u64 = 16 << 20;
/// The log's pages are dropped only while appends run at least this fast
/// (bytes per second, measured between writeback kicks; the default of
/// `--drop-written-pages`). There dropped pages come back warm for the
/// next appends within milliseconds: in closed loops the server used 12.4 s
/// of CPU against 14.1 s without the drop. Below it (at 100,000 events/s
/// the log grows about 30 MB/s) dropping raised the ack p99 (4.6-6.2 ms,
/// once 34.6 ms, against 1.4-4.3 ms), so those pages are left to the
/// kernel, which frees the oldest when it needs the memory.
const DROP_MIN_RATE: u64 = 96 << 20;

/// A queue that grows instead of refusing (the answers' deferred and held
/// queues). Sized at start for the common case; it grows only if more
/// duplicates wait for their originals, or more acks for an fsync, than
/// that.
pub struct Growable<T>(VecDeque<T>);

impl<T> Growable<T> {
    fn with_capacity(n: usize) -> Self {
        Self(VecDeque::with_capacity(n))
    }
}

impl<T> Fifo<T> for Growable<T> {
    fn push_back(&mut self, item: T) -> Result<(), T> {
        self.0.push_back(item);
        Ok(())
    }
    fn pop_front(&mut self) -> Option<T> {
        self.0.pop_front()
    }
    fn front(&self) -> Option<&T> {
        self.0.front()
    }
    fn len(&self) -> usize {
        self.0.len()
    }
    fn is_full(&self) -> bool {
        false
    }
}

/// The storage thread's answers (the core's state machine, on growable
/// queues).
type StorageAnswers = Answers<'static, Growable<Deferred>, Growable<Held>, 256, FINE>;

/// Everything the storage thread needs.
pub struct StorageParts {
    /// The open log.
    pub log: Log,
    /// Work from the processors, by class.
    pub rx: [Consumer<'static, StorageItem<'static>>; 3],
    /// Acks to ingest.
    pub acks: Producer<'static, (u32, Ack)>,
    /// The dedup table (offsets, removals, lookups).
    pub dedup: DedupRef<'static>,
    /// fsync policy.
    pub fsync: FsyncPolicy,
    /// Largest frame (sizes the buffer).
    pub max_frame: u32,
    /// Largest batch (sizes the buffer).
    pub batch_max_events: u32,
    /// Shared state.
    pub shared: Arc<Shared>,
}

/// Who runs storage's steps (`serve --storage-thread`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageMode {
    /// Its own thread only.
    Thread,
    /// Ingest only, once per loop after the processors: no storage thread.
    Ingest,
    /// Ingest writes small amounts itself while the storage thread sleeps
    /// (no hand-off, no wake-ups), and wakes the thread for large ones.
    Shared,
}

/// Storage's state: stepped by its thread or by ingest (`StorageMode`).
pub struct Storage {
    p: StorageParts,
    buf: Box<[u8]>,
    len: usize,
    /// Offset of the next record built.
    next: u64,
    /// What the buffer's events and answers are owed once it is written.
    pending: Vec<Owed>,
    /// Deferred duplicates, answers held for an fsync (`--fsync always`),
    /// the metrics.
    answers: StorageAnswers,
    failed_until: Option<u64>,
    /// When retention runs next (it also runs at every roll).
    next_retention: u64,
    /// The shutdown's final fsync is done.
    final_synced: bool,
}

impl Storage {
    /// The thread's state; allocates its buffers.
    pub fn new(p: StorageParts) -> Self {
        let max_record = RECORD_HEADER_LEN + p.batch_max_events as usize * p.max_frame as usize;
        let next = p.log.next_offset();
        p.shared.gauges.next_offset.store(next, Ordering::Relaxed);
        p.shared
            .gauges
            .log_bytes
            .store(p.log.total_bytes(), Ordering::Relaxed);
        Self {
            buf: vec![0u8; WRITE_BYTES + max_record].into_boxed_slice(),
            len: 0,
            next,
            pending: Vec::with_capacity(MAX_PENDING + p.batch_max_events as usize),
            answers: Answers::new(
                p.dedup,
                p.shared.registry,
                Growable::with_capacity(MAX_DEFERRED),
                Growable::with_capacity(MAX_PENDING * 4),
                p.fsync == FsyncPolicy::Always,
            ),
            failed_until: None,
            next_retention: monotonic_ns() + RETENTION_EVERY_NS,
            final_synced: false,
            p,
        }
    }

    /// Runs the storage thread until shutdown; the last write is fsynced
    /// before it returns. Ingest may take turns (`StorageMode::Shared`):
    /// whoever holds the lock steps, and nobody waits for it. A failed
    /// `try_lock` means ingest is writing right now; the thread looks again
    /// when woken.
    pub fn run_thread(storage: Arc<Mutex<Storage>>, shared: Arc<Shared>) -> Result<(), String> {
        let mut backoff = Backoff::new(shared.idle_spin_ns);
        loop {
            let (moved, done) = match storage.try_lock() {
                Ok(mut s) => {
                    let moved = s.step(usize::MAX);
                    (moved, !moved && s.done())
                }
                Err(TryLockError::WouldBlock) => (false, false),
                Err(TryLockError::Poisoned(_)) => return Err("storage state poisoned".into()),
            };
            if moved {
                shared.wake.ingest.wake_for_acks();
                shared.wake.ingest.wake_for_room();
                shared.wake.realtime.wake();
                shared.wake.transactional.wake();
                shared.wake.batch.wake();
                backoff.reset();
                continue;
            }
            if done {
                let mut s = storage.lock().map_err(|_| "storage state poisoned")?;
                // Ingest drains the ack ring meanwhile.
                while !s.finish()? {
                    shared.wake.ingest.wake_for_acks();
                    std::thread::yield_now();
                }
                return Ok(());
            }
            if backoff.idle() {
                let timeout = match storage.try_lock() {
                    Ok(mut s) => {
                        for (i, rx) in s.p.rx.iter_mut().enumerate() {
                            shared
                                .gauges
                                .set_depth(RingGauge::Storage(Class::ALL[i]), rx.len());
                        }
                        s.timeout(monotonic_ns())
                    }
                    Err(_) => Some(Duration::from_millis(1)),
                };
                shared.wake.storage.park(timeout, || {
                    shared.phase() == Phase::Stop
                        || storage.try_lock().is_ok_and(|mut s| s.has_work())
                });
                backoff.reset();
            }
        }
    }

    /// One round of storage's work: takes what the rings hold, writes it
    /// (one syscall), answers it, retries deferred duplicates, releases the
    /// acks an fsync now covers, and runs retention when it is due. Returns
    /// whether anything moved. It takes at most `max_items` items from the
    /// rings. The storage thread loops on it; ingest calls it once per loop
    /// when it writes itself (`StorageMode`).
    pub fn step(&mut self, max_items: usize) -> bool {
        let mut moved = self.gather(max_items);
        if self.len > 0 || !self.pending.is_empty() {
            self.write_out();
            moved = true;
        }
        moved |= self.retry_deferred();
        moved |= self.release_held();
        let now = monotonic_ns();
        if now >= self.next_retention {
            self.next_retention = now + RETENTION_EVERY_NS;
            if self.p.log.apply_retention() > 0 {
                self.p
                    .shared
                    .gauges
                    .log_bytes
                    .store(self.p.log.total_bytes(), Ordering::Relaxed);
                // The directory's fsync is owed to the sync thread.
                self.p.shared.wake.sync.wake();
            }
        }
        if moved {
            self.p
                .shared
                .life
                .finished
                .store(self.answers.settled(), Ordering::Release);
        }
        // With the rings empty nothing may call `step` again until new
        // input (ingest steps only when there is work), so what this step
        // counted is published now, not at the next traffic.
        let busy = moved && !self.inputs_empty();
        self.answers.flush_metrics(now, busy);
        moved
    }

    /// Whether `step` has work without new input: items in the rings, or
    /// held acks that an fsync now covers.
    pub fn has_work(&mut self) -> bool {
        let synced = self.p.shared.progress.synced.load(Ordering::Acquire);
        !self.inputs_empty() || self.answers.held_ready(synced)
    }

    /// How long storage may sleep before its timed work (deferred
    /// duplicates, retention by age); None: until new input.
    pub fn timeout(&self, now: u64) -> Option<Duration> {
        // Held acks: a safety net under the sync thread's wake-up, for the
        // moment ingest and the storage thread hand the work over.
        if self.answers.deferred() > 0 || self.answers.held() > 0 {
            Some(Duration::from_millis(1))
        } else if self.p.log.has_retention_age() {
            Some(Duration::from_nanos(
                self.next_retention.saturating_sub(now),
            ))
        } else {
            None
        }
    }

    /// Whether the shutdown has reached storage and nothing is left for it:
    /// time for `finish`.
    pub fn done(&mut self) -> bool {
        self.p.shared.phase() == Phase::Stop && self.inputs_empty() && self.answers.deferred() == 0
    }

    fn inputs_empty(&mut self) -> bool {
        self.p.rx.iter_mut().all(|r| r.is_empty())
    }

    /// The shutdown's last work: a final fsync (on the first call), then
    /// the held acks it covers. True, with `storage_done` set, once every
    /// ack is out; on the ingest thread, false while they wait for room in
    /// the ack ring (call again after ingest took acks out).
    pub fn finish(&mut self) -> Result<bool, String> {
        if !self.final_synced {
            if let Err(e) = self.p.log.sync_targets().sync() {
                return Err(format!("fsync failed at shutdown: {e}"));
            }
            let written = self.p.shared.progress.written.load(Ordering::Acquire);
            self.p
                .shared
                .progress
                .synced
                .store(written, Ordering::Release);
            self.final_synced = true;
            // A segment made ahead of use ends with its last record on a
            // clean stop (start-up would cut the zeros otherwise).
            if let Err(e) = self.p.log.cut_tail(true) {
                eprintln!("eventstream: cannot cut the log's unused tail at shutdown: {e}");
            }
        }
        self.release_held();
        if self.answers.held() > 0 {
            return Ok(false);
        }
        self.answers.flush_metrics(monotonic_ns(), false);
        self.p
            .shared
            .life
            .finished
            .store(self.answers.settled(), Ordering::Release);
        self.p
            .shared
            .life
            .storage_done
            .store(true, Ordering::Release);
        self.p.shared.wake.ingest.wake_always();
        Ok(true)
    }

    /// Takes work from the rings into the buffer until the rings are empty
    /// or the buffer is full. Returns whether anything was taken.
    fn gather(&mut self, max_items: usize) -> bool {
        let mut moved = false;
        let max_pending = self.pending_limit().min(max_items);
        loop {
            let mut round = false;
            for class in Class::ALL {
                while self.len < WRITE_BYTES
                    && self.pending.len() < max_pending
                    && self.answers.deferred() < MAX_DEFERRED
                {
                    if !self.take_one(class) {
                        break;
                    }
                    round = true;
                }
            }
            moved |= round;
            if !round || self.len >= WRITE_BYTES || self.pending.len() >= max_pending {
                return moved;
            }
        }
    }

    /// Items one write answers at most: also what the ack ring has room
    /// for (each item is at most one ack, and one more take can add a whole
    /// batch), so a step never waits for ingest to take acks out: ingest
    /// may be the thread running it.
    fn pending_limit(&mut self) -> usize {
        let room = self.p.acks.free_len();
        room.saturating_sub(self.p.batch_max_events as usize + 1)
            .min(MAX_PENDING)
    }

    /// Handles the next unit of one ring (an event, a whole batch, or an
    /// answer); false if there is none.
    fn take_one(&mut self, class: Class) -> bool {
        let Storage {
            p,
            buf,
            len,
            next,
            pending,
            answers,
            ..
        } = self;
        let rx = &mut p.rx[class.index()];
        // Under load the frames have waited in the pool long enough to leave
        // the caches; without this hint each copy would start with a wait
        // for memory.
        if let Some(ahead) = peek_event(rx, PREFETCH_AHEAD) {
            ahead.prefetch();
        }
        // The kind is known from the ring before anything is taken, so the
        // record is begun first: nothing leaves the ring unless it can be
        // written.
        let kind = match peek_kind(rx) {
            None => return false,
            Some(kind) => kind,
        };
        let offset = *next;
        let builder = match kind {
            Some(kind) => match RecordBuilder::new(&mut buf[*len..], kind, class, 0) {
                Ok(b) => Some(b),
                Err(_) => return false,
            },
            None => None,
        };
        let unit = match take_unit(rx) {
            None => return false,
            Some(Unit::Answer(answer)) => {
                if let Some(owed) = answers.outcome(answer, monotonic_ns() / 1_000_000) {
                    pending.push(owed);
                }
                return true;
            }
            Some(unit) => unit,
        };
        let (Some(mut builder), Some(kind)) = (builder, kind) else {
            return true;
        };
        let mut recv_ns = None;
        let mut count = 0u64;
        let mut add = |ev: Event<'static>| {
            recv_ns.get_or_insert(ev.recv_wall_ns);
            let _ = builder.push(ev.bytes());
            pending.push(Owed::stored(&ev, offset + count));
            count += 1;
        };
        match unit {
            Unit::Single(ev) => add(ev),
            Unit::Batch(mut run) => {
                while let Some(ev) = run.next() {
                    if let Some(ahead) = run.peek_ahead(PREFETCH_AHEAD) {
                        ahead.prefetch();
                    }
                    add(ev);
                }
            }
            Unit::Answer(_) => {}
        }
        builder.set_recv_ns(recv_ns.unwrap_or(0));
        if let Ok(rec) = builder.finish(offset) {
            *len += rec.len();
            *next += count;
            if kind == RecordKind::Batch {
                answers.metrics().add(Counter::Batches, 1);
            }
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::sync::appends_fast;
    use super::*;

    #[test]
    fn appends_are_fast_from_the_least_rate_up() {
        let r = DROP_MIN_RATE;
        // Exactly the rate, over one second and over 1 ms.
        assert!(appends_fast(r, 1_000_000_000, r));
        assert!(appends_fast(r / 1000 + 1, 1_000_000, r));
        // Just under it.
        assert!(!appends_fast(r - 1, 1_000_000_000, r));
        // 1 MiB every 33 ms (the log at 100,000 events/s): slow.
        assert!(!appends_fast(1 << 20, 33_000_000, r));
        // 1 MiB every 3 ms (a closed loop): fast.
        assert!(appends_fast(1 << 20, 3_000_000, r));
        // No time passed: fast; no bytes: slow unless the rate is 0.
        assert!(appends_fast(1, 0, r));
        assert!(!appends_fast(0, 1, r));
        assert!(appends_fast(0, 1, 0));
        // No overflow at the extremes.
        assert!(appends_fast(u64::MAX, u64::MAX, 1_000_000_000));
        assert!(!appends_fast(u64::MAX - 1, u64::MAX, 1_000_000_000));
        assert!(!appends_fast(u64::MAX, u64::MAX, u64::MAX));
        assert!(appends_fast(u64::MAX, 1, u64::MAX));
    }

    #[test]
    fn the_flag_maps_to_the_least_rate() {
        assert_eq!(drop_min_rate(DropPages::Auto), Some(DROP_MIN_RATE));
        assert_eq!(drop_min_rate(DropPages::Always), Some(0));
        assert_eq!(drop_min_rate(DropPages::Never), None);
    }
}
