//! Counters and latency histograms: each thread counts into its own
//! [`LocalMetrics`] (counters and raw latency samples) and flushes into a
//! shared [`Registry`] (counters and histograms) when its samples fill up,
//! every 1000 events, every millisecond while busy, and when it goes idle.
//! Histogram precision is a const generic, so firmware can keep 1 KiB
//! histograms where the host keeps 4 KiB ones.
//!
//! Costs: recording is a few plain integer operations (no atomics, no
//! allocation); a flush takes a spin lock to add the counters and one
//! bucket increment per sample. Nothing here wakes a thread: flushing rides
//! on the caller's own work and idling.

use crate::event::Class;
use crate::wire::Reason;

/// Largest value with its own bucket at every precision: 2^34 - 1 (17 s in
/// ns). Larger values are counted in one overflow bucket, reported as the
/// exact maximum.
pub const MAX_TRACKED: u64 = (1 << 34) - 1;

/// Bucket count (with the overflow bucket) of a histogram with 16 buckets
/// per power of two: quantiles within 3.2 % (496 x 8 B, the default).
pub const FINE: usize = 497;
/// 8 buckets per power of two: quantiles within 6.3 % (2 KiB).
pub const MEDIUM: usize = 257;
/// 4 buckets per power of two: quantiles within 12.5 % (1 KiB), for
/// firmware with little RAM.
pub const COARSE: usize = 133;

/// Log-linear histogram of `u64` values (nanoseconds, typically) in a fixed
/// `8 * B + 24` bytes. `B` is [`FINE`] (the default), [`MEDIUM`] or
/// [`COARSE`]; another value fails to compile. With `2^s` buckets per power
/// of two, values below `2^s` are counted exactly and every reported
/// quantile is within `2^-(s+1)` (plus rounding) of the exact one for values
/// up to [`MAX_TRACKED`].
#[derive(Clone)]
pub struct Histogram<const B: usize = FINE> {
    /// The last bucket counts values above MAX_TRACKED.
    counts: [u64; B],
    count: u64,
    sum: u64,
    max: u64,
}

impl<const B: usize> Histogram<B> {
    /// log2 of the buckets per power of two.
    const SUB_BITS: u32 = match B {
        FINE => 4,
        MEDIUM => 3,
        COARSE => 2,
        _ => panic!("a histogram has FINE, MEDIUM or COARSE buckets"),
    };
    /// Buckets per power of two; values below it have a bucket each.
    const SUB: usize = 1 << Self::SUB_BITS;
    /// Index of the overflow bucket.
    const OVERFLOW: usize = B - 1;
    /// The buckets cover 0..=MAX_TRACKED exactly, plus the overflow bucket.
    const LAYOUT_OK: () = assert!(B == Self::SUB + (34 - Self::SUB_BITS as usize) * Self::SUB + 1);

    /// An empty histogram of any precision (`Histogram::<COARSE>::empty()`).
    pub const fn empty() -> Self {
        let () = Self::LAYOUT_OK;
        Self {
            counts: [0; B],
            count: 0,
            sum: 0,
            max: 0,
        }
    }

    #[inline(always)]
    fn bucket(value: u64) -> usize {
        if value < Self::SUB as u64 {
            return value as usize;
        }
        if value > MAX_TRACKED {
            return Self::OVERFLOW;
        }
        let exp = 63 - value.leading_zeros(); // >= SUB_BITS
        let shift = exp - Self::SUB_BITS;
        let sub = (value >> shift) as usize & (Self::SUB - 1);
        Self::SUB + (shift as usize) * Self::SUB + sub
    }

