//! Latency histogram: recording one value (target <= 5 ns) and reading
//! p50/p99/p99.9. Peer: the hdrhistogram crate (3 significant digits).
//!
//! Run: `cargo bench -p eventstream-benches --bench histogram`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventstream_benches::{print_ratios, record, SplitMix};
use eventstream_core::metrics::Histogram;

fn bench(c: &mut Criterion) {
    // Log-uniform latencies from 100 ns to ~17 s.
    let values: Vec<u64> = SplitMix(3)
        .take(4096)
        .map(|r| 100 + (r >> (30 + (r % 27))))
        .collect();
    let mut g = c.benchmark_group("histogram");
    g.throughput(Throughput::Elements(values.len() as u64));
    let mut ours = Histogram::new();
    g.bench_function("record: ours", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                for v in &values {
                    ours.record(black_box(*v));
                }
            }
            let e = t.elapsed();
            record("record: ours", iters, e);
            e
        })
    });
    let mut hdr = hdrhistogram::Histogram::<u64>::new_with_bounds(1, 60_000_000_000, 3).unwrap();
    g.bench_function("record: hdrhistogram", |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                for v in &values {
                    hdr.saturating_record(black_box(*v));
                }
            }
            let e = t.elapsed();
            record("record: hdrhistogram", iters, e);
            e
        })
    });
    g.throughput(Throughput::Elements(3));
    g.bench_function("p50+p99+p99.9: ours", |b| {
        b.iter(|| {
            black_box((
                ours.quantile(0.5),
                ours.quantile(0.99),
                ours.quantile(0.999),
            ))
        })
    });
    g.bench_function("p50+p99+p99.9: hdrhistogram", |b| {
        b.iter(|| {
            black_box((
                hdr.value_at_quantile(0.5),
                hdr.value_at_quantile(0.99),
                hdr.value_at_quantile(0.999),
            ))
        })
    });
    g.finish();
    print_ratios(
        "histogram record of one value",
        values.len() as u64,
        "record: ours",
        &["record: hdrhistogram"],
    );
    println!(
        "  memory: ours {} bytes fixed; hdrhistogram {} counts",
        std::mem::size_of::<Histogram>(),
        hdr.distinct_values()
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(30).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
