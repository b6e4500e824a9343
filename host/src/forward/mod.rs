//! The forwarder (`--forward`, docs/scale-out.md): the `es-forward` thread
//! reads the stored log below its durable end, from its own cursor (the
//! reserved consumer group `_forward`), and publishes every event into a
//! NATS JetStream stream, with a `Nats-Msg-Id` that lets JetStream's
//! duplicate window drop what a restart or a retry publishes again.
//!
//! Only this thread runs the NATS client (`async-nats` on a current-thread
//! runtime); ingest, the processors and storage never wait for it. The
//! figures it keeps are in [`ForwardStats`].

mod log;
mod nats;
mod publish;
mod subject;

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

pub use subject::{escape_topic, Template};

use crate::readers::groups::Groups;
use crate::repair::Gaps;
use crate::shared::Shared;
use crate::storage::LogTail;

/// The forwarder's cursor: a consumer group the clients cannot name
/// (`_` is reserved for the server).
pub const CURSOR_GROUP: &str = "_forward";

/// The data directory's server id file.
pub const SERVER_ID_FILE: &str = "server_id";

/// The `serve` flags of the forwarder.
#[derive(clap::Args, Clone, Debug)]
pub struct ForwardArgs {
    /// Forward the stored log into NATS JetStream at these servers
    /// (`nats://HOST:PORT[,HOST:PORT...]`).
    #[arg(long, value_name = "URLS")]
    pub forward: Option<String>,
    /// The JetStream stream to forward into (needed with --forward).
    #[arg(long, value_name = "NAME")]
    pub forward_stream: Option<String>,
    /// Subject of each event; `{class}`, `{topic}`, `{priority}` and
    /// `{partition}` are replaced (topics are escaped: docs/scale-out.md).
    #[arg(
        long,
        default_value = "events.{class}.{topic}",
        value_name = "TEMPLATE"
    )]
    pub forward_subject: String,
    /// Publishes awaiting their JetStream ack at most.
    #[arg(long, default_value_t = 4096, value_name = "N")]
    pub forward_max_pending: u32,
    /// Create the stream if it is missing (file storage, the template's
    /// subjects, --forward-duplicate-window, --forward-replicas).
    #[arg(long)]
    pub forward_create_stream: bool,
    /// Replicas of a stream --forward-create-stream makes.
    #[arg(long, default_value_t = 1, value_name = "N")]
    pub forward_replicas: u8,
    /// Duplicate window of a stream --forward-create-stream makes.
    #[arg(long, default_value = "2m", value_parser = crate::config::parse_duration, value_name = "TIME")]
    pub forward_duplicate_window: Duration,
    /// A file holding the NATS token (its first line).
    #[arg(long, value_name = "FILE")]
    pub forward_token_file: Option<PathBuf>,
    /// How long a publish waits for its JetStream ack before it and
    /// everything after it are published again.
    #[arg(long, default_value = "5s", value_parser = crate::config::parse_duration, value_name = "TIME")]
    pub forward_ack_timeout: Duration,
    /// Connect to NATS with TLS, trusting the CA certificates in this PEM
    /// file (also for `tls://` URLs signed by a private CA).
    #[arg(long, value_name = "PEM")]
    pub forward_tls_ca: Option<PathBuf>,
    /// Present this client certificate (PEM) to NATS (its `verify`).
    #[arg(long, value_name = "PEM", requires = "forward_tls_key")]
    pub forward_tls_cert: Option<PathBuf>,
    /// The client certificate's key (PEM).
    #[arg(long, value_name = "PEM", requires = "forward_tls_cert")]
    pub forward_tls_key: Option<PathBuf>,
}

/// The forwarder's settings, checked.
#[derive(Clone, Debug)]
pub struct ForwardConfig {
    /// NATS server URLs.
    pub servers: Vec<String>,
    /// The stream.
    pub stream: String,
    /// Subject of each event.
    pub subject: Template,
    /// Publishes in flight at most.
    pub max_pending: usize,
    /// Create a missing stream.
    pub create_stream: bool,
    /// Its replicas.
    pub replicas: usize,
    /// Its duplicate window.
    pub duplicate_window: Duration,
    /// The NATS token.
    pub token: Option<String>,
    /// The wait for a publish ack.
    pub ack_timeout: Duration,
    /// TLS to NATS: the CA file (TLS required when given).
    pub tls_ca: Option<PathBuf>,
    /// TLS to NATS: a client certificate and its key.
    pub tls_cert: Option<(PathBuf, PathBuf)>,
}

