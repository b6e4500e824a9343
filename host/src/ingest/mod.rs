//! The ingest thread: one epoll loop (edge-triggered, non-blocking sockets)
//! that accepts producers, reads large chunks, decodes many frames per read,
//! copies each valid frame once into a pool slot, and hands it downstream
//! (the thread layout behind [`Downstream`]); it writes the acks that come
//! back from storage.
//!
//! Costs per event: no allocation, no lock, no syscall (one `read` serves
//! every frame in its chunk, one `write` every ack queued for a connection).
//! Allocation happens per connection (decoder stash, ack buffer).
//!
//! Submodules: `conns` (accepting, registering and closing connections,
//! their timeouts), `acks` (acks into connections and out to the sockets),
//! `read` (reading and decoding).

use std::collections::VecDeque;
use std::fs::File;
use std::io;
use std::net::TcpListener;
use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use eventstream_core::metrics::{Counter, LocalMetrics};
use eventstream_core::pipeline::Event;
use eventstream_core::pool::{Acquirer, SlotMut};
use eventstream_core::ring::Consumer;
use eventstream_core::route::TopicTable;
use eventstream_core::wire::{Ack, Limits, ACK_LEN};
use eventstream_core::Class;

use crate::settings::MAX_TOPICS;
use crate::shared::{Phase, Shared};
use crate::sys::{monotonic_ns, Epoll};
use crate::topology::Downstream;

mod acks;
mod conns;
mod hello;
mod read;
mod tls;

use conns::{spares, Conn};
use hello::HELLO_MAX;

use crate::auth::Access;
use eventstream_core::wire::Reason;

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
const TOKEN_TLS_LISTENER: u64 = u64::MAX - 2;
/// Longest a graceful shutdown waits for acks to reach slow clients.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(4500);
/// How long a shutdown keeps reading input that was already sent ...
const DRAIN_READ_NS: u64 = 500_000_000;
/// ... and at least this long, for frames still on their way.
const DRAIN_MIN_NS: u64 = 100_000_000;
/// How far ahead of the frame being handled ingest prefetches dedup slots
/// (about seven 256-byte events).
const DEDUP_AHEAD_BYTES: usize = 2048;
/// How long accepting pauses when no descriptor is left at all.
const ACCEPT_PAUSE_NS: u64 = 100_000_000;

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

/// Everything ingest needs, built by the server.
pub struct IngestParts {
    /// The producer listener (non-blocking; None: `--listen none`).
    pub listener: Option<TcpListener>,
    /// The TLS listener (non-blocking) and its set-up (`--tls-listen`).
    pub tls: Option<(TcpListener, Arc<crate::tls::ServerTls>)>,
    /// The pool's acquirer.
    pub acquirer: Acquirer<'static>,
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
    /// Shared state.
    pub shared: Arc<Shared>,
    /// Where read sessions go.
    pub readers: Arc<crate::readers::Inbox>,
    /// The tokens, when authentication is on (`--auth`).
    pub auth: Option<Arc<crate::auth::AuthState>>,
    /// With authentication on, legacy connections may produce to topics
    /// starting with this (`--legacy-unauthenticated`); None: they are
    /// closed.
    pub legacy_prefix: Option<Vec<u8>>,
    /// `--legacy deny`: the legacy dialect is FATAL BAD_MAGIC.
    pub legacy_deny: bool,
}

/// The ingest loop's state.
pub struct Ingest<D> {
    p: IngestParts,
    /// What accepted events go to (the thread layout).
    down: D,
    listener: Option<TcpListener>,
    tls_listener: Option<TcpListener>,
    epoll: Epoll,
    spare_fd: Option<File>,
    /// The `--auth` generation the connections were checked against.
    auth_seen: u64,
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

impl<D: Downstream> Ingest<D> {
    /// Sets up epoll over the listener and the waker.
    pub fn new(p: IngestParts, down: D) -> io::Result<Self> {
        let epoll = Epoll::new()?;
        let mut listener = None;
        if let Some(l) = &p.listener {
            epoll.add(l.as_raw_fd(), TOKEN_LISTENER, libc::EPOLLIN as u32)?;
            listener = Some(l.try_clone()?);
        }
        let mut tls_listener = None;
        if let Some((l, _)) = &p.tls {
            epoll.add(l.as_raw_fd(), TOKEN_TLS_LISTENER, libc::EPOLLIN as u32)?;
            tls_listener = Some(l.try_clone()?);
        }
        epoll.add(
            p.shared.wake.ingest.raw_fd(),
            TOKEN_WAKER,
            libc::EPOLLIN as u32,
        )?;
        Ok(Self {
            listener,
            tls_listener,
            epoll,
            spare_fd: File::open("/dev/null").ok(),
            auth_seen: 0,
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
            mid_frames: 0,
            next_timeout_scan: 0,
            next_idle_scan: 0,
            spare_out: spares((p.ack_credit as usize + 1) * ACK_LEN),
            spare_stash: spares(READ_CHUNK),
            shutting_down: false,
            shutdown_began: None,
            accept_paused_until: None,
            p,
            down,
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
            // Before any read: no frame is taken under revoked rights.
            self.recheck_tokens();
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
                self.p.shared.wake.ingest.prepare_park(want_room);
                if self.has_work() {
                    self.p.shared.wake.ingest.unpark();
                    continue;
                }
            }
            let n = self.epoll.wait(&mut events, timeout)?;
            if !busy {
                self.p.shared.wake.ingest.unpark();
            }
            for ev in events.iter().take(n) {
                let token = ev.u64;
                let flags = ev.events;
                match token {
                    TOKEN_LISTENER => self.accept_all(false),
                    TOKEN_TLS_LISTENER => self.accept_all(true),
                    TOKEN_WAKER => self.p.shared.wake.ingest.clear(),
                    _ => self.on_socket_event(token as u32, flags),
                }
            }
        }
    }

