//! State every engine thread shares: the shutdown phase, the wake-up spots,
//! the metrics registry and the gauges the threads publish.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Mutex;

use eventstream_core::metrics::{Histogram, Registry};
use eventstream_core::Class;

use crate::sys::{IngestWaker, Parker};

/// Where the server is in its life; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u32)]
pub enum Phase {
    /// Serving.
    Run = 0,
    /// A graceful shutdown began: no accepts, new frames are answered
    /// SHUTTING_DOWN, batch windows flush.
    Drain = 1,
    /// Everything accepted is answered: threads finish and exit.
    Stop = 2,
}

impl Phase {
    fn from_u32(v: u32) -> Phase {
        match v {
            0 => Phase::Run,
            1 => Phase::Drain,
            _ => Phase::Stop,
        }
    }
}

/// The rings whose depths the gauges publish.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RingGauge {
    /// Ingest to a processor, by class.
    Class(Class),
    /// A processor to storage, by class.
    Storage(Class),
    /// Storage's acks back to ingest.
    Acks,
}

impl RingGauge {
    /// Every ring, in the gauges' order.
    pub const ALL: [RingGauge; 7] = [
        RingGauge::Class(Class::Realtime),
        RingGauge::Class(Class::Transactional),
        RingGauge::Class(Class::Batch),
        RingGauge::Storage(Class::Realtime),
        RingGauge::Storage(Class::Transactional),
        RingGauge::Storage(Class::Batch),
        RingGauge::Acks,
    ];

    /// The gauge's index.
    pub fn index(self) -> usize {
        match self {
            RingGauge::Class(c) => c.index(),
            RingGauge::Storage(c) => 3 + c.index(),
            RingGauge::Acks => 6,
        }
    }

    /// The `ring` label of the gauge.
    pub fn name(self) -> &'static str {
        match self {
            RingGauge::Class(Class::Realtime) => "realtime",
            RingGauge::Class(Class::Transactional) => "transactional",
            RingGauge::Class(Class::Batch) => "batch",
            RingGauge::Storage(Class::Realtime) => "storage_realtime",
            RingGauge::Storage(Class::Transactional) => "storage_transactional",
            RingGauge::Storage(Class::Batch) => "storage_batch",
            RingGauge::Acks => "acks",
        }
    }
}

/// Shared by all threads of one server, in named parts.
pub struct Shared {
    /// Where the server is in its life, and what ingest and storage counted.
    pub life: Lifecycle,
    /// Where each thread parks, and how it is woken.
    pub wake: Wakers,
    /// How far the log is written, synced and handed to writeback.
    pub progress: SyncProgress,
    /// What the threads publish for `/metrics`.
    pub gauges: Gauges,
    /// Counters and latency histograms (made once per process start and
    /// kept for its life: the threads' metrics hold it by reference).
    pub registry: &'static Registry,
    /// Pool slots.
    pub pool_slots: u64,
    /// How long an idle thread spins before parking (`--idle-spin`).
    pub idle_spin_ns: u64,
    /// The read path's figures.
    pub readers: crate::readers::ReaderStats,
    /// The forwarder's figures.
    pub forward: crate::forward::ForwardStats,
    /// The `--auth` tokens (reloaded by housekeeping on SIGHUP).
    pub auth: std::sync::OnceLock<std::sync::Arc<crate::auth::AuthState>>,
    /// The TLS set-up (`--tls-listen`; its certificate is reloaded by
    /// housekeeping on SIGHUP).
    pub tls: std::sync::OnceLock<std::sync::Arc<crate::tls::ServerTls>>,
    /// Wakes the reader thread (after a reload).
    pub readers_waker: std::sync::OnceLock<std::sync::Arc<crate::sys::EventFd>>,
}

/// The server's life: its [`Phase`] and the counts the shutdown waits on.
pub struct Lifecycle {
    /// The [`Phase`], as its `u32`.
    phase: AtomicU32,
    /// A shutdown was asked for (signal or API).
    pub shutdown_requested: AtomicBool,
    /// SIGHUP came: read the `--auth` file again.
    pub reload_requested: AtomicBool,
    /// Events ingest handed on.
    pub accepted: AtomicU64,
    /// Events storage answered (stored, duplicate, rejected).
    pub finished: AtomicU64,
    /// Storage wrote its last record and released its last ack.
    pub storage_done: AtomicBool,
    /// Ingest is short of pool slots: batch windows should flush early.
    pub pool_starved: AtomicBool,
}

impl Lifecycle {
    /// The current phase.
    pub fn phase(&self) -> Phase {
        Phase::from_u32(self.phase.load(Ordering::Acquire))
    }
}

/// Each thread's parking spot.
pub struct Wakers {
    /// Ingest's wake-up (eventfd).
    pub ingest: IngestWaker,
    /// The realtime processor's.
    pub realtime: Parker,
    /// The transactional processor's.
    pub transactional: Parker,
    /// The batch processor's.
    pub batch: Parker,
    /// The storage thread's.
    pub storage: Parker,
    /// The sync thread's.
    pub sync: Parker,
    /// The prefill thread's (`--fsync always`): it sleeps while a segment
    /// made ahead of use waits for a roll; a roll wakes it.
    pub prefill: Parker,
}

impl Wakers {
    /// Wakes every thread.
    pub fn all(&self) {
        self.realtime.wake();
        self.transactional.wake();
        self.batch.wake();
        self.storage.wake();
        self.sync.wake();
        self.prefill.wake();
        self.ingest.wake_always();
    }
}

