//! The engine core's whole pipeline on a Cortex-M4F, every buffer a
//! `static`: it runs a built-in byte stream (every priority, duplicates
//! inside and outside the dedup window on a simulated clock, every frame
//! rejection, both FATALs, legacy frames, OVERLOADED, DEDUP_FULL, storage
//! failures, a graceful shutdown; frames split at odd boundaries; enough events to wrap every
//! ring and recycle every pool slot many times), checks each outcome count
//! against what the stream was built to produce, logs through defmt, and
//! exits through semihosting: 0 when everything matches, 1 otherwise.
#![no_std]
#![no_main]

// The board's interrupt vectors (this image enables none).
#[allow(dead_code)]
mod board;
mod common;

use core::sync::atomic::{AtomicU32, Ordering};

use common::{paint_stack, stack_used, TakeOnce};

use cortex_m_rt::entry;
use cortex_m_semihosting::debug;
use defmt_semihosting as _;
use eventstream_core::batch::{BatchConfig, StaticBatchWindows};
use eventstream_core::dedup::{DedupConfig, DedupTable, FullPolicy};
use eventstream_core::metrics::{Counter, Registry, COARSE};
use eventstream_core::pipeline::{Clock, Event, Parts, Pipeline, Sink, StorageFailed, WhenFull};
use eventstream_core::pool::EventPool;
use eventstream_core::record::{Record, RECORD_HEADER_LEN};
use eventstream_core::ring::Ring;
use eventstream_core::route::TopicTable;
use eventstream_core::wire::{Ack, FrameRepr, Limits, Reason, Status, StreamDecoder, FLAG_ACK};
use eventstream_core::{Class, Priority};

/// Pool slots and their size: the largest frame the image accepts.
const SLOTS: usize = 64;
const SLOT: usize = 256;
/// Events per batch window.
const BATCH_EVENTS: usize = 16;
/// RAM the whole image may use, statics and stack: the image fails when
/// its painted stack shows more.
const RAM_BUDGET: usize = 64 * 1024;
/// Dedup window of the simulated clock.
const WINDOW_MS: u32 = 10_000;

static POOL: EventPool<SLOTS, SLOT> = EventPool::new();
static RT_IN: Ring<Event<'static>, 16> = Ring::new();
static TX_IN: Ring<Event<'static>, 16> = Ring::new();
static BATCH_IN: Ring<Event<'static>, 16> = Ring::new();
static DEDUP: DedupTable<1024> = DedupTable::new(DedupConfig {
    window_ms: WINDOW_MS,
    // Reject, so that a full table answers DEDUP_FULL (phase J).
    when_full: FullPolicy::Reject,
});
/// Batch windows: 16 windows over an arena of 64 events.
static WINDOWS: TakeOnce<StaticBatchWindows<Event<'static>, 16, 64>> =
    TakeOnce::new(StaticBatchWindows::new());
/// Room for one record: a full batch of maximal frames.
static RECORD_BUF: TakeOnce<[u8; RECORD_HEADER_LEN + BATCH_EVENTS * SLOT]> =
    TakeOnce::new([0; RECORD_HEADER_LEN + BATCH_EVENTS * SLOT]);
/// Metrics totals with coarse histograms (4 buckets per power of two).
static REGISTRY: Registry<COARSE> = Registry::empty();
static ROUTER: TopicTable<4> = TopicTable::new();
/// A second counter of failed checks, kept outside the pipeline.
static MISMATCHES: AtomicU32 = AtomicU32::new(0);

/// The simulated clock: time moves only when the stream says so.
struct SimClock {
    now_ns: u64,
}

impl Clock for SimClock {
    fn monotonic_ns(&self) -> u64 {
        self.now_ns
    }
    fn wall_ns(&self) -> u64 {
        1_764_253_200_000_000_000 + self.now_ns
    }
}

