//! The server's settings as domain types: what `config` makes of the
//! command line once every flag is checked. Nothing here knows clap.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use eventstream_core::dedup::FullPolicy;
use eventstream_core::pipeline::WhenFull;
use eventstream_core::Priority;

/// The topic table's capacity.
pub const MAX_TOPICS: usize = 1024;

/// When the log is fsynced.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FsyncPolicy {
    /// Never (the page cache and the OS decide).
    Never,
    /// Every this many milliseconds while there are unsynced writes.
    Interval(u64),
    /// Group commit: STORED acks wait for an fsync covering their record.
    Always,
}

/// Where the three processors run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Processors {
    /// Inline on machines with at most 2 CPUs, threads otherwise.
    Auto,
    /// One thread per processor, fed through the class rings.
    Threads,
    /// On the ingest thread, straight into the storage rings.
    Inline,
}

/// Whether storage runs on its own thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StorageThread {
    /// Off when the processors run inline, on otherwise.
    Auto,
    /// The storage thread writes the log and hands acks back to ingest.
    On,
    /// The ingest thread writes the log itself (needs inline processors).
    Off,
}

/// Whether the log's written-back pages are dropped from the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DropPages {
    /// While appends run fast (see `writer::DROP_MIN_RATE`).
    Auto,
    /// Always, a few MiB behind the writeback.
    Always,
    /// Never: the kernel frees them when it needs the memory.
    Never,
}

/// Everything `serve` runs with (docs/operations.md says what each does).
#[derive(Clone, Debug)]
pub struct ServerConfig {
    /// Address producers and readers connect to in plaintext (None:
    /// `--listen none`).
    pub listen: Option<SocketAddr>,
    /// Address they connect to with TLS.
    pub tls_listen: Option<SocketAddr>,
    /// The TLS certificate, key and client CAs (with `tls_listen`).
    pub tls: Option<crate::tls::TlsFiles>,
    /// The data directory.
    pub data: PathBuf,
    /// Address of the `/metrics` endpoint.
    pub metrics: SocketAddr,
    /// When the log is fsynced.
    pub fsync: FsyncPolicy,
    /// Least time between two group-commit fsyncs.
    pub group_commit_delay: Duration,
    /// Segment size before a roll.
    pub segment_bytes: u64,
    /// Make segments ahead of use under `--fsync always`.
    pub segment_prefill: bool,
    /// Keep at most this many bytes of segments.
    pub retention_bytes: Option<u64>,
    /// Delete segments older than this.
    pub retention_age: Option<Duration>,
    /// Bytes of deleted segments read sessions may keep open.
    pub reader_hold_bytes: u64,
    /// Consumer groups at most.
    pub max_groups: usize,
    /// Forget a group idle this long.
    pub group_expiry: Duration,
    /// Repair damaged segments instead of refusing to start.
    pub repair: bool,
    /// Largest frame accepted.
    pub max_frame: u32,
    /// Longest topic accepted.
    pub max_topic: u8,
    /// Event pool slots.
    pub pool_events: u32,
    /// How long transactional ids are remembered.
    pub dedup_window: Duration,
    /// Dedup slots (a power of two).
    pub dedup_capacity: usize,
    /// What a full dedup table does.
    pub dedup_full: FullPolicy,
    /// How often expired ids are swept.
    pub dedup_sweep: Duration,
    /// Ring slots (a power of two).
    pub ring_capacity: usize,
    /// Events per batch window.
    pub batch_max_events: u32,
    /// Age at which a batch window closes.
    pub batch_max_age: Duration,
    /// Topic priority floors (flags and topics file).
    pub topics: Vec<(String, Priority)>,
    /// Connections beyond this are closed at accept.
    pub max_connections: u32,
    /// A frame half-received this long closes its connection.
    pub frame_timeout: Duration,
    /// A quiet producer connection is closed after this (`None`: never).
    pub idle_timeout: Option<Duration>,
    /// Acks one connection may have in flight or unsent.
    pub ack_credit: u32,
    /// What full rings or a full pool do.
    pub when_full: WhenFull,
    /// Pin engine threads to CPUs.
    pub pin: bool,
    /// Where the processors run.
    pub processors: Processors,
    /// Whether storage has its own thread.
    pub storage_thread: StorageThread,
    /// How long an idle thread spins before it parks.
    pub idle_spin: Duration,
    /// Page-cache dropping of the written log.
    pub drop_written_pages: DropPages,
    /// Forwarding into NATS JetStream (`--forward`).
    pub forward: Option<crate::forward::ForwardConfig>,
    /// The tokens, when authentication is on (`--auth`).
    pub auth: Option<std::sync::Arc<crate::auth::AuthState>>,
    /// With `--auth`: the topic prefix legacy clients may produce to.
    pub legacy_unauthenticated: Option<String>,
    /// `--legacy deny`: the legacy dialect is refused.
    pub legacy_deny: bool,
    /// The bearer token `/metrics` asks for (`--metrics-token-file`).
    pub metrics_token: Option<Vec<u8>>,
}
