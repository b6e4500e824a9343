//! `eventstream load`: a v1 load generator. Frames come from one template
//! per class whose id, timestamp and CRC are patched per event into a
//! reused write buffer (no allocation per event, many frames per write).
//! With `--rate` sending is open-loop: one thread makes one write per tick
//! (`--tick-us`), the connections in turn, each carrying its connection's
//! events due by then, and latency is measured from each event's planned
//! send time, its write's tick (no coordinated omission).
//! One thread reads every connection's acks. With `--ack` every event must
//! get exactly one ack.

use std::fmt::Write as _;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Args;
use eventstream_core::crc32c;
use eventstream_core::metrics::Histogram;
use eventstream_core::splitmix::SplitMix64;
use eventstream_core::wire::{Ack, FrameRepr, Reason, Status, FLAG_ACK};
use eventstream_core::{Class, Priority};

use crate::sys::{monotonic_ns, wall_ns};

/// `eventstream load` flags.
#[derive(Args, Debug, Clone)]
pub struct LoadArgs {
    /// Server address.
    #[arg(long)]
    pub target: SocketAddr,
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
    rejected: [u64; 12],
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

fn template(class: usize, payload: u32, ack: bool) -> Vec<u8> {
    let priority = [Priority::High, Priority::Medium, Priority::Batch][class];
    let topic = ["load/realtime", "load/transactional", "load/batch"][class];
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let repr = FrameRepr {
        priority,
        flags: if ack { FLAG_ACK } else { 0 },
        partition: 0,
        event_id: 0,
        timestamp_ns: 0,
        topic: topic.as_bytes(),
        payload: &body,
    };
    let mut out = vec![0u8; repr.encoded_len()];
    let _ = repr.encode(&mut out);
    out
}

/// Where a v1 frame's `event_id` and `timestamp_ns` sit (PROTOCOL.md
/// section 2): the 16 bytes a template changes per event.
const PATCHED: std::ops::Range<usize> = 16..32;

/// A frame template whose CRC is patched with tables instead of being
/// computed over the whole frame per event. CRC-32C over messages of one
/// length is affine in their bits: crc(m ^ d) = crc(m) ^ crc(d) ^ crc(0),
/// so the CRC of the template with new id and timestamp bytes is the
/// template's CRC (id and timestamp zero) xored with one table entry per
/// changed byte. 16 lookups instead of a pass over the ~300-byte frame;
/// the generator shares the two CPUs with the server it measures.
struct Template {
    frame: Vec<u8>,
    /// CRC of the frame with id and timestamp zero.
    base: u32,
    /// `[j][b]`: what byte `b` at `PATCHED.start + j` adds to the CRC.
    table: Box<[[u32; 256]; 16]>,
}

impl Template {
    fn new(frame: Vec<u8>) -> Self {
        let body = frame.len().saturating_sub(4);
        let mut table = Box::new([[0u32; 256]; 16]);
        let mut base = 0;
        if body >= PATCHED.end {
            let mut zero = frame[..body].to_vec();
            zero[PATCHED].fill(0);
            base = crc32c::checksum(&zero);
            let mut msg = vec![0u8; body];
            let empty = crc32c::checksum(&msg);
            for (j, row) in table.iter_mut().enumerate() {
                for (b, entry) in row.iter_mut().enumerate() {
                    msg[PATCHED.start + j] = b as u8;
                    *entry = crc32c::checksum(&msg) ^ empty;
                }
                msg[PATCHED.start + j] = 0;
            }
        }
        Self { frame, base, table }
    }

    fn len(&self) -> usize {
        self.frame.len()
    }

