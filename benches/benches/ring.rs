//! Cross-thread SPSC throughput: u64 items and pool handles, one at a time
//! and in batches, through our ring, rtrb and crossbeam's ArrayQueue, all with
//! capacity 1024, producer and consumer on separate threads.
//! (ArrayQueue has no batch API: its batch rows move items one at a time.)
//! After criterion's runs, the three also take turns for 21 rounds of
//! 100,000 items each (rows marked `[turns]`), each round on freshly
//! allocated buffers at shifted addresses: single-item cross-thread figures
//! on this machine swing by several times with memory placement alone, so
//! the medians over rounds and placements are the comparison.
//!
//! Run: `cargo bench -p eventstream-benches --bench ring`

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use eventstream_benches::{print_ratios, record};
use eventstream_core::pool::{Acquirer, EventPool, EventRef};
use eventstream_core::ring::{BufferRing, Consumer, Producer, Ring, Slot};

const CAP: usize = 1024;
const ITEMS: u64 = 100_000;
const BATCH: usize = 64;
/// Rounds of the taking-turns comparison after the criterion runs.
const ROUNDS: usize = 21;

/// The sending half of a queue under test.
trait Tx<T>: Send {
    fn push_one(&mut self, v: T) -> Result<(), T>;
    fn push_many<I: Iterator<Item = T>>(&mut self, it: &mut I, max: usize) -> usize;
}

/// The receiving half of a queue under test.
trait Rx<T>: Send {
    fn pop_one(&mut self) -> Option<T>;
    fn pop_many<F: FnMut(T)>(&mut self, max: usize, f: F) -> usize;
}

impl<T: Send> Tx<T> for Producer<'_, T> {
    fn push_one(&mut self, v: T) -> Result<(), T> {
        self.push(v)
    }
    fn push_many<I: Iterator<Item = T>>(&mut self, it: &mut I, max: usize) -> usize {
        self.push_from(it.take(max))
    }
}

impl<T: Send> Rx<T> for Consumer<'_, T> {
    fn pop_one(&mut self) -> Option<T> {
        self.pop()
    }
    fn pop_many<F: FnMut(T)>(&mut self, max: usize, f: F) -> usize {
        self.pop_batch(max, f)
    }
}

impl<T: Send> Tx<T> for rtrb::Producer<T> {
    fn push_one(&mut self, v: T) -> Result<(), T> {
        self.push(v).map_err(|rtrb::PushError::Full(v)| v)
    }
    fn push_many<I: Iterator<Item = T>>(&mut self, it: &mut I, max: usize) -> usize {
        let n = self.slots().min(max);
        if n == 0 {
            return 0;
        }
        match self.write_chunk_uninit(n) {
            Ok(chunk) => chunk.fill_from_iter(it),
            Err(_) => 0,
        }
    }
}

impl<T: Send> Rx<T> for rtrb::Consumer<T> {
    fn pop_one(&mut self) -> Option<T> {
        self.pop().ok()
    }
    fn pop_many<F: FnMut(T)>(&mut self, max: usize, mut f: F) -> usize {
        let n = self.slots().min(max);
        if n == 0 {
            return 0;
        }
        match self.read_chunk(n) {
            Ok(chunk) => {
                chunk.into_iter().for_each(&mut f);
                n
            }
            Err(_) => 0,
        }
    }
}

/// ArrayQueue is MPMC; each side holds a shared reference.
struct Aq<'q, T>(&'q ArrayQueue<T>);

impl<T: Send> Tx<T> for Aq<'_, T> {
    fn push_one(&mut self, v: T) -> Result<(), T> {
        self.0.push(v)
    }
    fn push_many<I: Iterator<Item = T>>(&mut self, it: &mut I, max: usize) -> usize {
        let mut n = 0;
        while n < max {
            if self.0.is_full() {
                break;
            }
            let Some(v) = it.next() else { break };
            if let Err(_v) = self.0.push(v) {
                unreachable!("single producer: room was checked");
            }
            n += 1;
        }
        n
    }
}

