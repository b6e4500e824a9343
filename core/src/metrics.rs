//! Counters and latency histograms: each thread counts into its own
//! [`LocalMetrics`] and flushes into a shared [`Registry`] every 1000 events,
//! every millisecond while busy, and when it goes idle.
//!
//! Costs: recording is a few plain integer operations (no atomics, no
//! allocation); a flush takes a spin lock for a merge of ~12 KiB. Nothing
//! here wakes a thread: flushing rides on the caller's own work and idling.

use crate::event::Class;
use crate::wire::Reason;

/// Values below this are counted exactly, one bucket each.
const LINEAR: usize = 16;
/// Sub-buckets per power of two: 16, so a bucket spans 1/16 of its octave and
/// its midpoint is within 1/32 (3.125 %) of any value in it.
const SUB_BITS: u32 = 4;
const SUB: usize = 1 << SUB_BITS;
/// Octaves above the linear range: values up to 2^34 - 1 (17 s in ns).
const OCTAVES: usize = 30;
/// Number of buckets.
pub const BUCKETS: usize = LINEAR + OCTAVES * SUB;
/// Largest value with its own bucket; larger values are counted in one
/// overflow bucket, reported as the exact maximum.
pub const MAX_TRACKED: u64 = (1 << (SUB_BITS as usize + OCTAVES)) - 1;

/// Log-linear histogram of `u64` values (nanoseconds, typically) in a fixed
/// 4,000 bytes. Every quantile it reports is within 3.2 % of the exact one
/// for values up to [`MAX_TRACKED`].
#[derive(Clone)]
pub struct Histogram {
    /// One more than BUCKETS: the last counts values above MAX_TRACKED.
    counts: [u64; BUCKETS + 1],
    count: u64,
    sum: u64,
    max: u64,
}

impl Histogram {
    /// An empty histogram.
    pub const fn new() -> Self {
        Self {
            counts: [0; BUCKETS + 1],
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    #[inline(always)]
    fn bucket(value: u64) -> usize {
        if value < LINEAR as u64 {
            return value as usize;
        }
        if value > MAX_TRACKED {
            return BUCKETS;
        }
        let exp = 63 - value.leading_zeros(); // >= SUB_BITS
        let shift = exp - SUB_BITS;
        let sub = (value >> shift) as usize & (SUB - 1);
        LINEAR + (shift as usize) * SUB + sub
    }

    /// Smallest value of bucket `index` (`index <= BUCKETS`).
    fn lower(index: usize) -> u64 {
        if index < LINEAR {
            return index as u64;
        }
        let shift = ((index - LINEAR) / SUB) as u32;
        let sub = ((index - LINEAR) % SUB) as u64;
        (SUB as u64 + sub) << shift
    }

    /// Midpoint of bucket `index`, the value reported for it.
    fn midpoint(index: usize) -> u64 {
        let low = Self::lower(index);
        low + (Self::lower(index + 1) - low) / 2
    }

    /// Counts one value.
    #[inline]
    pub fn record(&mut self, value: u64) {
        if let Some(c) = self.counts.get_mut(Self::bucket(value)) {
            *c += 1;
        }
        self.count += 1;
        self.sum = self.sum.saturating_add(value);
        self.max = self.max.max(value);
    }

    /// Values counted.
    pub fn count(&self) -> u64 {
        self.count
    }

    /// Sum of the values (saturating).
    pub fn sum(&self) -> u64 {
        self.sum
    }

    /// Largest value counted (exact), 0 when empty.
    pub fn max(&self) -> u64 {
        self.max
    }

    /// The value at rank `ceil(q * count)` (q in 0..=1), within 3.2 %; 0 when
    /// empty. Never above the exact maximum.
    pub fn quantile(&self, q: f64) -> u64 {
        if self.count == 0 {
            return 0;
        }
        let q = if q.is_nan() { 0.0 } else { q.clamp(0.0, 1.0) };
        let rank = ((q * self.count as f64) as u64).clamp(1, self.count);
        // Rounding q * count up without floating-point ceil (not in core).
        let rank = if (rank as f64) < q * self.count as f64 {
            (rank + 1).min(self.count)
        } else {
            rank
        };
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return if i == BUCKETS {
                    self.max
                } else {
                    Self::midpoint(i).min(self.max)
                };
            }
        }
        self.max
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    /// Empties it.
    pub fn clear(&mut self) {
        *self = Self::new();
    }

    /// Cumulative counts at bucket upper bounds, for Prometheus-style
    /// exposition: calls `f(upper_bound, cumulative)` for each non-empty
    /// bucket in order; the overflow bucket's bound is `u64::MAX`.
    pub fn for_each_cumulative(&self, mut f: impl FnMut(u64, u64)) {
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            if *c > 0 {
                seen += c;
                let upper = if i < BUCKETS {
                    Self::lower(i + 1) - 1
                } else {
                    u64::MAX
                };
                f(upper, seen);
            }
        }
    }
}

