//! Dedup table, random ids, tables half full: inserts of new ids and lookups
//! (half present, half absent), on 65,536 and 4,194,304 slots; 1 and 2
//! threads inserting at once, and the single-inserter mode (`Inserter`).
//! Peer: `Mutex<HashSet<u64>>` on the same ids.
//! Targets: insert >= 20 M/s and lookup >= 50 M/s on the 65,536-slot table.
//!
//! Run: `cargo bench -p eventstream-benches --bench dedup`

use std::collections::HashSet;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use eventstream_benches::{print_ratios, record, SplitMix};
use eventstream_core::dedup::{
    BufferDedupTable, DedupConfig, DedupRef, DedupSlot, DedupStamp, DedupState, FullPolicy, Insert,
};

/// New ids inserted per measured iteration (then removed, untimed).
const BATCH: usize = 4096;
const CFG: DedupConfig = DedupConfig {
    window_ms: 3_600_000,
    when_full: FullPolicy::Reject,
};

struct Setup {
    states: Vec<DedupState>,
    stamps: Vec<DedupStamp>,
    slots: Vec<DedupSlot>,
    resident: Vec<u64>,
    set: Mutex<HashSet<u64>>,
}

fn setup(capacity: usize) -> Setup {
    let resident: Vec<u64> = SplitMix(capacity as u64).take(capacity / 2).collect();
    let set = Mutex::new(resident.iter().copied().collect());
    Setup {
        states: (0..capacity).map(|_| DedupState::new()).collect(),
        stamps: (0..capacity).map(|_| DedupStamp::new()).collect(),
        slots: (0..capacity).map(|_| DedupSlot::new()).collect(),
        resident,
        set,
    }
}

fn fill(d: DedupRef<'_>, ids: &[u64]) {
    for id in ids {
        assert_eq!(d.insert(*id, 0), Insert::Inserted);
    }
}

/// Times `op` on every id, on this thread.
fn time_each<R>(ids: &[u64], mut op: impl FnMut(u64) -> R) -> Duration {
    let t = Instant::now();
    for id in ids {
        black_box(op(*id));
    }
    t.elapsed()
}

/// Times inserting `fresh`, on this thread or split over `threads` new ones.
fn timed_inserts(d: DedupRef<'_>, fresh: &[u64], threads: usize) -> Duration {
    if threads == 1 {
        return time_each(fresh, |id| d.insert(id, 0));
    }
    let t = Instant::now();
    std::thread::scope(|s| {
        for part in fresh.chunks(fresh.len().div_ceil(threads)) {
            s.spawn(move || {
                for id in part {
                    black_box(d.insert(*id, 0));
                }
            });
        }
    });
    t.elapsed()
}

fn timed_set_inserts(set: &Mutex<HashSet<u64>>, fresh: &[u64], threads: usize) -> Duration {
    let t = Instant::now();
    if threads == 1 {
        for id in fresh {
            black_box(set.lock().unwrap().insert(*id));
        }
        let e = t.elapsed();
        let mut g = set.lock().unwrap();
        for id in fresh {
            g.remove(id);
        }
        return e;
    }
    std::thread::scope(|s| {
        for part in fresh.chunks(fresh.len().div_ceil(threads)) {
            s.spawn(move || {
                for id in part {
                    black_box(set.lock().unwrap().insert(*id));
                }
            });
        }
    });
    let e = t.elapsed();
    let mut g = set.lock().unwrap();
    for id in fresh {
        g.remove(id);
    }
    e
}