    fn has_work(&mut self) -> bool {
        // A shutdown request is work once; after that the loop must keep
        // waiting on epoll, or it would spin without reading the input it
        // still answers SHUTTING_DOWN.
        let shutdown_news = !self.shutting_down
            && self
                .p
                .shared
                .life
                .shutdown_requested
                .load(Ordering::Acquire);
        if !self.p.ack_rx.is_empty() || shutdown_news || self.down.has_work() {
            return true;
        }
        !self.waiting_room.is_empty() && self.room()
    }

    fn park_timeout(&mut self, now: u64) -> i32 {
        let mut ms: i64 = -1;
        let mut until = |deadline: u64| {
            // Rounded up: waking before a deadline would only loop again.
            let left = deadline.saturating_sub(now).div_ceil(1_000_000) as i64;
            ms = if ms < 0 { left } else { ms.min(left) };
        };
        if let Some(next) = self.down.next_deadline(now) {
            until(next);
        }
        if self.mid_frames > 0 {
            until(self.next_timeout_scan);
        }
        if self.p.idle_timeout.is_some() && self.conns.len() > self.free_slots.len() {
            until(self.next_idle_scan);
        }
        if let Some(t) = self.accept_paused_until {
            until(t);
        }
        if let Some(deadline) = self.shutdown_deadline() {
            until(deadline);
            // While shutting down, look at least every 100 ms.
            ms = if ms < 0 { 100 } else { ms.min(100) };
        }
        ms.min(i32::MAX as i64) as i32
    }

    fn publish(&mut self, now: u64) {
        self.p
            .shared
            .life
            .accepted
            .store(self.accepted, Ordering::Release);
        if self.down.step(now) {
            self.deliver_acks();
            self.flush_dirty();
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

    /// A pool slot and room downstream for one more event.
    fn room(&mut self) -> bool {
        if self.spare.is_none() {
            self.spare = self.p.acquirer.acquire();
            if self.spare.is_none() {
                // Whoever holds the batch windows closes the oldest one to
                // free slots.
                if !self
                    .p
                    .shared
                    .life
                    .pool_starved
                    .swap(true, Ordering::Relaxed)
                {
                    self.down.starved();
                }
                return false;
            }
            self.p
                .shared
                .life
                .pool_starved
                .store(false, Ordering::Relaxed);
        }
        self.down.room()
    }

    fn push(&mut self, class: Class, ev: Event<'static>, now: u64) {
        self.metrics.add(Counter::Received(class), 1);
        self.metrics.event();
        if self.down.push(class, ev, now) {
            self.accepted += 1;
        }
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
            if !shared.life.shutdown_requested.load(Ordering::Acquire) {
                return Ok(false);
            }
            // Stop accepting; frames from now on are answered SHUTTING_DOWN.
            self.shutting_down = true;
            self.listener = None;
            self.tls_listener = None;
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
            let acks_out = self.conns.iter().flatten().all(|c| !c.unsent());
            let quiet = self.ready.is_empty() && acks_out && now >= begun + DRAIN_MIN_NS;
            let read_out = quiet || now >= begun + DRAIN_READ_NS;
            let answered = shared.life.finished.load(Ordering::Acquire) >= self.accepted;
            if (answered && read_out && now > begun) || past_deadline {
                shared.set_phase(Phase::Stop);
            }
        }
        if shared.phase() == Phase::Stop
            && !shared.life.storage_done.load(Ordering::Acquire)
            && self.down.finish()?
        {
            self.deliver_acks();
            self.flush_dirty();
        }
        if shared.phase() == Phase::Stop && shared.life.storage_done.load(Ordering::Acquire) {
            self.deliver_acks();
            let pending = self.conns.iter().flatten().any(|c| c.unsent());
            if !pending || past_deadline {
                return Ok(true);
            }
        }
        Ok(past_deadline)
    }
}