/// Outcome counts: what the stream was built to produce, and what came out.
#[derive(Default, PartialEq, Eq, Clone, Copy, defmt::Format)]
struct Tally {
    stored_acks: u32,
    duplicate_acks: u32,
    rejected: [u32; 12],
    fatal: [u32; 12],
    stored_events: [u32; 3],
}

/// The log and the ack wire of the image: checks every record and ack.
struct CheckingSink {
    next: u64,
    fail_appends: u32,
    seen: Tally,
    records: u32,
    bad_records: u32,
    /// Log offset of transactional ids 1..=64 (first store).
    first_offset: [Option<u32>; 65],
    wrong_duplicate_offsets: u32,
}

impl Sink for CheckingSink {
    fn next_offset(&self) -> u64 {
        self.next
    }

    fn append(&mut self, record: &[u8], events: u16) -> Result<(), StorageFailed> {
        if self.fail_appends > 0 {
            self.fail_appends -= 1;
            return Err(StorageFailed);
        }
        match Record::parse(record) {
            Ok(r) if r.offset() == self.next && r.count() == events => {
                self.records += 1;
                for (offset, f) in r.frames() {
                    self.seen.stored_events[r.class().index()] += 1;
                    let id = f.event_id();
                    if r.class() == Class::Transactional && (1..=64).contains(&id) {
                        let slot = &mut self.first_offset[id as usize];
                        if slot.is_none() {
                            *slot = u32::try_from(offset).ok();
                        }
                    }
                }
            }
            _ => self.bad_records += 1,
        }
        self.next += u64::from(events);
        Ok(())
    }

    fn ack(&mut self, _conn: u32, ack: Ack) {
        match ack.status {
            Status::Stored => self.seen.stored_acks += 1,
            Status::Duplicate => {
                self.seen.duplicate_acks += 1;
                let expected = self
                    .first_offset
                    .get(ack.event_id as usize)
                    .copied()
                    .flatten();
                if expected.map(u64::from) != Some(ack.offset) {
                    self.wrong_duplicate_offsets += 1;
                }
            }
            Status::Rejected => self.seen.rejected[ack.reason.code() as usize] += 1,
            Status::Fatal => self.seen.fatal[ack.reason.code() as usize] += 1,
        }
    }
}

type Engine =
    Pipeline<'static, 'static, 'static, TopicTable<4>, SimClock, CheckingSink, (), COARSE>;

/// Chunk sizes the stream is cut into, in turn (odd, to split headers,
/// topics and CRCs).
const CHUNKS: [usize; 7] = [7, 61, 13, 129, 3, 250, 37];

/// Feeds `bytes` to the pipeline in odd chunks, running it when full.
/// Returns true when the connection was closed (FATAL or legacy close).
fn send(
    p: &mut Engine,
    conn: u32,
    dec: &mut StreamDecoder<[u8; SLOT]>,
    bytes: &[u8],
    turn: &mut usize,
) -> bool {
    let mut pos = 0;
    while pos < bytes.len() {
        let n = CHUNKS[*turn % CHUNKS.len()].min(bytes.len() - pos);
        *turn += 1;
        let mut chunk = &bytes[pos..pos + n];
        while !chunk.is_empty() {
            let fed = p.feed(conn, dec, chunk);
            chunk = &chunk[fed.consumed..];
            if fed.close {
                return true;
            }
            if fed.blocked || fed.consumed == 0 {
                p.poll();
            }
        }
        pos += n;
    }
    false
}

/// Turns a valid frame of `n` bytes into one rejected for a reason;
/// returns its length.
type Spoil = fn(&mut [u8], usize) -> usize;