impl<T: Send> Rx<T> for Aq<'_, T> {
    fn pop_one(&mut self) -> Option<T> {
        self.0.pop()
    }
    fn pop_many<F: FnMut(T)>(&mut self, max: usize, mut f: F) -> usize {
        let mut n = 0;
        while n < max {
            let Some(v) = self.0.pop() else { break };
            f(v);
            n += 1;
        }
        n
    }
}

/// Moves `total` items made by `make` from `tx` to `rx` on two threads;
/// returns the elapsed time.
fn transfer<T: Send, P: Tx<T>, C: Rx<T>>(
    tx: &mut P,
    rx: &mut C,
    total: u64,
    batch: bool,
    make: &mut (impl FnMut() -> Option<T> + Send),
) -> Duration {
    let t = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            let mut sent = 0u64;
            let mut pending: Option<T> = None;
            while sent < total {
                if batch {
                    let want = BATCH.min((total - sent) as usize);
                    let mut it = std::iter::from_fn(&mut *make);
                    let n = tx.push_many(&mut it, want);
                    sent += n as u64;
                    if n == 0 {
                        std::hint::spin_loop();
                    }
                } else {
                    let v = match pending.take() {
                        Some(v) => v,
                        None => match make() {
                            Some(v) => v,
                            None => {
                                std::hint::spin_loop();
                                continue;
                            }
                        },
                    };
                    match tx.push_one(v) {
                        Ok(()) => sent += 1,
                        Err(v) => {
                            pending = Some(v);
                            std::hint::spin_loop();
                        }
                    }
                }
            }
        });
        let mut got = 0u64;
        while got < total {
            let n = if batch {
                rx.pop_many(BATCH, |v| drop(black_box(v)))
            } else {
                rx.pop_one().map_or(0, |v| {
                    drop(black_box(v));
                    1
                })
            };
            if n == 0 {
                std::hint::spin_loop();
            }
            got += n as u64;
        }
    });
    t.elapsed()
}

/// One pool feeds all three queues (they run one after another), so the
/// handle rows compare the queues and not where each pool happened to be
/// placed: with a pool each, the gap followed the pools when swapped.
static POOL: EventPool<4096, 64> = EventPool::new();

fn handle_maker<'a>(
    acq: &'a mut Acquirer<'static>,
) -> impl FnMut() -> Option<EventRef<'static>> + Send + 'a {
    move || {
        acq.acquire().map(|mut s| {
            s.buffer_mut()[0] = 1;
            s.share(64)
        })
    }
}

fn bench_case<T: Send, P: Tx<T>, C: Rx<T>, M: FnMut() -> Option<T> + Send>(
    c: &mut Criterion,
    name: &str,
    tx: &mut P,
    rx: &mut C,
    batch: bool,
    make: &mut M,
) {
    let mut g = c.benchmark_group("ring");
    g.throughput(Throughput::Elements(ITEMS));
    g.bench_function(name, |b| {
        b.iter_custom(|iters| {
            let e = transfer(tx, rx, iters * ITEMS, batch, make);
            record(name, iters, e);
            e
        })
    });
    g.finish();
}

