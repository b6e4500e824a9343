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

use std::collections::VecDeque;
use std::sync::atomic::{fence, Ordering};
use std::sync::Arc;
use std::time::Duration;

use eventstream_core::dedup::{DedupRef, Lookup};
use eventstream_core::metrics::{Counter, LocalMetrics};
use eventstream_core::pipeline::{Event, Work};
use eventstream_core::record::{RecordBuilder, RecordKind, RECORD_HEADER_LEN};
use eventstream_core::ring::{Consumer, Producer};
use eventstream_core::wire::{Ack, Reason};
use eventstream_core::Class;

use crate::config::FsyncPolicy;
use crate::shared::{Shared, STOP};
use crate::storage::Log;
use crate::sys::{monotonic_ns, Backoff};

/// Bytes of records gathered before a write.
const WRITE_BYTES: usize = 1 << 20;
/// Events answered per write at most.
const MAX_PENDING: usize = 16 * 1024;
/// Duplicates waiting for their original's offset.
const MAX_DEFERRED: usize = 4096;
/// How often retention runs between rolls (for `--retention-age`).
const RETENTION_EVERY_NS: u64 = 60_000_000_000;
/// How many answers ahead storage prefetches the dedup slots it sets
/// offsets in.
const PREFETCH_AHEAD: usize = 8;
/// A failed log is tried again after this long.
const RETRY_NS: u64 = 1_000_000_000;

/// What to do for one item once its write's outcome is known.
#[derive(Clone, Copy)]
enum Pending {
    /// An event in the buffer.
    Stored {
        conn: u32,
        event_id: u64,
        ack: bool,
        offset: u64,
        class: Class,
        recv_mono: u64,
        dedup: bool,
        len: u32,
    },
    /// An answer that does not depend on the write.
    Answer {
        conn: u32,
        ack: Option<Ack>,
        counter: Counter,
    },
}

/// An answer waiting for an fsync (group commit).
#[derive(Clone, Copy)]
struct Held {
    /// Connection and ack to send, if the event asked for one.
    ack: Option<(u32, Ack)>,
    /// Class and ingest time, for the ingest-to-stored latency.
    latency: Option<(Class, u64)>,
    /// Log bytes an fsync must cover first.
    position: u64,
}

/// Everything the storage thread needs.
pub struct StorageParts {
    /// The open log.
    pub log: Log,
    /// Work from the processors, by class.
    pub rx: [Consumer<'static, Work<'static>>; 3],
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

/// The storage thread's state.
pub struct Storage {
    p: StorageParts,
    buf: Box<[u8]>,
    len: usize,
    /// Offset of the next record built.
    next: u64,
    pending: Vec<Pending>,
    deferred: VecDeque<(u32, u64, bool, Class)>,
    /// Answers waiting for an fsync covering their bytes (`--fsync always`).
    held: VecDeque<Held>,
    metrics: LocalMetrics,
    failed_until: Option<u64>,
    finished: u64,
    /// When retention runs next (it also runs at every roll).
    next_retention: u64,
}

impl Storage {
    /// The thread's state; allocates its buffers.
    pub fn new(p: StorageParts) -> Self {
        let max_record = RECORD_HEADER_LEN + p.batch_max_events as usize * p.max_frame as usize;
        let next = p.log.next_offset();
        p.shared.next_offset.store(next, Ordering::Relaxed);
        p.shared
            .log_bytes
            .store(p.log.total_bytes(), Ordering::Relaxed);
        Self {
            buf: vec![0u8; WRITE_BYTES + max_record].into_boxed_slice(),
            len: 0,
            next,
            pending: Vec::with_capacity(MAX_PENDING + p.batch_max_events as usize),
            deferred: VecDeque::with_capacity(MAX_DEFERRED),
            held: VecDeque::with_capacity(MAX_PENDING * 4),
            metrics: LocalMetrics::new(),
            failed_until: None,
            finished: 0,
            next_retention: monotonic_ns() + RETENTION_EVERY_NS,
            p,
        }
    }

