//! Every stage of the engine wired on one thread: decode and route into the
//! class rings, run the three processors, and hand their outcomes straight
//! to storage, which builds log records and acks. [`Pipeline::poll`] runs
//! each stage once; the firmware runs it in its main loop. The host runs
//! the same stages on threads, with a storage ring behind each processor
//! ([`Work`], [`ToStorage`]).
//!
//! Costs: no allocation; one copy of each frame into a pool slot, one into
//! the record buffer. Full rings or an empty pool push back: `feed` returns
//! before the bytes it cannot place, and they are fed again later.

use crate::answer::{Answers, NoGroupCommit};
use crate::batch::BatchWindows;
use crate::dedup::{DedupHint, DedupRef};
use crate::event::Class;
use crate::metrics::{Counter, Registry, FINE};
use crate::pool::{Acquirer, EventRef, SlotMut};
use crate::process::{BatchProcessor, EventHook, RealtimeProcessor, TransactionalProcessor};
use crate::record::RECORD_HEADER_LEN;
use crate::ring::{Consumer, Producer};
use crate::route::TopicTable;
use crate::wire::{Ack, Decoded, Frame, FrameHead, Limits, Reason, StreamDecoder};

mod store;
mod unit;
mod work;

use store::Store;
pub use unit::{peek_event, peek_kind, take_unit, BatchRun, StorageItem, ToStorage, Unit};
pub use work::{Answer, Event, Work};

/// Monotonic and wall time, provided by the embedder.
pub trait Clock {
    /// Monotonic nanoseconds (dedup windows, batch ages, latencies).
    fn monotonic_ns(&self) -> u64;
    /// Wall-clock unix nanoseconds (`recv_ns` of records).
    fn wall_ns(&self) -> u64;
}

/// The log could not take a record (disk full, I/O error).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StorageFailed;

/// Where stored records and acks go, provided by the embedder.
pub trait Sink {
    /// The log offset the next appended event gets.
    fn next_offset(&self) -> u64;
    /// Appends one finished record holding `events` events; on success the
    /// next offset advances by `events`.
    fn append(&mut self, record: &[u8], events: u16) -> Result<(), StorageFailed>;
    /// Delivers an ack to connection `conn`.
    fn ack(&mut self, conn: u32, ack: Ack);
}

/// Routing of events to classes (a [`TopicTable`] of any capacity).
pub trait Router {
    /// The class of an event of `topic` sent at `priority`.
    fn route(&self, topic: &[u8], priority: crate::Priority) -> Class;
}

impl<const N: usize> Router for TopicTable<N> {
    fn route(&self, topic: &[u8], priority: crate::Priority) -> Class {
        TopicTable::route(self, topic, priority)
    }
}

/// What to do when a ring or the pool is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum WhenFull {
    /// Stop reading (the default): the producer is pushed back.
    Backpressure,
    /// Answer valid frames REJECTED OVERLOADED when the pool or their
    /// class ring is full at that moment, without running the later stages
    /// to make room (the caller's `poll` does that).
    Reject,
}

/// Why a valid frame is not taken, if it is not: a graceful shutdown first,
/// then a full pool or class ring (with reject-when-full). The rule of
/// PROTOCOL.md, shared by every ingest (this pipeline and the host's).
pub fn refusal(shutting_down: bool, room: bool) -> Option<Reason> {
    if shutting_down {
        Some(Reason::ShuttingDown)
    } else if !room {
        Some(Reason::Overloaded)
    } else {
        None
    }
}

/// A ring's two halves.
pub type RingPair<'r, T> = (Producer<'r, T>, Consumer<'r, T>);

