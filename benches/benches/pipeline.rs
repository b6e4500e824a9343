//! The whole engine on one thread: events/s of the single-thread pipeline
//! for 256-byte v1 frames, mix 40 % realtime / 40 % transactional / 20 %
//! batch, fed in 64 KiB chunks, records going to a sink that keeps nothing.
//! Peer: the streaming decoder alone over the same bytes (the floor).
//!
//! Run: `cargo bench -p eventstream-benches --bench pipeline`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventstream_benches::{print_ratios, record};
use eventstream_core::batch::{BatchConfig, BatchWindows, Entry, WindowMeta};
use eventstream_core::dedup::{
    BufferDedupTable, DedupConfig, DedupSlot, DedupStamp, DedupState, FullPolicy,
};
use eventstream_core::metrics::Registry;
use eventstream_core::pipeline::{Clock, Event, Parts, Pipeline, Sink, StorageFailed, WhenFull};
use eventstream_core::pool::{BufferPool, SlotMeta};
use eventstream_core::ring::Ring;
use eventstream_core::route::TopicTable;
use eventstream_core::wire::{Ack, FrameRepr, Limits, Status, StreamDecoder, FLAG_ACK};
use eventstream_core::Priority;

const EVENTS: usize = 4096;
const CHUNK: usize = 64 * 1024;

struct BenchClock(u64);

impl Clock for BenchClock {
    fn monotonic_ns(&self) -> u64 {
        self.0
    }
    fn wall_ns(&self) -> u64 {
        self.0
    }
}

#[derive(Default)]
struct CountingSink {
    next: u64,
    bytes: u64,
    acks: u64,
}

impl Sink for CountingSink {
    fn next_offset(&self) -> u64 {
        self.next
    }
    fn append(&mut self, record: &[u8], events: u16) -> Result<(), StorageFailed> {
        self.bytes += record.len() as u64;
        self.next += events as u64;
        Ok(())
    }
    fn ack(&mut self, _conn: u32, ack: Ack) {
        if ack.status == Status::Stored {
            self.acks += 1;
        }
    }
}

fn stream() -> Vec<u8> {
    let mut out = Vec::new();
    let payload = [0x5Au8; 256 - 40 - 8];
    for i in 0..EVENTS as u64 {
        let priority = match i % 5 {
            0 | 1 => Priority::High,
            2 | 3 => Priority::Medium,
            _ => Priority::Batch,
        };
        let repr = FrameRepr {
            priority,
            flags: FLAG_ACK,
            partition: (i % 4) as u32,
            event_id: i + 1,
            timestamp_ns: i,
            topic: b"orders/1",
            payload: &payload,
        };
        let mut f = vec![0u8; repr.encoded_len()];
        repr.encode(&mut f).unwrap();
        assert_eq!(f.len(), 256);
        out.extend_from_slice(&f);
    }
    out
}

fn bench(c: &mut Criterion) {
    let bytes = stream();
    let mut meta: Vec<SlotMeta> = (0..8192).map(|_| SlotMeta::new()).collect();
    let mut data = vec![0u8; 8192 * 512];
    let pool = BufferPool::new(&mut meta, &mut data, 512).unwrap();
    let class_rings: [Ring<Event<'_>, 1024>; 3] = [Ring::new(), Ring::new(), Ring::new()];
    let mut states: Vec<DedupState> = (0..65_536).map(|_| DedupState::new()).collect();
    let mut stamps: Vec<DedupStamp> = (0..65_536).map(|_| DedupStamp::new()).collect();
    let mut slots: Vec<DedupSlot> = (0..65_536).map(|_| DedupSlot::new()).collect();
    let dedup = BufferDedupTable::new(
        &mut states,
        &mut stamps,
        &mut slots,
        DedupConfig {
            window_ms: 1000,
            when_full: FullPolicy::Evict,
        },
    )
    .unwrap();
    let mut wmeta = [WindowMeta::new(); 64];
    let mut arena: Vec<Entry<Event<'_>>> = (0..4096).map(|_| Entry::new()).collect();
    let windows = BatchWindows::new(&mut wmeta, &mut arena, BatchConfig::DEFAULT).unwrap();
    let mut record_buf = vec![0u8; 28 + 64 * 512];
    let registry = Registry::new();
    let topics: TopicTable<4> = TopicTable::new();
    let [r0, r1, r2] = &class_rings;
    let mut p = Pipeline::new(Parts {
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
        registry: &registry,
        clock: BenchClock(1),
        sink: CountingSink::default(),
        hook: (),
        when_full: WhenFull::Backpressure,
    })
    .unwrap();

    let mut g = c.benchmark_group("pipeline");
    g.throughput(Throughput::Elements(EVENTS as u64));
    g.bench_function("single-thread pipeline, 256 B frames", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                // A fresh connection and a clock past the dedup window, so
                // every id is new again.
                p.clock_mut().0 += 2_000_000_000;
                let mut dec = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
                let t = Instant::now();
                for chunk in bytes.chunks(CHUNK) {
                    let mut rest = chunk;
                    while !rest.is_empty() {
                        let fed = p.feed(1, &mut dec, rest);
                        rest = &rest[fed.consumed..];
                        p.poll();
                    }
                }
                p.drain();
                total += t.elapsed();
            }
            record("single-thread pipeline, 256 B frames", iters, total);
            total
        })
    });
    g.bench_function("stream decoder alone, same bytes", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                let mut dec = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
                for chunk in bytes.chunks(CHUNK) {
                    let mut pos = 0;
                    loop {
                        let (used, item) = dec.next(&chunk[pos..]);
                        pos += used;
                        match item {
                            Some(d) => {
                                black_box(&d);
                            }
                            None => break,
                        }
                    }
                }
            }
            let e = t.elapsed();
            record("stream decoder alone, same bytes", iters, e);
            e
        })
    });
    g.finish();
    // Every event of every run was stored and acked STORED.
    assert_eq!(p.sink().next % EVENTS as u64, 0);
    assert_eq!(p.sink().acks, p.sink().next);
    print_ratios(
        "single-thread pipeline, 256-byte frames, mix 40/40/20",
        EVENTS as u64,
        "single-thread pipeline, 256 B frames",
        &["stream decoder alone, same bytes"],
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(3));
    targets = bench
}
criterion_main!(benches);
