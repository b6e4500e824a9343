//! Unit tests of `batch`.

use super::*;
use std::vec;
use std::vec::Vec;

#[derive(Debug, PartialEq)]
struct Ev {
    topic: &'static [u8],
    partition: u32,
    n: u32,
}

impl BatchItem for Ev {
    fn topic(&self) -> &[u8] {
        self.topic
    }
    fn partition(&self) -> u32 {
        self.partition
    }
}

#[derive(Default)]
struct Collect(Vec<(CloseReason, Vec<u32>)>);

impl Aggregate<Ev> for Collect {
    fn aggregate(&mut self, mut w: Closed<'_, Ev>) {
        let items = w.drain().map(|e| e.n).collect();
        self.0.push((w.reason, items));
    }
}

fn ev(topic: &'static [u8], partition: u32, n: u32) -> Ev {
    Ev {
        topic,
        partition,
        n,
    }
}

const CFG: BatchConfig = BatchConfig {
    max_events: 3,
    max_age_ns: 100,
};

#[test]
fn windows_close_on_count_age_and_key() {
    let mut s: StaticBatchWindows<Ev, 2, 8> = StaticBatchWindows::new();
    let mut w = s.windows(CFG).unwrap();
    let mut agg = Collect::default();
    w.push(ev(b"a", 0, 1), 0, &mut agg);
    w.push(ev(b"a", 1, 2), 1, &mut agg);
    w.push(ev(b"a", 0, 3), 2, &mut agg);
    w.push(ev(b"a", 0, 4), 3, &mut agg);
    assert_eq!(agg.0, [(CloseReason::Full, vec![1, 3, 4])]);
    assert_eq!(w.held(), 1);
    assert_eq!(w.next_deadline(), Some(101));
    assert!(!w.poll(100, &mut agg));
    assert!(w.poll(101, &mut agg));
    assert!(!w.poll(101, &mut agg));
    assert_eq!(agg.0[1], (CloseReason::Aged, vec![2]));
    assert_eq!(w.held(), 0);
}

#[test]
fn every_item_comes_out_once_in_order_under_key_and_arena_pressure() {
    // 4 windows over an arena of 6 cells, 7 keys, ages and counts mixed:
    // windows open, close and get packed in every order.
    let mut s: StaticBatchWindows<Ev, 4, 6> = StaticBatchWindows::new();
    let mut w = s.windows(CFG).unwrap();
    let mut agg = Collect::default();
    let topics: [&'static [u8]; 7] = [b"a", b"b", b"c", b"d", b"e", b"f", b"g"];
    let mut x = 7u32;
    let mut sent = Vec::new();
    for n in 0..2000u32 {
        x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
        let key = (x >> 16) % 7;
        let now = u64::from(n) * 7;
        sent.push((key, n));
        w.push(ev(topics[key as usize], 0, n), now, &mut agg);
        if n % 13 == 0 {
            w.poll(now, &mut agg);
        }
        assert!(w.open_windows() <= 4 && w.held() <= 6);
    }
    w.flush_all(&mut agg);
    assert_eq!(w.held(), 0);
    assert_eq!(w.open_windows(), 0);
    let mut out: Vec<u32> = agg.0.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    out.sort_unstable();
    assert_eq!(out, (0..2000).collect::<Vec<_>>(), "each item exactly once");
    // Within a closed window, items share a key and keep arrival order.
    for (_, items) in &agg.0 {
        assert!(items.len() <= 3);
        let key = sent[items[0] as usize].0;
        assert!(items.iter().all(|&n| sent[n as usize].0 == key));
        assert!(items.windows(2).all(|p| p[0] < p[1]));
    }
}

#[test]
fn a_third_key_flushes_the_oldest_window() {
    let mut s: StaticBatchWindows<Ev, 2, 8> = StaticBatchWindows::new();
    let mut w = s.windows(CFG).unwrap();
    let mut agg = Collect::default();
    w.push(ev(b"a", 0, 1), 0, &mut agg);
    w.push(ev(b"b", 0, 2), 1, &mut agg);
    w.push(ev(b"c", 0, 3), 2, &mut agg);
    assert_eq!(agg.0, [(CloseReason::Pressure, vec![1])]);
    w.flush_all(&mut agg);
    assert_eq!(
        agg.0[1..],
        [(CloseReason::Drain, vec![2]), (CloseReason::Drain, vec![3])]
    );
}

#[test]
fn a_full_arena_flushes_early_and_never_loses_an_event() {
    let mut s: StaticBatchWindows<Ev, 4, 4> = StaticBatchWindows::new();
    let mut w = s
        .windows(BatchConfig {
            max_events: 100,
            max_age_ns: 1000,
        })
        .unwrap();
    let mut agg = Collect::default();
    for n in 0..50 {
        let topic: &'static [u8] = [b"x".as_slice(), b"y", b"z"][n as usize % 3];
        w.push(ev(topic, 0, n), n as u64, &mut agg);
        assert!(w.held() <= 4);
    }
    w.flush_all(&mut agg);
    let mut all: Vec<u32> = agg.0.iter().flat_map(|(_, v)| v.iter().copied()).collect();
    all.sort_unstable();
    assert_eq!(all, (0..50).collect::<Vec<_>>());
}