    /// Runs until shutdown; the last write is fsynced before it returns.
    pub fn run(mut self) -> Result<(), String> {
        let mut backoff = Backoff::new(self.p.shared.idle_spin_ns);
        loop {
            let mut moved = self.gather();
            if self.len > 0 || !self.pending.is_empty() {
                self.write_out()?;
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
                        .log_bytes
                        .store(self.p.log.total_bytes(), Ordering::Relaxed);
                }
            }
            if moved {
                self.metrics.maybe_flush(&self.p.shared.registry, now);
                self.p
                    .shared
                    .finished
                    .store(self.finished, Ordering::Release);
                self.p.shared.ingest.wake_for_acks();
                self.p.shared.ingest.wake_for_room();
                self.p.shared.realtime.wake();
                self.p.shared.transactional.wake();
                self.p.shared.batch.wake();
                backoff.reset();
                continue;
            }
            self.metrics.flush(&self.p.shared.registry, now);
            if self.p.shared.phase() == STOP && self.inputs_empty() && self.deferred.is_empty() {
                return self.finish();
            }
            if backoff.idle() {
                for (i, rx) in self.p.rx.iter_mut().enumerate() {
                    self.p.shared.set_depth(3 + i, rx.len());
                }
                let timeout = if !self.deferred.is_empty() {
                    Some(Duration::from_millis(1))
                } else if self.p.log.has_retention_age() {
                    Some(Duration::from_nanos(
                        self.next_retention.saturating_sub(monotonic_ns()),
                    ))
                } else {
                    None
                };
                let shared = self.p.shared.clone();
                let held_at = self.held.front().map(|h| h.position);
                let rx = &mut self.p.rx;
                shared.storage.park(timeout, || {
                    rx.iter_mut().any(|r| !r.is_empty())
                        || shared.phase() == STOP
                        || held_at.is_some_and(|at| shared.synced.load(Ordering::Acquire) >= at)
                });
                backoff.reset();
            }
        }
    }

    fn inputs_empty(&mut self) -> bool {
        self.p.rx.iter_mut().all(|r| r.is_empty())
    }

    /// Final write, fsync, and every held ack released.
    fn finish(mut self) -> Result<(), String> {
        if let Err(e) = self.p.log.active().sync_data() {
            return Err(format!("fsync failed at shutdown: {e}"));
        }
        let written = self.p.shared.written.load(Ordering::Acquire);
        self.p.shared.synced.store(written, Ordering::Release);
        self.release_held();
        self.metrics.flush(&self.p.shared.registry, monotonic_ns());
        self.p
            .shared
            .finished
            .store(self.finished, Ordering::Release);
        self.p.shared.storage_done.store(true, Ordering::Release);
        self.p.shared.ingest.wake_always();
        Ok(())
    }

    /// Takes work from the rings into the buffer until the rings are empty
    /// or the buffer is full. Returns whether anything was taken.
    fn gather(&mut self) -> bool {
        let mut moved = false;
        loop {
            let mut round = false;
            for class in Class::ALL {
                while self.len < WRITE_BYTES
                    && self.pending.len() < MAX_PENDING
                    && self.deferred.len() < MAX_DEFERRED
                {
                    if !self.take_one(class) {
                        break;
                    }
                    round = true;
                }
            }
            moved |= round;
            if !round || self.len >= WRITE_BYTES || self.pending.len() >= MAX_PENDING {
                return moved;
            }
        }
    }

