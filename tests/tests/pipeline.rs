//! The single-thread pipeline end to end: a byte stream with every priority,
//! duplicates inside and outside the window (fake clock), every rejection
//! reason the engine itself decides, legacy frames and a final FATAL, fed at
//! odd split points; the exact outcome of every event is checked, and every
//! STORED offset is checked against the records in the sink. With the
//! reject-when-full policy, what does not fit is answered OVERLOADED.

use std::collections::HashMap;

use eventstream_core::batch::{BatchConfig, BatchWindows, Entry, WindowMeta};
use eventstream_core::dedup::{DedupConfig, DedupTable, FullPolicy};
use eventstream_core::metrics::{Counter, Registry};
use eventstream_core::pipeline::{Clock, Event, Parts, Pipeline, Sink, StorageFailed, WhenFull};
use eventstream_core::pool::EventPool;
use eventstream_core::record::Record;
use eventstream_core::ring::Ring;
use eventstream_core::route::TopicTable;
use eventstream_core::wire::{
    seal, Ack, FrameRepr, Limits, Reason, Status, StreamDecoder, FLAG_ACK,
};
use eventstream_core::{Class, Priority};

struct FakeClock {
    mono_ns: u64,
}

impl Clock for FakeClock {
    fn monotonic_ns(&self) -> u64 {
        self.mono_ns
    }
    fn wall_ns(&self) -> u64 {
        1_764_253_200_000_000_000 + self.mono_ns
    }
}

#[derive(Default)]
struct VecSink {
    records: Vec<Vec<u8>>,
    next: u64,
    acks: Vec<(u32, Ack)>,
    fail: bool,
}

impl Sink for VecSink {
    fn next_offset(&self) -> u64 {
        self.next
    }
    fn append(&mut self, record: &[u8], events: u16) -> Result<(), StorageFailed> {
        if self.fail {
            return Err(StorageFailed);
        }
        self.records.push(record.to_vec());
        self.next += events as u64;
        Ok(())
    }
    fn ack(&mut self, conn: u32, ack: Ack) {
        self.acks.push((conn, ack));
    }
}

fn frame(id: u64, priority: Priority, ack: bool, topic: &str) -> Vec<u8> {
    let repr = FrameRepr {
        priority,
        flags: if ack { FLAG_ACK } else { 0 },
        partition: 1,
        event_id: id,
        timestamp_ns: 5,
        topic: topic.as_bytes(),
        payload: &[0xA5; 200],
    };
    let mut out = vec![0u8; repr.encoded_len()];
    repr.encode(&mut out).unwrap();
    out
}

/// A frame with one byte changed (and re-sealed unless it is the CRC test).
fn broken(id: u64, at: usize, value: u8, reseal: bool) -> Vec<u8> {
    let mut f = frame(id, Priority::Medium, true, "orders");
    f[at] = value;
    if reseal {
        seal(&mut f);
    }
    f
}

fn legacy(priority: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let body_len = 3 + topic.len() + payload.len();
    let mut f = (body_len as u32).to_be_bytes().to_vec();
    f.push(priority);
    f.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    f.extend_from_slice(topic.as_bytes());
    f.extend_from_slice(payload);
    f
}