/// Everything a pipeline is built from. `B` is the bucket count of the
/// registry's histograms ([`FINE`] by default).
pub struct Parts<'a, 'r, 'p, R, C, S, H, const B: usize = FINE> {
    /// Frame limits.
    pub limits: Limits,
    /// Topic-priority routing.
    pub router: &'a R,
    /// The pool's acquirer.
    pub acquirer: Acquirer<'p>,
    /// Ingest -> processor rings, by class: the pipeline's only rings (on
    /// one thread, the processors hand their outcomes straight to storage).
    pub class_rings: [RingPair<'r, Event<'p>>; 3],
    /// The dedup table; the pipeline takes its single inserter (for the
    /// transactional processor), so no other thread may insert into it.
    pub dedup: DedupRef<'a>,
    /// The batch windows.
    pub windows: BatchWindows<'a, Event<'p>>,
    /// Buffer for one record: 28 + max_events * max_frame bytes at least.
    pub record_buf: &'a mut [u8],
    /// Shared metrics totals.
    pub registry: &'a Registry<B>,
    /// Time.
    pub clock: C,
    /// Log and acks.
    pub sink: S,
    /// Business logic hook.
    pub hook: H,
    /// Full rings or pool: push back or reject.
    pub when_full: WhenFull,
}

/// Why a pipeline could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PartsError {
    /// The record buffer cannot hold a full batch of maximal frames.
    RecordBufferTooSmall,
    /// The pool's slots are smaller than the largest frame the limits let
    /// in.
    SlotTooSmall,
    /// The dedup table's single inserter was taken already.
    InserterTaken,
}

/// Result of [`Pipeline::feed`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Fed {
    /// Bytes taken; feed the rest again later.
    pub consumed: usize,
    /// Stopped because the pool or a ring is full.
    pub blocked: bool,
    /// The connection must be closed (FATAL sent, or a legacy close).
    pub close: bool,
}

/// The whole engine on one thread.
///
/// ```
/// use eventstream_core::batch::{BatchConfig, BatchWindows, Entry, WindowMeta};
/// use eventstream_core::dedup::{DedupConfig, DedupTable};
/// use eventstream_core::metrics::Registry;
/// use eventstream_core::pipeline::{Clock, Event, Parts, Pipeline, Sink, StorageFailed, WhenFull};
/// use eventstream_core::pool::EventPool;
/// use eventstream_core::ring::Ring;
/// use eventstream_core::route::TopicTable;
/// use eventstream_core::wire::{Ack, FrameRepr, Limits, Status, StreamDecoder, FLAG_ACK};
/// use eventstream_core::Priority;
///
/// struct Clk;
/// impl Clock for Clk {
///     fn monotonic_ns(&self) -> u64 { 1_000_000 }
///     fn wall_ns(&self) -> u64 { 1_764_253_200_000_000_000 }
/// }
/// /// A log in memory: records and acks.
/// #[derive(Default)]
/// struct Mem { next: u64, records: usize, acks: Vec<Ack> }
/// impl Sink for Mem {
///     fn next_offset(&self) -> u64 { self.next }
///     fn append(&mut self, _record: &[u8], events: u16) -> Result<(), StorageFailed> {
///         self.records += 1;
///         self.next += u64::from(events);
///         Ok(())
///     }
///     fn ack(&mut self, _conn: u32, ack: Ack) { self.acks.push(ack) }
/// }
///
/// static POOL: EventPool<16, 512> = EventPool::new();
/// static DEDUP: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
/// let rings: [Ring<Event<'static>, 8>; 3] = [Ring::new(), Ring::new(), Ring::new()];
/// let mut meta = [WindowMeta::new(); 2];
/// let mut arena: Vec<Entry<Event<'static>>> = (0..16).map(|_| Entry::new()).collect();
/// let windows = BatchWindows::new(&mut meta, &mut arena, BatchConfig::DEFAULT).unwrap();
/// let mut record_buf = vec![0u8; 28 + 64 * 512];
/// let registry = Registry::new();
/// let topics: TopicTable<2> = TopicTable::new();
/// let [a, b, c] = &rings;
/// let mut p = Pipeline::new(Parts {
///     limits: Limits::DEFAULT,
///     router: &topics,
///     acquirer: POOL.acquirer().unwrap(),
///     class_rings: [a.split().unwrap(), b.split().unwrap(), c.split().unwrap()],
///     dedup: DEDUP.table(),
///     windows,
///     record_buf: &mut record_buf,
///     registry: &registry,
///     clock: Clk,
///     sink: Mem::default(),
///     hook: (),
///     when_full: WhenFull::Backpressure,
/// })
/// .unwrap();
///
/// // A transactional event, sent twice on connection 7.
/// let repr = FrameRepr {
///     priority: Priority::Medium,
///     flags: FLAG_ACK,
///     partition: 0,
///     event_id: 99,
///     timestamp_ns: 0,
///     topic: b"orders",
///     payload: b"paid",
/// };
/// let mut frame = vec![0u8; repr.encoded_len()];
/// repr.encode(&mut frame).unwrap();
/// let mut dec = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
/// for _ in 0..2 {
///     let fed = p.feed(7, &mut dec, &frame);
///     assert_eq!(fed.consumed, frame.len());
///     while p.poll() {}
/// }
/// let acks = &p.sink().acks;
/// assert_eq!((acks[0].status, acks[0].offset), (Status::Stored, 0));
/// assert_eq!((acks[1].status, acks[1].offset), (Status::Duplicate, 0));
/// assert_eq!(p.sink().records, 1);
/// ```
pub struct Pipeline<'a, 'r, 'p, R, C, S, H, const B: usize = FINE> {
    limits: Limits,
    router: &'a R,
    acquirer: Acquirer<'p>,
    spare: Option<SlotMut<'p>>,
    class_rings: [RingPair<'r, Event<'p>>; 3],
    realtime: RealtimeProcessor<'a>,
    transactional: TransactionalProcessor<'a>,
    batch: BatchProcessor<'a, Event<'p>>,
    store: Store<'a, C, S, B>,
    hook: H,
    when_full: WhenFull,
    shutting_down: bool,
}

