//! The histogram's quantiles against an exact sort: within 3.2 % for every
//! value it tracks, whatever the distribution; merging equals recording all.

use eventstream_core::metrics::{Histogram, MAX_TRACKED};
use proptest::prelude::*;

fn exact(sorted: &[u64], q: f64) -> u64 {
    let n = sorted.len();
    let rank = ((q * n as f64).ceil() as usize).clamp(1, n);
    sorted[rank - 1]
}

fn values() -> impl Strategy<Value = Vec<u64>> {
    let one = prop_oneof![
        0u64..16,
        16u64..10_000,
        10_000u64..100_000_000,
        0u64..=MAX_TRACKED,
        // A heavy tail: log-uniform over the whole range.
        (0u32..34).prop_flat_map(|e| (1u64 << e)..=(1u64 << (e + 1)) - 1),
    ];
    prop::collection::vec(one, 1..2000)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 128, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn quantiles_are_within_3_2_percent(values in values(), extra_q in 0.0f64..=1.0) {
        let mut h = Histogram::new();
        for v in &values {
            h.record(*v);
        }
        let mut sorted = values.clone();
        sorted.sort_unstable();
        for q in [0.0, 0.5, 0.9, 0.99, 0.999, 1.0, extra_q] {
            let want = exact(&sorted, q);
            let got = h.quantile(q);
            let err = got.abs_diff(want) as f64;
            prop_assert!(err <= want as f64 * 0.032, "q={} exact={} got={}", q, want, got);
        }
        prop_assert_eq!(h.count(), values.len() as u64);
        prop_assert_eq!(h.max(), *sorted.last().unwrap());
    }

    #[test]
    fn merged_equals_recorded_together(a in values(), b in values()) {
        let (mut ha, mut hb, mut all) = (Histogram::new(), Histogram::new(), Histogram::new());
        a.iter().for_each(|v| { ha.record(*v); all.record(*v); });
        b.iter().for_each(|v| { hb.record(*v); all.record(*v); });
        ha.merge(&hb);
        for q in [0.5, 0.99, 0.999] {
            prop_assert_eq!(ha.quantile(q), all.quantile(q));
        }
        prop_assert_eq!(ha.count(), all.count());
    }
}
