//! The command line (clap) and the checked server configuration it yields.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};
use eventstream_core::route::parse_topic_line;

/// EventStreamCore: event ingest and processing engine.
#[derive(Parser, Debug)]
#[command(name = "eventstream", version, about)]
pub struct Cli {
    /// What to run.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the server.
    Serve(Box<ServeArgs>),
    /// Generate load against a server.
    Load(Box<crate::load::LoadArgs>),
    /// Read a data directory's log.
    Inspect(InspectArgs),
    /// Send one event per line of standard input.
    Produce(crate::produce::ProduceArgs),
    /// Read events from a server's log, one per line (`--json`: objects).
    Consume(crate::consume::ConsumeArgs),
}

use crate::settings::{DropPages, Processors, StorageThread};
pub use crate::settings::{FsyncPolicy, ServerConfig, MAX_TOPICS};
use eventstream_core::dedup::FullPolicy;
use eventstream_core::pipeline::WhenFull;

/// Dedup policy when the table is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DedupFull {
    /// Replace the oldest entry met (the effective window shrinks).
    Evict,
    /// Answer REJECTED DEDUP_FULL.
    Reject,
}

/// What ingest does when a ring or the pool is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum WhenFullArg {
    /// Stop reading the affected sockets until room returns.
    Backpressure,
    /// Answer REJECTED OVERLOADED.
    Reject,
}

/// Where the three processors run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum ProcessorsArg {
    /// Inline on machines with at most 2 CPUs, threads otherwise.
    Auto,
    /// One thread per processor, fed through the class rings.
    Threads,
    /// On the ingest thread, straight into the storage rings.
    Inline,
}

/// Whether storage runs on its own thread.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum StorageThreadArg {
    /// Off when the processors run inline, on otherwise.
    Auto,
    /// The storage thread writes the log and hands acks back to ingest.
    On,
    /// The ingest thread writes the log itself once per loop, after the
    /// processors (needs `--processors inline`).
    Off,
}

/// Whether the log's written-back pages are dropped from the page cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DropPagesArg {
    /// While appends run at 96 MiB/s or faster.
    Auto,
    /// Always, a few MiB behind the writeback.
    Always,
    /// Never: the kernel frees them when it needs the memory.
    Never,
}

