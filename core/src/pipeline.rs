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

use crate::batch::{Aggregate, BatchItem, BatchWindows, Closed};
use crate::dedup::{DedupHint, DedupRef, Lookup};
use crate::event::Class;
use crate::metrics::{Counter, LocalMetrics, Registry, FINE};
use crate::pool::{Acquirer, EventRef, SlotMut};
use crate::process::{
    BatchProcessor, EventHook, Outcome, RealtimeProcessor, TransactionalProcessor,
};
use crate::record::{RecordBuilder, RecordKind, RECORD_HEADER_LEN};
use crate::ring::{Consumer, Producer};
use crate::route::TopicTable;
use crate::wire::{self, Ack, Decoded, Frame, Limits, Reason, StreamDecoder};

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

/// One accepted event on its way: its v1 frame in a pool slot (legacy events
/// already converted), and where its ack goes.
pub struct Event<'p> {
    data: EventRef<'p>,
    /// Connection the event came from.
    pub conn: u32,
    /// The class routing chose.
    pub class: Class,
    /// Wall clock at ingest, unix ns.
    pub recv_wall_ns: u64,
    /// Monotonic clock at ingest, ns.
    pub recv_mono_ns: u64,
    /// Where the transactional processor put its id in the dedup table
    /// (for the offset storage records there), else `DedupHint::NONE`.
    pub dedup: DedupHint,
}

impl<'p> Event<'p> {
    /// An event whose frame bytes are in `data`.
    pub fn new(
        data: EventRef<'p>,
        conn: u32,
        class: Class,
        recv_wall_ns: u64,
        recv_mono_ns: u64,
    ) -> Self {
        Self {
            data,
            conn,
            class,
            recv_wall_ns,
            recv_mono_ns,
            dedup: DedupHint::NONE,
        }
    }

    /// The stored frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// Starts loading the frame's bytes into this core's cache (a hint;
    /// see [`EventRef::prefetch`]).
    #[inline]
    pub fn prefetch(&self) {
        self.data.prefetch();
    }

    /// The frame (validated at ingest).
    pub fn frame(&self) -> Option<Frame<'_>> {
        wire::trusted_frame(self.data.bytes())
    }
}

impl BatchItem for Event<'_> {
    fn topic(&self) -> &[u8] {
        self.frame().map_or(&[], |f| f.topic_bytes())
    }
    fn partition(&self) -> u32 {
        self.frame().map_or(0, |f| f.partition())
    }
    fn frame(&self) -> Option<Frame<'_>> {
        Event::frame(self)
    }
    fn recv_ns(&self) -> u64 {
        self.recv_wall_ns
    }
}

