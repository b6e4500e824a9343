//! `eventstream load`: a v1 load generator. Frames come from one template
//! per class whose id, timestamp and CRC are patched per event into a
//! reused write buffer (no allocation per event, many frames per write).
//! With `--rate` sending is open-loop: one thread makes one write per tick
//! (`--tick-us`), the connections in turn, each carrying its connection's
//! events due by then, and latency is measured from each event's planned
//! send time, its write's tick (no coordinated omission).
//! One thread reads every connection's acks. With `--ack` every event must
//! get exactly one ack.
//!
//! Submodules: `template` (frames patched per event), `send`, `receive`,
//! `report` (the table and the JSON).

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use eventstream_core::crc32c;
use eventstream_core::metrics::Histogram;
use eventstream_core::splitmix::SplitMix64;
use eventstream_core::wire::{Ack, Check, Frame, FrameHead, FrameRepr, Reason, Status, FLAG_ACK};
use eventstream_core::{Class, Priority};

use crate::sys::{monotonic_ns, wall_ns};

mod receive;
mod report;
mod send;
mod template;

use receive::{recv_all, Reader};
use send::{drive, Sender};
use template::{template, Template};

/// `eventstream load` flags.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server address.
    #[arg(long)]
    pub target: SocketAddr,
    /// A file whose first line is the token, for a server with --auth.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<std::path::PathBuf>,
    /// TLS (to a server's `--tls-listen` port).
    #[command(flatten)]
    pub tls: crate::tls::ClientTlsArgs,
    /// Events to send (default 100000 unless --duration).
    #[arg(long, conflicts_with = "duration")]
    pub events: Option<u64>,
    /// Seconds to send for.
    #[arg(long)]
    pub duration: Option<f64>,
    /// Offered events per second over all connections (open loop).
    #[arg(long)]
    pub rate: Option<f64>,
    /// With --rate: one write every this many microseconds, the connections
    /// in turn (each writes every `connections` ticks), carrying the
    /// connection's events scheduled since its last write; each event's
    /// latency counts from its write's planned time (as planned, not as
    /// sent, so a late sender never hides server latency).
    #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub tick_us: u64,
    /// With --rate: the sending thread wakes this long before each tick and
    /// spins to its start, so that the thread's own wake-up lateness (tens
    /// of microseconds on a busy VM) is not counted as the server's
    /// latency. 0: sleep to the tick (lateness counted, as it must be:
    /// latency always counts from the planned start).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    pub spin_us: u64,
    /// Connections.
    #[arg(long, default_value_t = 4)]
    pub connections: u32,
    /// Payload bytes per event.
    #[arg(long, default_value_t = 256)]
    pub payload: u32,
    /// Class mix in percent: realtime=40,transactional=40,batch=20.
    #[arg(long, default_value = "realtime=40,transactional=40,batch=20", value_parser = parse_mix)]
    pub mix: [u32; 3],
    /// Fraction of transactional events that resend an earlier id.
    #[arg(long, default_value_t = 0.0)]
    pub duplicates: f64,
    /// Ask for acks and check that every event gets exactly one.
    #[arg(long)]
    pub ack: bool,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
}

/// Parses `realtime=40,transactional=40,batch=20` (percentages).
pub fn parse_mix(s: &str) -> Result<[u32; 3], String> {
    let mut mix = [0u32; 3];
    for part in s.split(',') {
        let (k, v) = part
            .split_once('=')
            .ok_or_else(|| format!("bad mix part {part:?}: expected class=percent"))?;
        let v: u32 = v
            .trim()
            .parse()
            .map_err(|_| format!("bad percent in {part:?}"))?;
        let i = match k.trim() {
            "realtime" => 0,
            "transactional" => 1,
            "batch" => 2,
            other => return Err(format!("unknown class {other:?} in --mix")),
        };
        mix[i] = v;
    }
    if mix.iter().sum::<u32>() != 100 {
        return Err(format!("--mix {s:?} must add up to 100"));
    }
    Ok(mix)
}

/// Seq slots per connection (events in flight must stay below half).
const SLOTS: usize = 1 << 18;
const SLOT_MASK: u64 = SLOTS as u64 - 1;
/// Transactional seqs remembered for duplicates.
const RECENT: usize = 1 << 14;
/// Frames per write in closed loop.
const BATCH: usize = 64;

/// Bookkeeping of one event sequence number, shared by a connection's
/// sender and receiver.
struct Slot {
    /// Intended (open loop) or actual send time, monotonic ns.
    sent_ns: AtomicU64,
    /// Acks still expected (a duplicate adds one) << 2 | class.
    state: AtomicU32,
}