impl ForwardArgs {
    /// The forwarder's settings (None: no --forward); errors are one line.
    pub fn config(&self) -> Result<Option<ForwardConfig>, String> {
        let Some(urls) = &self.forward else {
            if self.forward_stream.is_some() || self.forward_create_stream {
                return Err("--forward-stream and --forward-create-stream need --forward".into());
            }
            return Ok(None);
        };
        let servers: Vec<String> = urls
            .split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(|s| {
                if s.contains("://") {
                    s.to_string()
                } else {
                    format!("nats://{s}")
                }
            })
            .collect();
        if servers.is_empty() {
            return Err("--forward: no NATS server given".into());
        }
        for s in &servers {
            s.parse::<async_nats::ServerAddr>()
                .map_err(|e| format!("--forward: bad NATS address {s:?}: {e}"))?;
        }
        let stream = self
            .forward_stream
            .clone()
            .ok_or("--forward needs --forward-stream NAME")?;
        if stream.is_empty()
            || !stream
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'-' || c == b'_')
        {
            return Err(format!(
                "--forward-stream {stream:?}: a stream name is letters, digits, '-' and '_'"
            ));
        }
        let subject = Template::parse(&self.forward_subject)
            .map_err(|e| format!("--forward-subject {:?}: {e}", self.forward_subject))?;
        if !(1..=1 << 20).contains(&self.forward_max_pending) {
            return Err("--forward-max-pending must be 1..=1048576".into());
        }
        if !(1..=5).contains(&self.forward_replicas) {
            return Err("--forward-replicas must be 1..=5".into());
        }
        if self.forward_ack_timeout.is_zero() {
            return Err("--forward-ack-timeout must be above zero".into());
        }
        // NATS tokens are not HELLO tokens: no 512-byte bound of ours.
        let token = crate::auth::token_file(
            "--forward-token-file",
            self.forward_token_file.as_deref(),
            usize::MAX,
        )?;
        // Read now, so a bad file stops the start with one line.
        if let Some(ca) = &self.forward_tls_ca {
            eventstream_client::tls::read_certs(ca)
                .map_err(|e| format!("--forward-tls-ca: {e}"))?;
        }
        let tls_cert = self
            .forward_tls_cert
            .clone()
            .zip(self.forward_tls_key.clone());
        if let Some((cert, key)) = &tls_cert {
            eventstream_client::tls::read_certs(cert)
                .map_err(|e| format!("--forward-tls-cert: {e}"))?;
            eventstream_client::tls::read_key(key)
                .map_err(|e| format!("--forward-tls-key: {e}"))?;
        }
        Ok(Some(ForwardConfig {
            servers,
            stream,
            subject,
            max_pending: self.forward_max_pending as usize,
            create_stream: self.forward_create_stream,
            replicas: usize::from(self.forward_replicas),
            duplicate_window: self.forward_duplicate_window,
            token,
            ack_timeout: self.forward_ack_timeout,
            tls_ca: self.forward_tls_ca.clone(),
            tls_cert,
        }))
    }
}

/// The forwarder's figures (`/metrics` and the summary line).
#[derive(Default)]
pub struct ForwardStats {
    /// Whether `--forward` is on.
    pub enabled: AtomicBool,
    /// 1 while connected to NATS with the stream found.
    pub up: AtomicBool,
    /// Messages published (repeats included).
    pub published: AtomicU64,
    /// Events JetStream acked as new.
    pub acked: AtomicU64,
    /// Acks JetStream marked as duplicates (repeats it dropped).
    pub duplicates: AtomicU64,
    /// Publishes failed or timed out (each restarts publishing at the
    /// oldest unacked event).
    pub failures: AtomicU64,
    /// Events retention deleted before they were forwarded.
    pub skipped: AtomicU64,
    /// Every event below this offset is acked by JetStream.
    pub acked_offset: AtomicU64,
    /// Receive time (unix ns) of the oldest event not yet acked, 0 if
    /// unknown or none.
    pub oldest_unacked_ns: AtomicU64,
}

impl ForwardStats {
    /// The lag now, against the log's written end: (events, seconds);
    /// None without `--forward`.
    pub fn lag(&self, tail: Option<&Arc<LogTail>>) -> Option<(u64, f64)> {
        let tail = tail.filter(|_| self.enabled.load(Ordering::Relaxed))?;
        let end = tail.written.load().offset;
        Some((
            self.lag_events(end),
            self.lag_seconds(end, crate::sys::wall_ns()),
        ))
    }