    /// Smallest value of bucket `index` (`index <= OVERFLOW`).
    fn lower(index: usize) -> u64 {
        if index < Self::SUB {
            return index as u64;
        }
        let shift = ((index - Self::SUB) / Self::SUB) as u32;
        let sub = ((index - Self::SUB) % Self::SUB) as u64;
        (Self::SUB as u64 + sub) << shift
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

    /// The value at rank `ceil(q * count)` (q in 0..=1), within the
    /// histogram's precision; 0 when empty. Never above the exact maximum.
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
                return if i == Self::OVERFLOW {
                    self.max
                } else {
                    Self::midpoint(i).min(self.max)
                };
            }
        }
        self.max
    }

    /// Adds every count of `other`.
    pub fn merge(&mut self, other: &Histogram<B>) {
        for (a, b) in self.counts.iter_mut().zip(other.counts.iter()) {
            *a += b;
        }
        self.count += other.count;
        self.sum = self.sum.saturating_add(other.sum);
        self.max = self.max.max(other.max);
    }

    /// Empties it.
    pub fn clear(&mut self) {
        *self = Self::empty();
    }

    /// Cumulative counts at bucket upper bounds, for Prometheus-style
    /// exposition: calls `f(upper_bound, cumulative)` for each non-empty
    /// bucket in order; the overflow bucket's bound is `u64::MAX`.
    pub fn for_each_cumulative(&self, mut f: impl FnMut(u64, u64)) {
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            if *c > 0 {
                seen += c;
                let upper = if i < Self::OVERFLOW {
                    Self::lower(i + 1) - 1
                } else {
                    u64::MAX
                };
                f(upper, seen);
            }
        }
    }
}

impl Histogram {
    /// An empty histogram of the default precision.
    pub const fn new() -> Self {
        Self::empty()
    }
}