/// A valid v1 frame in `buf`; returns its length.
fn v1(buf: &mut [u8], id: u64, priority: Priority, ack: bool) -> usize {
    let topic: &[u8] = [b"t0" as &[u8], b"t1", b"t2", b"t3"][(id % 4) as usize];
    let mut payload = [0u8; 160];
    let plen = 48 + (id as usize * 37) % 112;
    for (i, b) in payload.iter_mut().enumerate() {
        *b = (i as u8) ^ (id as u8);
    }
    FrameRepr {
        priority,
        flags: if ack { FLAG_ACK } else { 0 },
        partition: (id % 2) as u32,
        event_id: id,
        timestamp_ns: id,
        topic,
        payload: &payload[..plen],
    }
    .encode(buf)
    .unwrap_or(0)
}

#[entry]
fn main() -> ! {
    let top = common::stack_top();
    let painted = paint_stack();
    let ok = run();
    let stack = stack_used(painted, top);
    let statics = painted.0 - 0x2000_0000;
    defmt::info!(
        "RAM: statics {} B + stack {} B = {} B (budget {} B)",
        statics,
        stack,
        statics + stack,
        RAM_BUDGET
    );
    let fits = statics + stack <= RAM_BUDGET;
    if !fits {
        defmt::error!("firmware: RAM over its budget");
    }
    if !ok {
        defmt::error!("firmware: outcome mismatch");
    }
    if ok && fits {
        defmt::info!("firmware: every outcome matches, RAM within its budget");
        debug::exit(debug::EXIT_SUCCESS);
    } else {
        debug::exit(debug::EXIT_FAILURE);
    }
    loop {
        cortex_m::asm::bkpt();
    }
}

/// Builds the pipeline over the statics; `None` if a part was taken
/// already or does not fit.
#[inline(never)]
fn build(limits: Limits) -> Option<Engine> {
    let (Some(windows), Some(record_buf)) = (WINDOWS.take(), RECORD_BUF.take()) else {
        return None;
    };
    let (Some(acquirer), Some(windows)) = (
        POOL.acquirer(),
        windows.windows(BatchConfig {
            max_events: BATCH_EVENTS as u32,
            max_age_ns: 100_000_000,
        }),
    ) else {
        return None;
    };
    let (Some(a), Some(b), Some(c)) = (RT_IN.split(), TX_IN.split(), BATCH_IN.split()) else {
        return None;
    };
    let parts = Parts {
        limits,
        router: &ROUTER,
        acquirer,
        class_rings: [a, b, c],
        dedup: DEDUP.table(),
        windows,
        record_buf: &mut record_buf[..],
        registry: &REGISTRY,
        clock: SimClock { now_ns: 0 },
        sink: CheckingSink {
            next: 0,
            fail_appends: 0,
            seen: Tally::default(),
            records: 0,
            bad_records: 0,
            first_offset: [None; 65],
            wrong_duplicate_offsets: 0,
        },
        hook: (),
        when_full: WhenFull::Backpressure,
    };
    Pipeline::new(parts).ok()
}

/// What the phases of the stream share.
struct Run {
    want: Tally,
    turn: usize,
    buf: [u8; SLOT],
    conn1: StreamDecoder<[u8; SLOT]>,
    limits: Limits,
}

impl Run {
    /// Sends a valid acked frame of `id` on connection 1 and expects it
    /// stored in its class.
    fn send_stored(&mut self, p: &mut Engine, id: u64, prio: Priority) {
        let n = v1(&mut self.buf, id, prio, true);
        send(p, 1, &mut self.conn1, &self.buf[..n], &mut self.turn);
        self.want.stored_acks += 1;
        self.want.stored_events[prio.class().index()] += 1;
    }
}

/// Runs the stream, phase by phase (each its own function, so the stack
/// holds one phase's locals at a time), and checks the outcome.
fn run() -> bool {
    let Ok(limits) = Limits::new(SLOT as u32, 32) else {
        return false;
    };
    let Some(mut p) = build(limits) else {
        return false;
    };
    let Ok(conn1) = StreamDecoder::new([0u8; SLOT], limits) else {
        return false;
    };
    let mut r = Run {
        want: Tally::default(),
        turn: 0,
        buf: [0; SLOT],
        conn1,
        limits,
    };
    let p = &mut p;
    let r = &mut r;
    phase_a(p, r);
    phase_bc(p, r);
    phase_d(p, r);
    if !phase_ef(p, r) {
        return false;
    }
    phase_ij(p, r);
    phase_gh(p, r);
    check(p, &r.want)
}