struct Conn {
    slots: Box<[Slot]>,
    /// Acks received (for the in-flight bound).
    acked: AtomicU64,
}

#[derive(Default)]
struct Tally {
    stored: u64,
    duplicate: u64,
    rejected: [u64; Reason::ALL.len()],
    fatal: u64,
    unexpected: u64,
    latency: [Histogram; 3],
    last_ack_ns: u64,
}

impl Tally {
    fn merge(&mut self, o: &Tally) {
        self.stored += o.stored;
        self.duplicate += o.duplicate;
        for (a, b) in self.rejected.iter_mut().zip(o.rejected) {
            *a += b;
        }
        self.fatal += o.fatal;
        self.unexpected += o.unexpected;
        for (a, b) in self.latency.iter_mut().zip(o.latency.iter()) {
            a.merge(b);
        }
        self.last_ack_ns = self.last_ack_ns.max(o.last_ack_ns);
    }
}

struct Shared {
    sent: AtomicU64,
    acked: AtomicU64,
    errors: AtomicU64,
    stop: AtomicBool,
}

/// The summary of a run.
pub struct Report {
    /// Events sent (duplicates included).
    pub sent: u64,
    /// Acks by status.
    pub stored: u64,
    /// DUPLICATE acks.
    pub duplicate: u64,
    /// REJECTED acks by reason code.
    pub rejected: [u64; Reason::ALL.len()],
    /// FATAL acks.
    pub fatal: u64,
    /// Acked events that never got their ack.
    pub missing: u64,
    /// Acks for no event in flight.
    pub unexpected: u64,
    /// Seconds from the first send to the last ack (or last send).
    pub seconds: f64,
    /// Ack latency per class, ns.
    pub latency: [Histogram; 3],
    /// Per write, ns from its first event's planned send time to the
    /// write's return: how late the generator itself was (open loop).
    pub send_lag: Histogram,
}