/// What the processors hand to storage.
pub enum Work<'p> {
    /// Write this event as a single record.
    Store(Event<'p>),
    /// The next `count` `Store` items of this ring form one batch record.
    Batch {
        /// Events in the batch.
        count: u16,
    },
    /// A duplicate: answer DUPLICATE once the original is stored.
    Duplicate {
        /// Connection to answer.
        conn: u32,
        /// The event's id.
        event_id: u64,
        /// The ACK flag.
        ack: bool,
        /// Its class.
        class: Class,
        /// The original's offset, if already known.
        offset: Option<u64>,
    },
    /// Not stored: answer REJECTED.
    Reject {
        /// Connection to answer.
        conn: u32,
        /// The event's id.
        event_id: u64,
        /// The ACK flag.
        ack: bool,
        /// Why.
        reason: Reason,
    },
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

/// Latency samples the pipeline's metrics hold between flushes.
const SAMPLES: usize = 32;
/// Duplicates whose original is not stored yet, held at most. On one thread
/// an original is stored in the step that accepted it, so this stays empty
/// unless another thread shares the table; when it is full, the processors
/// wait.
const DEFERRED: usize = 8;

/// The storage stage: records to the sink, acks for every outcome.
struct Store<'a, 'p, C, S, const B: usize> {
    record_buf: &'a mut [u8],
    dedup: DedupRef<'a>,
    registry: &'a Registry<B>,
    metrics: LocalMetrics<SAMPLES>,
    clock: C,
    sink: S,
    deferred: heapless::Deque<Work<'p>, DEFERRED>,
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
    store: Store<'a, 'p, C, S, B>,
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
                dedup: parts.dedup,
                registry: parts.registry,
                metrics: LocalMetrics::empty(),
                clock: parts.clock,
                sink: parts.sink,
                deferred: heapless::Deque::new(),
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
                self.flush_oldest_window();
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
        self.store.metrics.add(Counter::BytesReceived, pos as u64);
        fed
    }

    fn ingest(&mut self, conn: u32, item: Decoded<'_>, room: bool) {
        let metrics = &mut self.store.metrics;
        match item {
            Decoded::Frame(f) => {
                let class = self.router.route(f.topic_bytes(), f.priority());
                self.accept(
                    conn,
                    class,
                    f.bytes(),
                    f.event_id(),
                    f.ack_requested(),
                    room,
                );
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
                let len = ev.encode_v1(0, wall, slot.buffer_mut()).unwrap_or(0);
                self.push_event(conn, class, slot.share(len), wall);
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
            Decoded::Close => {}
        }
    }

    fn accept(
        &mut self,
        conn: u32,
        class: Class,
        frame: &[u8],
        event_id: u64,
        ack: bool,
        room: bool,
    ) {
        if let Some(reason) = refusal(self.shutting_down, room) {
            self.store.metrics.add(Counter::Rejected(reason), 1);
            if ack {
                self.store.sink.ack(conn, Ack::rejected(event_id, reason));
            }
            return;
        }
        let Some(mut slot) = self.spare.take() else {
            return;
        };
        let buf = slot.buffer_mut();
        let Some(dst) = buf.get_mut(..frame.len()) else {
            return;
        };
        dst.copy_from_slice(frame);
        let wall = self.store.clock.wall_ns();
        self.push_event(conn, class, slot.share(frame.len()), wall);
    }

    fn push_event(&mut self, conn: u32, class: Class, data: EventRef<'p>, wall: u64) {
        let ev = Event::new(data, conn, class, wall, self.now_ns());
        self.store.metrics.add(Counter::Received(class), 1);
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
        moved |= self.close_aged_window();
        let now = self.now_ns();
        let Store {
            metrics, registry, ..
        } = &mut self.store;
        if moved {
            metrics.maybe_flush(*registry, now);
        } else {
            metrics.flush(*registry, now);
        }
        moved
    }

    /// Runs every stage until nothing moves and every batch window is
    /// closed and stored: after it, every accepted event is answered.
    pub fn drain(&mut self) {
        loop {
            while self.poll() {}
            if self.batch.windows().held() == 0 && self.store.deferred.is_empty() {
                break;
            }
            if !self.flush_oldest_window() && !self.store.retry_deferred() {
                break;
            }
        }
        let now = self.now_ns();
        self.store.metrics.flush(self.store.registry, now);
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
            if store.deferred.is_full() {
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

    fn close_aged_window(&mut self) -> bool {
        let now = self.now_ns();
        self.batch.windows().poll(now, &mut self.store)
    }

    fn flush_oldest_window(&mut self) -> bool {
        self.batch.windows().flush_oldest(&mut self.store)
    }
}

impl<'p, C: Clock, S: Sink, const B: usize> Store<'_, 'p, C, S, B> {
    /// Handles one processor outcome.
    fn work(&mut self, work: Work<'p>) {
        match work {
            Work::Store(ev) => {
                self.write(RecordKind::Single, ev.class, || core::iter::once(&ev));
            }
            other => self.answer_work(other),
        }
    }

    /// Writes the events (one, or a batch window's, each call of `events`
    /// yielding them in order) as one record, built from the pool slots in
    /// place, and answers each of them.
    fn write<'e, I>(&mut self, kind: RecordKind, class: Class, events: impl Fn() -> I)
    where
        'p: 'e,
        I: Iterator<Item = &'e Event<'p>>,
    {
        let offset = self.sink.next_offset();
        let mut recv_ns = None;
        let mut count = 0u16;
        let mut built = 0u16;
        let record = match RecordBuilder::new(self.record_buf, kind, class, 0) {
            Ok(mut rec) => {
                for ev in events() {
                    count = count.saturating_add(1);
                    recv_ns.get_or_insert(ev.recv_wall_ns);
                    if rec.push(ev.bytes()).is_ok() {
                        built += 1;
                    }
                }
                rec.set_recv_ns(recv_ns.unwrap_or(0));
                rec.finish(offset).ok()
            }
            Err(_) => None,
        };
        let result = match record {
            Some(bytes) if built == count && count > 0 => self.sink.append(bytes, count),
            _ => Err(StorageFailed),
        };
        if kind == RecordKind::Batch {
            self.metrics
                .add(Counter::Batches, u64::from(result.is_ok()));
        }
        let now = self.clock.monotonic_ns();
        for (i, ev) in events().enumerate() {
            self.answer_stored(ev, offset + i as u64, result, now);
        }
    }

    fn answer_stored(
        &mut self,
        ev: &Event<'p>,
        offset: u64,
        result: Result<(), StorageFailed>,
        now: u64,
    ) {
        let Some(f) = ev.frame() else { return };
        let deduped = ev.class == Class::Transactional && !f.is_legacy();
        self.metrics
            .latency(self.registry, ev.class, now.saturating_sub(ev.recv_mono_ns));
        match result {
            Ok(()) => {
                self.metrics.add(Counter::Stored(ev.class), 1);
                self.metrics
                    .add(Counter::BytesStored, f.bytes().len() as u64);
                if deduped {
                    self.dedup.set_offset_hinted(f.event_id(), offset, ev.dedup);
                }
                if f.ack_requested() {
                    self.sink.ack(ev.conn, Ack::stored(f.event_id(), offset));
                }
            }
            Err(StorageFailed) => {
                self.metrics
                    .add(Counter::Rejected(Reason::StorageFailed), 1);
                if deduped {
                    self.dedup.remove(f.event_id());
                }
                if f.ack_requested() {
                    self.sink
                        .ack(ev.conn, Ack::rejected(f.event_id(), Reason::StorageFailed));
                }
            }
        }
    }

    fn answer_work(&mut self, work: Work<'p>) {
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
            } => {
                self.metrics.add(Counter::Rejected(reason), 1);
                self.metrics.event();
                if ack {
                    self.sink.ack(conn, Ack::rejected(event_id, reason));
                }
            }
            Work::Store(_) | Work::Batch { .. } => {}
        }
    }

    fn answer_duplicate(
        &mut self,
        conn: u32,
        event_id: u64,
        ack: bool,
        class: Class,
        offset: Option<u64>,
    ) {
        let now_ms = self.clock.monotonic_ns() / 1_000_000;
        let offset = match offset {
            Some(o) => Some(o),
            None => match self.dedup.lookup(event_id, now_ms) {
                Lookup::Present(Some(o)) => Some(o),
                Lookup::Present(None) => {
                    let _ = self.deferred.push_back(Work::Duplicate {
                        conn,
                        event_id,
                        ack,
                        class,
                        offset: None,
                    });
                    return;
                }
                // The original's write failed (its id was removed): it is
                // not in the log, so a retry is safe.
                Lookup::Absent => None,
            },
        };
        self.metrics.event();
        match offset {
            Some(o) => {
                self.metrics.add(Counter::Duplicate(class), 1);
                if ack {
                    self.sink.ack(conn, Ack::duplicate(event_id, o));
                }
            }
            None => {
                self.metrics
                    .add(Counter::Rejected(Reason::StorageFailed), 1);
                if ack {
                    self.sink
                        .ack(conn, Ack::rejected(event_id, Reason::StorageFailed));
                }
            }
        }
    }

    /// Answers the deferred duplicates whose original is now stored.
    fn retry_deferred(&mut self) -> bool {
        let mut moved = false;
        for _ in 0..self.deferred.len() {
            let Some(work) = self.deferred.pop_front() else {
                break;
            };
            let before = self.deferred.len();
            self.answer_work(work);
            moved |= self.deferred.len() == before;
        }
        moved
    }
}