    /// Writes the frame with `event_id` and `timestamp_ns` into `out`
    /// (exactly `len()` bytes), sealed.
    fn write(&self, out: &mut [u8], event_id: u64, timestamp_ns: u64) {
        out.copy_from_slice(&self.frame);
        let body = out.len().saturating_sub(4);
        if body < PATCHED.end {
            return;
        }
        let mut patch = [0u8; 16];
        patch[..8].copy_from_slice(&event_id.to_le_bytes());
        patch[8..].copy_from_slice(&timestamp_ns.to_le_bytes());
        out[PATCHED].copy_from_slice(&patch);
        let crc = patch
            .iter()
            .zip(self.table.iter())
            .fold(self.base, |c, (&b, row)| c ^ row[b as usize]);
        out[body..].copy_from_slice(&crc.to_le_bytes());
    }
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
    pub rejected: [u64; 12],
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
    for c in 0..u64::from(args.connections) {
        let stream = TcpStream::connect(args.target)
            .map_err(|e| format!("cannot connect to {}: {e}", args.target))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
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
            let reader = stream.try_clone().map_err(|e| e.to_string())?;
            readers.push(Reader::new(reader, conn.clone(), id_base));
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

/// One connection's sending side.
struct Sender {
    stream: TcpStream,
    conn: Arc<Conn>,
    templates: [Template; 3],
    buf: Vec<u8>,
    rng: SplitMix64,
    mix: [u32; 3],
    duplicates: f64,
    ack: bool,
    id_base: u64,
    total: Option<u64>,
    deadline: Option<u64>,
    /// Open loop: ns between events of this connection, and the tick.
    interval_ns: Option<f64>,
    tick_ns: u64,
    start: u64,
    seq: u64,
    sent: u64,
    /// The last transactional seqs sent, for --duplicates.
    recent_tx: Vec<u64>,
    recent_at: usize,
    /// Per write: from the planned send time of its first event (open
    /// loop; closed loop: the step's start) to the write's return.
    send_lag: Histogram,
    done: bool,
    failed: Option<String>,
}

/// What one sending step did.
enum Step {
    /// Wrote frames.
    Sent,
    /// Nothing due before this monotonic time.
    Wait(u64),
    /// Finished (count, time or a failed write).
    Done,
}

impl Sender {
    #[allow(clippy::too_many_arguments)]
    fn new(
        stream: TcpStream,
        args: &LoadArgs,
        conn: Arc<Conn>,
        id_base: u64,
        total: Option<u64>,
        deadline: Option<u64>,
        rate: Option<f64>,
        start: u64,
        index: u64,
    ) -> Self {
        // Open loop: the connections write in turn, one every tick (the
        // index-th at index ticks past the start, then every C ticks), as
        // independent producers' sends are spread out; so the one sending
        // thread never queues a connection's write, and its events'
        // latency, behind the other connections' writes of the same
        // instant.
        let tick = args.tick_us.max(1) * 1_000;
        let offset = if rate.is_some() { tick * index } else { 0 };
        let templates: [Template; 3] =
            [0, 1, 2].map(|c| Template::new(template(c, args.payload, args.ack)));
        let max_len = templates.iter().map(Template::len).max().unwrap_or(0);
        Self {
            stream,
            conn,
            templates,
            buf: vec![0u8; BATCH * max_len],
            rng: SplitMix64(index.wrapping_mul(0x1234_5678_9ABC_DEF1) ^ id_base),
            mix: args.mix,
            duplicates: args.duplicates,
            ack: args.ack,
            id_base,
            total,
            deadline,
            interval_ns: rate.map(|r| 1e9 / r.max(1e-9)),
            tick_ns: tick * u64::from(args.connections),
            start: start + offset,
            seq: 0,
            sent: 0,
            recent_tx: vec![u64::MAX; RECENT],
            recent_at: 0,
            send_lag: Histogram::new(),
            done: false,
            failed: None,
        }
    }

    /// Sends what is due at `now` (open loop) or one batch (closed loop).
    fn step(&mut self, now: u64, shared: &Shared) -> Step {
        if self.done
            || self.total.is_some_and(|t| self.sent >= t)
            || self.deadline.is_some_and(|d| now >= d)
        {
            self.done = true;
            return Step::Done;
        }
        // How many to send now: open loop sends what is due.
        let mut n = BATCH;
        if let Some(iv) = self.interval_ns {
            if now < self.start {
                return Step::Wait(self.start);
            }
            // Events of ticks up to the current one are due: event i is
            // scheduled at the start of tick floor(i * iv / tick).
            let tick = self.tick_ns;
            let tick_end = ((now - self.start) / tick + 1) * tick;
            let due = (tick_end as f64 / iv).ceil() as u64;
            if due <= self.sent {
                return Step::Wait(self.start + tick_end);
            }
            n = ((due - self.sent) as usize).min(BATCH);
        }
        if let Some(t) = self.total {
            n = n.min((t - self.sent) as usize);
        }
        // Keep the in-flight window inside the slot ring.
        if self.ack
            && self
                .seq
                .saturating_sub(self.conn.acked.load(Ordering::Acquire))
                > (SLOTS / 2) as u64
        {
            return Step::Wait(now + 200_000);
        }
        let mut len = 0;
        let mut first_intended = now;
        // One clock reading per write: its events are made at one instant.
        let wall = wall_ns();
        for k in 0..n {
            let pick = self.rng.below(100);
            let class = if pick < u64::from(self.mix[0]) {
                0
            } else if pick < u64::from(self.mix[0] + self.mix[1]) {
                1
            } else {
                2
            };
            let intended = match self.interval_ns {
                Some(iv) => {
                    let at = ((self.sent + k as u64) as f64 * iv) as u64;
                    self.start + at / self.tick_ns * self.tick_ns
                }
                None => now,
            };
            if k == 0 {
                first_intended = intended;
            }
            // A duplicate resends an earlier transactional id, preferably
            // one already answered (then its slot times the new send); one
            // still in flight expects one more ack and keeps the original's
            // send time, so the duplicate's latency is counted from there.
            let mut use_seq = self.seq;
            let mut fresh = true;
            let mut in_flight = false;
            let known = self.recent_at.min(RECENT) as u64;
            if class == 1
                && known > 0
                && self.duplicates > 0.0
                && self.rng.below(1_000_000) as f64 / 1e6 < self.duplicates
            {
                for _ in 0..4 {
                    let cand = self.recent_tx[self.rng.below(known) as usize];
                    let slot = &self.conn.slots[(cand & SLOT_MASK) as usize];
                    use_seq = cand;
                    fresh = false;
                    in_flight = self.ack && slot.state.load(Ordering::Acquire) >> 2 != 0;
                    if !in_flight {
                        break;
                    }
                }
            }
            let t = &self.templates[class];
            t.write(
                &mut self.buf[len..len + t.len()],
                self.id_base | use_seq,
                wall,
            );
            len += t.len();
            if self.ack {
                let slot = &self.conn.slots[(use_seq & SLOT_MASK) as usize];
                if fresh {
                    slot.sent_ns.store(intended, Ordering::Relaxed);
                    slot.state.store((1 << 2) | class as u32, Ordering::Release);
                } else {
                    if !in_flight {
                        slot.sent_ns.store(intended, Ordering::Relaxed);
                    }
                    slot.state.fetch_add(1 << 2, Ordering::Release);
                }
            }
            if fresh {
                if class == 1 {
                    self.recent_tx[self.recent_at % RECENT] = self.seq;
                    self.recent_at += 1;
                }
                self.seq += 1;
            }
        }
        if let Err(e) = self.stream.write_all(&self.buf[..len]) {
            self.failed = Some(format!("send failed: {e}"));
            shared.errors.fetch_add(1, Ordering::Relaxed);
            self.done = true;
            return Step::Done;
        }
        self.send_lag
            .record(monotonic_ns().saturating_sub(first_intended));
        self.sent += n as u64;
        shared.sent.fetch_add(n as u64, Ordering::Relaxed);
        Step::Sent
    }

    /// Acks still expected.
    fn missing(&self) -> u64 {
        self.conn
            .slots
            .iter()
            .map(|s| u64::from(s.state.load(Ordering::Acquire) >> 2))
            .sum()
    }
}

/// What a sending thread reports: events sent, acks missing at the end,
/// the first failure, and its writes' send lag.
type Driven = (u64, u64, Option<String>, Histogram);

/// Runs `senders` until each is done, sleeping until the earliest is due
/// (the last `spin_ns` of the wait spinning); then waits (at most 10 s) for
/// their acks.
fn drive(mut senders: Vec<Sender>, shared: &Shared, spin_ns: u64) -> Driven {
    loop {
        let now = monotonic_ns();
        let mut next = u64::MAX;
        let mut busy = false;
        for s in senders.iter_mut() {
            match s.step(now, shared) {
                Step::Sent => busy = true,
                Step::Wait(at) => next = next.min(at),
                Step::Done => {}
            }
        }
        if busy {
            continue;
        }
        if next == u64::MAX {
            break;
        }
        let wait = next.saturating_sub(monotonic_ns());
        if wait > spin_ns {
            std::thread::sleep(Duration::from_nanos((wait - spin_ns).min(1_000_000)));
        } else {
            while monotonic_ns() < next {
                std::hint::spin_loop();
            }
        }
    }
    let ack = senders.iter().any(|s| s.ack);
    let wait_until = monotonic_ns() + 10_000_000_000;
    let mut missing = 0;
    if ack {
        loop {
            missing = senders.iter().map(Sender::missing).sum::<u64>();
            if missing == 0 || monotonic_ns() > wait_until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let sent = senders.iter().map(|s| s.sent).sum();
    let failed = senders.iter_mut().find_map(|s| s.failed.take());
    let mut lag = Histogram::new();
    for s in &senders {
        let _ = s.stream.shutdown(std::net::Shutdown::Both);
        lag.merge(&s.send_lag);
    }
    (sent, missing, failed, lag)
}

/// One connection's receiving side.
struct Reader {
    stream: TcpStream,
    conn: Arc<Conn>,
    id_base: u64,
    buf: Vec<u8>,
    held: usize,
    open: bool,
}

impl Reader {
    fn new(stream: TcpStream, conn: Arc<Conn>, id_base: u64) -> Self {
        Self {
            stream,
            conn,
            id_base,
            buf: vec![0u8; 256 * 1024],
            held: 0,
            open: true,
        }
    }

    /// Reads once and counts every whole ack; false at the end.
    fn read(&mut self, shared: &Shared, t: &mut Tally) -> bool {
        let n = match self.stream.read(&mut self.buf[self.held..]) {
            Ok(0) => return false,
            Ok(n) => n,
            // A signal (or a freeze of the process) cut the read short.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
            Err(_) => return false,
        };
        let now = monotonic_ns();
        let end = self.held + n;
        let whole = end - end % 24;
        let mut count = 0u64;
        for chunk in self.buf[..whole].chunks_exact(24) {
            count += 1;
            let Ok(ack) = Ack::decode(chunk) else {
                t.unexpected += 1;
                continue;
            };
            match ack.status {
                Status::Stored => t.stored += 1,
                Status::Duplicate => t.duplicate += 1,
                Status::Rejected => t.rejected[ack.reason.code() as usize] += 1,
                Status::Fatal => {
                    t.fatal += 1;
                    continue;
                }
            }
            if ack.event_id & !((1 << 40) - 1) != self.id_base {
                t.unexpected += 1;
                continue;
            }
            let slot = &self.conn.slots[(ack.event_id & SLOT_MASK) as usize];
            let state = slot.state.load(Ordering::Acquire);
            if state >> 2 == 0 {
                t.unexpected += 1;
                continue;
            }
            let class = (state & 3) as usize;
            let sent = slot.sent_ns.load(Ordering::Relaxed);
            if let Some(h) = t.latency.get_mut(class) {
                h.record(now.saturating_sub(sent));
            }
            slot.state.fetch_sub(1 << 2, Ordering::Release);
        }
        t.last_ack_ns = now;
        self.conn.acked.fetch_add(count, Ordering::Release);
        shared.acked.fetch_add(count, Ordering::Relaxed);
        self.buf.copy_within(whole..end, 0);
        self.held = end - whole;
        true
    }
}

/// Reads the acks of every connection until each is closed: one `poll`
/// over all of them per wake-up.
fn recv_all(mut readers: Vec<Reader>, shared: &Shared, t: &mut Tally) {
    let mut fds: Vec<libc::pollfd> = readers
        .iter()
        .map(|r| libc::pollfd {
            fd: r.stream.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while readers.iter().any(|r| r.open) {
        for (f, r) in fds.iter_mut().zip(&readers) {
            // A negative fd is skipped by poll.
            f.fd = if r.open { r.stream.as_raw_fd() } else { -1 };
            f.revents = 0;
        }
        match crate::sys::poll(&mut fds, 100) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("load: poll failed: {e}");
                return;
            }
        }
        for (f, r) in fds.iter().zip(readers.iter_mut()) {
            if r.open && f.revents != 0 && !r.read(shared, t) {
                r.open = false;
            }
        }
    }
}

/// The quantiles every latency report gives, with their JSON keys.
const QUANTILES: [(&str, Option<f64>); 4] = [
    ("p50", Some(0.5)),
    ("p99", Some(0.99)),
    ("p999", Some(0.999)),
    ("max", None),
];

/// `h`'s p50, p99, p99.9 and max in microseconds.
fn quantiles_us(h: &Histogram) -> [f64; 4] {
    QUANTILES.map(|(_, q)| q.map_or(h.max(), |q| h.quantile(q)) as f64 / 1e3)
}

fn lat_json(h: &Histogram) -> String {
    let mut o = String::from("{");
    for (i, ((key, _), v)) in QUANTILES.iter().zip(quantiles_us(h)).enumerate() {
        let sep = if i == 0 { "" } else { "," };
        let _ = write!(o, "{sep}\"{key}\":{v:.1}");
    }
    o.push('}');
    o
}

impl Report {
    /// Events per second: acked ones with `--ack`, else sent ones.
    pub fn events_per_sec(&self, ack: bool) -> f64 {
        let n = if ack {
            self.stored + self.duplicate
        } else {
            self.sent
        };
        n as f64 / self.seconds.max(1e-9)
    }

    /// Latency of realtime and transactional events together.
    pub fn overall(&self) -> Histogram {
        let mut h = self.latency[0].clone();
        h.merge(&self.latency[1]);
        h
    }

    /// The one-object JSON form.
    pub fn json(&self, ack: bool) -> String {
        let rejected: u64 = self.rejected.iter().sum();
        let mut by_reason = String::new();
        for &r in Reason::errors() {
            let n = self.rejected[r.code() as usize];
            if n > 0 {
                if !by_reason.is_empty() {
                    by_reason.push(',');
                }
                let _ = write!(by_reason, "\"{}\":{n}", r.name());
            }
        }
        format!(
            "{{\"sent\":{},\"stored\":{},\"duplicate\":{},\"rejected\":{rejected},\"rejected_by_reason\":{{{by_reason}}},\"fatal\":{},\"missing_acks\":{},\"unexpected_acks\":{},\"seconds\":{:.3},\"events_per_sec\":{:.0},\"latency_us\":{},\"latency_us_by_class\":{{\"realtime\":{},\"transactional\":{},\"batch\":{}}},\"send_lag_us\":{}}}",
            self.sent,
            self.stored,
            self.duplicate,
            self.fatal,
            self.missing,
            self.unexpected,
            self.seconds,
            self.events_per_sec(ack),
            lat_json(&self.overall()),
            lat_json(&self.latency[0]),
            lat_json(&self.latency[1]),
            lat_json(&self.latency[2]),
            lat_json(&self.send_lag),
        )
    }

    /// The human table.
    pub fn table(&self, ack: bool) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "sent            {}", self.sent);
        if ack {
            let _ = writeln!(o, "stored          {}", self.stored);
            let _ = writeln!(o, "duplicate       {}", self.duplicate);
            for &r in Reason::errors() {
                let n = self.rejected[r.code() as usize];
                if n > 0 {
                    let _ = writeln!(o, "rejected {:<14} {n}", r.name());
                }
            }
            let _ = writeln!(o, "fatal           {}", self.fatal);
            let _ = writeln!(o, "missing acks    {}", self.missing);
        }
        let _ = writeln!(o, "seconds         {:.3}", self.seconds);
        let _ = writeln!(o, "events/s        {:.0}", self.events_per_sec(ack));
        // One row of quantiles, in microseconds.
        let row = |o: &mut String, name: &str, h: &Histogram| {
            let _ = write!(o, "{name:<18}");
            for v in quantiles_us(h) {
                let _ = write!(o, " {v:>8.1}");
            }
            o.push('\n');
        };
        if ack {
            let _ = writeln!(o, "ack latency (us)        p50      p99    p99.9      max");
            row(&mut o, "  rt+tx", &self.overall());
            for c in Class::ALL {
                row(&mut o, &format!("  {}", c.name()), &self.latency[c.index()]);
            }
            let _ = writeln!(o, "  (batch events wait for their window; reported apart)");
        }
        row(&mut o, "send lag (us)", &self.send_lag);
        o
    }
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
    use eventstream_core::wire::patch_frame;

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
                        patch_frame(&mut want, id, ts);
                        assert_eq!(got, want, "payload {payload} class {class}");
                    }
                }
            }
        }
    }
}
