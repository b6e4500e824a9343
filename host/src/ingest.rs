//! The ingest thread: one epoll loop (edge-triggered, non-blocking sockets)
//! that accepts producers, reads large chunks, decodes many frames per read,
//! copies each valid frame once into a pool slot, routes it into a class
//! ring (or, with `--processors inline`, runs its processor here and hands
//! the outcome to storage), and writes the acks that come back from
//! storage.
//!
//! Costs per event: no allocation, no lock, no syscall (one `read` serves
//! every frame in its chunk, one `write` every ack queued for a connection).
//! Allocation happens per connection (decoder stash, ack buffer).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use eventstream_core::dedup::DedupRef;
use eventstream_core::metrics::{Counter, LocalMetrics};
use eventstream_core::pipeline::{refusal, Event, ToStorage, Work};
use eventstream_core::pool::{Acquirer, SlotMut};
use eventstream_core::process::{
    BatchProcessor, RealtimeProcessor, Sweeper, TransactionalProcessor,
};
use eventstream_core::ring::{Consumer, Producer};
use eventstream_core::route::TopicTable;
use eventstream_core::wire::{peek_v1, Ack, Decoded, Limits, StreamDecoder, ACK_LEN};
use eventstream_core::Class;

use crate::processors::{sweep_step, sweeper};
use crate::settings::MAX_TOPICS;
use crate::shared::{Phase, RingGauge, Shared};
use crate::sys::{self, monotonic_ns, wall_ns, Epoll};
use crate::writer::{Storage, StorageMode};

/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Spare ack and input buffers kept for connections that need one; more
/// are freed (connections take a buffer while they have acks to write or
/// input held back, and give it back when they go quiet).
const SPARE_BUFFERS: usize = 256;
/// Spares made at start, so the first connections to need a buffer take
/// one without allocating on the hot path (untouched, they cost address
/// space, not memory).
const SPARE_AT_START: usize = 16;
/// Low bits of a connection id: its slot; high bits: the slot's generation.
const SLOT_BITS: u32 = 20;
const SLOT_MASK: u32 = (1 << SLOT_BITS) - 1;
const TOKEN_LISTENER: u64 = u64::MAX;
const TOKEN_WAKER: u64 = u64::MAX - 1;
/// Longest a graceful shutdown waits for acks to reach slow clients.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);
/// How long a shutdown keeps reading input that was already sent ...
const DRAIN_READ_NS: u64 = 500_000_000;
/// ... and at least this long, for frames still on their way.
const DRAIN_MIN_NS: u64 = 100_000_000;
/// With `--storage-thread auto` (`StorageMode::Shared`), ingest writes at
/// most this many events of one loop itself; more wake the storage thread,
/// so under load the two threads split the work.
const INGEST_WRITE_MAX: usize = 256;
/// How far ahead of the frame being handled ingest prefetches dedup slots
/// (about seven 256-byte events).
const DEDUP_AHEAD_BYTES: usize = 2048;
/// How long accepting pauses when no descriptor is left at all.
const ACCEPT_PAUSE_NS: u64 = 100_000_000;

/// One producer connection.
struct Conn {
    fd: OwnedFd,
    id: u32,
    dec: StreamDecoder<Box<[u8]>>,
    /// Encoded acks not yet written; `out_pos` bytes of it are written.
    out: Vec<u8>,
    out_pos: usize,
    /// Acked events in the pipeline.
    inflight: u32,
    /// Input read but not yet decoded (the rings or pool were full).
    stash: Vec<u8>,
    stash_pos: usize,
    readable: bool,
    writable: bool,
    eof: bool,
    /// epoll reported RDHUP, HUP or ERR: the peer closed (or reset) its
    /// side, so reads go on until one returns 0 or an error, short ones
    /// included (no further edge will come).
    hup: bool,
    /// FATAL to send once every earlier acked event is answered.
    fatal: Option<Ack>,
    /// Close once the acks are written.
    closing: bool,
    /// In the ready list.
    queued: bool,
    /// In the dirty list (acks to write).
    in_dirty: bool,
    /// Monotonic ns since a frame has been half-received.
    mid_since: Option<u64>,
    /// Monotonic ns of the last read that brought bytes (or the accept).
    last_active: u64,
}

/// Gives `c` an ack buffer if it has none (from `spare` when one is kept).
fn ensure_out(c: &mut Conn, spare: &mut Vec<Vec<u8>>, capacity: usize) {
    if c.out.capacity() == 0 {
        c.out = spare.pop().unwrap_or_else(|| Vec::with_capacity(capacity));
    }
}

/// The spare list of buffers of `capacity` bytes, with its first ones made.
fn spares(capacity: usize) -> Vec<Vec<u8>> {
    let mut v = Vec::with_capacity(SPARE_BUFFERS);
    v.extend((0..SPARE_AT_START).map(|_| Vec::with_capacity(capacity)));
    v
}

/// Keeps `buf` for another connection, or frees it when enough are kept.
fn give_back(spare: &mut Vec<Vec<u8>>, mut buf: Vec<u8>) {
    if buf.capacity() > 0 && spare.len() < SPARE_BUFFERS {
        buf.clear();
        spare.push(buf);
    }
}

impl Conn {
    fn unsent_acks(&self) -> u32 {
        ((self.out.len() - self.out_pos) / ACK_LEN) as u32
    }

    fn push_ack(&mut self, ack: &Ack) {
        self.out.extend_from_slice(&ack.encode());
    }
}

