//! `eventstream consume`: reads events from a server's log with the
//! client library's [`Consumer`] and prints one per line: the payload
//! (lossy UTF-8), or with `--json` the object `inspect --json` prints plus
//! the payload, as a string under `payload` when it is UTF-8, else base64
//! under `payload_b64`. With a group it commits every `--commit-every`
//! events and at the end.

use std::io::{self, BufWriter, Write};

use clap::{Args, ValueEnum};
use eventstream_client::{Class, Consumer, ConsumerOptions, Error, StartAt};
use eventstream_core::wire::Reason;

use crate::inspect::{json_str, EventFields};

/// What to do when the group's committed offset is no longer retained.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Reset {
    /// Start at the first retained offset.
    Earliest,
    /// Start at the end (only new events).
    Latest,
    /// Stop with an error.
    Error,
}

/// `eventstream consume` flags.
#[derive(Args, Debug, Clone)]
pub struct ConsumeArgs {
    /// The server's address (the producer port).
    #[arg(long)]
    pub target: String,
    /// A file whose first line is the token, for a server with --auth.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// TLS (to a server's `--tls-listen` port).
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// Where to start: earliest, latest, committed (needs --group) or an
    /// offset.
    #[arg(long, default_value = "earliest", value_parser = parse_from)]
    pub from: StartAt,
    /// The consumer group (commits; `--from committed`).
    #[arg(long)]
    pub group: Option<String>,
    /// When the group's committed offset fell below the first retained
    /// one.
    #[arg(long, value_enum, default_value = "error")]
    pub reset: Reset,
    /// Only topics starting with this.
    #[arg(long, default_value = "")]
    pub topic: String,
    /// Only these classes (realtime, transactional, batch), comma-separated.
    #[arg(long, value_delimiter = ',', value_parser = parse_class)]
    pub class: Vec<Class>,
    /// Keep reading as new events arrive.
    #[arg(long)]
    pub follow: bool,
    /// Stop after this many events.
    #[arg(long)]
    pub limit: Option<u64>,
    /// With a group: commit after every this many events (and at the end).
    #[arg(long, default_value_t = 1000)]
    pub commit_every: u64,
    /// One JSON object per line.
    #[arg(long)]
    pub json: bool,
}

fn parse_from(s: &str) -> Result<StartAt, String> {
    StartAt::parse(s)
        .ok_or_else(|| format!("{s:?} is not earliest, latest, committed or an offset"))
}

fn parse_class(s: &str) -> Result<Class, String> {
    match s {
        "realtime" => Ok(Class::Realtime),
        "transactional" => Ok(Class::Transactional),
        "batch" => Ok(Class::Batch),
        _ => Err(format!("{s:?} is not realtime, transactional or batch")),
    }
}

/// Standard base64 with padding.
fn base64(bytes: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for c in bytes.chunks(3) {
        let n = (u32::from(c[0]) << 16)
            | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
            | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(A[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Runs the command.
pub fn run(args: &ConsumeArgs) -> Result<(), String> {
    if args.from == StartAt::Committed && args.group.is_none() {
        return Err("--from committed needs --group".into());
    }
    let mut opts = ConsumerOptions {
        from: args.from,
        group: args.group.clone(),
        topic_prefix: args.topic.clone(),
        classes: args.class.clone(),
        follow: args.follow,
        read_timeout: None,
        token: crate::auth::hello_token(args.token_file.as_deref())?,
        tls: args.tls.client()?,
        ..ConsumerOptions::default()
    };
    let mut consumer = match Consumer::connect(args.target.as_str(), opts.clone()) {
        Err(Error::Refused {
            reason: Reason::OutOfRange,
            first,
            end,
        }) if args.from == StartAt::Committed && args.reset != Reset::Error => {
            eprintln!(
                "eventstream: the group's committed offset is no longer in the log ({first}..{end}); starting at the {}",
                if args.reset == Reset::Earliest { "earliest" } else { "latest" }
            );
            opts.from = if args.reset == Reset::Earliest {
                StartAt::Earliest
            } else {
                StartAt::Latest
            };
            Consumer::connect(args.target.as_str(), opts)
        }
        other => other,
    }
    .map_err(|e| format!("{}: {e}", args.target))?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut n = 0u64;
    let mut since_commit = 0u64;
    while args.limit.is_none_or(|l| n < l) {
        let Some(ev) = consumer.next_ref().map_err(|e| e.to_string())? else {
            break;
        };
        let line = if args.json {
            let frame = ev.frame();
            let mut o = EventFields {
                offset: ev.offset,
                class: ev.class,
                recv_ns: ev.recv_ns,
                frame: &frame,
            }
            .json_open();
            match std::str::from_utf8(ev.payload()) {
                Ok(text) => {
                    o.push_str(",\"payload\":");
                    json_str(&mut o, text);
                }
                Err(_) => {
                    o.push_str(",\"payload_b64\":\"");
                    o.push_str(&base64(ev.payload()));
                    o.push('"');
                }
            }
            o.push('}');
            o
        } else {
            String::from_utf8_lossy(ev.payload()).into_owned()
        };
        writeln!(out, "{line}").map_err(|e| format!("cannot write: {e}"))?;
        n += 1;
        since_commit += 1;
        if args.group.is_some() && since_commit >= args.commit_every {
            out.flush().map_err(|e| format!("cannot write: {e}"))?;
            let at = consumer.position();
            consumer.commit(at).map_err(|e| format!("commit: {e}"))?;
            since_commit = 0;
        }
    }
    out.flush().map_err(|e| format!("cannot write: {e}"))?;
    if args.group.is_some() && since_commit > 0 {
        let at = consumer.position();
        consumer.commit(at).map_err(|e| format!("commit: {e}"))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::base64;

    #[test]
    fn base64_matches_the_rfc_examples() {
        for (i, o) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(i.as_bytes()), o);
        }
    }
}