/// Builds pipeline `$p` in the caller's scope: a 64-slot pool, class rings
/// of 16, a 32-slot dedup table with `$dedup`, four
/// batch windows over 32 events, metrics into `$registry`, a fake clock at
/// `$mono_ns` and a `VecSink`.
macro_rules! pipeline {
    ($p:ident, $registry:ident, $dedup:expr, $mono_ns:expr, $when_full:expr) => {
        let pool: Box<EventPool<64, 512>> = Box::new(EventPool::new());
        let class_rings: [Ring<Event<'_>, 16>; 3] = [Ring::new(), Ring::new(), Ring::new()];
        let dedup: Box<DedupTable<32>> = Box::new(DedupTable::new($dedup));
        let mut meta = [WindowMeta::new(); 4];
        let mut arena: Vec<Entry<Event<'_>>> = (0..32).map(|_| Entry::new()).collect();
        let windows = BatchWindows::new(&mut meta, &mut arena, BatchConfig::DEFAULT).unwrap();
        let mut record_buf = vec![0u8; 28 + 64 * 512];
        let topics: TopicTable<4> = TopicTable::new();
        let [r0, r1, r2] = &class_rings;
        let mut $p = Pipeline::new(Parts {
            limits: Limits::DEFAULT,
            router: &topics,
            acquirer: pool.acquirer().unwrap(),
            class_rings: [
                r0.split().unwrap(),
                r1.split().unwrap(),
                r2.split().unwrap(),
            ],
            dedup: dedup.table(),
            windows,
            record_buf: &mut record_buf,
            registry: &$registry,
            clock: FakeClock { mono_ns: $mono_ns },
            sink: VecSink::default(),
            hook: (),
            when_full: $when_full,
        })
        .unwrap();
    };
}

#[derive(Clone, Copy, Debug, PartialEq)]
enum Expect {
    Stored,
    /// DUPLICATE of the event stored with this id earlier (nth STORED of it).
    DuplicateOf(u64),
    Rejected(Reason),
}

/// One phase of the scenario: bytes to feed, then what happens to the clock.
struct Phase {
    bytes: Vec<u8>,
    advance_ms_after: u64,
    shutdown_before: bool,
    fail_storage: bool,
}

const WINDOW_MS: u32 = 1000;

fn scenario() -> (Vec<Phase>, Vec<(u64, Expect)>) {
    use Expect::*;
    use Priority::*;
    let mut expect = Vec::new();
    let mut a = Vec::new();
    let mut add = |bytes: Vec<u8>, id: u64, e: Option<Expect>, buf: &mut Vec<u8>| {
        buf.extend_from_slice(&bytes);
        if let Some(e) = e {
            expect.push((id, e));
        }
    };
    // Phase A: every priority, duplicates inside the window, every frame
    // rejection, a full dedup table.
    add(frame(1, Critical, true, "alerts"), 1, Some(Stored), &mut a);
    add(frame(2, High, true, "alerts"), 2, Some(Stored), &mut a);
    add(frame(3, Medium, true, "orders"), 3, Some(Stored), &mut a);
    add(frame(4, Low, true, "orders"), 4, Some(Stored), &mut a);
    add(frame(5, Batch, true, "metrics"), 5, Some(Stored), &mut a);
    add(frame(6, Batch, true, "metrics"), 6, Some(Stored), &mut a);
    add(
        frame(3, Medium, true, "orders"),
        3,
        Some(DuplicateOf(3)),
        &mut a,
    );
    add(
        frame(4, Low, true, "orders"),
        4,
        Some(DuplicateOf(4)),
        &mut a,
    );
    add(
        broken(10, 60, 0xFF, false),
        10,
        Some(Rejected(Reason::BadCrc)),
        &mut a,
    );
    add(
        broken(11, 8, 2, true),
        11,
        Some(Rejected(Reason::BadVersion)),
        &mut a,
    );
    add(
        broken(12, 32, 0, true),
        12,
        Some(Rejected(Reason::BadLength)),
        &mut a,
    );
    add(
        broken(13, 9, 7, true),
        13,
        Some(Rejected(Reason::BadPriority)),
        &mut a,
    );
    add(
        broken(14, 10, 3, true),
        14,
        Some(Rejected(Reason::BadFlags)),
        &mut a,
    );
    add(
        broken(15, 36, 0xFF, true),
        15,
        Some(Rejected(Reason::BadTopic)),
        &mut a,
    );
    add(frame(16, Medium, false, "orders"), 16, None, &mut a);
    // The dedup table has 32 slots and holds 3, 4 and 16: 29 more fill it.
    for id in 100..129 {
        add(frame(id, Low, true, "fill"), id, Some(Stored), &mut a);
    }
    add(
        frame(129, Low, true, "fill"),
        129,
        Some(Rejected(Reason::DedupFull)),
        &mut a,
    );
    // Realtime never inserts: it is not affected by a full table.
    add(frame(130, High, true, "alerts"), 130, Some(Stored), &mut a);
    // Phase A2: once the original is stored, a realtime event with its id
    // is a duplicate too (realtime checks, it never inserts).
    let mut a2 = Vec::new();
    add(
        frame(3, High, true, "alerts"),
        3,
        Some(DuplicateOf(3)),
        &mut a2,
    );
    // Phase B, after the window: the same ids are new again.
    let mut b = Vec::new();
    add(frame(3, Medium, true, "orders"), 3, Some(Stored), &mut b);
    add(
        frame(3, Medium, true, "orders"),
        3,
        Some(DuplicateOf(3)),
        &mut b,
    );
    add(frame(129, Low, true, "fill"), 129, Some(Stored), &mut b);
    // Phase C: the log fails; the ids are not kept, so a retry is accepted.
    let mut c = Vec::new();
    add(
        frame(200, Medium, true, "orders"),
        200,
        Some(Rejected(Reason::StorageFailed)),
        &mut c,
    );
    add(
        frame(201, Critical, true, "alerts"),
        201,
        Some(Rejected(Reason::StorageFailed)),
        &mut c,
    );
    let mut d = Vec::new();
    add(
        frame(200, Medium, true, "orders"),
        200,
        Some(Stored),
        &mut d,
    );
    add(frame(7, Batch, true, "metrics"), 7, Some(Stored), &mut d);
    // Phase E: shutting down; invalid frames keep their own reason; then a
    // bad magic ends the connection after every earlier ack.
    let mut e = Vec::new();
    add(
        frame(300, Medium, true, "orders"),
        300,
        Some(Rejected(Reason::ShuttingDown)),
        &mut e,
    );
    add(
        broken(301, 60, 0xFF, false),
        301,
        Some(Rejected(Reason::BadCrc)),
        &mut e,
    );
    e.extend_from_slice(b"XXXX\x30\0\0\0");
    let phases = vec![
        Phase {
            bytes: a,
            advance_ms_after: 0,
            shutdown_before: false,
            fail_storage: false,
        },
        Phase {
            bytes: a2,
            advance_ms_after: WINDOW_MS as u64 + 1,
            shutdown_before: false,
            fail_storage: false,
        },
        Phase {
            bytes: b,
            advance_ms_after: 1,
            shutdown_before: false,
            fail_storage: false,
        },
        Phase {
            bytes: c,
            advance_ms_after: 1,
            shutdown_before: false,
            fail_storage: true,
        },
        Phase {
            bytes: d,
            advance_ms_after: 0,
            shutdown_before: false,
            fail_storage: false,
        },
        Phase {
            bytes: e,
            advance_ms_after: 0,
            shutdown_before: true,
            fail_storage: false,
        },
    ];
    (phases, expect)
}

struct Run {
    acks: Vec<(u32, Ack)>,
    records: Vec<Vec<u8>>,
    registry_stored: [u64; 3],
}

fn run(chunks: &[usize]) -> Run {
    let registry = Registry::new();
    pipeline!(
        p,
        registry,
        DedupConfig {
            window_ms: WINDOW_MS,
            when_full: FullPolicy::Reject,
        },
        1_000_000_000,
        WhenFull::Backpressure
    );

    // A legacy connection: stored with LEGACY ids, skips counted, no acks.
    let mut ldec = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
    let mut l = Vec::new();
    l.extend(legacy(4, "legacy/a", b"one"));
    l.extend([0, 0, 0, 0]);
    l.extend(legacy(9, "legacy/a", b"bad priority"));
    l.extend(legacy(0, "legacy/b", b"two"));
    l.extend(legacy(2, "legacy/c", b"three"));
    let fed = p.feed(2, &mut ldec, &l);
    assert_eq!(fed.consumed, l.len());
    // A v1 connection whose second frame declares 10000 bytes: the first is
    // answered, then FATAL BAD_LENGTH, then the connection closes.
    let mut d3 = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
    let mut s3 = frame(400, Priority::Critical, true, "alerts");
    s3.extend_from_slice(b"ESC1\x10\x27\0\0");
    s3.extend_from_slice(&[0; 100]);
    assert!(p.feed(3, &mut d3, &s3).close);

    let (phases, _) = scenario();
    let mut dec = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
    let mut sizes = chunks.iter().copied().cycle();
    for phase in phases {
        if phase.shutdown_before {
            p.begin_shutdown();
        }
        p.sink_mut().fail = phase.fail_storage;
        let mut pos = 0;
        while pos < phase.bytes.len() {
            let n = sizes.next().unwrap().min(phase.bytes.len() - pos);
            let mut chunk = &phase.bytes[pos..pos + n];
            while !chunk.is_empty() {
                let fed = p.feed(1, &mut dec, chunk);
                chunk = &chunk[fed.consumed..];
                if fed.close {
                    break;
                }
                p.poll();
            }
            pos += n;
        }
        // Let storage answer everything of this phase but the open batch
        // windows, which close on age.
        while p.poll() {}
        p.clock_mut().mono_ns += phase.advance_ms_after * 1_000_000;
        while p.poll() {}
        if phase.advance_ms_after > WINDOW_MS as u64 {
            // Every transactional id of phase A expired: the housekeeping
            // sweep frees them all (3, 4, 16 and 100..=128).
            assert_eq!(p.sweep_dedup(), 3 + 29);
        }
    }
    assert!(dec.is_closed());

    p.drain();
    let snap = registry.snapshot();
    assert_eq!(snap.get(Counter::KeepAlives), 1);
    assert_eq!(snap.get(Counter::LegacySkipped), 1);
    let stored = [
        snap.get(Counter::Stored(Class::Realtime)),
        snap.get(Counter::Stored(Class::Transactional)),
        snap.get(Counter::Stored(Class::Batch)),
    ];
    let sink = p.sink();
    Run {
        acks: sink.acks.clone(),
        records: sink.records.clone(),
        registry_stored: stored,
    }
}

fn check(run: &Run) {
    let (_, expect) = scenario();
    // Every event in the log, by offset.
    let mut by_offset: HashMap<u64, (u64, bool, Class)> = HashMap::new();
    let mut next = 0;
    for r in &run.records {
        let rec = Record::parse(r).unwrap();
        assert_eq!(rec.offset(), next, "offsets are dense");
        next = rec.next_offset();
        for (off, f) in rec.frames() {
            by_offset.insert(off, (f.event_id(), f.is_legacy(), rec.class()));
        }
    }
    // Connection 1's acks, FATAL last.
    let acks: Vec<Ack> = run
        .acks
        .iter()
        .filter(|(c, _)| *c == 1)
        .map(|(_, a)| *a)
        .collect();
    assert!(
        run.acks.iter().all(|(c, _)| *c != 2),
        "legacy connections get no acks"
    );
    let conn3: Vec<Ack> = run
        .acks
        .iter()
        .filter(|(c, _)| *c == 3)
        .map(|(_, a)| *a)
        .collect();
    assert_eq!(conn3.len(), 2);
    assert_eq!((conn3[0].status, conn3[0].event_id), (Status::Stored, 400));
    assert_eq!(by_offset[&conn3[0].offset].0, 400);
    assert_eq!(conn3[1], Ack::fatal(Reason::BadLength));
    let (fatal, acks) = acks.split_last().unwrap();
    assert_eq!(*fatal, Ack::fatal(Reason::BadMagic));
    assert_eq!(acks.len(), expect.len(), "one ack per answered frame");
    // Match acks to expectations per id, in order.
    let mut pending: HashMap<u64, Vec<Expect>> = HashMap::new();
    for (id, e) in &expect {
        pending.entry(*id).or_default().push(*e);
    }
    pending.values_mut().for_each(|v| v.reverse());
    let mut last_stored: HashMap<u64, u64> = HashMap::new();
    for ack in acks {
        let want = pending.get_mut(&ack.event_id).and_then(Vec::pop);
        let want = want.unwrap_or_else(|| panic!("unexpected ack {ack:?}"));
        match want {
            Expect::Stored => {
                assert_eq!(ack.status, Status::Stored, "{ack:?}");
                let (id, legacy, _) = by_offset[&ack.offset];
                assert_eq!(
                    (id, legacy),
                    (ack.event_id, false),
                    "STORED offset holds the event"
                );
                last_stored.insert(ack.event_id, ack.offset);
            }
            Expect::DuplicateOf(orig) => {
                assert_eq!(ack.status, Status::Duplicate, "{ack:?}");
                assert_eq!(
                    Some(&ack.offset),
                    last_stored.get(&orig),
                    "original's offset"
                );
            }
            Expect::Rejected(reason) => {
                assert_eq!(
                    (ack.status, ack.reason),
                    (Status::Rejected, reason),
                    "{ack:?}"
                );
            }
        }
    }
    assert!(
        pending.values().all(Vec::is_empty),
        "missing acks: {pending:?}"
    );
    // Stored events: answered ones, id 16 (no ack), 3 legacy events, id 400.
    let stored = expect.iter().filter(|(_, e)| *e == Expect::Stored).count() + 1 + 3 + 1;
    assert_eq!(by_offset.len(), stored);
    let legacy: Vec<_> = by_offset.iter().filter(|(_, (_, l, _))| *l).collect();
    assert_eq!(legacy.len(), 3);
    for (off, (id, _, _)) in legacy {
        assert_eq!(*id, (1u64 << 63) + off, "legacy id is 2^63 + offset");
    }
    assert_eq!(run.registry_stored.iter().sum::<u64>() as usize, stored);
}

#[test]
fn every_event_gets_its_exact_outcome_for_every_split() {
    let patterns: [&[usize]; 5] = [
        &[usize::MAX],
        &[1],
        &[7, 1, 250, 3],
        &[64 * 1024],
        &[13, 241, 2, 509, 36],
    ];
    for chunks in patterns {
        // Acks of different classes may come in any order (PROTOCOL.md
        // section 3); each event's own outcome may not vary.
        check(&run(chunks));
    }
}

#[test]
fn reject_when_full_answers_overloaded_and_stores_what_fit() {
    let registry = Registry::new();
    pipeline!(p, registry, DedupConfig::DEFAULT, 1, WhenFull::Reject);
    // 40 realtime frames in one read: the realtime ring holds 16.
    let bytes: Vec<u8> = (1..=40)
        .flat_map(|id| frame(id, Priority::Critical, true, "alerts"))
        .collect();
    let mut dec = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
    let fed = p.feed(1, &mut dec, &bytes);
    assert_eq!(fed.consumed, bytes.len());
    assert!(!fed.blocked);
    p.drain();
    let acks = &p.sink().acks;
    assert_eq!(acks.len(), 40);
    for (_, ack) in acks {
        if ack.event_id <= 16 {
            assert_eq!(ack.status, Status::Stored, "{ack:?}");
        } else {
            assert_eq!(
                (ack.status, ack.reason),
                (Status::Rejected, Reason::Overloaded),
                "{ack:?}"
            );
        }
    }
    assert_eq!(
        registry
            .snapshot()
            .get(Counter::Rejected(Reason::Overloaded)),
        24
    );
    assert_eq!(
        registry.snapshot().get(Counter::Stored(Class::Realtime)),
        16
    );
}