    /// Handles the next item of one ring; false if there is none (or a
    /// batch is not complete in the ring yet).
    fn take_one(&mut self, class: Class) -> bool {
        let rx = &mut self.p.rx[class.index()];
        let (kind, count) = match rx.peek(0) {
            None => return false,
            Some(Work::Store(_)) => (RecordKind::Single, 1u16),
            Some(Work::Batch { count }) => (RecordKind::Batch, *count),
            Some(Work::Duplicate { .. } | Work::Reject { .. }) => {
                if let Some(work) = rx.pop() {
                    self.answer_work(work);
                }
                return true;
            }
        };
        let skip = usize::from(kind == RecordKind::Batch);
        if rx.len() < skip + count as usize {
            // The batch processor is still pushing this window.
            return false;
        }
        if skip == 1 {
            let _ = rx.pop();
        }
        let offset = self.next;
        let mut builder = match RecordBuilder::new(&mut self.buf[self.len..], kind, class, 0) {
            Ok(b) => b,
            Err(_) => return false,
        };
        let mut recv_ns = None;
        for i in 0..count as u64 {
            let Some(Work::Store(ev)) = rx.pop() else {
                continue;
            };
            recv_ns.get_or_insert(ev.recv_wall_ns);
            let _ = builder.push(ev.bytes());
            self.pending.push(stored(&ev, offset + i));
        }
        builder.set_recv_ns(recv_ns.unwrap_or(0));
        if let Ok(rec) = builder.finish(offset) {
            self.len += rec.len();
            self.next += u64::from(count);
            if kind == RecordKind::Batch {
                self.metrics.add(Counter::Batches, 1);
            }
        }
        true
    }

    fn answer_work(&mut self, work: Work<'static>) {
        match work {
            Work::Duplicate {
                conn,
                event_id,
                ack,
                class,
                offset,
            } => self.answer_duplicate(conn, event_id, ack, class, offset),
            Work::Reject {
                conn,
                event_id,
                ack,
                reason,
            } => self.pending.push(Pending::Answer {
                conn,
                ack: ack.then(|| Ack::rejected(event_id, reason)),
                counter: Counter::Rejected(reason),
            }),
            Work::Store(_) | Work::Batch { .. } => {}
        }
    }

    /// DUPLICATE only once the original is written: its offset is in the
    /// table from then on. Until then the answer waits in `deferred`.
    fn answer_duplicate(
        &mut self,
        conn: u32,
        event_id: u64,
        ack: bool,
        class: Class,
        offset: Option<u64>,
    ) {
        let now_ms = monotonic_ns() / 1_000_000;
        let offset = match offset {
            Some(o) => Some(o),
            None => match self.p.dedup.lookup(event_id, now_ms) {
                Lookup::Present(Some(o)) => Some(o),
                Lookup::Present(None) => {
                    self.deferred.push_back((conn, event_id, ack, class));
                    return;
                }
                // The original's write failed: it is not in the log.
                Lookup::Absent => None,
            },
        };
        self.pending.push(match offset {
            Some(o) => Pending::Answer {
                conn,
                ack: ack.then(|| Ack::duplicate(event_id, o)),
                counter: Counter::Duplicate(class),
            },
            None => Pending::Answer {
                conn,
                ack: ack.then(|| Ack::rejected(event_id, Reason::StorageFailed)),
                counter: Counter::Rejected(Reason::StorageFailed),
            },
        });
    }

    fn retry_deferred(&mut self) -> bool {
        let n = self.deferred.len();
        for _ in 0..n {
            let Some((conn, id, ack, class)) = self.deferred.pop_front() else {
                break;
            };
            self.answer_duplicate(conn, id, ack, class, None);
        }
        if !self.pending.is_empty() {
            // Answers that became ready go out with the next write's acks;
            // with nothing to write, right away.
            if self.len == 0 {
                let _ = self.complete(true);
            }
            return self.deferred.len() < n;
        }
        false
    }

    /// Writes the buffer (one syscall) and answers everything pending.
    fn write_out(&mut self) -> Result<(), String> {
        let now = monotonic_ns();
        let mut ok = true;
        if self.len > 0 {
            let events = self.next - self.p.log.next_offset();
            ok = match self.failed_until {
                Some(t) if now < t => false,
                _ => self.try_write(events),
            };
            if ok {
                if self.failed_until.take().is_some() {
                    eprintln!("eventstream: storage recovered: writes succeed again");
                }
            } else {
                self.next = self.p.log.next_offset();
                if self.failed_until.is_none_or(|t| now >= t) {
                    self.failed_until = Some(now + RETRY_NS);
                }
            }
            self.p.shared.storage_failed.store(!ok, Ordering::Relaxed);
            self.len = 0;
        }
        self.complete(ok)
    }

