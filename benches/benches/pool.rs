//! Event pool acquire + release against `Box::new` + drop of the same bytes,
//! single thread.
//!
//! Run: `cargo bench -p eventstream-benches --bench pool`

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventstream_benches::{print_ratios, record};
use eventstream_core::pool::EventPool;

static POOL: EventPool<1024, 512> = EventPool::new();

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("pool");
    g.throughput(Throughput::Elements(1));
    let mut acq = POOL.acquirer().unwrap();

    g.bench_function("pool acquire+share+drop (ours)", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters {
                let mut slot = acq.acquire().unwrap();
                slot.buffer_mut()[0] = i as u8;
                let handle = slot.share(256);
                black_box(&handle);
                drop(handle);
            }
            let e = t.elapsed();
            record("pool acquire+share+drop (ours)", iters, e);
            e
        })
    });
    g.bench_function("Box::new([u8; 512]) + drop (peer)", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for i in 0..iters {
                let mut boxed = Box::new([0u8; 512]);
                boxed[0] = i as u8;
                black_box(&boxed);
                drop(boxed);
            }
            let e = t.elapsed();
            record("Box::new([u8; 512]) + drop (peer)", iters, e);
            e
        })
    });
    g.finish();
    print_ratios(
        "pool acquire + release vs Box::new + drop",
        1,
        "pool acquire+share+drop (ours)",
        &["Box::new([u8; 512]) + drop (peer)"],
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(std::time::Duration::from_millis(500)).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