fn bench_size(c: &mut Criterion, capacity: usize, label: &str, fresh_table_per_iteration: bool) {
    let mut s = setup(capacity);
    let mut fresh_ids = SplitMix(!(capacity as u64));
    // Lookups: half resident ids, half never inserted.
    let probes: Vec<u64> = s
        .resident
        .iter()
        .step_by(2)
        .take(BATCH / 2)
        .copied()
        .chain(SplitMix(7).take(BATCH / 2))
        .collect();

    let mut g = c.benchmark_group(format!("dedup {label}"));
    g.throughput(Throughput::Elements(BATCH as u64));
    {
        let table = BufferDedupTable::new(&mut s.states, &mut s.stamps, &mut s.slots, CFG).unwrap();
        let d = table.table();
        fill(d, &s.resident);
        let name = format!("{label}: lookup, DedupTable");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let t = Instant::now();
                for _ in 0..iters {
                    for id in &probes {
                        black_box(d.lookup(*id, 0));
                    }
                }
                let e = t.elapsed();
                record(&name, iters, e);
                e
            })
        });
    }
    let name = format!("{label}: lookup, Mutex<HashSet>");
    g.bench_function(&name, |b| {
        b.iter_custom(|iters| {
            let t = Instant::now();
            for _ in 0..iters {
                for id in &probes {
                    black_box(s.set.lock().unwrap().contains(id));
                }
            }
            let e = t.elapsed();
            record(&name, iters, e);
            e
        })
    });
    for threads in [1usize, 2] {
        let name = format!("{label}: insert, {threads} thread(s), DedupTable");
        if fresh_table_per_iteration {
            // Every iteration starts from a freshly filled half-full table
            // (untimed), so it measures exactly "insert into a half-full table".
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let table =
                            BufferDedupTable::new(&mut s.states, &mut s.stamps, &mut s.slots, CFG)
                                .unwrap();
                        let d = table.table();
                        fill(d, &s.resident);
                        let fresh: Vec<u64> = fresh_ids.by_ref().take(BATCH).collect();
                        total += timed_inserts(d, &fresh, threads);
                    }
                    record(&name, iters, total);
                    total
                })
            });
        } else {
            // Too large to refill per iteration: insert, then remove and
            // sweep (untimed) to return to half full.
            let table =
                BufferDedupTable::new(&mut s.states, &mut s.stamps, &mut s.slots, CFG).unwrap();
            let d = table.table();
            fill(d, &s.resident);
            g.bench_function(&name, |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let fresh: Vec<u64> = fresh_ids.by_ref().take(BATCH).collect();
                        total += timed_inserts(d, &fresh, threads);
                        for id in &fresh {
                            d.remove(*id);
                        }
                        d.sweep(0);
                    }
                    record(&name, iters, total);
                    total
                })
            });
        }
        let name = format!("{label}: insert, {threads} thread(s), Mutex<HashSet>");
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let fresh: Vec<u64> = fresh_ids.by_ref().take(BATCH).collect();
                    total += timed_set_inserts(&s.set, &fresh, threads);
                }
                record(&name, iters, total);
                total
            })
        });
    }
    // The single-inserter mode (one inserting thread, as in the server).
    let name = format!("{label}: insert, 1 thread, DedupTable single inserter");
    if fresh_table_per_iteration {
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let table =
                        BufferDedupTable::new(&mut s.states, &mut s.stamps, &mut s.slots, CFG)
                            .unwrap();
                    let d = table.table();
                    fill(d, &s.resident);
                    let mut ins = d.inserter().unwrap();
                    let fresh: Vec<u64> = fresh_ids.by_ref().take(BATCH).collect();
                    total += time_each(&fresh, |id| ins.insert(id, 0));
                }
                record(&name, iters, total);
                total
            })
        });
    } else {
        let table = BufferDedupTable::new(&mut s.states, &mut s.stamps, &mut s.slots, CFG).unwrap();
        let d = table.table();
        fill(d, &s.resident);
        let mut ins = d.inserter().unwrap();
        g.bench_function(&name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let fresh: Vec<u64> = fresh_ids.by_ref().take(BATCH).collect();
                    total += time_each(&fresh, |id| ins.insert(id, 0));
                    for id in &fresh {
                        d.remove(*id);
                    }
                    ins.sweep(0);
                }
                record(&name, iters, total);
                total
            })
        });
    }
    g.finish();
    print_ratios(
        &format!("dedup insert, {label}, half full, single inserter"),
        BATCH as u64,
        &format!("{label}: insert, 1 thread, DedupTable single inserter"),
        &[&format!("{label}: insert, 1 thread(s), Mutex<HashSet>")],
    );
    for threads in [1, 2] {
        print_ratios(
            &format!("dedup insert, {label}, half full, {threads} thread(s)"),
            BATCH as u64,
            &format!("{label}: insert, {threads} thread(s), DedupTable"),
            &[&format!(
                "{label}: insert, {threads} thread(s), Mutex<HashSet>"
            )],
        );
    }
    print_ratios(
        &format!("dedup lookup, {label}, half full, half hits"),
        BATCH as u64,
        &format!("{label}: lookup, DedupTable"),
        &[&format!("{label}: lookup, Mutex<HashSet>")],
    );
}

fn bench(c: &mut Criterion) {
    bench_size(c, 65_536, "65,536 slots", true);
    bench_size(c, 4_194_304, "4,194,304 slots", false);
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(300)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