impl<const B: usize> Default for Histogram<B> {
    fn default() -> Self {
        Self::empty()
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
pub const COUNTERS: usize = 3 * 3 + Reason::ALL.len() + 5;

impl Counter {
    /// Slot of this counter in a counter array.
    pub const fn index(self) -> usize {
        match self {
            Counter::Received(c) => c as usize,
            Counter::Stored(c) => 3 + c as usize,
            Counter::Duplicate(c) => 6 + c as usize,
            Counter::Rejected(r) => 9 + r as usize,
            Counter::Batches => 9 + Reason::ALL.len(),
            Counter::BytesStored => 10 + Reason::ALL.len(),
            Counter::BytesReceived => 11 + Reason::ALL.len(),
            Counter::KeepAlives => 12 + Reason::ALL.len(),
            Counter::LegacySkipped => 13 + Reason::ALL.len(),
        }
    }
}

/// A set of counters and per-class latency histograms of `B` buckets
/// ([`Histogram`]).
#[derive(Clone)]
pub struct Snapshot<const B: usize = FINE> {
    counters: [u64; COUNTERS],
    latency: [Histogram<B>; 3],
}

impl Snapshot {
    /// All zero, histograms of the default precision.
    pub const fn new() -> Self {
        Self::empty()
    }
}

impl<const B: usize> Snapshot<B> {
    /// All zero, histograms of any precision.
    pub const fn empty() -> Self {
        Self {
            counters: [0; COUNTERS],
            latency: [Histogram::empty(), Histogram::empty(), Histogram::empty()],
        }
    }

    /// The value of one counter.
    pub fn get(&self, c: Counter) -> u64 {
        self.counters.get(c.index()).copied().unwrap_or(0)
    }

    /// Ingest-to-stored latency of one class, nanoseconds.
    pub fn latency(&self, class: Class) -> &Histogram<B> {
        &self.latency[class.index()]
    }

    /// Adds `other` into this one.
    pub fn merge(&mut self, other: &Snapshot<B>) {
        for (a, b) in self.counters.iter_mut().zip(other.counters.iter()) {
            *a += b;
        }
        for (a, b) in self.latency.iter_mut().zip(other.latency.iter()) {
            a.merge(b);
        }
    }
}

impl<const B: usize> Default for Snapshot<B> {
    fn default() -> Self {
        Self::empty()
    }
}

/// The shared totals every thread flushes into; histograms of `B` buckets.
pub struct Registry<const B: usize = FINE> {
    totals: spin::Mutex<Snapshot<B>>,
}

impl Registry {
    /// Empty totals, histograms of the default precision; `const`, so a
    /// registry can be a `static`.
    pub const fn new() -> Self {
        Self::empty()
    }
}

impl<const B: usize> Registry<B> {
    /// Empty totals, histograms of any precision
    /// (`Registry::<COARSE>::empty()`); `const`, so a registry can be a
    /// `static`.
    pub const fn empty() -> Self {
        Self {
            totals: spin::Mutex::new(Snapshot::empty()),
        }
    }

    /// A copy of the totals.
    pub fn snapshot(&self) -> Snapshot<B> {
        self.totals.lock().clone()
    }

    /// Runs `f` on the totals under the lock (no copy).
    pub fn with<R>(&self, f: impl FnOnce(&Snapshot<B>) -> R) -> R {
        f(&self.totals.lock())
    }
}

impl<const B: usize> Default for Registry<B> {
    fn default() -> Self {
        Self::empty()
    }
}

/// Flush after this many recorded events ...
pub const FLUSH_EVENTS: u32 = 1000;
/// ... or this long after the previous flush while busy (nanoseconds).
pub const FLUSH_INTERVAL_NS: u64 = 1_000_000;

/// Bits of a latency sample that hold its class; the rest hold the value.
const CLASS_SHIFT: u32 = 62;

/// One thread's counters and up to `K` latency samples, flushed into a
/// [`Registry`]: when the samples fill up, and otherwise after
/// [`FLUSH_EVENTS`] events or [`FLUSH_INTERVAL_NS`] (see
/// [`maybe_flush`](Self::maybe_flush)). It holds raw samples rather than
/// histograms, so it stays small (`8 * (K + 30)` bytes) and a flush costs
/// one bucket increment per sample.
pub struct LocalMetrics<const K: usize = 256> {
    counters: [u64; COUNTERS],
    /// Class in the top two bits, nanoseconds (saturated) below.
    samples: [u64; K],
    len: usize,
    events: u32,
    last_flush_ns: u64,
}

impl LocalMetrics {
    /// Nothing counted yet; room for the default number of samples.
    pub const fn new() -> Self {
        Self::empty()
    }
}

impl<const K: usize> LocalMetrics<K> {
    /// Room for at least one sample.
    const CAPACITY_OK: () = assert!(K > 0, "LocalMetrics needs room for a sample");

    /// Nothing counted yet; room for `K` samples.
    pub const fn empty() -> Self {
        let () = Self::CAPACITY_OK;
        Self {
            counters: [0; COUNTERS],
            samples: [0; K],
            len: 0,
            events: 0,
            last_flush_ns: 0,
        }
    }

    /// Adds `n` to a counter.
    #[inline]
    pub fn add(&mut self, c: Counter, n: u64) {
        if let Some(v) = self.counters.get_mut(c.index()) {
            *v += n;
        }
    }

    /// Records one event's ingest-to-stored latency and counts it toward
    /// the next flush; flushes into `registry` when the samples are full.
    #[inline]
    pub fn latency<const B: usize>(&mut self, registry: &Registry<B>, class: Class, ns: u64) {
        if self.len >= K {
            self.merge_into(registry);
        }
        if let Some(s) = self.samples.get_mut(self.len) {
            *s = ((class as u64) << CLASS_SHIFT) | ns.min((1 << CLASS_SHIFT) - 1);
            self.len += 1;
        }
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
    pub fn maybe_flush<const B: usize>(&mut self, registry: &Registry<B>, now_ns: u64) {
        if self.events >= FLUSH_EVENTS
            || (self.events > 0 && now_ns.saturating_sub(self.last_flush_ns) >= FLUSH_INTERVAL_NS)
        {
            self.flush(registry, now_ns);
        }
    }

    /// Flushes now (call before going idle).
    pub fn flush<const B: usize>(&mut self, registry: &Registry<B>, now_ns: u64) {
        self.merge_into(registry);
        self.events = 0;
        self.last_flush_ns = now_ns;
    }

    /// Adds the counters and samples to the registry's totals and clears
    /// them.
    fn merge_into<const B: usize>(&mut self, registry: &Registry<B>) {
        let mut totals = registry.totals.lock();
        for (a, b) in totals.counters.iter_mut().zip(self.counters.iter()) {
            *a += b;
        }
        for s in self.samples.iter().take(self.len) {
            let class = (s >> CLASS_SHIFT) as usize;
            if let Some(h) = totals.latency.get_mut(class) {
                h.record(s & ((1 << CLASS_SHIFT) - 1));
            }
        }
        drop(totals);
        self.counters = [0; COUNTERS];
        self.len = 0;
    }

    /// A counter's value not flushed yet.
    pub fn pending(&self, c: Counter) -> u64 {
        self.counters.get(c.index()).copied().unwrap_or(0)
    }
}

impl<const K: usize> Default for LocalMetrics<K> {
    fn default() -> Self {
        Self::empty()
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
        let mut m = LocalMetrics::<1024>::empty();
        for i in 0..999 {
            m.latency(&reg, Class::Realtime, 100);
            m.maybe_flush(&reg, 10 + i);
        }
        assert_eq!(reg.snapshot().latency(Class::Realtime).count(), 0);
        m.latency(&reg, Class::Realtime, 100);
        m.maybe_flush(&reg, 2_000);
        assert_eq!(reg.snapshot().latency(Class::Realtime).count(), 1000);
        m.add(Counter::Stored(Class::Batch), 3);
        m.event();
        m.maybe_flush(&reg, 2_000 + FLUSH_INTERVAL_NS - 1);
        assert_eq!(reg.snapshot().get(Counter::Stored(Class::Batch)), 0);
        m.maybe_flush(&reg, 2_000 + FLUSH_INTERVAL_NS);
        assert_eq!(reg.snapshot().get(Counter::Stored(Class::Batch)), 3);
    }

    fn within<const B: usize>(bound: f64) {
        let mut v = 1u64;
        while v <= MAX_TRACKED {
            for x in [v, v + v / 3, v + v / 2, v * 2 - 1].map(|x| x.min(MAX_TRACKED)) {
                let mut h = Histogram::<B>::empty();
                h.record(x);
                h.record(x.saturating_add(1) * 4);
                let got = h.quantile(0.5);
                let err = x.abs_diff(got) as f64 / x as f64;
                assert!(err <= bound, "{B}: {x} reported as {got}");
            }
            v = v * 3 + 1;
        }
    }

    #[test]
    fn every_precision_is_within_its_bound() {
        // A bucket's midpoint is within 2^-(s+1) of any value in it.
        within::<FINE>(1.0 / 32.0 + 1e-9);
        within::<MEDIUM>(1.0 / 16.0 + 1e-9);
        within::<COARSE>(1.0 / 8.0 + 1e-9);
        assert!(core::mem::size_of::<Histogram<COARSE>>() <= 1100);
    }

    #[test]
    fn samples_flush_into_the_registry_when_full() {
        let reg = Registry::<COARSE>::empty();
        let mut m = LocalMetrics::<4>::empty();
        for i in 0..5u64 {
            m.latency(&reg, Class::ALL[(i % 3) as usize], 1_000 * (i + 1));
        }
        m.add(Counter::Batches, 2);
        let s = reg.snapshot();
        assert_eq!(s.latency(Class::Realtime).count(), 2);
        assert_eq!(s.latency(Class::Transactional).count(), 1);
        assert_eq!(s.latency(Class::Batch).count(), 1);
        assert_eq!(s.get(Counter::Batches), 0);
        assert_eq!(m.pending(Counter::Batches), 2);
        m.flush(&reg, 1);
        let s = reg.snapshot();
        assert_eq!(s.latency(Class::Transactional).count(), 2);
        assert_eq!(s.latency(Class::Transactional).max(), 5_000);
        assert_eq!(s.get(Counter::Batches), 2);
        // A value beyond the sample's 62 bits saturates, in its class.
        m.latency(&reg, Class::Batch, u64::MAX);
        m.flush(&reg, 2);
        assert_eq!(reg.snapshot().latency(Class::Batch).max(), (1 << 62) - 1);
    }
}
