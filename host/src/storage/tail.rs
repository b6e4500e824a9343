//! What the log's writers publish to its readers (PROTOCOL.md section 7):
//! the segments that exist, how far records are written, how far they are
//! visible and how far durable, and the wake-up of the reader thread.
//!
//! Positions are published with a sequence lock (three words written by
//! one thread at a time, read by any): the storage thread publishes the
//! written end after each write; under `--fsync always` the sync thread
//! publishes the durable end after each fsync, and that is the visible
//! end; under the other policies the written end is visible. Segments
//! change only at a roll or a retention delete (a lock there, never per
//! write).
//!
//! Costs per write: three relaxed stores and two sequence stores, one
//! fence and one load; an eventfd write only when a reader waits for new
//! records.

use std::path::PathBuf;
use std::sync::atomic::{fence, AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use super::locked;
use crate::sys::EventFd;

/// A position in the log: the segment, the byte end of whole records in
/// it, and the offset that follows them.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Position {
    /// Base offset of the segment.
    pub base: u64,
    /// Bytes of the segment up to the end of the last record counted.
    pub bytes: u64,
    /// The offset after the last event counted.
    pub offset: u64,
}

/// A [`Position`] under a sequence lock: one writer at a time (callers
/// serialize), any number of readers, no lock on either side.
#[derive(Default)]
pub struct Published {
    seq: AtomicU64,
    base: AtomicU64,
    bytes: AtomicU64,
    offset: AtomicU64,
}

impl Published {
    /// Publishes `p`. Only one thread may store at a time.
    pub fn store(&self, p: Position) {
        let s = self.seq.load(Ordering::Relaxed);
        self.seq.store(s.wrapping_add(1), Ordering::Relaxed);
        fence(Ordering::Release);
        self.base.store(p.base, Ordering::Relaxed);
        self.bytes.store(p.bytes, Ordering::Relaxed);
        self.offset.store(p.offset, Ordering::Relaxed);
        self.seq.store(s.wrapping_add(2), Ordering::Release);
    }

    /// The last position published whole.
    pub fn load(&self) -> Position {
        loop {
            let s1 = self.seq.load(Ordering::Acquire);
            if s1 & 1 == 1 {
                std::hint::spin_loop();
                continue;
            }
            let p = Position {
                base: self.base.load(Ordering::Relaxed),
                bytes: self.bytes.load(Ordering::Relaxed),
                offset: self.offset.load(Ordering::Relaxed),
            };
            fence(Ordering::Acquire);
            if self.seq.load(Ordering::Relaxed) == s1 {
                return p;
            }
        }
    }
}

/// One segment as readers see it.
#[derive(Clone, Debug)]
pub struct SegmentEntry {
    /// Offset of its first event.
    pub base: u64,
    /// Its file.
    pub path: PathBuf,
    /// Its length once closed (a roll made a newer one); None while active.
    pub closed_len: Option<u64>,
}

/// The segments, and a count that changes whenever they do.
#[derive(Default)]
struct Catalog {
    segments: Vec<SegmentEntry>,
    generation: u64,
}

/// What readers need of the log; shared by the storage, sync, reader and
/// commit threads.
pub struct LogTail {
    /// The end of the records written (storage thread).
    pub written: Published,
    /// The end of the records an fsync covered (sync and commit threads,
    /// serialized by `durable_lock`).
    pub durable: Published,
    durable_lock: Mutex<()>,
    /// Under `--fsync always` only durable records are visible.
    always: bool,
    catalog: Mutex<Catalog>,
    generation: AtomicU64,
    /// The reader thread sleeps waiting for records past the visible end.
    readers_waiting: AtomicBool,
    waker: EventFd,
    /// Where the slowest reader is: segment base and byte position
    /// (`u64::MAX` base: no reader). The page-drop policy keeps what lies
    /// past it.
    low_base: AtomicU64,
    low_pos: AtomicU64,
    /// The forwarder's first event not yet acked (`u64::MAX`: no
    /// forwarder): retention keeps the segments from it on.
    forward_hold: AtomicU64,
}

