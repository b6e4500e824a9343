//! Cross-thread SPSC throughput: u64 items and pool handles, one at a time
//! and in batches, through our ring, rtrb and crossbeam's ArrayQueue, all with
//! capacity 1024, producer and consumer on separate threads pinned to two
//! CPUs. (ArrayQueue has no batch API: its batch rows move items one at a
//! time.)
//!
//! Cross-thread figures on this machine swing by several times with where
//! the buffers and the two threads' stacks happen to lie, so every run (each
//! criterion sample, and each round below) builds its queue, and for
//! handles its pool, afresh, at a shifted heap address, with both halves at
//! a varying stack depth. The pool work and the disposal of items run out
//! of line, so every queue runs the same machine code for them. Our side
//! runs `BufferRing`; `Ring<T, N>` runs the same code over an inline array.
//!
//! After criterion's runs, the three take turns for 31 paired rounds of
//! 400,000 items each (rows marked `[rounds]`), in a rotated order, and the
//! comparison is the median of the per-round ratios, printed with its
//! quartiles and the number of rounds we won.
//!
//! Run: `cargo bench -p eventstream-benches --bench ring`
//! (`RING_CASE="pool handle single"` runs only the cases whose name holds
//! that text; `RING_ROUNDS_ONLY=1` skips criterion's runs.)

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use eventstream_benches::{median, print_paired, print_ratios, record};
use eventstream_core::pool::{Acquirer, BufferPool, EventRef, SlotMeta};
use eventstream_core::ring::{BufferRing, Consumer, Producer, Slot};

const CAP: usize = 1024;
const ITEMS: u64 = 100_000;
const BATCH: usize = 64;
/// Paired rounds after the criterion runs.
const ROUNDS: usize = 31;
/// Items each queue moves in one round.
const ROUND_ITEMS: u64 = 400_000;

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

/// Whether the case named `case` ("u64 single", "pool handle batch", ...)
/// runs: all of them unless `RING_CASE` names a part of the case's name.
fn wanted(case: &str) -> bool {
    std::env::var("RING_CASE").map_or(true, |c| case.contains(&c))
}

/// The two CPUs the halves run on, if the machine lets threads be pinned to
/// two: producer first. Pinned, every queue runs with its halves on the same
/// two CPUs, and no round loses time to the scheduler moving a spinning half
/// onto the other's CPU.
fn cpus() -> Option<(usize, usize)> {
    // SAFETY: cpu_set_t is plain bits; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 is this thread; the set is as large as the size passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of_val(&set), &mut set) };
    if rc != 0 {
        return None;
    }
    // SAFETY: CPU_ISSET reads one bit of the set, in bounds below CPU_SETSIZE.
    let mut allowed =
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &set) });
    Some((allowed.next()?, allowed.next()?))
}

/// Pins this thread to `cpu`; a refusal leaves it unpinned.
fn pin(cpu: usize) {
    // SAFETY: as in `cpus`.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: cpu is below CPU_SETSIZE (it came from sched_getaffinity).
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is this thread; the set is as large as the size passed.
    let _ = unsafe { libc::sched_setaffinity(0, std::mem::size_of_val(&set), &set) };
}

/// Runs `f` `depth` frames further down this thread's stack (each frame
/// holds 64 bytes more), so that the rounds also vary where the two halves'
/// stack variables sit relative to the buffers.
#[inline(never)]
fn deeper<R>(depth: usize, f: &mut dyn FnMut() -> R) -> R {
    let pad = black_box([0u8; 64]);
    let r = if depth == 0 {
        f()
    } else {
        deeper(depth - 1, f)
    };
    black_box(&pad);
    r
}