impl Default for Histogram {
    fn default() -> Self {
        Self::new()
    }
}

/// What the engine counts. Per-class and per-reason counters are laid out
/// in blocks; [`Counter::index`] gives each one's place.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Counter {
    /// Valid events read (v1 and legacy), per class.
    Received(Class),
    /// Events written to the log, per class.
    Stored(Class),
    /// Events answered DUPLICATE (or dropped as duplicates), per class.
    Duplicate(Class),
    /// Frames or events rejected, per reason.
    Rejected(Reason),
    /// Batch records written.
    Batches,
    /// Frame bytes written to the log.
    BytesStored,
    /// Frame bytes read from producers.
    BytesReceived,
    /// Legacy keep-alives.
    KeepAlives,
    /// Legacy frames skipped (also counted under their reason).
    LegacySkipped,
}

/// Number of distinct counters.
pub const COUNTERS: usize = 3 * 3 + 12 + 5;

impl Counter {
    /// Slot of this counter in a counter array.
    pub const fn index(self) -> usize {
        match self {
            Counter::Received(c) => c as usize,
            Counter::Stored(c) => 3 + c as usize,
            Counter::Duplicate(c) => 6 + c as usize,
            Counter::Rejected(r) => 9 + r as usize,
            Counter::Batches => 21,
            Counter::BytesStored => 22,
            Counter::BytesReceived => 23,
            Counter::KeepAlives => 24,
            Counter::LegacySkipped => 25,
        }
    }
}

/// A set of counters and per-class latency histograms.
#[derive(Clone)]
pub struct Snapshot {
    counters: [u64; COUNTERS],
    latency: [Histogram; 3],
}

impl Snapshot {
    /// All zero.
    pub const fn new() -> Self {
        Self {
            counters: [0; COUNTERS],
            latency: [Histogram::new(), Histogram::new(), Histogram::new()],
        }
    }

    /// The value of one counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters.get(c.index()).copied().unwrap_or(0)
    }

    /// Ingest-to-stored latency of one class, nanoseconds.
    pub fn latency(&self, class: Class) -> &Histogram {
        &self.latency[class.index()]
    }

    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &Snapshot) {
        for (a, b) in self.counters.iter_mut().zip(other.counters.iter()) {
            *a += b;
        }
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            a.merge(b);
        }
    }

    fn clear(&mut self) {
        self.counters = [0; COUNTERS];
        self.latency.iter_mut().for_each(Histogram::clear);
    }
}

impl Default for Snapshot {
    fn default() -> Self {
        Self::new()
    }
}

/// The shared totals every thread flushes into.
pub struct Registry {
    totals: spin::Mutex<Snapshot>,
}

impl Registry {
    /// Empty totals; `const`, so a registry can be a `static`.
    pub const fn new() -> Self {
        Self {
            totals: spin::Mutex::new(Snapshot::new()),
        }
    }

    /// A copy of the totals.
    pub fn snapshot(&self) -> Snapshot {
        self.totals.lock().clone()
    }