/// Runs the load; returns the report.
pub fn run_load(args: &LoadArgs) -> Result<Report, String> {
    if args.connections == 0 || args.connections > 255 {
        return Err("--connections must be in 1..=255".into());
    }
    if !(0.0..=1.0).contains(&args.duplicates) {
        return Err("--duplicates must be a fraction in 0..=1".into());
    }
    if args.payload > 65_000 {
        return Err("--payload must be at most 65000".into());
    }
    let total = match (args.events, args.duration) {
        (Some(n), _) => Some(n),
        (None, Some(_)) => None,
        (None, None) => Some(100_000),
    };
    let shared = Arc::new(Shared {
        sent: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        errors: AtomicU64::new(0),
        stop: AtomicBool::new(false),
    });
    // Ids: a run prefix (so repeated runs do not collide in the dedup
    // window), the connection, a sequence number; the top bit stays clear.
    let run_prefix = (wall_ns() / 1_000_000) & 0x7FFF;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let mut opened = Vec::new();
    let mut readers = Vec::new();
    let token = crate::auth::hello_token(args.token_file.as_deref())?;
    let tls = args.tls.client()?;
    for c in 0..u64::from(args.connections) {
        let (recv, send) = eventstream_client::tls::connect(&[args.target], tls.as_ref(), None)
            .map_err(|e| format!("cannot connect to {}: {e}", args.target))?;
        let mut both = eventstream_client::tls::Duplex { recv, send };
        if let Some(t) = &token {
            eventstream_client::hello(&mut both, t)
                .map_err(|e| format!("{}: HELLO refused: {e}", args.target))?;
        }
        let eventstream_client::tls::Duplex { recv, send: stream } = both;
        let conn = Arc::new(Conn {
            slots: (0..SLOTS)
                .map(|_| Slot {
                    sent_ns: AtomicU64::new(0),
                    state: AtomicU32::new(0),
                })
                .collect(),
            acked: AtomicU64::new(0),
        });
        let id_base = (run_prefix << 48) | (c << 40);
        let my_total = total.map(|t| {
            t / u64::from(args.connections) + u64::from(c < t % u64::from(args.connections))
        });
        if args.ack {
            readers.push(Reader::new(recv, conn.clone(), id_base));
        }
        opened.push((stream, conn, id_base, my_total, c));
    }
    // The clock starts once the connections are up: events are not
    // counted late for the time the set-up took.
    let start = monotonic_ns();
    let deadline = args.duration.map(|s| start + (s * 1e9) as u64);
    let rate = args.rate.map(|r| r / f64::from(args.connections));
    let senders: Vec<Sender> = opened
        .into_iter()
        .map(|(stream, conn, id_base, my_total, c)| {
            Sender::new(
                stream, args, conn, id_base, my_total, deadline, rate, start, c,
            )
        })
        .collect();
    // One thread reads every connection's acks (poll), so a wake-up serves
    // all of them.
    let receiver = (!readers.is_empty()).then(|| {
        let (s, t) = (shared.clone(), tally.clone());
        std::thread::spawn(move || {
            let mut mine = Tally::default();
            recv_all(readers, &s, &mut mine);
            if let Ok(mut all) = t.lock() {
                all.merge(&mine);
            }
        })
    });
    // Open loop: one thread sends for every connection, once per tick.
    // Closed loop: a thread per connection, each writing as fast as its
    // socket takes frames.
    let handles: Vec<_> = if args.rate.is_some() {
        let s = shared.clone();
        let spin_ns = args.spin_us * 1_000;
        vec![std::thread::spawn(move || {
            if let Err(e) = crate::sys::precise_sleeps() {
                eprintln!("load: cannot set the timer slack ({e}); send times may run late");
            }
            drive(senders, &s, spin_ns)
        })]
    } else {
        senders
            .into_iter()
            .map(|sender| {
                let s = shared.clone();
                std::thread::spawn(move || drive(vec![sender], &s, 0))
            })
            .collect()
    };
    // Progress once a second while it runs.
    let progress = {
        let s = shared.clone();
        let quiet = args.json;
        std::thread::spawn(move || {
            let mut last = 0;
            while !s.stop.load(Ordering::Relaxed) {
                for _ in 0..10 {
                    std::thread::sleep(Duration::from_millis(100));
                    if s.stop.load(Ordering::Relaxed) {
                        return;
                    }
                }
                let sent = s.sent.load(Ordering::Relaxed);
                if !quiet {
                    eprintln!(
                        "load: {} events/s sent, {} sent, {} acked, {} errors",
                        sent - last,
                        sent,
                        s.acked.load(Ordering::Relaxed),
                        s.errors.load(Ordering::Relaxed)
                    );
                }
                last = sent;
            }
        })
    };
    let mut sent = 0;
    let mut missing = 0;
    let mut failed = None;
    let mut send_lag = Histogram::new();
    for h in handles {
        let (n, miss, err, lag) = h
            .join()
            .map_err(|_| "a sender thread panicked".to_string())?;
        sent += n;
        missing += miss;
        failed = failed.or(err);
        send_lag.merge(&lag);
    }
    if let Some(r) = receiver {
        r.join()
            .map_err(|_| "the receiver thread panicked".to_string())?;
    }
    if let Some(e) = failed {
        if missing > 0 || sent == 0 {
            return Err(e);
        }
    }
    shared.stop.store(true, Ordering::Relaxed);
    let _ = progress.join();
    let t = tally.lock().map_err(|_| "tally poisoned")?;
    let end = if args.ack && t.last_ack_ns > 0 {
        t.last_ack_ns
    } else {
        monotonic_ns()
    };
    Ok(Report {
        sent,
        stored: t.stored,
        duplicate: t.duplicate,
        rejected: t.rejected,
        fatal: t.fatal,
        missing: if args.ack { missing } else { 0 },
        unexpected: t.unexpected,
        seconds: (end - start) as f64 / 1e9,
        latency: t.latency.clone(),
        send_lag,
    })
}

/// `eventstream load`: prints the table or JSON; an error if any ack is
/// missing at the end.
pub fn run(args: &LoadArgs) -> Result<(), String> {
    let report = run_load(args)?;
    if args.json {
        println!("{}", report.json(args.ack));
    } else {
        print!("{}", report.table(args.ack));
    }
    if report.missing > 0 {
        return Err(format!(
            "{} events sent with --ack got no ack",
            report.missing
        ));
    }
    if report.unexpected > 0 {
        return Err(format!(
            "{} acks matched no event in flight",
            report.unexpected
        ));
    }
    if args.ack {
        eprintln!("load: every event got exactly one ack");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_table_patched_template_equals_a_freshly_sealed_frame() {
        let mut rng = SplitMix64(42);
        for payload in [0, 1, 7, 256, 480] {
            for class in 0..3 {
                for ack in [false, true] {
                    let t = Template::new(template(class, payload, ack));
                    let mut got = vec![0u8; t.len()];
                    let mut want = t.frame.clone();
                    for _ in 0..200 {
                        let (id, ts) = (rng.next_u64(), rng.next_u64());
                        t.write(&mut got, id, ts);
                        let mut f = Frame::check(&mut want[..], Check::Layout).unwrap();
                        f.set_event_id(id);
                        f.set_timestamp_ns(ts);
                        f.fill_crc();
                        assert_eq!(got, want, "payload {payload} class {class}");
                    }
                }
            }
        }
    }
}