impl LogTail {
    /// The tail of a log whose segments are `segments` (the last active)
    /// and whose records end at `end`.
    pub fn new(segments: Vec<SegmentEntry>, end: Position, always: bool) -> std::io::Result<Self> {
        let tail = LogTail {
            written: Published::default(),
            durable: Published::default(),
            durable_lock: Mutex::new(()),
            always,
            catalog: Mutex::new(Catalog {
                segments,
                generation: 1,
            }),
            generation: AtomicU64::new(1),
            readers_waiting: AtomicBool::new(false),
            waker: EventFd::new()?,
            low_base: AtomicU64::new(u64::MAX),
            low_pos: AtomicU64::new(0),
            forward_hold: AtomicU64::new(u64::MAX),
        };
        tail.written.store(end);
        // What start-up recovered is synced (recovery fsyncs it).
        tail.durable.store(end);
        Ok(tail)
    }

    /// The end of the records readers may see: the written end, or under
    /// `--fsync always` the durable one.
    pub fn visible(&self) -> Position {
        if self.always {
            self.durable.load()
        } else {
            self.written.load()
        }
    }

    /// Storage: records up to `p` are written.
    pub fn publish_written(&self, p: Position) {
        self.written.store(p);
        if !self.always {
            self.wake_readers();
        }
    }

    /// Sync or commit thread: records up to `p` are durable (a `p` below
    /// the one published is ignored).
    pub fn publish_durable(&self, p: Position) {
        let guard = locked(&self.durable_lock);
        let now = self.durable.load();
        if (p.offset, p.base) > (now.offset, now.base) {
            self.durable.store(p);
        }
        drop(guard);
        if self.always {
            self.wake_readers();
        }
    }

    fn wake_readers(&self) {
        fence(Ordering::SeqCst);
        if self.readers_waiting.load(Ordering::Relaxed)
            && self.readers_waiting.swap(false, Ordering::Relaxed)
        {
            self.waker.notify();
        }
    }

    /// The reader thread: about to sleep until the visible end passes
    /// `seen` offset. Returns false (do not sleep) if it passed already.
    pub fn prepare_wait(&self, seen: u64) -> bool {
        self.readers_waiting.store(true, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if self.visible().offset != seen {
            self.readers_waiting.store(false, Ordering::Relaxed);
            return false;
        }
        true
    }

    /// The eventfd the reader thread waits on.
    pub fn waker(&self) -> &EventFd {
        &self.waker
    }

    /// A copy of the segments (oldest first) and their generation.
    pub fn segments(&self) -> (Vec<SegmentEntry>, u64) {
        let c = locked(&self.catalog);
        (c.segments.clone(), c.generation)
    }

    /// Changes whenever the segments do (one load, to check cheaply).
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// The first retained offset.
    pub fn first_offset(&self) -> u64 {
        locked(&self.catalog).segments.first().map_or(0, |s| s.base)
    }

    pub(super) fn rolled(&self, closed_len: u64, new: SegmentEntry) {
        let mut c = locked(&self.catalog);
        if let Some(last) = c.segments.last_mut() {
            last.closed_len = Some(closed_len);
        }
        c.segments.push(new);
        c.generation += 1;
        self.generation.store(c.generation, Ordering::Release);
    }

    pub(super) fn deleted(&self, base: u64) {
        let mut c = locked(&self.catalog);
        c.segments.retain(|s| s.base != base);
        c.generation += 1;
        self.generation.store(c.generation, Ordering::Release);
    }

    /// The reader thread: where its slowest session is (`None`: no session).
    pub fn set_low_water(&self, low: Option<(u64, u64)>) {
        let (base, pos) = low.unwrap_or((u64::MAX, 0));
        self.low_pos.store(pos, Ordering::Relaxed);
        self.low_base.store(base, Ordering::Release);
    }

    /// The forwarder: every event below `next` is forwarded (`None`: no
    /// forwarder).
    pub fn set_forward_hold(&self, next: Option<u64>) {
        self.forward_hold
            .store(next.unwrap_or(u64::MAX), Ordering::Relaxed);
    }

    /// The first offset the forwarder still needs (`u64::MAX`: none).
    pub fn forward_hold(&self) -> u64 {
        self.forward_hold.load(Ordering::Relaxed)
    }

    /// The page-drop policy: how far into the segment `base` pages may be
    /// dropped without dropping what a reader has not read yet.
    pub fn drop_limit(&self, base: u64, limit: u64) -> u64 {
        let low_base = self.low_base.load(Ordering::Acquire);
        if low_base == u64::MAX || low_base > base {
            limit
        } else if low_base == base {
            limit.min(self.low_pos.load(Ordering::Relaxed))
        } else {
            0
        }
    }
}
