//! Measures how fast this machine's CPUs run while a benchmark runs beside
//! it, for what steal time does not show.
//!
//!   cpu_probe SECONDS
//!
//! Once a millisecond it copies 64 KiB four times (inside the L2 cache) and
//! reads the thread's own CPU time for it. A busy neighbour process of ours can make
//! the copy wait, but not make it use more CPU time; it uses more only when
//! the CPU itself runs slower (the hypervisor giving the virtual CPU part
//! of a core, or the host's other load). At the end it prints one JSON
//! object: samples taken, the median copy's CPU time, and the milliseconds
//! of the run in which the copy took over 4 times that median
//! (`slow_ms`), with the longest such stretch.

use std::time::{Duration, Instant};

/// The calling thread's CPU time in nanoseconds.
fn thread_cpu_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid, writable timespec for the call's duration.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID) failed");
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

fn main() {
    let secs: f64 = match std::env::args().nth(1).map(|s| s.parse()) {
        Some(Ok(s)) if s > 0.0 => s,
        _ => {
            eprintln!("usage: cpu_probe SECONDS");
            std::process::exit(2);
        }
    };
    // Source and destination 64 KiB apart in one buffer, so at the same
    // place within a page: on some CPUs (AMD Zen 3 seen here) a `rep movsb`
    // copy whose destination lies 1-31 bytes past its source within a page
    // runs ~18 times slower, and two separate allocations can land that way
    // (malloc's 16-byte header), which would make every sample "slow".
    let mut both = vec![1u8; 2 * (64 << 10)];
    let (src, dst) = both.split_at_mut(64 << 10);
    // Mapped and cached before the first timed copy.
    dst.copy_from_slice(src);
    let mut costs: Vec<u64> = Vec::with_capacity((secs * 1000.0) as usize + 1);
    let start = Instant::now();
    let mut next = start;
    while start.elapsed().as_secs_f64() < secs {
        next += Duration::from_millis(1);
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        let t0 = thread_cpu_ns();
        for k in 0..4 {
            dst.copy_from_slice(src);
            // Keeps the copies from being folded into one.
            std::hint::black_box(&mut *dst)[k] ^= 1;
        }
        costs.push(thread_cpu_ns() - t0);
    }
    let mut sorted = costs.clone();
    sorted.sort_unstable();
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(0);
    let (mut slow, mut run, mut longest) = (0u64, 0u64, 0u64);
    for &c in &costs {
        if c > 4 * median {
            slow += 1;
            run += 1;
            longest = longest.max(run);
        } else {
            run = 0;
        }
    }
    println!(
        "{{\"samples\":{},\"median_ns\":{median},\"slow_ms\":{slow},\"longest_slow_ms\":{longest}}}",
        costs.len()
    );
}