    fn try_write(&mut self, events: u64) -> bool {
        let len = self.len;
        let sync_old = self.p.fsync != FsyncPolicy::Never;
        if self.p.log.needs_roll(len) {
            if let Err(e) = self.p.log.roll(sync_old) {
                eprintln!("eventstream: storage failed: cannot roll the log: {e}");
                self.p
                    .shared
                    .storage_failures
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
        }
        match self.p.log.append(&self.buf[..len], events) {
            Ok(()) => {
                let written = self
                    .p
                    .shared
                    .written
                    .fetch_add(len as u64, Ordering::AcqRel);
                let _ = written;
                self.p
                    .shared
                    .next_offset
                    .store(self.p.log.next_offset(), Ordering::Relaxed);
                self.p
                    .shared
                    .log_bytes
                    .store(self.p.log.total_bytes(), Ordering::Relaxed);
                match self.p.fsync {
                    FsyncPolicy::Always => self.p.shared.sync.wake(),
                    FsyncPolicy::Interval(_) => {
                        fence(Ordering::SeqCst);
                        if self.p.shared.sync_idle.load(Ordering::Relaxed)
                            && self.p.shared.sync_idle.swap(false, Ordering::Relaxed)
                        {
                            self.p.shared.sync.wake();
                        }
                    }
                    FsyncPolicy::Never => {}
                }
                true
            }
            Err(e) => {
                eprintln!(
                    "eventstream: storage failed: write of {len} bytes: {e}; answering STORAGE_FAILED and retrying each second"
                );
                self.p
                    .shared
                    .storage_failures
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Answers every pending item after a write that succeeded or not.
    fn complete(&mut self, ok: bool) -> Result<(), String> {
        let now = monotonic_ns();
        let position = self.p.shared.written.load(Ordering::Acquire);
        let pending = std::mem::take(&mut self.pending);
        for (i, p) in pending.iter().enumerate() {
            if let Some(Pending::Stored {
                event_id,
                dedup: true,
                ..
            }) = pending.get(i + PREFETCH_AHEAD)
            {
                self.p.dedup.prefetch(*event_id);
            }
            self.finished += 1;
            self.metrics.event();
            match *p {
                Pending::Stored {
                    conn,
                    event_id,
                    ack,
                    offset,
                    class,
                    recv_mono,
                    dedup,
                    len,
                } => {
                    if ok {
                        self.metrics.add(Counter::Stored(class), 1);
                        self.metrics.add(Counter::BytesStored, u64::from(len));
                        if dedup {
                            self.p.dedup.set_offset(event_id, offset);
                        }
                        let ack = ack.then(|| (conn, Ack::stored(event_id, offset)));
                        if self.p.fsync == FsyncPolicy::Always {
                            self.held.push_back(Held {
                                ack,
                                latency: Some((class, recv_mono)),
                                position,
                            });
                        } else {
                            self.metrics.latency(
                                &self.p.shared.registry,
                                class,
                                now.saturating_sub(recv_mono),
                            );
                            if let Some((conn, a)) = ack {
                                self.send(conn, a);
                            }
                        }
                    } else {
                        self.metrics
                            .add(Counter::Rejected(Reason::StorageFailed), 1);
                        if dedup {
                            self.p.dedup.remove(event_id);
                        }
                        if ack {
                            self.send(conn, Ack::rejected(event_id, Reason::StorageFailed));
                        }
                    }
                }
                Pending::Answer { conn, ack, counter } => {
                    self.metrics.add(counter, 1);
                    match ack {
                        // DUPLICATE means "in the log": with group commit,
                        // after an fsync covering everything written so far.
                        Some(a)
                            if self.p.fsync == FsyncPolicy::Always
                                && a.status == eventstream_core::wire::Status::Duplicate =>
                        {
                            self.held.push_back(Held {
                                ack: Some((conn, a)),
                                latency: None,
                                position,
                            });
                        }
                        Some(a) => self.send(conn, a),
                        None => {}
                    }
                }
            }
        }
        self.pending = pending;
        self.pending.clear();
        Ok(())
    }

    fn send(&mut self, conn: u32, ack: Ack) {
        let mut item = (conn, ack);
        loop {
            match self.p.acks.push(item) {
                Ok(()) => return,
                Err(back) => {
                    // Ingest always drains the ack ring (credit makes every
                    // ack fit its connection's buffer): wait for it.
                    item = back;
                    self.p.shared.ingest.wake_for_acks();
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Releases held answers whose bytes an fsync now covers.
    fn release_held(&mut self) -> bool {
        let synced = self.p.shared.synced.load(Ordering::Acquire);
        let now = monotonic_ns();
        let mut moved = false;
        while let Some(&h) = self.held.front() {
            if h.position > synced {
                break;
            }
            self.held.pop_front();
            moved = true;
            if let Some((class, recv_mono)) = h.latency {
                self.metrics.latency(
                    &self.p.shared.registry,
                    class,
                    now.saturating_sub(recv_mono),
                );
            }
            if let Some((conn, ack)) = h.ack {
                self.send(conn, ack);
            }
        }
        moved
    }
}

fn stored(ev: &Event<'_>, offset: u64) -> Pending {
    let (event_id, ack, legacy) = ev.frame().map_or((0, false, true), |f| {
        (f.event_id(), f.ack_requested(), f.is_legacy())
    });
    Pending::Stored {
        conn: ev.conn,
        event_id,
        ack,
        offset,
        class: ev.class,
        recv_mono: ev.recv_mono_ns,
        dedup: ev.class == Class::Transactional && !legacy,
        len: ev.bytes().len() as u32,
    }
}

/// Runs the sync thread: fsyncs the active segment per the policy and
/// publishes how far the log is synced. A failed fsync ends the process.
pub fn run_sync(
    policy: FsyncPolicy,
    active: Arc<std::sync::Mutex<Arc<std::fs::File>>>,
    shared: Arc<Shared>,
) {
    let mut last_sync = monotonic_ns();
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
    loop {
        if shared.phase() == STOP {
            return;
        }
        let written = shared.written.load(Ordering::Acquire);
        let synced = shared.synced.load(Ordering::Acquire);
        match policy {
            FsyncPolicy::Never => {
                shared.sync.park(None, || shared.phase() == STOP);
                continue;
            }
            FsyncPolicy::Always => {
                if written == synced {
                    shared.sync.park(None, || {
                        shared.written.load(Ordering::Acquire) != synced || shared.phase() == STOP
                    });
                    continue;
                }
            }
            FsyncPolicy::Interval(ms) => {
                if written == synced {
                    shared.sync_idle.store(true, Ordering::Relaxed);
                    shared.sync.park(None, || {
                        shared.written.load(Ordering::Acquire) != synced || shared.phase() == STOP
                    });
                    shared.sync_idle.store(false, Ordering::Relaxed);
                    continue;
                }
                let due = last_sync + ms * 1_000_000;
                let now = monotonic_ns();
                if now < due {
                    shared.sync.park(Some(Duration::from_nanos(due - now)), || {
                        shared.phase() == STOP
                    });
                    continue;
                }
            }
        }
        // Read the target before taking the file: a roll in between fsyncs
        // the old segment itself.
        let target = shared.written.load(Ordering::Acquire);
        let file = match active.lock() {
            Ok(f) => f.clone(),
            Err(p) => p.into_inner().clone(),
        };
        let t0 = monotonic_ns();
        let result = if fail_after == Some(done) {
            Err(std::io::Error::from_raw_os_error(libc::EIO))
        } else {
            file.sync_data()
        };
        done += 1;
        if let Err(e) = result {
            eprintln!("eventstream: fatal: fsync failed: {e}; exiting (start-up recovery will check the log)");
            std::process::exit(1);
        }
        let took = monotonic_ns() - t0;
        last_sync = monotonic_ns();
        shared.fsyncs.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = shared.fsync_latency.lock() {
            h.record(took);
        }
        shared.synced.fetch_max(target, Ordering::AcqRel);
        shared.storage.wake();
    }
}