fn bench(c: &mut Criterion) {
    // On the heap like the peers' buffers, away from this thread's stack.
    let ours: Box<Ring<u64, CAP>> = Box::new(Ring::new());
    let (mut otx, mut orx) = ours.split().unwrap();
    let (mut rtx, mut rrx) = rtrb::RingBuffer::<u64>::new(CAP);
    let aq = ArrayQueue::<u64>::new(CAP);
    for batch in [false, true] {
        let kind = if batch { "batch" } else { "single" };
        let counter = || {
            let mut i = 0u64;
            move || {
                i += 1;
                Some(i)
            }
        };
        let n_ours = format!("u64 {kind}: ours");
        let n_rtrb = format!("u64 {kind}: rtrb");
        let n_aq = format!("u64 {kind}: crossbeam ArrayQueue");
        bench_case(c, &n_ours, &mut otx, &mut orx, batch, &mut counter());
        bench_case(c, &n_rtrb, &mut rtx, &mut rrx, batch, &mut counter());
        bench_case(c, &n_aq, &mut Aq(&aq), &mut Aq(&aq), batch, &mut counter());
        // The same three, taking turns, each round on fresh buffers at
        // shifted heap addresses: single-item cross-thread figures on this
        // machine swing by several times with placement alone (cache-line
        // and 4 KiB aliasing between the threads' accesses), so the
        // comparison is the median over rounds and placements.
        for round in 0..ROUNDS {
            let _shift = vec![0u8; 64 + (round * 4160) % 65_536];
            let mut slots: Vec<Slot<u64>> = (0..CAP).map(|_| Slot::new()).collect();
            let ring = Box::new(BufferRing::new(&mut slots).unwrap());
            let (tx, rx) = ring.split().unwrap();
            let (mut tx, mut rx) = (Box::new(tx), Box::new(rx));
            let e = transfer(&mut *tx, &mut *rx, ITEMS, batch, &mut counter());
            record(&format!("{n_ours} [turns]"), 1, e);
            let (tx, rx) = rtrb::RingBuffer::<u64>::new(CAP);
            let (mut tx, mut rx) = (Box::new(tx), Box::new(rx));
            let e = transfer(&mut *tx, &mut *rx, ITEMS, batch, &mut counter());
            record(&format!("{n_rtrb} [turns]"), 1, e);
            let q = ArrayQueue::<u64>::new(CAP);
            let e = transfer(&mut Aq(&q), &mut Aq(&q), ITEMS, batch, &mut counter());
            record(&format!("{n_aq} [turns]"), 1, e);
        }
    }

    let hours: Box<Ring<EventRef<'static>, CAP>> = Box::new(Ring::new());
    let (mut htx, mut hrx) = hours.split().unwrap();
    let (mut hrtx, mut hrrx) = rtrb::RingBuffer::<EventRef<'static>>::new(CAP);
    let haq = ArrayQueue::<EventRef<'static>>::new(CAP);
    let mut acq = POOL.acquirer().unwrap();
    for batch in [false, true] {
        let kind = if batch { "batch" } else { "single" };
        let n_ours = format!("pool handle {kind}: ours");
        let n_rtrb = format!("pool handle {kind}: rtrb");
        let n_aq = format!("pool handle {kind}: crossbeam ArrayQueue");
        bench_case(
            c,
            &n_ours,
            &mut htx,
            &mut hrx,
            batch,
            &mut handle_maker(&mut acq),
        );
        bench_case(
            c,
            &n_rtrb,
            &mut hrtx,
            &mut hrrx,
            batch,
            &mut handle_maker(&mut acq),
        );
        bench_case(
            c,
            &n_aq,
            &mut Aq(&haq),
            &mut Aq(&haq),
            batch,
            &mut handle_maker(&mut acq),
        );
        for round in 0..ROUNDS {
            let _shift = vec![0u8; 64 + (round * 4160) % 65_536];
            let mut slots: Vec<Slot<EventRef<'static>>> = (0..CAP).map(|_| Slot::new()).collect();
            let ring = Box::new(BufferRing::new(&mut slots).unwrap());
            let (mut tx, mut rx) = ring.split().unwrap();
            let e = transfer(&mut tx, &mut rx, ITEMS, batch, &mut handle_maker(&mut acq));
            record(&format!("{n_ours} [turns]"), 1, e);
            let (mut tx, mut rx) = rtrb::RingBuffer::<EventRef<'static>>::new(CAP);
            let e = transfer(&mut tx, &mut rx, ITEMS, batch, &mut handle_maker(&mut acq));
            record(&format!("{n_rtrb} [turns]"), 1, e);
            let q = ArrayQueue::<EventRef<'static>>::new(CAP);
            let e = transfer(
                &mut Aq(&q),
                &mut Aq(&q),
                ITEMS,
                batch,
                &mut handle_maker(&mut acq),
            );
            record(&format!("{n_aq} [turns]"), 1, e);
        }
    }

    for item in ["u64", "pool handle"] {
        for kind in ["single", "batch"] {
            for suffix in ["", " [turns]"] {
                print_ratios(
                    &format!("SPSC {item}, {kind}{suffix}"),
                    ITEMS,
                    &format!("{item} {kind}: ours{suffix}"),
                    &[
                        &format!("{item} {kind}: rtrb{suffix}"),
                        &format!("{item} {kind}: crossbeam ArrayQueue{suffix}"),
                    ],
                );
            }
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