/// `eventstream serve` flags.
#[derive(Args, Debug, Clone)]
pub struct ServeArgs {
    /// Address to accept producers and readers on in plaintext; `none`:
    /// only `--tls-listen`.
    #[arg(long, default_value = "127.0.0.1:7000", value_parser = parse_listen)]
    pub listen: Listen,
    /// Data directory (created if missing).
    #[arg(long, default_value = "./data")]
    pub data: PathBuf,
    /// Address of the Prometheus /metrics endpoint.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics: SocketAddr,
    /// never | interval:<ms> | always.
    #[arg(long, default_value = "interval:1000", value_parser = parse_fsync)]
    pub fsync: FsyncPolicy,
    /// With `--fsync always`: the least time between the starts of two
    /// fsyncs, so each one covers more records (fewer fsyncs and less CPU
    /// under load; an ack waits up to this much longer). 0: back to back.
    #[arg(long, default_value = "1ms", value_parser = parse_duration_us)]
    pub group_commit_delay: Duration,
    /// Roll to a new segment past this size (e.g. 128MiB).
    #[arg(long, default_value = "128MiB", value_parser = parse_size)]
    pub segment_bytes: u64,
    /// With `--fsync always`, do not make each next segment ahead of use
    /// (zero-filled to --segment-bytes and fsynced, so that the group
    /// commits' fsyncs write data only). Making them writes every segment
    /// twice; turn it off on disks where that costs more than it saves.
    #[arg(long)]
    pub no_segment_prefill: bool,
    /// Delete the oldest segments while the log is bigger than this.
    #[arg(long, value_parser = parse_size)]
    pub retention_bytes: Option<u64>,
    /// Delete segments whose last write is older than this (e.g. 7d).
    #[arg(long, value_parser = parse_duration)]
    pub retention_age: Option<Duration>,
    /// Bytes of segments deleted by retention that read sessions inside
    /// them may keep open; past it those sessions get CLOSING OUT_OF_RANGE.
    #[arg(long, default_value = "1GiB", value_parser = parse_size)]
    pub reader_hold_bytes: u64,
    /// Consumer groups at most (a new group past it is refused).
    #[arg(long, default_value_t = 1000)]
    pub max_groups: u32,
    /// A consumer group with no session and no commit for this long is
    /// forgotten.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub group_expiry: Duration,
    /// Repair a corrupt newest segment at start-up instead of refusing.
    #[arg(long)]
    pub repair: bool,
    /// Largest accepted frame in bytes (40..=65536).
    #[arg(long, default_value_t = 512)]
    pub max_frame: u32,
    /// Longest accepted topic in bytes (1..=255).
    #[arg(long, default_value_t = 64)]
    pub max_topic: u8,
    /// Event pool slots.
    #[arg(long, default_value_t = 65536)]
    pub pool_events: u32,
    /// Dedup window (e.g. 1h).
    #[arg(long, default_value = "1h", value_parser = parse_duration)]
    pub dedup_window: Duration,
    /// Dedup table capacity in ids (rounded up to a power of two).
    #[arg(long, default_value_t = 2_097_152)]
    pub dedup_capacity: u32,
    /// Policy when the dedup table is full.
    #[arg(long, value_enum, default_value = "evict")]
    pub dedup_full: DedupFull,
    /// How often expired dedup ids are swept.
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub dedup_sweep: Duration,
    /// Slots per ring (rounded up to a power of two).
    #[arg(long, default_value_t = 16384)]
    pub ring_capacity: u32,
    /// Events per batch window before it closes (1..=65535).
    #[arg(long, default_value_t = 64)]
    pub batch_max_events: u32,
    /// Age at which a batch window closes.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub batch_max_age: Duration,
    /// Raise a topic's priority: TOPIC=PRIORITY (repeatable).
    #[arg(long = "topic-priority", value_name = "T=P")]
    pub topic_priority: Vec<String>,
    /// A file of `topic:PRIORITY` lines (the original's topics.conf).
    #[arg(long)]
    pub topics_file: Option<PathBuf>,
    /// Connections beyond this are closed at accept.
    #[arg(long, default_value_t = 10_000)]
    pub max_connections: u32,
    /// Close a connection whose frame stays half-received this long.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub frame_timeout: Duration,
    /// Close a producer connection with nothing in flight and nothing
    /// received for this long (0: never).
    #[arg(long, default_value = "10m", value_parser = parse_duration)]
    pub idle_timeout: Duration,
    /// Per-connection ack buffer: bounds in-flight acked events plus unsent acks.
    #[arg(long, default_value = "64KiB", value_parser = parse_size)]
    pub ack_buffer: u64,
    /// When a ring or the pool is full.
    #[arg(long, value_enum, default_value = "backpressure")]
    pub when_full: WhenFullArg,
    /// Pin each engine thread to a CPU.
    #[arg(long)]
    pub pin: bool,
    /// Where the realtime, transactional and batch processors run: their
    /// own threads, or inline on the ingest thread (two fewer thread hops
    /// and wake-ups per event; best when cores are few).
    #[arg(long, value_enum, default_value = "auto")]
    pub processors: ProcessorsArg,
    /// Whether storage has its own thread. Off, ingest writes the log and
    /// its acks in the same loop that read the frames: two fewer thread
    /// hops and wake-ups per write. The sync thread stays.
    #[arg(long, value_enum, default_value = "auto")]
    pub storage_thread: StorageThreadArg,
    /// How long an idle engine thread spins before it parks (0: park at
    /// once, best with few cores; tens of microseconds with cores to spare).
    #[arg(long, default_value = "0ms", value_parser = parse_duration_us)]
    pub idle_spin: Duration,
    /// Whether the sync thread drops the log's pages from the page cache
    /// once they are written back (only clean pages; durability does not
    /// change). Dropped pages come back warm for the next appends, which
    /// saves CPU at high rates; at low rates keeping them gave a lower ack
    /// tail on this project's test machine (docs/decisions.md).
    #[arg(long, value_enum, default_value = "auto")]
    pub drop_written_pages: DropPagesArg,
    /// Forwarding into NATS JetStream.
    #[command(flatten)]
    pub forward: crate::forward::ForwardArgs,
    /// Turn on token authentication: the tokens (as SHA-256 digests) and
    /// their rights (docs/operations.md, "Authentication").
    #[arg(long, value_name = "FILE")]
    pub auth: Option<PathBuf>,
    /// With --auth: legacy clients (which cannot send a HELLO) may produce
    /// to topics starting with this; without it they are refused.
    #[arg(long, value_name = "TOPIC_PREFIX")]
    pub legacy_unauthenticated: Option<String>,
    /// allow: connections may speak the original C++ EventStreamCore's
    /// frames; deny: a connection that does not start with a v1, read or
    /// HELLO magic gets FATAL BAD_MAGIC and is closed (an appliance's
    /// byte link that starts mid-frame, say).
    #[arg(long, value_enum, default_value = "allow")]
    pub legacy: LegacyArg,
    /// TLS for producers and readers.
    #[command(flatten)]
    pub tls: crate::tls::TlsArgs,
    /// Listen beyond loopback in plaintext or without --auth; without it
    /// `serve` refuses to.
    #[arg(long)]
    pub insecure: bool,
    /// `/metrics` answers only requests with `Authorization: Bearer` and
    /// the token in this file (its first line).
    #[arg(long, value_name = "FILE")]
    pub metrics_token_file: Option<PathBuf>,
}