/// Moves `total` items made by `make` from `tx` to `rx`, each half on its
/// own thread (pinned to two CPUs when it can); returns the time from when
/// both halves are running until the consumer has taken the last item.
fn transfer<T: Send, P: Tx<T>, C: Rx<T>>(
    tx: &mut P,
    rx: &mut C,
    total: u64,
    batch: bool,
    make: &mut (impl FnMut() -> Option<T> + Send),
    depth: usize,
) -> Duration {
    let cpus = cpus();
    let ready = std::sync::Barrier::new(2);
    std::thread::scope(|s| {
        s.spawn(|| {
            if let Some((p, _)) = cpus {
                pin(p);
            }
            ready.wait();
            deeper(depth, &mut || {
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
        });
        let consumer = s.spawn(|| {
            if let Some((_, c)) = cpus {
                pin(c);
            }
            ready.wait();
            deeper(depth, &mut || {
                let t = Instant::now();
                let mut got = 0u64;
                while got < total {
                    let n = if batch {
                        rx.pop_many(BATCH, consume)
                    } else {
                        rx.pop_one().map_or(0, |v| {
                            consume(v);
                            1
                        })
                    };
                    if n == 0 {
                        std::hint::spin_loop();
                    }
                    got += n as u64;
                }
                t.elapsed()
            })
        });
        // The clock runs on the consumer: this thread is not pinned and may
        // wait for a CPU while the two halves spin.
        consumer
            .join()
            .unwrap_or_else(|e| std::panic::resume_unwind(e))
    })
}

/// Disposes of one item the consumer took (for a handle: its release to
/// the pool). Not inlined, so every queue runs the same machine code for
/// it, and the rows differ only in the queues' own code.
#[inline(never)]
fn consume<T>(v: T) {
    drop(black_box(v));
}

/// A handle from the pool, or `None` when every slot is out. Not inlined,
/// like `consume`.
#[inline(never)]
fn make_handle<'p>(acq: &mut Acquirer<'p>) -> Option<EventRef<'p>> {
    acq.acquire().map(|mut s| {
        s.buffer_mut()[0] = 1;
        s.share(64)
    })
}

/// The queues under test.
#[derive(Clone, Copy)]
enum Queue {
    Ours,
    Rtrb,
    Crossbeam,
}

impl Queue {
    const ALL: [Queue; 3] = [Queue::Ours, Queue::Rtrb, Queue::Crossbeam];

    fn name(self) -> &'static str {
        match self {
            Queue::Ours => "ours",
            Queue::Rtrb => "rtrb",
            Queue::Crossbeam => "crossbeam ArrayQueue",
        }
    }
}

/// What one run moves: counting u64s, or handles from a pool of 4,096
/// slots of 64 bytes.
#[derive(Clone, Copy)]
enum Item {
    U64,
    Handle,
}

/// Moves `items` items through a queue of kind `q` built for this run alone
/// (fresh buffers, and for handles a fresh pool, after `pad` bytes of heap
/// so that runs land at varying addresses), with both halves `depth` frames
/// down their stacks; returns the consumer's time.
fn run(q: Queue, item: Item, items: u64, batch: bool, pad: usize, depth: usize) -> Duration {
    let _pad = vec![0u8; 64 + pad % 65_536];
    match item {
        Item::U64 => {
            let mut i = 0u64;
            let mut make = move || {
                i += 1;
                Some(i)
            };
            through(q, items, batch, &mut make, depth)
        }
        Item::Handle => {
            let mut meta: Vec<SlotMeta> = (0..4096).map(|_| SlotMeta::new()).collect();
            let mut data = vec![0u8; 4096 * 64];
            let Ok(pool) = BufferPool::new(&mut meta, &mut data, 64) else {
                unreachable!("4,096 slots of 64 bytes fit their buffers");
            };
            let Some(mut acq) = pool.acquirer() else {
                unreachable!("a new pool has its acquirer");
            };
            through(q, items, batch, &mut || make_handle(&mut acq), depth)
        }
    }
}

/// `run`'s queue part: a fresh queue of kind `q`, its halves on the heap.
fn through<T: Send>(
    q: Queue,
    items: u64,
    batch: bool,
    make: &mut (impl FnMut() -> Option<T> + Send),
    depth: usize,
) -> Duration {
    match q {
        Queue::Ours => {
            let mut slots: Vec<Slot<T>> = (0..CAP).map(|_| Slot::new()).collect();
            let Ok(ring) = BufferRing::new(&mut slots) else {
                unreachable!("CAP is a power of two");
            };
            let ring = Box::new(ring);
            let Some((tx, rx)) = ring.split() else {
                unreachable!("a new ring splits");
            };
            let (mut tx, mut rx) = (Box::new(tx), Box::new(rx));
            transfer(&mut *tx, &mut *rx, items, batch, make, depth)
        }
        Queue::Rtrb => {
            let (tx, rx) = rtrb::RingBuffer::<T>::new(CAP);
            let (mut tx, mut rx) = (Box::new(tx), Box::new(rx));
            transfer(&mut *tx, &mut *rx, items, batch, make, depth)
        }
        Queue::Crossbeam => {
            let q = ArrayQueue::<T>::new(CAP);
            transfer(&mut Aq(&q), &mut Aq(&q), items, batch, make, depth)
        }
    }
}