    /// Events stored and not yet acked by JetStream.
    pub fn lag_events(&self, end: u64) -> u64 {
        end.saturating_sub(self.acked_offset.load(Ordering::Relaxed))
    }

    /// Seconds since the oldest event not yet acked was received (0 when
    /// caught up).
    pub fn lag_seconds(&self, end: u64, now_ns: u64) -> f64 {
        let oldest = self.oldest_unacked_ns.load(Ordering::Relaxed);
        if self.lag_events(end) == 0 || oldest == 0 {
            return 0.0;
        }
        now_ns.saturating_sub(oldest) as f64 / 1e9
    }
}

/// The server id of the data directory `dir`: made once (16 random bytes,
/// in hex) and kept in `<dir>/server_id`.
pub fn server_id(dir: &Path) -> Result<String, String> {
    let path = dir.join(SERVER_ID_FILE);
    match fs::read_to_string(&path) {
        Ok(text) => {
            let id = text.trim();
            if id.len() == 32 && id.bytes().all(|c| c.is_ascii_hexdigit()) {
                return Ok(id.to_string());
            }
            return Err(format!(
                "{}: not a server id (32 hex digits); it names this server's events in forwarded streams and must not change",
                path.display()
            ));
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    }
    let mut raw = [0u8; 16];
    File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut raw))
        .map_err(|e| format!("cannot read /dev/urandom: {e}"))?;
    let id: String = raw.iter().map(|b| format!("{b:02x}")).collect();
    crate::storage::replace_durably(dir, SERVER_ID_FILE, format!("{id}\n").as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(id)
}

/// Lowers the calling thread's scheduling priority to `nice` (Linux
/// gives each thread its own nice value).
fn set_thread_nice(nice: i32) -> std::io::Result<()> {
    // SAFETY: gettid has no arguments and cannot fail.
    let tid = unsafe { libc::syscall(libc::SYS_gettid) };
    // SAFETY: setpriority takes plain integers; its result is checked.
    if unsafe { libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice) } == -1 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// What the forwarder needs of the server.
pub struct ForwardParts {
    /// Its settings.
    pub cfg: ForwardConfig,
    /// This data directory's id.
    pub server_id: String,
    /// The log's tail (durable end, segments).
    pub tail: Arc<LogTail>,
    /// Gaps `--repair` listed.
    pub gaps: Gaps,
    /// The consumer groups (the cursor lives there).
    pub groups: Arc<Groups>,
    /// The log's fsync (for policies that leave events undurable).
    pub sync: Arc<crate::storage::SyncTargets>,
    /// The server's shared state.
    pub shared: Arc<Shared>,
    /// The first offset to forward (set by [`start`] from the cursor).
    pub start: u64,
}

/// How long `serve` waits at start for NATS, to tell a missing stream as
/// a start-up error. Past it the server runs and the forwarder retries.
const START_WAIT: Duration = Duration::from_secs(3);

/// Starts the `es-forward` thread; returns once NATS answered (or did not
/// within [`START_WAIT`]). A missing stream without
/// `--forward-create-stream`, or one that cannot be made, is an error.
pub fn start(mut p: ForwardParts) -> Result<std::thread::JoinHandle<Result<(), String>>, String> {
    let (tx, rx) = mpsc::channel();
    // The cursor, and retention's hold on it, before anything runs.
    p.start = {
        let mut groups = p.groups.lock();
        let g = groups.entry(CURSOR_GROUP.to_string()).or_default();
        g.session = Some(crate::readers::groups::FORWARD_SESSION);
        g.committed
    }
    .unwrap_or_else(|| p.tail.first_offset());
    p.tail.set_forward_hold(Some(p.start));
    p.shared
        .forward
        .acked_offset
        .store(p.start, Ordering::Relaxed);
    p.shared.forward.enabled.store(true, Ordering::Relaxed);
    let handle = std::thread::Builder::new()
        .name("es-forward".into())
        .spawn(move || publish::run(p, tx))
        .map_err(|e| format!("cannot start the forward thread: {e}"))?;
    match rx.recv_timeout(START_WAIT) {
        Ok(Ok(())) => Ok(handle),
        Ok(Err(e)) => {
            let _ = handle.join();
            Err(e)
        }
        Err(_) => {
            eprintln!(
                "eventstream: warning: NATS did not answer within {}s; the server runs and the forwarder retries",
                START_WAIT.as_secs()
            );
            Ok(handle)
        }
    }
}