/// A: every priority.
#[inline(never)]
fn phase_a(p: &mut Engine, r: &mut Run) {
    // A: 640 events of every priority, acked (the pool turns over 10 times).
    for id in 1..=640u64 {
        r.send_stored(p, id, Priority::ALL[(id % 5) as usize]);
        p.clock_mut().now_ns += 100_000;
    }
    p.drain();
    defmt::info!("A: 640 events of every priority sent");
}

/// B, C: duplicates inside and outside the window.
#[inline(never)]
fn phase_bc(p: &mut Engine, r: &mut Run) {
    // B: inside the window, transactional ids 1..=64 again, then as
    // realtime frames: DUPLICATE with the original's offset.
    p.clock_mut().now_ns += 1_000_000_000;
    for id in (1..=64u64).filter(|id| matches!(id % 5, 1 | 2)) {
        for prio in [Priority::Medium, Priority::High] {
            let n = v1(&mut r.buf, id, prio, true);
            send(p, 1, &mut r.conn1, &r.buf[..n], &mut r.turn);
            r.want.duplicate_acks += 1;
        }
    }
    p.drain();

    // C: past the window the same ids are new again.
    p.clock_mut().now_ns += u64::from(WINDOW_MS) * 1_000_000 + 1_000_000_000;
    for id in (1..=64u64).filter(|id| matches!(id % 5, 1 | 2)) {
        r.send_stored(p, id, Priority::Low);
    }
    p.drain();
    defmt::info!("B, C: duplicates inside and outside the window");
}

/// D: every REJECTED reason of a frame.
#[inline(never)]
fn phase_d(p: &mut Engine, r: &mut Run) {
    // D: every REJECTED reason of a frame, three times each, between valid
    // frames; the connection stays open.
    for round in 0..3u64 {
        let rejects: [(Reason, Spoil); 6] = [
            (Reason::BadCrc, |f, n| {
                f[n - 1] ^= 0xFF;
                n
            }),
            (Reason::BadVersion, |f, n| {
                f[8] = 2;
                eventstream_core::wire::seal(&mut f[..n]);
                n
            }),
            (Reason::BadLength, |f, n| {
                f[32] ^= 1; // payload_len no longer adds up
                eventstream_core::wire::seal(&mut f[..n]);
                n
            }),
            (Reason::BadPriority, |f, n| {
                f[9] = 7;
                eventstream_core::wire::seal(&mut f[..n]);
                n
            }),
            (Reason::BadFlags, |f, n| {
                f[10] |= 0x80;
                eventstream_core::wire::seal(&mut f[..n]);
                n
            }),
            (Reason::BadTopic, |f, n| {
                f[36] = 0xFF; // not UTF-8
                eventstream_core::wire::seal(&mut f[..n]);
                n
            }),
        ];
        for (i, (reason, spoil)) in rejects.iter().enumerate() {
            let id = 1000 + round * 10 + i as u64;
            let n = v1(&mut r.buf, id, Priority::High, true);
            let n = spoil(&mut r.buf, n);
            send(p, 1, &mut r.conn1, &r.buf[..n], &mut r.turn);
            r.want.rejected[reason.code() as usize] += 1;
            r.send_stored(p, id + 500, Priority::High);
        }
    }
    p.drain();
    defmt::info!("D: every REJECTED reason of a frame");
}