/// What stopped a connection's decoding.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stop {
    /// All input taken.
    Done,
    /// No pool slot or ring room.
    Room,
    /// Its ack credit is used up.
    Credit,
    /// The decoder closed the connection (FATAL or legacy close).
    Closed,
}

/// Where ingest hands the events it accepts.
pub enum Dispatch {
    /// Into the class rings of the three processor threads.
    Threads(Box<[Producer<'static, Event<'static>>; 3]>),
    /// Through the three processors on the ingest thread, into the storage
    /// rings: two fewer thread hops per event, for machines with few cores.
    Inline(Box<Inline>),
}

/// The processors, run by ingest itself (`--processors inline`).
pub struct Inline {
    realtime: RealtimeProcessor<'static>,
    transactional: TransactionalProcessor<'static>,
    batch: BatchProcessor<'static, Event<'static>>,
    dedup: DedupRef<'static>,
    /// Ingest -> storage rings, by class.
    storage_tx: [Producer<'static, Work<'static>>; 3],
    /// Room the batch storage ring needs before a batch event is taken.
    batch_need: usize,
    sweeper: Sweeper,
}

impl Inline {
    /// The processors over `dedup` (whose inserter the transactional one
    /// holds) and the batch windows, writing into `storage_tx`.
    pub fn new(
        realtime: RealtimeProcessor<'static>,
        transactional: TransactionalProcessor<'static>,
        batch: BatchProcessor<'static, Event<'static>>,
        dedup: DedupRef<'static>,
        storage_tx: [Producer<'static, Work<'static>>; 3],
        sweep_every: Duration,
    ) -> Self {
        let mut batch = batch;
        let batch_need = ToStorage::room_needed(&batch.windows().config());
        Self {
            realtime,
            transactional,
            batch,
            dedup,
            storage_tx,
            batch_need,
            sweeper: sweeper(sweep_every),
        }
    }

    fn room(&mut self) -> bool {
        let need = self.batch_need;
        let [rt, tx, b] = &mut self.storage_tx;
        rt.has_room(1) && tx.has_room(1) && b.has_room(need)
    }

    /// Runs `ev` through its processor; its outcome goes to storage.
    fn process(&mut self, class: Class, ev: Event<'static>, now: u64) {
        let now_ms = now / 1_000_000;
        let work = match class {
            Class::Batch => {
                let [_, _, out] = &mut self.storage_tx;
                self.batch.handle(ev, now, &mut (), &mut ToStorage { out });
                return;
            }
            Class::Realtime => Work::decided(ev, |f| self.realtime.handle(f, now_ms, &mut ())),
            Class::Transactional => {
                Work::decided_hinted(ev, |f| self.transactional.handle_hinted(f, now_ms, &mut ()))
            }
        };
        if let Some(out) = self.storage_tx.get_mut(class.index()) {
            // Room was checked before decoding.
            let _ = out.push(work);
        }
    }

    /// Timed work: windows past their age, all of them while draining or
    /// (the oldest) when the pool is empty, and the dedup sweep. Returns
    /// whether anything went to the batch storage ring.
    fn tick(&mut self, now: u64, draining: bool, starved: bool) -> bool {
        let mut moved = false;
        let [_, _, out] = &mut self.storage_tx;
        if out.has_room(self.batch_need) {
            moved = self
                .batch
                .tick(now, draining || starved, &mut ToStorage { out });
        }
        sweep_step(&mut self.sweeper, &mut self.transactional, now);
        moved
    }

    /// When `tick` has work next (monotonic ns).
    fn next_deadline(&mut self) -> u64 {
        let windows = self.batch.next_deadline().unwrap_or(u64::MAX);
        windows.min(self.sweeper.next_deadline())
    }

    /// Batch events still waiting in windows.
    fn held(&mut self) -> usize {
        self.batch.held()
    }
}

/// Everything ingest needs, built by the server.
pub struct IngestParts {
    /// The producer listener (non-blocking).
    pub listener: TcpListener,
    /// The pool's acquirer.
    pub acquirer: Acquirer<'static>,
    /// Where accepted events go: the processor threads, or the processors
    /// run right here.
    pub dispatch: Dispatch,
    /// Acks from storage.
    pub ack_rx: Consumer<'static, (u32, Ack)>,
    /// Topic floors.
    pub router: &'static TopicTable<MAX_TOPICS>,
    /// Frame limits.
    pub limits: Limits,
    /// Acks one connection may have in flight or unsent.
    pub ack_credit: u32,
    /// Connection limit.
    pub max_connections: u32,
    /// Half-received frame limit.
    pub frame_timeout: Duration,
    /// Close a connection with nothing in flight and nothing received for
    /// this long (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Reject with OVERLOADED instead of backpressure.
    pub reject_when_full: bool,
    /// Storage, when ingest may step it (`StorageMode::Ingest` or
    /// `Shared`; only with the processors inline): one step per loop, after
    /// the processors.
    pub storage: Option<Arc<Mutex<Storage>>>,
    /// Who steps storage.
    pub storage_mode: StorageMode,
    /// Shared state.
    pub shared: Arc<Shared>,
}