/// `eventstream inspect` flags.
#[derive(Args, Debug, Clone)]
pub struct InspectArgs {
    /// The data directory.
    pub data_dir: PathBuf,
    /// Check every record's crc and offset continuity.
    #[arg(long)]
    pub verify: bool,
    /// One JSON object per event per line.
    #[arg(long)]
    pub json: bool,
    /// First event offset to print.
    #[arg(long)]
    pub from: Option<u64>,
    /// Events to print at most.
    #[arg(long)]
    pub limit: Option<u64>,
}

/// `--legacy`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum LegacyArg {
    /// Legacy clients are served.
    Allow,
    /// Legacy frames are refused (FATAL BAD_MAGIC).
    Deny,
}

/// `--listen`: an address, or none.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Listen(pub Option<SocketAddr>);

/// Parses `--listen`: `ADDR` or `none`.
pub fn parse_listen(s: &str) -> Result<Listen, String> {
    if s == "none" {
        return Ok(Listen(None));
    }
    s.parse()
        .map(|a| Listen(Some(a)))
        .map_err(|_| format!("{s:?} is not an address (HOST:PORT) or none"))
}

/// Parses `never`, `always` or `interval:<ms>`.
pub fn parse_fsync(s: &str) -> Result<FsyncPolicy, String> {
    match s {
        "never" => Ok(FsyncPolicy::Never),
        "always" => Ok(FsyncPolicy::Always),
        _ => {
            let ms = s
                .strip_prefix("interval:")
                .ok_or_else(|| format!("expected never, always or interval:<ms>, got {s:?}"))?;
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("bad interval {ms:?}: expected milliseconds"))?;
            if ms == 0 {
                return Err("the fsync interval must be at least 1 ms".into());
            }
            Ok(FsyncPolicy::Interval(ms))
        }
    }
}

/// Parses a byte size: a number with an optional unit (B, KiB, MiB, GiB,
/// KB, MB, GB, K, M, G).
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad size {s:?}: expected e.g. 65536, 64KiB, 128MiB"))?;
    let mult: u64 = match unit.trim() {
        "" | "B" => 1,
        "K" | "KiB" => 1 << 10,
        "M" | "MiB" => 1 << 20,
        "G" | "GiB" => 1 << 30,
        "KB" => 1_000,
        "MB" => 1_000_000,
        "GB" => 1_000_000_000,
        u => return Err(format!("bad size unit {u:?} in {s:?}")),
    };
    n.checked_mul(mult)
        .ok_or_else(|| format!("size {s:?} is too large"))
}

/// Parses a duration: a number with a unit (ms, s, m, h, d).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let t = s.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("bad duration {s:?}: expected e.g. 100ms, 30s, 10m, 1h, 7d"))?;
    let ms = match unit {
        "ms" => Some(n),
        "s" => n.checked_mul(1_000),
        "m" => n.checked_mul(60_000),
        "h" => n.checked_mul(3_600_000),
        "d" => n.checked_mul(86_400_000),
        _ => {
            return Err(format!(
                "bad duration {s:?}: the unit must be ms, s, m, h or d"
            ))
        }
    };
    ms.map(Duration::from_millis)
        .ok_or_else(|| format!("duration {s:?} is too large"))
}