    /// Runs `f` on the totals under the lock (no copy).
    pub fn with<R>(&self, f: impl FnOnce(&Snapshot) -> R) -> R {
        f(&self.totals.lock())
    }
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

/// Flush after this many recorded events ...
pub const FLUSH_EVENTS: u32 = 1000;
/// ... or this long after the previous flush while busy (nanoseconds).
pub const FLUSH_INTERVAL_NS: u64 = 1_000_000;

/// One thread's counters, flushed into a [`Registry`].
pub struct LocalMetrics {
    pending: Snapshot,
    events: u32,
    last_flush_ns: u64,
}

impl LocalMetrics {
    /// Nothing counted yet.
    pub const fn new() -> Self {
        Self {
            pending: Snapshot::new(),
            events: 0,
            last_flush_ns: 0,
        }
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        if let Some(v) = self.pending.counters.get_mut(c.index()) {
            *v += n;
        }
    }

    /// Records one event's ingest-to-stored latency and counts it toward
    /// the next flush.
    #[inline]
    pub fn latency(&mut self, class: Class, ns: u64) {
        self.pending.latency[class.index()].record(ns);
        self.events += 1;
    }

    /// Counts one event toward the next flush (for events without latency).
    #[inline]
    pub fn event(&mut self) {
        self.events += 1;
    }

    /// Flushes if 1000 events were counted or 1 ms passed since the last
    /// flush; call it after each unit of work, with the monotonic time.
    #[inline]
    pub fn maybe_flush(&mut self, registry: &Registry, now_ns: u64) {
        if self.events >= FLUSH_EVENTS
            || (self.events > 0 && now_ns.saturating_sub(self.last_flush_ns) >= FLUSH_INTERVAL_NS)
        {
            self.flush(registry, now_ns);
        }
    }

    /// Flushes now (call before going idle).
    pub fn flush(&mut self, registry: &Registry, now_ns: u64) {
        registry.totals.lock().merge(&self.pending);
        self.pending.clear();
        self.events = 0;
        self.last_flush_ns = now_ns;
    }

    /// What is counted but not flushed yet.
    pub fn pending(&self) -> &Snapshot {
        &self.pending
    }
}

impl Default for LocalMetrics {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_fits_in_4_kib() {
        assert!(core::mem::size_of::<Histogram>() <= 4096);
    }

    #[test]
    fn exact_below_16_and_bounded_above() {
        let mut h = Histogram::new();
        for v in 0..16 {
            h.record(v);
        }
        assert_eq!(h.quantile(0.5), 7);
        assert_eq!(h.quantile(1.0), 15);
        let mut h = Histogram::new();
        h.record(u64::MAX);
        assert_eq!(h.quantile(0.5), u64::MAX);
        h.record(MAX_TRACKED);
        assert!(h.quantile(0.5).abs_diff(MAX_TRACKED) <= MAX_TRACKED / 32);
        assert_eq!(h.max(), u64::MAX);
    }

    #[test]
    fn local_metrics_flush_every_1000_events_or_1_ms() {
        let reg = Registry::new();
        let mut m = LocalMetrics::new();
        for i in 0..999 {
            m.latency(Class::Realtime, 100);
            m.maybe_flush(&reg, 10 + i);
        }
        assert_eq!(reg.snapshot().latency(Class::Realtime).count(), 0);
        m.latency(Class::Realtime, 100);
        m.maybe_flush(&reg, 2_000);
        assert_eq!(reg.snapshot().latency(Class::Realtime).count(), 1000);
        m.add(Counter::Stored(Class::Batch), 3);
        m.event();
        m.maybe_flush(&reg, 2_000 + FLUSH_INTERVAL_NS - 1);
        assert_eq!(reg.snapshot().get(Counter::Stored(Class::Batch)), 0);
        m.maybe_flush(&reg, 2_000 + FLUSH_INTERVAL_NS);
        assert_eq!(reg.snapshot().get(Counter::Stored(Class::Batch)), 3);
    }
}