/// E, F: both FATALs, the legacy dialect.
#[inline(never)]
fn phase_ef(p: &mut Engine, r: &mut Run) -> bool {
    // E: FATAL BAD_MAGIC and FATAL BAD_LENGTH, each after a valid frame:
    // that frame's ack, then FATAL, then the connection closes.
    for (conn, reason) in [(3u32, Reason::BadMagic), (4, Reason::BadLength)] {
        let Ok(mut dec) = StreamDecoder::new([0u8; SLOT], r.limits) else {
            return false;
        };
        let n = v1(&mut r.buf, 2000 + u64::from(conn), Priority::Critical, true);
        send(p, conn, &mut dec, &r.buf[..n], &mut r.turn);
        r.want.stored_acks += 1;
        r.want.stored_events[Class::Realtime.index()] += 1;
        let n = v1(&mut r.buf, 2100 + u64::from(conn), Priority::Critical, true);
        if reason == Reason::BadMagic {
            r.buf[..4].copy_from_slice(b"XXXX");
        } else {
            r.buf[4..8].copy_from_slice(&9999u32.to_le_bytes());
        }
        let closed = send(p, conn, &mut dec, &r.buf[..n], &mut r.turn);
        if !closed {
            MISMATCHES.fetch_add(1, Ordering::Relaxed);
        }
        r.want.fatal[reason.code() as usize] += 1;
    }
    p.drain();

    // F: a legacy client: 40 events, a keep-alive, 3 skipped frames.
    let Ok(mut legacy) = StreamDecoder::new([0u8; SLOT], r.limits) else {
        return false;
    };
    for i in 0..44u32 {
        let mut frame = [0u8; 64];
        let prio: u8 = if i >= 41 { 9 } else { (i % 5) as u8 };
        let topic = b"legacy/t";
        let payload = [i as u8; 20];
        let body = 3 + topic.len() + payload.len();
        let len = if i == 40 {
            frame[..4].copy_from_slice(&0u32.to_be_bytes()); // keep-alive
            4
        } else {
            frame[..4].copy_from_slice(&(body as u32).to_be_bytes());
            frame[4] = prio;
            frame[5..7].copy_from_slice(&(topic.len() as u16).to_be_bytes());
            frame[7..7 + topic.len()].copy_from_slice(topic);
            frame[7 + topic.len()..4 + body].copy_from_slice(&payload);
            4 + body
        };
        send(p, 5, &mut legacy, &frame[..len], &mut r.turn);
        if i < 40 {
            if let Some(pr) = Priority::from_u8(prio) {
                r.want.stored_events[pr.class().index()] += 1;
            }
        }
    }
    p.drain();
    defmt::info!("E, F: both FATALs, the legacy dialect");

    true
}

/// I: OVERLOADED when the pipeline rejects instead of pushing back;
/// J: DEDUP_FULL when the dedup table has no slot left in the window.
#[inline(never)]
fn phase_ij(p: &mut Engine, r: &mut Run) {
    // I: 20 realtime events, nothing run in between (a rejecting pipeline
    // never stops to make room): the realtime ring takes 16, the other 4
    // are answered OVERLOADED.
    p.set_when_full(WhenFull::Reject);
    for id in 5000..5020u64 {
        let n = v1(&mut r.buf, id, Priority::High, true);
        send(p, 1, &mut r.conn1, &r.buf[..n], &mut r.turn);
    }
    p.drain();
    p.set_when_full(WhenFull::Backpressure);
    r.want.stored_acks += 16;
    r.want.stored_events[Class::Realtime.index()] += 16;
    r.want.rejected[Reason::Overloaded.code() as usize] += 4;

    // J: 1,200 new transactional ids inside the window into 1,024 slots:
    // each is STORED or REJECTED DEDUP_FULL, and some must be the latter.
    let before = p.sink().seen;
    for id in 6000..7200u64 {
        let n = v1(&mut r.buf, id, Priority::Medium, true);
        send(p, 1, &mut r.conn1, &r.buf[..n], &mut r.turn);
    }
    p.drain();
    let seen = p.sink().seen;
    let stored = seen.stored_acks - before.stored_acks;
    let full = seen.rejected[Reason::DedupFull.code() as usize]
        - before.rejected[Reason::DedupFull.code() as usize];
    if full == 0 || stored + full != 1200 {
        defmt::error!("J: {} stored and {} DEDUP_FULL of 1200", stored, full);
        MISMATCHES.fetch_add(1, Ordering::Relaxed);
    }
    r.want.stored_acks += stored;
    r.want.stored_events[Class::Transactional.index()] += stored;
    r.want.rejected[Reason::DedupFull.code() as usize] += full;
    defmt::info!(
        "I, J: OVERLOADED, DEDUP_FULL ({} of 1200 new ids stored)",
        stored
    );
}

