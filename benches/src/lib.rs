//! Shared by the benchmarks in `benches/`: each benchmark records the time of
//! every sample it measures, and at the end prints, for each case, our median
//! against the peers' medians from the same run, as a ratio.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

static SAMPLES: Mutex<BTreeMap<String, Vec<f64>>> = Mutex::new(BTreeMap::new());

/// Records one sample of `name`: `iters` iterations took `elapsed`.
pub fn record(name: &str, iters: u64, elapsed: Duration) {
    if iters == 0 {
        return;
    }
    let per_iter = elapsed.as_secs_f64() * 1e9 / iters as f64;
    SAMPLES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.to_owned())
        .or_default()
        .push(per_iter);
}

/// Median nanoseconds per iteration of `name`, if it ran.
pub fn median_ns(name: &str) -> Option<f64> {
    let samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    let mut v = samples.get(name)?.clone();
    v.sort_by(f64::total_cmp);
    Some(v[v.len() / 2])
}

/// Prints `ours` against each peer: median per element (an iteration moves
/// `elements` items), million elements per second, and peer time / our time
/// (above 1.0: we are faster).
pub fn print_ratios(title: &str, elements: u64, ours: &str, peers: &[&str]) {
    let Some(our) = median_ns(ours) else {
        return;
    };
    println!("\n== {title}: median of every sample, {elements} element(s) per iteration");
    let line = |name: &str, ns: f64| {
        let per = ns / elements as f64;
        println!(
            "  {name:<44} {per:>10.2} ns/elem {:>9.1} M elem/s",
            1e3 / per
        );
    };
    line(ours, our);
    for peer in peers {
        if let Some(p) = median_ns(peer) {
            line(peer, p);
            println!("  ratio {ours} vs {peer}: {:.2}x", p / our);
        }
    }
}

/// Deterministic pseudo-random u64s (splitmix64), for ids and values.
pub use eventstream_core::splitmix::SplitMix64 as SplitMix;
