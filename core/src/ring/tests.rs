//! Unit tests of `ring`.

use super::*;
use std::sync::atomic::AtomicUsize;
use std::vec::Vec;

#[test]
fn push_pop_in_order_and_full() {
    let ring: Ring<u32, 4> = Ring::new();
    let (mut tx, mut rx) = ring.split().unwrap();
    assert!(ring.split().is_none());
    for i in 0..4 {
        tx.push(i).unwrap();
    }
    assert_eq!(tx.push(9), Err(9));
    assert!(!tx.has_room(1));
    assert_eq!(rx.len(), 4);
    assert_eq!(rx.peek(0), Some(&0));
    assert_eq!(rx.peek(3), Some(&3));
    assert_eq!(rx.peek(4), None);
    for i in 0..4 {
        assert_eq!(rx.pop(), Some(i));
    }
    assert_eq!(rx.pop(), None);
    assert!(tx.has_room(4));
    assert!(!tx.has_room(5));
}

#[test]
fn batches_wrap_around() {
    let mut buf: Vec<Slot<u64>> = (0..8).map(|_| Slot::new()).collect();
    let ring = BufferRing::new(&mut buf).unwrap();
    let (mut tx, mut rx) = ring.split().unwrap();
    let mut next = 0u64;
    let mut expect = 0u64;
    for round in 0..100 {
        let mut it = (next..next + 5 + round % 7).peekable();
        let pushed = tx.push_from(&mut it);
        next += pushed as u64;
        let mut out = [0u64; 3];
        let n = rx.pop_slice(&mut out);
        for v in &out[..n] {
            assert_eq!(*v, expect);
            expect += 1;
        }
    }
    rx.pop_batch(usize::MAX, |v| {
        assert_eq!(v, expect);
        expect += 1;
    });
    assert_eq!(expect, next);
}

#[test]
fn bad_buffer_lengths_are_refused() {
    let mut buf: Vec<Slot<u8>> = (0..6).map(|_| Slot::new()).collect();
    assert!(BufferRing::new(&mut buf).is_err());
    let mut empty: Vec<Slot<u8>> = Vec::new();
    assert!(BufferRing::new(&mut empty).is_err());
}

struct Counted<'a>(&'a AtomicUsize);
impl Drop for Counted<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Relaxed);
    }
}

#[test]
fn items_left_inside_are_dropped_once() {
    let drops = AtomicUsize::new(0);
    {
        let ring: Ring<Counted<'_>, 8> = Ring::new();
        let (mut tx, mut rx) = ring.split().unwrap();
        for _ in 0..5 {
            assert!(tx.push(Counted(&drops)).is_ok());
        }
        drop(rx.pop());
        assert_eq!(drops.load(Relaxed), 1);
    }
    assert_eq!(drops.load(Relaxed), 5);
}

#[test]
fn a_panicking_batch_callback_never_reads_an_item_twice() {
    let drops = AtomicUsize::new(0);
    let ring: Ring<Counted<'_>, 8> = Ring::new();
    let (mut tx, mut rx) = ring.split().unwrap();
    for _ in 0..4 {
        assert!(tx.push(Counted(&drops)).is_ok());
    }
    let mut seen = 0;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rx.pop_batch(4, |c| {
            seen += 1;
            drop(c);
            if seen == 2 {
                panic!("callback failure");
            }
        })
    }));
    assert!(r.is_err());
    assert_eq!(drops.load(Relaxed), 2);
    assert_eq!(rx.len(), 2);
    drop(ring);
    assert_eq!(drops.load(Relaxed), 4);
}

#[test]
fn a_panicking_push_iterator_publishes_what_it_wrote() {
    let drops = AtomicUsize::new(0);
    let ring: Ring<Counted<'_>, 8> = Ring::new();
    let (mut tx, mut rx) = ring.split().unwrap();
    let mut made = 0;
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        tx.push_from(core::iter::from_fn(|| {
            made += 1;
            if made == 4 {
                panic!("iterator failure");
            }
            Some(Counted(&drops))
        }))
    }));
    assert!(r.is_err());
    // The three written before the panic are in the ring, once each.
    assert_eq!(rx.len(), 3);
    assert_eq!(drops.load(Relaxed), 0);
    assert!(tx.push(Counted(&drops)).is_ok());
    let mut got = 0;
    rx.pop_batch(8, |c| {
        got += 1;
        drop(c);
    });
    assert_eq!(got, 4);
    assert_eq!(drops.load(Relaxed), 4);
    drop(ring);
    assert_eq!(drops.load(Relaxed), 4);
}

#[test]
fn threads_move_every_item_once_in_order() {
    let ring: Ring<u64, 64> = Ring::new();
    let (mut tx, mut rx) = ring.split().unwrap();
    let n = if cfg!(miri) { 2_000 } else { 200_000 };
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut i = 0u64;
            while i < n {
                if i % 3 == 0 {
                    i += tx.push_from(i..(i + 7).min(n)) as u64;
                } else if tx.push(i).is_ok() {
                    i += 1;
                } else {
                    std::thread::yield_now();
                }
            }
        });
        let mut expect = 0u64;
        while expect < n {
            let got = rx.pop_batch(5, |v| {
                assert_eq!(v, expect);
                expect += 1;
            });
            if got == 0 {
                std::thread::yield_now();
            }
        }
    });
}