/// Items a processor step takes from its ring.
const STEP: usize = 64;

impl<'a, 'r, 'p, R: Router, C: Clock, S: Sink, H: EventHook, const B: usize>
    Pipeline<'a, 'r, 'p, R, C, S, H, B>
{
    /// Wires the parts together.
    pub fn new(parts: Parts<'a, 'r, 'p, R, C, S, H, B>) -> Result<Self, PartsError> {
        let max_events = parts.windows.config().max_events as usize;
        let max_record = RECORD_HEADER_LEN + max_events * parts.limits.max_frame() as usize;
        if parts.record_buf.len() < max_record {
            return Err(PartsError::RecordBufferTooSmall);
        }
        if parts.acquirer.slot_size() < parts.limits.max_frame() as usize {
            return Err(PartsError::SlotTooSmall);
        }
        Ok(Self {
            limits: parts.limits,
            router: parts.router,
            acquirer: parts.acquirer,
            spare: None,
            class_rings: parts.class_rings,
            realtime: RealtimeProcessor::new(parts.dedup),
            transactional: TransactionalProcessor::new(
                parts.dedup.inserter().ok_or(PartsError::InserterTaken)?,
            ),
            batch: BatchProcessor::new(parts.windows),
            store: Store {
                record_buf: parts.record_buf,
                answers: Answers::new(
                    parts.dedup,
                    parts.registry,
                    heapless::Deque::new(),
                    NoGroupCommit,
                    false,
                ),
                clock: parts.clock,
                sink: parts.sink,
            },
            hook: parts.hook,
            when_full: parts.when_full,
            shutting_down: false,
        })
    }

    /// The frame limits connections are decoded with.
    pub fn limits(&self) -> Limits {
        self.limits
    }

    /// The sink (to inspect what was stored and acked).
    pub fn sink(&self) -> &S {
        &self.store.sink
    }

    /// The sink, mutably (to repair storage, say).
    pub fn sink_mut(&mut self) -> &mut S {
        &mut self.store.sink
    }

    /// The clock, mutably (tests move a fake clock).
    pub fn clock_mut(&mut self) -> &mut C {
        &mut self.store.clock
    }

    fn now_ns(&self) -> u64 {
        self.store.clock.monotonic_ns()
    }

    /// Frees the dedup entries older than the window and reclaims their
    /// slots; returns how many it freed. It walks the whole table, so call
    /// it from the embedder's housekeeping (every few minutes), not per
    /// event.
    pub fn sweep_dedup(&mut self) -> usize {
        let now_ms = self.now_ns() / 1_000_000;
        self.transactional.sweep(now_ms)
    }

    /// What a full ring or pool does from now on.
    pub fn set_when_full(&mut self, when_full: WhenFull) {
        self.when_full = when_full;
    }

    /// From now on valid frames are answered REJECTED SHUTTING_DOWN.
    pub fn begin_shutdown(&mut self) {
        self.shutting_down = true;
    }

    /// A pool slot and room in every class ring for one more event.
    fn room(&mut self) -> bool {
        if self.spare.is_none() {
            self.spare = self.acquirer.acquire();
        }
        self.spare.is_some() && self.class_rings.iter_mut().all(|(tx, _)| tx.has_room(1))
    }

    /// Makes room by running the later stages, and, if the pool is what is
    /// short, by closing the oldest batch window early.
    fn make_room(&mut self) -> bool {
        for _ in 0..4 {
            if self.room() {
                return true;
            }
            if !self.poll() && self.spare.is_none() {
                self.tick_batch(true);
            }
        }
        self.room()
    }

    /// Decodes `input` of connection `conn` (whose decoder is `dec`) and
    /// moves every complete frame into the pipeline.
    pub fn feed<D: AsRef<[u8]> + AsMut<[u8]>>(
        &mut self,
        conn: u32,
        dec: &mut StreamDecoder<D>,
        input: &[u8],
    ) -> Fed {
        let mut pos = 0;
        let mut fed = Fed {
            consumed: 0,
            blocked: false,
            close: dec.is_closed(),
        };
        while pos < input.len() && !dec.is_closed() {
            let room = match self.when_full {
                WhenFull::Backpressure => self.make_room(),
                // Reject does not wait for the later stages: what does not
                // fit now is answered OVERLOADED.
                WhenFull::Reject => self.room(),
            };
            if !room && self.when_full == WhenFull::Backpressure {
                fed.blocked = true;
                break;
            }
            let (used, item) = dec.next(input.get(pos..).unwrap_or(&[]));
            pos += used;
            match item {
                Some(d) => self.ingest(conn, d, room),
                None => break,
            }
        }
        fed.consumed = pos;
        fed.close = dec.is_closed();
        self.store
            .answers
            .metrics()
            .add(Counter::BytesReceived, pos as u64);
        fed
    }

    fn ingest(&mut self, conn: u32, item: Decoded<'_>, room: bool) {
        let metrics = self.store.answers.metrics();
        match item {
            Decoded::Frame(f) => {
                let class = self.router.route(f.topic_bytes(), f.priority());
                self.accept(conn, class, f, room);
            }
            Decoded::Legacy(ev) => {
                let class = self.router.route(ev.topic(), ev.priority());
                let wall = self.store.clock.wall_ns();
                if let Some(reason) = refusal(self.shutting_down, room) {
                    metrics.add(Counter::Rejected(reason), 1);
                    return;
                }
                let Some(mut slot) = self.spare.take() else {
                    return;
                };
                // A slot holds any frame the limits let in (checked at
                // `new`); should one not, the event is refused, not cut.
                let Ok(len) = ev.encode_v1(0, wall, slot.buffer_mut()) else {
                    metrics.add(Counter::Rejected(Reason::BadLength), 1);
                    return;
                };
                self.push_event(conn, class, slot.share(len), ev.v1_head(), wall);
            }
            Decoded::Rejected {
                reason,
                event_id,
                ack,
            } => {
                metrics.add(Counter::Rejected(reason), 1);
                if ack {
                    self.store.sink.ack(conn, Ack::rejected(event_id, reason));
                }
            }
            Decoded::Fatal(reason) => {
                metrics.add(Counter::Rejected(reason), 1);
                // The acks of every earlier frame first, then FATAL.
                self.drain();
                self.store.sink.ack(conn, Ack::fatal(reason));
            }
            Decoded::LegacySkipped(rule) => {
                metrics.add(Counter::Rejected(rule.reason()), 1);
                metrics.add(Counter::LegacySkipped, 1);
            }
            Decoded::KeepAlive => metrics.add(Counter::KeepAlives, 1),
            // The firmware serves no read sessions and no HELLO: the
            // decoder is closed, as after a legacy close.
            Decoded::Close | Decoded::Reader(_) | Decoded::Hello(_) => {}
        }
    }

    fn accept(&mut self, conn: u32, class: Class, f: Frame<&[u8]>, room: bool) {
        if let Some(reason) = refusal(self.shutting_down, room) {
            self.store
                .answers
                .metrics()
                .add(Counter::Rejected(reason), 1);
            if f.ack_requested() {
                self.store
                    .sink
                    .ack(conn, Ack::rejected(f.event_id(), reason));
            }
            return;
        }
        let Some(mut slot) = self.spare.take() else {
            return;
        };
        let frame = f.bytes();
        let buf = slot.buffer_mut();
        let Some(dst) = buf.get_mut(..frame.len()) else {
            return;
        };
        dst.copy_from_slice(frame);
        let wall = self.store.clock.wall_ns();
        self.push_event(conn, class, slot.share(frame.len()), f.head(), wall);
    }

    fn push_event(
        &mut self,
        conn: u32,
        class: Class,
        data: EventRef<'p>,
        head: FrameHead,
        wall: u64,
    ) {
        let ev = Event::new(data, head, conn, class, wall, self.now_ns());
        self.store
            .answers
            .metrics()
            .add(Counter::Received(class), 1);
        if let Some((tx, _)) = self.class_rings.get_mut(class.index()) {
            // Room was checked before decoding.
            let _ = tx.push(ev);
        }
    }

    /// Runs the processors (and storage behind them) once, closes an aged
    /// batch window, and flushes metrics when due. Returns whether anything
    /// moved.
    pub fn poll(&mut self) -> bool {
        let mut moved = self.store.retry_deferred();
        moved |= self.process_singles(Class::Realtime);
        moved |= self.process_singles(Class::Transactional);
        moved |= self.process_batch();
        moved |= self.tick_batch(false);
        let now = self.now_ns();
        self.store.answers.flush_metrics(now, moved);
        moved
    }

    /// Runs every stage until nothing moves and every batch window is
    /// closed and stored: after it, every accepted event is answered.
    pub fn drain(&mut self) {
        loop {
            while self.poll() {}
            if self.batch.held() == 0 && self.store.answers.deferred() == 0 {
                break;
            }
            if !self.tick_batch(true) && !self.store.retry_deferred() {
                break;
            }
        }
        let now = self.now_ns();
        self.store.answers.flush_metrics(now, false);
    }

    /// One step of the realtime or the transactional processor: events from
    /// its class ring, outcomes straight to storage.
    fn process_singles(&mut self, class: Class) -> bool {
        let now_ms = self.now_ns() / 1_000_000;
        let Self {
            class_rings,
            realtime,
            transactional,
            hook,
            store,
            ..
        } = self;
        let Some((_, rx)) = class_rings.get_mut(class.index()) else {
            return false;
        };
        let mut moved = false;
        for _ in 0..STEP {
            if !store.answers.can_defer() {
                break;
            }
            let Some(ev) = rx.pop() else { break };
            moved = true;
            store.work(Work::decided_hinted(ev, |f| match class {
                Class::Realtime => (realtime.handle(f, now_ms, hook), DedupHint::NONE),
                _ => transactional.handle_hinted(f, now_ms, hook),
            }));
        }
        moved
    }

    fn process_batch(&mut self) -> bool {
        let now = self.now_ns();
        let mut moved = false;
        for _ in 0..STEP {
            let [_, _, (_, rx)] = &mut self.class_rings;
            let Some(ev) = rx.pop() else { break };
            moved = true;
            self.batch.handle(ev, now, &mut self.hook, &mut self.store);
        }
        moved
    }

    /// The batch processor's timed work: a window past its age closes;
    /// with `flush` (the pool is short, or a drain), the oldest one too.
    fn tick_batch(&mut self, flush: bool) -> bool {
        let now = self.now_ns();
        self.batch.tick(now, flush, &mut self.store)
    }
}