/// G, H: storage failures, a graceful shutdown.
#[inline(never)]
fn phase_gh(p: &mut Engine, r: &mut Run) {
    // G: five appends fail (STORAGE_FAILED), then the log works again.
    p.sink_mut().fail_appends = 5;
    for id in 3000..3010u64 {
        let n = v1(&mut r.buf, id, Priority::High, true);
        send(p, 1, &mut r.conn1, &r.buf[..n], &mut r.turn);
        p.drain();
        if id < 3005 {
            r.want.rejected[Reason::StorageFailed.code() as usize] += 1;
        } else {
            r.want.stored_acks += 1;
            r.want.stored_events[Class::Realtime.index()] += 1;
        }
    }

    // H: a graceful shutdown: valid frames are refused SHUTTING_DOWN; a bad
    // one keeps its own reason.
    p.begin_shutdown();
    for id in 4000..4004u64 {
        let n = v1(&mut r.buf, id, Priority::Medium, true);
        send(p, 1, &mut r.conn1, &r.buf[..n], &mut r.turn);
        r.want.rejected[Reason::ShuttingDown.code() as usize] += 1;
    }
    let n = v1(&mut r.buf, 4010, Priority::Medium, true);
    r.buf[n - 1] ^= 1;
    send(p, 1, &mut r.conn1, &r.buf[..n], &mut r.turn);
    r.want.rejected[Reason::BadCrc.code() as usize] += 1;
    p.drain();
    defmt::info!("G, H: storage failures, a graceful shutdown");
}

/// Compares what came out with what the stream was built to produce.
#[inline(never)]
fn check(p: &Engine, want: &Tally) -> bool {
    let sink = p.sink();
    let seen = sink.seen;
    let mut ok = seen == *want
        && sink.bad_records == 0
        && sink.wrong_duplicate_offsets == 0
        && MISMATCHES.load(Ordering::Relaxed) == 0;
    // The registry's totals, read in place (a copy would take 3.5 KiB of
    // stack).
    ok &= REGISTRY.with(|snap| {
        let mut ok = true;
        for class in Class::ALL {
            let stored = snap.get(Counter::Stored(class));
            if stored != u64::from(want.stored_events[class.index()]) {
                defmt::error!("registry: {} stored {}", class, stored);
                ok = false;
            }
            let latencies = snap.latency(class).count();
            if latencies < stored {
                defmt::error!("registry: {} latencies for {} stored", latencies, stored);
                ok = false;
            }
        }
        if snap.get(Counter::KeepAlives) != 1 || snap.get(Counter::LegacySkipped) != 3 {
            defmt::error!("legacy keep-alive or skip counts differ");
            ok = false;
        }
        ok
    });
    defmt::info!(
        "events stored: realtime {} transactional {} batch {} in {} records; acks stored {} duplicate {}",
        seen.stored_events[0],
        seen.stored_events[1],
        seen.stored_events[2],
        sink.records,
        seen.stored_acks,
        seen.duplicate_acks
    );
    if !ok {
        defmt::error!("want {}", want);
        defmt::error!("seen {}", seen);
        defmt::error!(
            "bad records {}, wrong duplicate offsets {}",
            sink.bad_records,
            sink.wrong_duplicate_offsets
        );
    }
    ok
}
