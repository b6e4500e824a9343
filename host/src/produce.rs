//! `eventstream produce`: one event per line of standard input, sent with
//! the client library's [`Producer`] (like `kafka-console-producer` or
//! `nats pub`). Each line's bytes, without its newline, are the payload.
//! Every outcome is checked: the command exits non-zero if any event was
//! not stored (a DUPLICATE counts as stored: the id is in the log).

use std::collections::HashMap;
use std::io::{self, BufRead};
use std::time::{SystemTime, UNIX_EPOCH};

use clap::{Args, ValueEnum};
use eventstream_client::{Acked, Event, Outcome, Priority, Producer};
use eventstream_core::splitmix::SplitMix64;

/// How `produce` numbers its events.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum IdScheme {
    /// A random 64-bit id per event (a retry of the command stores the
    /// lines again).
    Random,
    /// `--id-base` plus the line's number, from 1: running the same input
    /// again with the same base is deduplicated (transactional topics).
    LineNumber,
}

/// The priority of the events, by name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum PriorityArg {
    /// 4: realtime.
    Critical,
    /// 3: realtime.
    High,
    /// 2: transactional.
    Medium,
    /// 1: transactional.
    Low,
    /// 0: batch.
    Batch,
}

impl PriorityArg {
    fn priority(self) -> Priority {
        match self {
            PriorityArg::Critical => Priority::Critical,
            PriorityArg::High => Priority::High,
            PriorityArg::Medium => Priority::Medium,
            PriorityArg::Low => Priority::Low,
            PriorityArg::Batch => Priority::Batch,
        }
    }
}

/// `eventstream produce` flags.
#[derive(Args, Debug, Clone)]
pub struct ProduceArgs {
    /// The server's producer address.
    #[arg(long)]
    pub target: String,
    /// A file whose first line is the token, for a server with --auth.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// TLS (to a server's `--tls-listen` port).
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// The events' topic.
    #[arg(long)]
    pub topic: String,
    /// The events' priority (the server routes them to a class by it).
    #[arg(long, value_enum, default_value = "medium")]
    pub priority: PriorityArg,
    /// The events' partition.
    #[arg(long, default_value_t = 0)]
    pub partition: u32,
    /// How events are numbered.
    #[arg(long, value_enum, default_value = "random")]
    pub id: IdScheme,
    /// With `--id line-number`: the id of line 0 (line n gets base + n).
    #[arg(long, default_value_t = 0)]
    pub id_base: u64,
}

/// Runs `produce` over standard input.
pub fn run(args: &ProduceArgs) -> Result<(), String> {
    if args.topic.is_empty() || args.topic.len() > 255 {
        return Err("--topic must be 1 to 255 bytes".into());
    }
    let stdin = io::stdin();
    produce(args, stdin.lock())
}

/// Sends one event per line of `input`; an error if any was not stored.
pub fn produce(args: &ProduceArgs, input: impl BufRead) -> Result<(), String> {
    let opts = eventstream_client::Options {
        token: crate::auth::hello_token(args.token_file.as_deref())?,
        tls: args.tls.client()?,
        ..Default::default()
    };
    let mut p = Producer::with_options(args.target.as_str(), opts)
        .map_err(|e| format!("cannot connect to {}: {e}", args.target))?;
    let seed = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
        ^ u64::from(std::process::id()) << 32;
    let mut rng = SplitMix64(seed);
    let mut lines_of: HashMap<u64, u64> = HashMap::new();
    let mut tally = Tally::default();
    for (n, line) in input.split(b'\n').enumerate() {
        let line = line.map_err(|e| format!("cannot read standard input: {e}"))?;
        let n = n as u64 + 1;
        let id = match args.id {
            IdScheme::Random => rng.next_u64(),
            IdScheme::LineNumber => args.id_base.wrapping_add(n),
        };
        lines_of.insert(id, n);
        p.send(&Event {
            topic: &args.topic,
            partition: args.partition,
            priority: args.priority.priority(),
            id,
            payload: &line,
        })
        .map_err(|e| format!("line {n}: {e}"))?;
        tally.count(&p.take_acked().map_err(|e| e.to_string())?, &mut lines_of);
    }
    tally.count(&p.flush().map_err(|e| e.to_string())?, &mut lines_of);
    eprintln!(
        "produce: {} sent: {} stored, {} duplicate, {} rejected",
        tally.stored + tally.duplicate + tally.rejected,
        tally.stored,
        tally.duplicate,
        tally.rejected
    );
    if tally.rejected > 0 {
        return Err(format!("{} events were rejected", tally.rejected));
    }
    Ok(())
}

#[derive(Default)]
struct Tally {
    stored: u64,
    duplicate: u64,
    rejected: u64,
}

impl Tally {
    fn count(&mut self, acked: &[Acked], lines_of: &mut HashMap<u64, u64>) {
        for a in acked {
            let line = lines_of.remove(&a.id).unwrap_or(0);
            match a.outcome {
                Outcome::Stored(_) => self.stored += 1,
                Outcome::Duplicate(_) => self.duplicate += 1,
                Outcome::Rejected(reason) => {
                    self.rejected += 1;
                    eprintln!(
                        "produce: line {line} (id {}) rejected: {}",
                        a.id,
                        reason.name()
                    );
                }
            }
        }
    }
}