/// Storage of a closed batch window: one batch record, then the answers.
impl<'p, C: Clock, S: Sink, const B: usize> Aggregate<Event<'p>> for Store<'_, 'p, C, S, B> {
    fn aggregate(&mut self, window: Closed<'_, Event<'p>>) {
        // The window's events are dropped (their slots freed) after this.
        self.write(RecordKind::Batch, Class::Batch, || window.iter());
    }
}

/// The batch processor's aggregate: a marker, then the window's events, into
/// the batch storage ring. The caller checks room for two full windows
/// before each push (a push can close one window and open another).
pub struct ToStorage<'c, 'r, 'p> {
    /// The batch storage ring.
    pub out: &'c mut Producer<'r, Work<'p>>,
}

impl ToStorage<'_, '_, '_> {
    /// Free slots the batch storage ring needs before each push into the
    /// windows: two closing windows, each a marker and its events.
    pub fn room_needed(config: &crate::batch::BatchConfig) -> usize {
        2 * (config.max_events as usize + 1)
    }
}

impl<'p> Aggregate<Event<'p>> for ToStorage<'_, '_, 'p> {
    fn aggregate(&mut self, mut window: Closed<'_, Event<'p>>) {
        let count = window.len().min(u16::MAX as usize) as u16;
        let _ = self.out.push(Work::Batch { count });
        for ev in window.drain() {
            let _ = self.out.push(Work::Store(ev));
        }
    }
}

impl<'p> Work<'p> {
    /// What storage gets for a realtime or transactional `ev`: `decide`
    /// runs its processor on its frame; an event without a readable frame
    /// is rejected BAD_LENGTH. A stored event keeps its frame; the others
    /// need only its id and ACK flag, read from the same parse.
    pub fn decided(ev: Event<'p>, decide: impl FnOnce(&Frame<'_>) -> Outcome) -> Work<'p> {
        Self::decided_hinted(ev, |f| (decide(f), DedupHint::NONE))
    }

    /// [`Self::decided`] with a processor that also says where the event's
    /// id went in the dedup table (`TransactionalProcessor::handle_hinted`);
    /// a stored event carries that hint to storage.
    pub fn decided_hinted(
        mut ev: Event<'p>,
        decide: impl FnOnce(&Frame<'_>) -> (Outcome, DedupHint),
    ) -> Work<'p> {
        let ((outcome, hint), event_id, ack) = match ev.frame() {
            Some(f) => (decide(&f), f.event_id(), f.ack_requested()),
            None => (
                (Outcome::Rejected(Reason::BadLength), DedupHint::NONE),
                0,
                false,
            ),
        };
        match outcome {
            Outcome::Store | Outcome::Buffered => {
                ev.dedup = hint;
                Work::Store(ev)
            }
            Outcome::Duplicate(offset) => Work::Duplicate {
                conn: ev.conn,
                event_id,
                ack,
                class: ev.class,
                offset,
            },
            Outcome::Rejected(reason) => Work::Reject {
                conn: ev.conn,
                event_id,
                ack,
                reason,
            },
        }
    }
}