/// Median time of one cache-line round trip between the two CPUs the
/// halves run on (two threads bouncing a counter, 11 runs of 20,000 trips),
/// in ns. It tells the state the machine is in: here it was 112-135 ns in
/// runs where our ring led in every row, and 160-183 ns in a stretch where
/// the one-at-a-time rows swung either way.
fn round_trip_ns() -> f64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    const TRIPS: u64 = 20_000;
    let cpus = cpus();
    let mut runs: Vec<f64> = (0..11)
        .map(|_| {
            let ball = CachePadded::new(AtomicU64::new(0));
            std::thread::scope(|s| {
                s.spawn(|| {
                    if let Some((_, c)) = cpus {
                        pin(c);
                    }
                    for i in 0..TRIPS {
                        while ball.load(Ordering::Acquire) != 2 * i + 1 {
                            std::hint::spin_loop();
                        }
                        ball.store(2 * i + 2, Ordering::Release);
                    }
                });
                let t = s
                    .spawn(|| {
                        if let Some((p, _)) = cpus {
                            pin(p);
                        }
                        let t = Instant::now();
                        for i in 0..TRIPS {
                            ball.store(2 * i + 1, Ordering::Release);
                            while ball.load(Ordering::Acquire) != 2 * i + 2 {
                                std::hint::spin_loop();
                            }
                        }
                        t.elapsed()
                    })
                    .join()
                    .unwrap_or_else(|e| std::panic::resume_unwind(e));
                t.as_secs_f64() * 1e9 / TRIPS as f64
            })
        })
        .collect();
    median(&mut runs)
}

fn bench(c: &mut Criterion) {
    let before = round_trip_ns();
    for (item, item_name) in [(Item::U64, "u64"), (Item::Handle, "pool handle")] {
        for batch in [false, true] {
            let kind = if batch { "batch" } else { "single" };
            if !wanted(&format!("{item_name} {kind}")) {
                continue;
            }
            let name = |q: Queue| format!("{item_name} {kind}: {}", q.name());
            // Criterion's samples: each on a queue (and pool) of its own,
            // at a varying depth, one queue after another.
            if std::env::var_os("RING_ROUNDS_ONLY").is_none() {
                let mut g = c.benchmark_group("ring");
                g.throughput(Throughput::Elements(ITEMS));
                for q in Queue::ALL {
                    let n = name(q);
                    let mut sample = 0usize;
                    g.bench_function(&n, |b| {
                        b.iter_custom(|iters| {
                            sample += 1;
                            let e = run(q, item, iters * ITEMS, batch, sample * 4160, sample % 32);
                            record(&n, iters, e);
                            e
                        })
                    });
                }
                g.finish();
            }
            // The same three in paired rounds, in a rotated order: single-item
            // cross-thread figures on this machine swing by several times
            // with placement and with the moment, so the comparison is the
            // median of the per-round ratios.
            for round in 0..ROUNDS {
                for k in 0..3 {
                    let q = Queue::ALL[(round + k) % 3];
                    let e = run(q, item, ROUND_ITEMS, batch, round * 4160, round);
                    record(&format!("{} [rounds]", name(q)), 1, e);
                }
            }
        }
    }

    println!(
        "\n== cache-line round trip between the two CPUs: {before:.1} ns before, {:.1} ns after",
        round_trip_ns()
    );
    for item in ["u64", "pool handle"] {
        for kind in ["single", "batch"] {
            let name = |peer: &str, suffix: &str| format!("{item} {kind}: {peer}{suffix}");
            print_ratios(
                &format!("SPSC {item}, {kind}"),
                ITEMS,
                &name("ours", ""),
                &[&name("rtrb", ""), &name("crossbeam ArrayQueue", "")],
            );
            print_paired(
                &format!("SPSC {item}, {kind} [rounds]"),
                ROUND_ITEMS,
                &name("ours", " [rounds]"),
                &[
                    &name("rtrb", " [rounds]"),
                    &name("crossbeam ArrayQueue", " [rounds]"),
                ],
            );
        }
    }
}
criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).warm_up_time(Duration::from_millis(500)).measurement_time(Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