/// Like [`parse_duration`], also taking microseconds (`us`).
pub fn parse_duration_us(s: &str) -> Result<Duration, String> {
    match s.trim().strip_suffix("us") {
        Some(n) => n
            .parse()
            .map(Duration::from_micros)
            .map_err(|_| format!("bad duration {s:?}")),
        None => parse_duration(s),
    }
}

impl ServerConfig {
    /// Checks the flags and reads the topics file.
    pub fn from_args(args: ServeArgs) -> Result<ServerConfig, String> {
        if !(40..=65536).contains(&args.max_frame) {
            return Err(format!(
                "--max-frame {} is outside 40..=65536",
                args.max_frame
            ));
        }
        if args.max_topic == 0 {
            return Err("--max-topic must be at least 1".into());
        }
        if !(1..=65535).contains(&args.batch_max_events) {
            return Err("--batch-max-events must be in 1..=65535".into());
        }
        if args.pool_events < 64 {
            return Err("--pool-events must be at least 64".into());
        }
        if args.ring_capacity < 256 || args.ring_capacity > 1 << 24 {
            return Err("--ring-capacity must be in 256..=16777216".into());
        }
        if args.dedup_capacity < 64 || args.dedup_capacity > 1 << 30 {
            return Err("--dedup-capacity must be in 64..=1073741824".into());
        }
        let window_ms = args.dedup_window.as_millis();
        if window_ms == 0 || window_ms > i32::MAX as u128 {
            return Err("--dedup-window must be between 1ms and 24d".into());
        }
        let tls = crate::tls::TlsFiles::from_args(&args.tls)?;
        if args.listen.0.is_none() && tls.is_none() {
            return Err("--listen none needs --tls-listen".into());
        }
        for warning in crate::exposure::exposure(
            args.listen.0,
            args.tls.tls_listen,
            args.metrics,
            args.auth.is_some(),
            args.metrics_token_file.is_some(),
            args.insecure,
        )? {
            eprintln!("eventstream: {warning}");
        }
        if args.segment_bytes < 4096 {
            return Err("--segment-bytes must be at least 4KiB".into());
        }
        if args.max_connections == 0 || args.max_connections > 1 << 20 {
            return Err("--max-connections must be in 1..=1048576".into());
        }
        if args.group_commit_delay > Duration::from_secs(1) {
            return Err("--group-commit-delay must be at most 1s".into());
        }
        if args.batch_max_age.is_zero() {
            return Err("--batch-max-age must be positive".into());
        }
        let ack_credit = args.ack_buffer / eventstream_core::wire::ACK_LEN as u64;
        if ack_credit < 1 {
            return Err("--ack-buffer must hold at least one 24-byte ack".into());
        }
        let ring_capacity = (args.ring_capacity as usize).next_power_of_two();
        if (ring_capacity as u64) < 2 * (u64::from(args.batch_max_events) + 1) {
            return Err("--ring-capacity must hold two full batch windows".into());
        }
        let mut topics = Vec::new();
        for flag in &args.topic_priority {
            match parse_topic_line(flag) {
                Some(Ok((t, p))) => topics.push((t.to_string(), p)),
                _ => {
                    return Err(format!(
                        "bad --topic-priority {flag:?}: expected TOPIC=PRIORITY"
                    ))
                }
            }
        }
        if let Some(path) = &args.topics_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| format!("cannot read topics file {}: {e}", path.display()))?;
            for (n, line) in text.lines().enumerate() {
                match parse_topic_line(line) {
                    None => {}
                    Some(Ok((t, p))) => topics.push((t.to_string(), p)),
                    Some(Err(l)) => {
                        return Err(format!(
                            "{}:{}: bad line {l:?}: expected topic:PRIORITY",
                            path.display(),
                            n + 1
                        ))
                    }
                }
            }
        }
        if topics.len() > MAX_TOPICS {
            return Err(format!("at most {MAX_TOPICS} topic priorities"));
        }
        if let Some((t, _)) = topics
            .iter()
            .find(|(t, _)| t.is_empty() || t.len() > usize::from(args.max_topic))
        {
            return Err(format!("topic {t:?} is longer than --max-topic"));
        }
        Ok(ServerConfig {
            listen: args.listen.0,
            tls_listen: args.tls.tls_listen,
            tls,
            data: args.data,
            metrics: args.metrics,
            fsync: args.fsync,
            group_commit_delay: args.group_commit_delay,
            segment_bytes: args.segment_bytes,
            segment_prefill: !args.no_segment_prefill,
            retention_bytes: args.retention_bytes,
            retention_age: args.retention_age,
            repair: args.repair,
            reader_hold_bytes: args.reader_hold_bytes,
            max_groups: args.max_groups as usize,
            group_expiry: args.group_expiry,
            max_frame: args.max_frame,
            max_topic: args.max_topic,
            pool_events: args.pool_events,
            dedup_window: args.dedup_window,
            dedup_capacity: (args.dedup_capacity as usize).next_power_of_two(),
            dedup_full: match args.dedup_full {
                DedupFull::Evict => FullPolicy::Evict,
                DedupFull::Reject => FullPolicy::Reject,
            },
            dedup_sweep: args.dedup_sweep,
            ring_capacity,
            batch_max_events: args.batch_max_events,
            batch_max_age: args.batch_max_age,
            topics,
            max_connections: args.max_connections,
            frame_timeout: args.frame_timeout,
            idle_timeout: (!args.idle_timeout.is_zero()).then_some(args.idle_timeout),
            ack_credit: ack_credit.min(u64::from(u32::MAX)) as u32,
            when_full: match args.when_full {
                WhenFullArg::Backpressure => WhenFull::Backpressure,
                WhenFullArg::Reject => WhenFull::Reject,
            },
            pin: args.pin,
            processors: match args.processors {
                ProcessorsArg::Auto => Processors::Auto,
                ProcessorsArg::Threads => Processors::Threads,
                ProcessorsArg::Inline => Processors::Inline,
            },
            storage_thread: match args.storage_thread {
                StorageThreadArg::Auto => StorageThread::Auto,
                StorageThreadArg::On => StorageThread::On,
                StorageThreadArg::Off => StorageThread::Off,
            },
            idle_spin: args.idle_spin,
            drop_written_pages: match args.drop_written_pages {
                DropPagesArg::Auto => DropPages::Auto,
                DropPagesArg::Always => DropPages::Always,
                DropPagesArg::Never => DropPages::Never,
            },
            forward: args.forward.config()?,
            auth: match &args.auth {
                Some(p) => Some(std::sync::Arc::new(crate::auth::AuthState::load(p)?)),
                None if args.legacy_unauthenticated.is_some() => {
                    return Err("--legacy-unauthenticated needs --auth".into())
                }
                None => None,
            },
            legacy_unauthenticated: match args.legacy {
                LegacyArg::Deny if args.legacy_unauthenticated.is_some() => {
                    return Err("--legacy-unauthenticated needs --legacy allow".into())
                }
                _ => args.legacy_unauthenticated.clone(),
            },
            legacy_deny: args.legacy == LegacyArg::Deny,
            metrics_token: crate::auth::token_file(
                "--metrics-token-file",
                args.metrics_token_file.as_deref(),
                crate::auth::MAX_TOKEN,
            )?
            .map(String::into_bytes),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_durations_and_fsync_parse() {
        assert_eq!(parse_size("128MiB"), Ok(128 << 20));
        assert_eq!(parse_size("64KiB"), Ok(65536));
        assert_eq!(parse_size("1000"), Ok(1000));
        assert!(parse_size("12XB").is_err());
        assert!(parse_size("").is_err());
        assert_eq!(parse_duration("100ms"), Ok(Duration::from_millis(100)));
        assert_eq!(parse_duration("1h"), Ok(Duration::from_secs(3600)));
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86400)));
        assert!(parse_duration("10").is_err());
        assert_eq!(parse_fsync("always"), Ok(FsyncPolicy::Always));
        assert_eq!(parse_fsync("interval:5"), Ok(FsyncPolicy::Interval(5)));
        assert!(parse_fsync("interval:0").is_err());
        assert!(parse_fsync("sometimes").is_err());
        assert_eq!(parse_duration_us("50us"), Ok(Duration::from_micros(50)));
        assert_eq!(parse_duration_us("0ms"), Ok(Duration::ZERO));
        assert!(parse_duration_us("xus").is_err());
    }
}