/// The log's progress between the writer and the sync thread.
pub struct SyncProgress {
    /// The sync thread sleeps until the next write (storage wakes it).
    pub sync_idle: AtomicBool,
    /// The active segment's bytes `kick_from..kick_to` are due for
    /// writeback: the sync thread starts it (`sync_file_range`), so the
    /// writer never waits for that call. Only a hint: a torn pair just
    /// widens the range.
    pub kick_from: AtomicU64,
    /// See `kick_from`.
    pub kick_to: AtomicU64,
    /// Log bytes written since start.
    pub written: AtomicU64,
    /// Log bytes covered by a finished fsync.
    pub synced: AtomicU64,
    /// fsyncs done.
    pub fsyncs: AtomicU64,
    /// fsync latency, ns.
    pub fsync_latency: Mutex<Histogram>,
}

/// Gauges and counters the threads publish for `/metrics` (beside the
/// registry's).
pub struct Gauges {
    /// Open producer connections.
    pub connections: AtomicU64,
    /// Connections accepted since start.
    pub connections_total: AtomicU64,
    /// Connections refused at accept (limit or no descriptors).
    pub connections_refused: AtomicU64,
    /// Connections closed for a half-received frame past --frame-timeout.
    pub frame_timeouts: AtomicU64,
    /// Connections closed after --idle-timeout with nothing in flight.
    pub idle_closed: AtomicU64,
    /// Ring depths, as last seen by each consumer (by [`RingGauge`]).
    ring_depth: [AtomicU64; 7],
    /// Next log offset.
    pub next_offset: AtomicU64,
    /// Bytes in all segments.
    pub log_bytes: AtomicU64,
    /// Offsets lost to `--repair`, as `damaged/report` lists them.
    pub log_lost_offsets: AtomicU64,
    /// Storage is in its failed state (retrying once a second).
    pub storage_failed: AtomicBool,
    /// Storage write failures since start.
    pub storage_failures: AtomicU64,
    /// Dedup entries (as of the last housekeeping pass).
    pub dedup_entries: AtomicU64,
    /// Effective dedup window, ms.
    pub dedup_effective_ms: AtomicU32,
}

impl Gauges {
    /// Publishes a ring's depth.
    pub fn set_depth(&self, ring: RingGauge, depth: usize) {
        if let Some(g) = self.ring_depth.get(ring.index()) {
            g.store(depth as u64, Ordering::Relaxed);
        }
    }

    /// A ring's last published depth.
    pub fn depth(&self, ring: RingGauge) -> u64 {
        self.ring_depth
            .get(ring.index())
            .map_or(0, |g| g.load(Ordering::Relaxed))
    }
}

impl Shared {
    /// Fresh state for a pool of `pool_slots`.
    pub fn new(pool_slots: u64, window_ms: u32, idle_spin_ns: u64) -> std::io::Result<Self> {
        Ok(Self {
            life: Lifecycle {
                phase: AtomicU32::new(Phase::Run as u32),
                shutdown_requested: AtomicBool::new(false),
                reload_requested: AtomicBool::new(false),
                accepted: AtomicU64::new(0),
                finished: AtomicU64::new(0),
                storage_done: AtomicBool::new(false),
                pool_starved: AtomicBool::new(false),
            },
            wake: Wakers {
                ingest: IngestWaker::new()?,
                realtime: Parker::new(),
                transactional: Parker::new(),
                batch: Parker::new(),
                storage: Parker::new(),
                sync: Parker::new(),
                prefill: Parker::new(),
            },
            progress: SyncProgress {
                sync_idle: AtomicBool::new(false),
                kick_from: AtomicU64::new(0),
                kick_to: AtomicU64::new(0),
                written: AtomicU64::new(0),
                synced: AtomicU64::new(0),
                fsyncs: AtomicU64::new(0),
                fsync_latency: Mutex::new(Histogram::new()),
            },
            gauges: Gauges {
                connections: AtomicU64::new(0),
                connections_total: AtomicU64::new(0),
                connections_refused: AtomicU64::new(0),
                frame_timeouts: AtomicU64::new(0),
                idle_closed: AtomicU64::new(0),
                ring_depth: Default::default(),
                next_offset: AtomicU64::new(0),
                log_bytes: AtomicU64::new(0),
                log_lost_offsets: AtomicU64::new(0),
                storage_failed: AtomicBool::new(false),
                storage_failures: AtomicU64::new(0),
                dedup_entries: AtomicU64::new(0),
                dedup_effective_ms: AtomicU32::new(window_ms),
            },
            registry: Box::leak(Box::new(Registry::new())),
            pool_slots,
            idle_spin_ns,
            readers: Default::default(),
            forward: Default::default(),
            auth: Default::default(),
            tls: Default::default(),
            readers_waker: Default::default(),
        })
    }

    /// The current phase.
    pub fn phase(&self) -> Phase {
        self.life.phase()
    }

    /// Sets the phase and wakes every thread so each sees it.
    pub fn set_phase(&self, phase: Phase) {
        self.life.phase.store(phase as u32, Ordering::Release);
        self.wake.all();
    }

    /// Asks for a graceful shutdown (what SIGINT and SIGTERM do).
    pub fn request_shutdown(&self) {
        self.life.shutdown_requested.store(true, Ordering::Release);
        self.wake.ingest.wake_always();
    }

    /// Pool slots not held by an event in flight (events accepted and not
    /// yet answered hold one slot each).
    pub fn pool_free(&self) -> u64 {
        let inflight = self
            .life
            .accepted
            .load(Ordering::Relaxed)
            .saturating_sub(self.life.finished.load(Ordering::Relaxed));
        self.pool_slots.saturating_sub(inflight)
    }
}
