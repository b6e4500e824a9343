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

/// The median of `v` (the upper one of an even count), sorting it; `NaN`
/// if it is empty.
pub fn median(v: &mut [f64]) -> f64 {
    quantile(v, 0.5)
}

/// The value at fraction `q` (0.0 to 1.0) of `v` sorted, the nearest rank
/// (rounded half up: `q` = 0.5 with an even count gives the upper middle);
/// `NaN` if it is empty.
fn quantile(v: &mut [f64], q: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[((v.len() - 1) as f64 * q).round() as usize]
}

/// Median nanoseconds per iteration of `name`, if it ran.
pub fn median_ns(name: &str) -> Option<f64> {
    let samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    Some(median(&mut samples.get(name)?.clone()))
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

/// Prints paired rounds: `ours` and each peer recorded one sample per round,
/// in the same rounds (close together in time, on the same machine state),
/// so each round gives one ratio, peer time / our time. Prints the median
/// ratio, its quartiles, and in how many rounds we were faster: on a noisy
/// machine the median of paired ratios is steadier than a ratio of medians
/// taken minutes apart.
pub fn print_paired(title: &str, elements: u64, ours: &str, peers: &[&str]) {
    let samples = SAMPLES.lock().unwrap_or_else(|e| e.into_inner());
    let Some(our) = samples.get(ours) else {
        return;
    };
    println!(
        "\n== {title}: {} paired rounds, {elements} element(s) each",
        our.len()
    );
    let per = |ns: f64| ns / elements as f64;
    println!(
        "  {ours:<44} median {:>8.2} ns/elem",
        per(median(&mut our.clone()))
    );
    for peer in peers {
        let Some(theirs) = samples.get(*peer) else {
            continue;
        };
        let mut ratios: Vec<f64> = our.iter().zip(theirs).map(|(o, t)| t / o).collect();
        if ratios.is_empty() {
            continue;
        }
        let wins = ratios.iter().filter(|r| **r > 1.0).count();
        let (q1, q2, q3) = (
            quantile(&mut ratios, 0.25),
            quantile(&mut ratios, 0.5),
            quantile(&mut ratios, 0.75),
        );
        println!(
            "  {peer:<44} median {:>8.2} ns/elem",
            per(median(&mut theirs.clone()))
        );
        println!(
            "  ratio {ours} vs {peer}: median {q2:.2}x (quartiles {q1:.2}-{q3:.2}), faster in {wins} of {} rounds",
            ratios.len()
        );
    }
}

/// Deterministic pseudo-random u64s (splitmix64), for ids and values.
pub use eventstream_core::splitmix::SplitMix64 as SplitMix;