/// The ingest loop's state.
pub struct Ingest {
    p: IngestParts,
    listener: Option<TcpListener>,
    epoll: Epoll,
    spare_fd: Option<File>,
    conns: Vec<Option<Conn>>,
    gens: Vec<u32>,
    free_slots: Vec<u32>,
    ready: VecDeque<u32>,
    waiting_room: Vec<u32>,
    dirty: Vec<u32>,
    spare: Option<SlotMut<'static>>,
    read_buf: Box<[u8]>,
    metrics: LocalMetrics,
    accepted: u64,
    pushed: [bool; 3],
    /// Events ingest pushed to storage since its last step.
    pushed_events: usize,
    mid_frames: usize,
    next_timeout_scan: u64,
    /// When the next connection may pass `--idle-timeout`.
    next_idle_scan: u64,
    /// Ack buffers of connections that have none in use.
    spare_out: Vec<Vec<u8>>,
    /// Input stashes likewise.
    spare_stash: Vec<Vec<u8>>,
    shutting_down: bool,
    /// Monotonic ns when the graceful shutdown began.
    shutdown_began: Option<u64>,
    accept_paused_until: Option<u64>,
}

impl Ingest {
    /// Sets up epoll over the listener and the waker.
    pub fn new(p: IngestParts) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        epoll.add(p.listener.as_raw_fd(), TOKEN_LISTENER, libc::EPOLLIN as u32)?;
        epoll.add(p.shared.ingest.raw_fd(), TOKEN_WAKER, libc::EPOLLIN as u32)?;
        let listener = p.listener.try_clone()?;
        Ok(Self {
            listener: Some(listener),
            epoll,
            spare_fd: File::open("/dev/null").ok(),
            conns: Vec::new(),
            gens: Vec::new(),
            free_slots: Vec::new(),
            ready: VecDeque::with_capacity(1024),
            waiting_room: Vec::with_capacity(1024),
            dirty: Vec::with_capacity(1024),
            spare: None,
            read_buf: vec![0u8; READ_CHUNK].into_boxed_slice(),
            metrics: LocalMetrics::new(),
            accepted: 0,
            pushed: [false; 3],
            pushed_events: 0,
            mid_frames: 0,
            next_timeout_scan: 0,
            next_idle_scan: 0,
            spare_out: spares((p.ack_credit as usize + 1) * ACK_LEN),
            spare_stash: spares(READ_CHUNK),
            shutting_down: false,
            shutdown_began: None,
            accept_paused_until: None,
            p,
        })
    }

    /// Runs until a graceful shutdown completes.
    pub fn run(mut self) -> io::Result<()> {
        let mut events: Vec<libc::epoll_event> =
            vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
        loop {
            let now = monotonic_ns();
            self.resume_accepting(now);
            self.deliver_acks();
            self.resume_waiting();
            self.serve_ready(now);
            self.flush_dirty();
            self.publish(now);
            if self.shutdown_step(now)? {
                return Ok(());
            }
            let busy = !self.ready.is_empty();
            let timeout = if busy { 0 } else { self.park_timeout(now) };
            if !busy {
                let want_room = !self.waiting_room.is_empty();
                self.p.shared.ingest.prepare_park(want_room);
                if self.has_work() {
                    self.p.shared.ingest.unpark();
                    continue;
                }
            }
            let n = self.epoll.wait(&mut events, timeout)?;
            if !busy {
                self.p.shared.ingest.unpark();
            }
            for ev in events.iter().take(n) {
                let token = ev.u64;
                let flags = ev.events;
                match token {
                    TOKEN_LISTENER => self.accept_all(),
                    TOKEN_WAKER => self.p.shared.ingest.clear(),
                    _ => self.on_socket_event(token as u32, flags),
                }
            }
        }
    }

    fn has_work(&mut self) -> bool {
        // A shutdown request is work once; after that the loop must keep
        // waiting on epoll, or it would spin without reading the input it
        // still answers SHUTTING_DOWN.
        let shutdown_news =
            !self.shutting_down && self.p.shared.shutdown_requested.load(Ordering::Acquire);
        if !self.p.ack_rx.is_empty() || shutdown_news {
            return true;
        }
        if let Some(storage) = &self.p.storage {
            let shared = &self.p.shared;
            let finishing = self.p.storage_mode == StorageMode::Ingest
                && shared.phase() == Phase::Stop
                && !shared.storage_done.load(Ordering::Acquire);
            if finishing
                || (self.ingest_writes() && storage.try_lock().is_ok_and(|mut s| s.has_work()))
            {
                return true;
            }
        }
        !self.waiting_room.is_empty() && self.room()
    }

    fn park_timeout(&mut self, now: u64) -> i32 {
        let mut ms: i64 = -1;
        if let Dispatch::Inline(i) = &mut self.p.dispatch {
            // The next window to close by age, or the dedup sweep; while
            // draining, every millisecond until the windows are flushed.
            let next = i.next_deadline();
            if next != u64::MAX {
                ms = (next.saturating_sub(now) / 1_000_000) as i64 + 1;
            }
            if self.shutting_down && i.held() > 0 {
                ms = if ms < 0 { 1 } else { ms.min(1) };
            }
        }
        let storage_timeout = match &self.p.storage {
            Some(s) if self.ingest_writes() => s.try_lock().ok().and_then(|s| s.timeout(now)),
            _ => None,
        };
        if let Some(t) = storage_timeout {
            let left = t.as_nanos().div_ceil(1_000_000).min(i32::MAX as u128) as i64;
            ms = if ms < 0 { left } else { ms.min(left) };
        }
        if self.mid_frames > 0 {
            let left = (self.next_timeout_scan.saturating_sub(now) / 1_000_000) as i64 + 1;
            ms = if ms < 0 { left } else { ms.min(left) };
        }
        if self.p.idle_timeout.is_some() && self.conns.len() > self.free_slots.len() {
            let left = (self.next_idle_scan.saturating_sub(now) / 1_000_000) as i64 + 1;
            ms = if ms < 0 { left } else { ms.min(left) };
        }
        if let Some(until) = self.accept_paused_until {
            let left = (until.saturating_sub(now) / 1_000_000) as i64 + 1;
            ms = if ms < 0 { left } else { ms.min(left) };
        }
        if let Some(deadline) = self.shutdown_deadline() {
            let left = (deadline.saturating_sub(now) / 1_000_000) as i64 + 1;
            ms = if ms < 0 {
                left.min(100)
            } else {
                ms.min(left).min(100)
            };
        }
        ms.min(i32::MAX as i64) as i32
    }

    fn publish(&mut self, now: u64) {
        self.p
            .shared
            .accepted
            .store(self.accepted, Ordering::Release);
        if let Dispatch::Inline(i) = &mut self.p.dispatch {
            let draining = self.p.shared.phase() >= Phase::Drain;
            let starved = self.p.shared.pool_starved.load(Ordering::Relaxed);
            if i.tick(now, draining, starved) {
                // A closed window: at most a batch of events.
                self.pushed_events += 1;
            }
        }
        match &self.p.dispatch {
            Dispatch::Threads(_) => {
                for (c, pushed) in self.pushed.iter_mut().enumerate() {
                    if std::mem::take(pushed) {
                        match c {
                            0 => self.p.shared.realtime.wake(),
                            1 => self.p.shared.transactional.wake(),
                            _ => self.p.shared.batch.wake(),
                        }
                    }
                }
            }
            Dispatch::Inline(_) => {
                let pushed = std::mem::take(&mut self.pushed_events);
                self.step_storage(pushed);
            }
        }
        if self.ready.is_empty() {
            self.metrics.flush(self.p.shared.registry, now);
        } else {
            self.metrics.maybe_flush(self.p.shared.registry, now);
        }
        if self.mid_frames > 0 && now >= self.next_timeout_scan {
            self.scan_frame_timeouts(now);
        }
        if self.p.idle_timeout.is_some() && now >= self.next_idle_scan {
            self.scan_idle(now);
        }
    }

    /// Closes connections with nothing in flight (no acks owed or unsent,
    /// no input held back) and nothing received for `--idle-timeout`, and
    /// sets when the next one could expire.
    fn scan_idle(&mut self, now: u64) {
        let Some(limit) = self.p.idle_timeout.map(|d| d.as_nanos() as u64) else {
            return;
        };
        let mut next = now + limit;
        // A connection past the limit but not quiet (acks owed) is looked
        // at again a second later (or one limit, if shorter).
        let floor = now + limit.min(1_000_000_000);
        let mut expired = Vec::new();
        for c in self.conns.iter().flatten() {
            let quiet = c.inflight == 0 && c.out_pos >= c.out.len() && c.stash.is_empty();
            let expiry = c.last_active + limit;
            if quiet && expiry <= now {
                expired.push(c.id);
            } else {
                next = next.min(expiry.max(floor));
            }
        }
        if !expired.is_empty() {
            eprintln!(
                "eventstream: closed {} connections idle past --idle-timeout",
                expired.len()
            );
            self.p
                .shared
                .idle_closed
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
        }
        for id in expired {
            self.close(id);
        }
        self.next_idle_scan = next;
    }

    /// Whether ingest steps storage now: always with `StorageMode::Ingest`;
    /// with `Shared` while the storage thread sleeps (so the two do not
    /// take turns while both are busy) and the shutdown has not reached
    /// storage.
    fn ingest_writes(&self) -> bool {
        match self.p.storage_mode {
            StorageMode::Thread => false,
            StorageMode::Ingest => true,
            StorageMode::Shared => {
                self.p.shared.storage.is_parked() && self.p.shared.phase() != Phase::Stop
            }
        }
    }

    /// Writes what the processors produced (`pushed` events) and sends its
    /// acks in this same loop, when ingest writes (`ingest_writes`); with
    /// `Shared`, only up to `INGEST_WRITE_MAX` events, and the storage
    /// thread is woken for more. Otherwise the storage thread is woken.
    fn step_storage(&mut self, pushed: usize) {
        let mode = self.p.storage_mode;
        let mut left = pushed > 0;
        let small = mode == StorageMode::Ingest || pushed <= INGEST_WRITE_MAX;
        if small && self.ingest_writes() {
            let mut stepped = false;
            if let Some(Ok(mut s)) = self.p.storage.as_ref().map(|s| s.try_lock()) {
                let budget = match mode {
                    StorageMode::Ingest => usize::MAX,
                    _ => INGEST_WRITE_MAX,
                };
                stepped = (pushed > 0 || s.has_work()) && s.step(budget);
                left = mode == StorageMode::Shared && s.has_work();
            }
            if stepped {
                self.deliver_acks();
                self.flush_dirty();
            }
        }
        if left && mode != StorageMode::Ingest {
            self.p.shared.storage.wake();
        }
    }

    /// A pool slot and room in every ring ingest pushes to for one more
    /// event (the class rings, or inline the storage rings).
    fn room(&mut self) -> bool {
        if self.spare.is_none() {
            self.spare = self.p.acquirer.acquire();
            if self.spare.is_none() {
                // The batch thread, or inline the next `tick`, closes the
                // oldest window to free slots.
                if !self.p.shared.pool_starved.swap(true, Ordering::Relaxed)
                    && matches!(self.p.dispatch, Dispatch::Threads(_))
                {
                    self.p.shared.batch.wake();
                }
                return false;
            }
            self.p.shared.pool_starved.store(false, Ordering::Relaxed);
        }
        match &mut self.p.dispatch {
            Dispatch::Threads(class_tx) => class_tx.iter_mut().all(|tx| tx.has_room(1)),
            Dispatch::Inline(i) => i.room(),
        }
    }

    fn accept_all(&mut self) {
        loop {
            let Some(listener) = &self.listener else {
                return;
            };
            let fd = match sys::accept(listener.as_raw_fd()) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: free the spare, accept the
                    // connection and close it at once, so epoll does not
                    // report the same pending connection forever.
                    // (accept4 reports EMFILE even with nothing pending.)
                    if self.spare_fd.take().is_none() {
                        // No spare either: stop watching the listener for a
                        // while instead of spinning on it.
                        self.pause_accepting();
                        return;
                    }
                    // Accepted and closed at once.
                    let pending = sys::accept(listener.as_raw_fd()).map(drop);
                    self.spare_fd = File::open("/dev/null").ok();
                    if pending.is_err() {
                        return;
                    }
                    self.p
                        .shared
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    eprintln!("eventstream: out of file descriptors; connection refused");
                    continue;
                }
                Err(e) => {
                    eprintln!("eventstream: accept failed: {e}");
                    return;
                }
            };
            let open = self.conns.len() - self.free_slots.len();
            if open >= self.p.max_connections as usize {
                self.p
                    .shared
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Err(e) = self.register(fd) {
                eprintln!("eventstream: cannot register a connection: {e}");
            }
        }
    }

    /// Takes the listener out of epoll for [`ACCEPT_PAUSE_NS`].
    fn pause_accepting(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        if let Some(l) = &self.listener {
            if let Err(e) = self.epoll.delete(l.as_raw_fd()) {
                eprintln!("eventstream: cannot pause accepting: {e}");
                return;
            }
        }
        eprintln!("eventstream: out of file descriptors; accepting paused");
        self.accept_paused_until = Some(monotonic_ns() + ACCEPT_PAUSE_NS);
    }

    fn resume_accepting(&mut self, now: u64) {
        let Some(until) = self.accept_paused_until else {
            return;
        };
        if now < until {
            return;
        }
        self.accept_paused_until = None;
        if self.spare_fd.is_none() {
            self.spare_fd = File::open("/dev/null").ok();
        }
        if let Some(l) = &self.listener {
            if let Err(e) = self
                .epoll
                .add(l.as_raw_fd(), TOKEN_LISTENER, libc::EPOLLIN as u32)
            {
                eprintln!("eventstream: cannot resume accepting: {e}");
            }
        }
    }

    fn register(&mut self, fd: OwnedFd) -> io::Result<()> {
        sys::set_nodelay(fd.as_raw_fd())?;
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.gens.push(0);
                (self.conns.len() - 1) as u32
            }
        };
        let gen = self.gens[slot as usize];
        let id = (gen << SLOT_BITS) | slot;
        let stash = vec![0u8; self.p.limits.max_frame() as usize].into_boxed_slice();
        let dec = StreamDecoder::new(stash, self.p.limits)
            .map_err(|_| io::Error::other("decoder stash too small"))?;
        self.epoll.add(
            fd.as_raw_fd(),
            u64::from(id),
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        )?;
        self.conns[slot as usize] = Some(Conn {
            fd,
            id,
            dec,
            // Taken when needed (see ensure_out): an idle connection holds
            // no buffer but its decoder's.
            out: Vec::new(),
            out_pos: 0,
            inflight: 0,
            stash: Vec::new(),
            stash_pos: 0,
            readable: false,
            writable: true,
            eof: false,
            hup: false,
            fatal: None,
            closing: false,
            queued: false,
            in_dirty: false,
            mid_since: None,
            last_active: monotonic_ns(),
        });
        self.p.shared.connections.fetch_add(1, Ordering::Relaxed);
        self.p
            .shared
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The size of a connection's ack buffer: its credit and one FATAL.
    fn out_capacity(&self) -> usize {
        (self.p.ack_credit as usize + 1) * ACK_LEN
    }

    /// Queues `id` for an ack write (once, however many acks it has).
    fn mark_dirty(&mut self, id: u32) {
        if let Some(c) = self.conn_mut(id) {
            if !c.in_dirty {
                c.in_dirty = true;
                self.dirty.push(id);
            }
        }
    }

    fn conn_mut(&mut self, id: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut((id & SLOT_MASK) as usize)?
            .as_mut()
            .filter(|c| c.id == id)
    }

    fn on_socket_event(&mut self, id: u32, flags: u32) {
        let Some(c) = self.conn_mut(id) else { return };
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
        {
            c.readable = true;
        }
        if flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
            c.hup = true;
        }
        if flags & libc::EPOLLOUT as u32 != 0 {
            c.writable = true;
        }
        let flush = c.out_pos < c.out.len();
        let queue = c.readable && !c.queued;
        if queue {
            c.queued = true;
        }
        if flush {
            self.mark_dirty(id);
        }
        if queue {
            self.ready.push_back(id);
        }
    }

    /// Moves acks from storage into their connections' buffers.
    fn deliver_acks(&mut self) {
        let mut got = 0usize;
        let capacity = self.out_capacity();
        while let Some((id, ack)) = self.p.ack_rx.pop() {
            got += 1;
            let Some(c) = self.conns[(id & SLOT_MASK) as usize]
                .as_mut()
                .filter(|c| c.id == id)
            else {
                continue;
            };
            ensure_out(c, &mut self.spare_out, capacity);
            c.inflight = c.inflight.saturating_sub(1);
            c.push_ack(&ack);
            self.mark_dirty(id);
        }
        if got > 0 {
            self.p.shared.set_depth(RingGauge::Acks, 0);
        }
    }

    /// Writes every connection's queued acks (one write each).
    fn flush_dirty(&mut self) {
        let capacity = self.out_capacity();
        while let Some(id) = self.dirty.pop() {
            let Some(c) = self.conns[(id & SLOT_MASK) as usize]
                .as_mut()
                .filter(|c| c.id == id)
            else {
                continue;
            };
            c.in_dirty = false;
            if c.fatal.is_some() && c.inflight == 0 {
                if let Some(f) = c.fatal.take() {
                    ensure_out(c, &mut self.spare_out, capacity);
                    c.push_ack(&f);
                    c.closing = true;
                }
            }
            let mut close = false;
            while c.writable && c.out_pos < c.out.len() {
                let rest = &c.out[c.out_pos..];
                match sys::send(c.fd.as_raw_fd(), rest) {
                    Ok(n) => c.out_pos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
            if c.out_pos == c.out.len() {
                c.out.clear();
                c.out_pos = 0;
                if c.inflight == 0 {
                    // Quiet: the buffer goes back until acks come again.
                    give_back(&mut self.spare_out, std::mem::take(&mut c.out));
                }
            }
            let idle = c.inflight == 0 && c.out.is_empty();
            if close || (idle && (c.closing || c.eof)) {
                self.close(id);
                continue;
            }
            // Credit came back: decode what is held, read again.
            let input = c.readable || c.stash_pos < c.stash.len();
            if input && !c.queued && !c.closing && c.fatal.is_none() {
                c.queued = true;
                self.ready.push_back(id);
            }
        }
    }

    fn close(&mut self, id: u32) {
        let slot = (id & SLOT_MASK) as usize;
        if let Some(c) = self.conns.get_mut(slot).and_then(Option::take) {
            if c.mid_since.is_some() {
                self.mid_frames = self.mid_frames.saturating_sub(1);
            }
            give_back(&mut self.spare_out, c.out);
            give_back(&mut self.spare_stash, c.stash);
            self.gens[slot] = (self.gens[slot] + 1) & (u32::MAX >> SLOT_BITS);
            self.free_slots.push(slot as u32);
            self.p.shared.connections.fetch_sub(1, Ordering::Relaxed);
        }
    }

    fn resume_waiting(&mut self) {
        if self.waiting_room.is_empty() || !self.room() {
            return;
        }
        for id in std::mem::take(&mut self.waiting_room) {
            if let Some(c) = self.conn_mut(id) {
                if !c.queued {
                    c.queued = true;
                    self.ready.push_back(id);
                }
            }
        }
    }

    /// Gives each ready connection one read (round robin).
    fn serve_ready(&mut self, now: u64) {
        let wall = wall_ns();
        for _ in 0..self.ready.len() {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let requeue = self.serve(id, now, wall);
            if let Some(c) = self.conn_mut(id) {
                c.queued = requeue;
                if requeue {
                    self.ready.push_back(id);
                }
            }
        }
    }

    /// Reads and decodes for one connection; true if it should stay ready.
    fn serve(&mut self, id: u32, now: u64, wall: u64) -> bool {
        let slot = (id & SLOT_MASK) as usize;
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return false;
        };
        let keep = self.serve_conn(&mut c, now, wall);
        let was_mid = c.mid_since.is_some();
        let mid = c.dec.is_mid_frame();
        match (was_mid, mid) {
            (false, true) => {
                c.mid_since = Some(now);
                if self.mid_frames == 0 {
                    self.next_timeout_scan = now + self.p.frame_timeout.as_nanos() as u64;
                }
                self.mid_frames += 1;
            }
            (true, false) => {
                c.mid_since = None;
                self.mid_frames -= 1;
            }
            _ => {}
        }
        let closed = c.dec.is_closed();
        let dirty = c.out_pos < c.out.len() || c.fatal.is_some() || c.eof;
        self.conns[slot] = Some(c);
        if dirty {
            self.mark_dirty(id);
        }
        if closed {
            if self.conn_mut(id).is_some_and(|c| c.fatal.is_none()) {
                // Legacy close: no acks exist in this dialect.
                self.close(id);
            }
            return false;
        }
        keep
    }

    fn serve_conn(&mut self, c: &mut Conn, now: u64, wall: u64) -> bool {
        if c.closing || c.fatal.is_some() || c.dec.is_closed() {
            return false;
        }
        // Input held back by a full ring or pool goes first.
        if c.stash_pos < c.stash.len() {
            let stash = std::mem::take(&mut c.stash);
            let (used, stop) = self.decode(c, &stash[c.stash_pos..], now, wall);
            c.stash = stash;
            c.stash_pos += used;
            if c.stash_pos == c.stash.len() {
                c.stash_pos = 0;
                give_back(&mut self.spare_stash, std::mem::take(&mut c.stash));
            }
            match stop {
                Stop::Done => {}
                Stop::Room => {
                    self.waiting_room.push(c.id);
                    return false;
                }
                Stop::Credit | Stop::Closed => return false,
            }
        }
        if !c.readable || c.eof {
            return false;
        }
        let n = match sys::read(c.fd.as_raw_fd(), &mut self.read_buf) {
            Ok(0) => {
                c.eof = true;
                c.readable = false;
                return false;
            }
            Ok(n) => {
                c.last_active = now;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.readable = false;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(_) => {
                c.eof = true;
                c.readable = false;
                c.closing = true;
                return false;
            }
        };
        // A short read emptied the socket: a non-blocking TCP read returns
        // less than asked only once the receive queue is empty (a pending
        // signal does not cut it short; it only ends a read that would
        // wait). Bytes that arrive from then on raise a new edge-triggered
        // event, so the connection waits for epoll instead of paying one
        // more read (and one more loop) for EAGAIN after every wake-up.
        // Not so once the peer hung up: its FIN or RST came on the edge
        // that carried this data, no edge follows, and only the read that
        // returns 0 (or the reset) tells the connection is gone.
        if n < self.read_buf.len() && !c.hup {
            c.readable = false;
        }
        let buf = std::mem::take(&mut self.read_buf);
        let (used, stop) = self.decode(c, &buf[..n], now, wall);
        if used < n {
            if c.stash.capacity() == 0 {
                // It only ever holds the rest of one read: it never grows.
                c.stash = self
                    .spare_stash
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK));
            }
            c.stash.extend_from_slice(&buf[used..n]);
        }
        self.read_buf = buf;
        match stop {
            Stop::Done => c.readable,
            Stop::Room => {
                self.waiting_room.push(c.id);
                false
            }
            Stop::Credit | Stop::Closed => false,
        }
    }

    /// Decodes `input` for `c`; returns the bytes taken and why it stopped.
    fn decode(&mut self, c: &mut Conn, input: &[u8], now: u64, wall: u64) -> (usize, Stop) {
        let mut pos = 0;
        let credit = self.p.ack_credit;
        let id = c.id;
        let mut stop = Stop::Done;
        let mut scan = 0;
        while pos < input.len() {
            if c.dec.is_closed() {
                pos = input.len();
                stop = Stop::Closed;
                break;
            }
            self.prefetch_ahead(input, pos, &mut scan);
            if c.inflight + c.unsent_acks() + 1 > credit {
                stop = Stop::Credit;
                break;
            }
            let room = self.shutting_down || self.room();
            if !room && !self.p.reject_when_full {
                stop = Stop::Room;
                break;
            }
            let Conn {
                dec,
                out,
                inflight,
                fatal,
                ..
            } = c;
            let (used, item) = dec.next(&input[pos..]);
            pos += used;
            let Some(item) = item else { break };
            match item {
                Decoded::Frame(f) => {
                    let ack = f.ack_requested();
                    if let Some(reason) = refusal(self.shutting_down, room) {
                        self.metrics.add(Counter::Rejected(reason), 1);
                        if ack {
                            if out.capacity() == 0 {
                                *out = self.spare_out.pop().unwrap_or_else(|| {
                                    Vec::with_capacity((credit as usize + 1) * ACK_LEN)
                                });
                            }
                            out.extend_from_slice(&Ack::rejected(f.event_id(), reason).encode());
                        }
                        continue;
                    }
                    let class = self.p.router.route(f.topic_bytes(), f.priority());
                    let Some(mut slot) = self.spare.take() else {
                        continue;
                    };
                    let bytes = f.bytes();
                    let Some(dst) = slot.buffer_mut().get_mut(..bytes.len()) else {
                        continue;
                    };
                    dst.copy_from_slice(bytes);
                    let ev = Event::new(slot.share(bytes.len()), id, class, wall, now);
                    self.push(class, ev, now);
                    if ack {
                        *inflight += 1;
                    }
                }
                Decoded::Legacy(ev) => {
                    if let Some(reason) = refusal(self.shutting_down, room) {
                        self.metrics.add(Counter::Rejected(reason), 1);
                        continue;
                    }
                    let class = self.p.router.route(ev.topic(), ev.priority());
                    let Some(mut slot) = self.spare.take() else {
                        continue;
                    };
                    let Ok(len) = ev.encode_v1(0, wall, slot.buffer_mut()) else {
                        continue;
                    };
                    let ev = Event::new(slot.share(len), id, class, wall, now);
                    self.push(class, ev, now);
                }
                Decoded::Rejected {
                    reason,
                    event_id,
                    ack,
                } => {
                    self.metrics.add(Counter::Rejected(reason), 1);
                    if ack {
                        if out.capacity() == 0 {
                            *out = self.spare_out.pop().unwrap_or_else(|| {
                                Vec::with_capacity((credit as usize + 1) * ACK_LEN)
                            });
                        }
                        out.extend_from_slice(&Ack::rejected(event_id, reason).encode());
                    }
                }
                Decoded::Fatal(reason) => {
                    // The acks of every earlier frame first, then FATAL,
                    // then close (flush_dirty sends it once none is left).
                    self.metrics.add(Counter::Rejected(reason), 1);
                    *fatal = Some(Ack::fatal(reason));
                    pos = input.len();
                    stop = Stop::Closed;
                    break;
                }
                Decoded::LegacySkipped(rule) => {
                    self.metrics.add(Counter::Rejected(rule.reason()), 1);
                    self.metrics.add(Counter::LegacySkipped, 1);
                }
                Decoded::KeepAlive => self.metrics.add(Counter::KeepAlives, 1),
                Decoded::Close => {
                    pos = input.len();
                    stop = Stop::Closed;
                    break;
                }
            }
        }
        self.metrics.add(Counter::BytesReceived, pos as u64);
        (pos, stop)
    }

    /// With the processors inline: asks the CPU to start loading the
    /// dedup slots of the frames that start in `input[*scan..pos +
    /// DEDUP_AHEAD_BYTES]` (`*scan` moves past them), so that each lookup or
    /// insert finds its slots in cache instead of waiting for memory, as it
    /// would with a prefetch issued just before it. The frames' heads are
    /// read unchecked (`peek_v1`): the hint may be wrong, never the answer.
    /// `*scan` starts at a frame boundary (0, or `pos` once `pos` passed
    /// it); it stops at the first thing that is not a whole v1 frame.
    #[inline]
    fn prefetch_ahead(&self, input: &[u8], pos: usize, scan: &mut usize) {
        let Dispatch::Inline(i) = &self.p.dispatch else {
            return;
        };
        if *scan < pos {
            *scan = pos;
        }
        while *scan < pos + DEDUP_AHEAD_BYTES {
            let Some(head) = input.get(*scan..).and_then(peek_v1) else {
                break;
            };
            match self.p.router.route(head.topic, head.priority) {
                Class::Realtime => i.dedup.prefetch(head.event_id),
                Class::Transactional => i.dedup.prefetch_insert(head.event_id),
                Class::Batch => {}
            }
            *scan += head.len;
        }
    }

    fn push(&mut self, class: Class, ev: Event<'static>, now: u64) {
        self.metrics.add(Counter::Received(class), 1);
        self.metrics.event();
        match &mut self.p.dispatch {
            Dispatch::Threads(class_tx) => {
                if let Some(tx) = class_tx.get_mut(class.index()) {
                    // Room was checked before decoding.
                    if tx.push(ev).is_ok() {
                        self.accepted += 1;
                        self.pushed[class.index()] = true;
                    }
                }
            }
            Dispatch::Inline(i) => {
                i.process(class, ev, now);
                self.accepted += 1;
                self.pushed_events += 1;
            }
        }
    }

    /// Closes connections whose frame stayed half-received too long.
    fn scan_frame_timeouts(&mut self, now: u64) {
        let limit = self.p.frame_timeout.as_nanos() as u64;
        let mut next = u64::MAX;
        let mut expired = Vec::new();
        for c in self.conns.iter().flatten() {
            if let Some(since) = c.mid_since {
                if now.saturating_sub(since) >= limit {
                    expired.push(c.id);
                } else {
                    next = next.min(since + limit);
                }
            }
        }
        for id in expired {
            eprintln!("eventstream: connection closed: frame half-received past --frame-timeout");
            self.p.shared.frame_timeouts.fetch_add(1, Ordering::Relaxed);
            self.close(id);
        }
        self.next_timeout_scan = if next == u64::MAX { now + limit } else { next };
    }

    /// When a graceful shutdown stops waiting for slow clients.
    fn shutdown_deadline(&self) -> Option<u64> {
        self.shutdown_began
            .map(|t| t + SHUTDOWN_GRACE.as_nanos() as u64)
    }

    /// Runs the graceful shutdown; true when ingest may exit.
    fn shutdown_step(&mut self, now: u64) -> io::Result<bool> {
        let shared = self.p.shared.clone();
        if !self.shutting_down {
            if !shared.shutdown_requested.load(Ordering::Acquire) {
                return Ok(false);
            }
            // Stop accepting; frames from now on are answered SHUTTING_DOWN.
            self.shutting_down = true;
            self.listener = None;
            self.shutdown_began = Some(now);
            if shared.phase() == Phase::Run {
                shared.set_phase(Phase::Drain);
            }
            // Input waiting for room is answered now.
            let waiting = std::mem::take(&mut self.waiting_room);
            for id in waiting {
                if let Some(c) = self.conn_mut(id) {
                    if !c.queued {
                        c.queued = true;
                        self.ready.push_back(id);
                    }
                }
            }
        }
        let past_deadline = self.shutdown_deadline().is_some_and(|d| now >= d);
        if shared.phase() == Phase::Drain {
            // Input already waiting in the sockets is read and answered
            // SHUTTING_DOWN (for up to DRAIN_READ), so producers learn
            // which frames were not stored.
            // Input is read out when no connection is ready and every ack
            // is written (a connection held back by its ack credit reads
            // again once its acks are out), but not before DRAIN_MIN_NS, so
            // frames still on their way get their answer too.
            let begun = self.shutdown_began.unwrap_or(now);
            let acks_out = self
                .conns
                .iter()
                .flatten()
                .all(|c| c.out_pos >= c.out.len());
            let quiet = self.ready.is_empty() && acks_out && now >= begun + DRAIN_MIN_NS;
            let read_out = quiet || now >= begun + DRAIN_READ_NS;
            let answered = shared.finished.load(Ordering::Acquire) >= self.accepted;
            if (answered && read_out && now > begun) || past_deadline {
                shared.set_phase(Phase::Stop);
            }
        }
        if shared.phase() == Phase::Stop && !shared.storage_done.load(Ordering::Acquire) {
            if let (Some(storage), StorageMode::Ingest) = (&self.p.storage, self.p.storage_mode) {
                // Storage has no thread: its final fsync and held acks.
                let finished = match storage.try_lock() {
                    Ok(mut s) => s.done() && s.finish().map_err(io::Error::other)?,
                    Err(_) => false,
                };
                if finished {
                    self.deliver_acks();
                    self.flush_dirty();
                }
            }
        }
        if shared.phase() == Phase::Stop && shared.storage_done.load(Ordering::Acquire) {
            self.deliver_acks();
            let pending = self.conns.iter().flatten().any(|c| c.out_pos < c.out.len());
            if !pending || past_deadline {
                return Ok(true);
            }
        }
        Ok(past_deadline)
    }
}
