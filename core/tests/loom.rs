//! Model checks of the ring and the pool under every interleaving loom
//! explores (bounded preemptions). Run with
//! `RUSTFLAGS="--cfg loom" LOOM_MAX_PREEMPTIONS=3 cargo test -p eventstream-core --test loom --release`.
#![cfg(loom)]

use eventstream_core::pool::{EventPool, EventRef};
use eventstream_core::ring::Ring;
use loom::sync::atomic::{AtomicUsize, Ordering::SeqCst};
use loom::sync::Arc;
use loom::thread;

/// Loom threads need `'static` borrows: each model run leaks its small ring
/// or pool (bytes per run, freed at process exit).
fn leak<T>(value: T) -> &'static T {
    Box::leak(Box::new(value))
}

#[test]
fn ring_moves_items_in_order_across_threads() {
    loom::model(|| {
        let ring: &'static Ring<u32, 2> = leak(Ring::new());
        let (mut tx, mut rx) = ring.split().unwrap();
        let producer = thread::spawn(move || {
            let mut next = 0;
            while next < 3 {
                if tx.push(next).is_ok() {
                    next += 1;
                } else {
                    thread::yield_now();
                }
            }
        });
        let mut expect = 0;
        while expect < 3 {
            match rx.pop() {
                Some(v) => {
                    assert_eq!(v, expect);
                    expect += 1;
                }
                None => thread::yield_now(),
            }
        }
        producer.join().unwrap();
        assert_eq!(rx.pop(), None);
    });
}

#[test]
fn ring_batches_publish_whole_and_in_order() {
    loom::model(|| {
        let ring: &'static Ring<u32, 4> = leak(Ring::new());
        let (mut tx, mut rx) = ring.split().unwrap();
        let producer = thread::spawn(move || {
            let mut next = 0;
            while next < 5 {
                let pushed = tx.push_from(next..5);
                next += pushed as u32;
                if pushed == 0 {
                    thread::yield_now();
                }
            }
        });
        let mut expect = 0;
        while expect < 5 {
            let n = rx.pop_batch(3, |v| {
                assert_eq!(v, expect);
                expect += 1;
            });
            if n == 0 {
                thread::yield_now();
            }
        }
        producer.join().unwrap();
    });
}

#[test]
fn ring_split_is_one_shot_across_threads() {
    loom::model(|| {
        let ring: &'static Ring<u32, 2> = leak(Ring::new());
        let wins = Arc::new(AtomicUsize::new(0));
        let w = wins.clone();
        let t = thread::spawn(move || {
            if ring.split().is_some() {
                w.fetch_add(1, SeqCst);
            }
        });
        if ring.split().is_some() {
            wins.fetch_add(1, SeqCst);
        }
        t.join().unwrap();
        assert_eq!(wins.load(SeqCst), 1);
    });
}

#[test]
fn pool_slot_released_on_another_thread_is_reused_safely() {
    loom::model(|| {
        let pool: &'static EventPool<1, 4> = leak(EventPool::new());
        let mut acq = pool.acquirer().unwrap();
        let mut slot = acq.acquire().unwrap();
        slot.buffer_mut()[0] = 7;
        let shared = slot.share(1);
        let other = shared.clone();
        let reader = thread::spawn(move || {
            assert_eq!(other.bytes()[0], 7);
            drop(other);
        });
        drop(shared);
        // The single slot comes back only after both handles dropped; once it
        // does, writing it must not race with the reader (loom checks).
        loop {
            if let Some(mut s) = acq.acquire() {
                s.buffer_mut()[0] = 9;
                break;
            }
            thread::yield_now();
        }
        reader.join().unwrap();
    });
}

#[test]
fn pool_concurrent_releasers_lose_no_slot() {
    loom::model(|| {
        let pool: &'static EventPool<3, 1> = leak(EventPool::new());
        let mut acq = pool.acquirer().unwrap();
        let a = acq.acquire().unwrap().share(1);
        let b = acq.acquire().unwrap().share(1);
        let c = acq.acquire().unwrap().share(1);
        assert!(acq.acquire().is_none());
        let ta = thread::spawn(move || drop::<EventRef<'static>>(a));
        let tb = thread::spawn(move || drop::<EventRef<'static>>(b));
        // Acquire while the others release: each slot comes back once.
        let first = acq.acquire();
        drop(c);
        ta.join().unwrap();
        tb.join().unwrap();
        drop(first);
        let mut held = Vec::new();
        while let Some(s) = acq.acquire() {
            held.push(s);
        }
        let mut idx: Vec<u32> = held.iter().map(|s| s.index()).collect();
        idx.sort_unstable();
        idx.dedup();
        assert_eq!(idx, [0, 1, 2], "every slot comes back exactly once");
    });
}

use eventstream_core::dedup::{DedupConfig, DedupTable, FullPolicy, Insert, Lookup};

const LOOM_DEDUP: DedupConfig = DedupConfig {
    window_ms: 100,
    when_full: FullPolicy::Reject,
};

#[test]
fn dedup_twin_inserts_let_exactly_one_win() {
    loom::model(|| {
        let table: &'static DedupTable<4> = leak(DedupTable::new(LOOM_DEDUP));
        let d = table.table();
        // An expired entry gives the twins two different free slots to claim.
        assert_eq!(d.insert(1, 0), Insert::Inserted);
        let t = thread::spawn(move || d.insert(42, 200));
        let mine = d.insert(42, 200);
        let theirs = t.join().unwrap();
        let wins = [mine, theirs]
            .iter()
            .filter(|r| **r == Insert::Inserted)
            .count();
        assert_eq!(wins, 1, "{mine:?} {theirs:?}");
        assert_eq!(d.lookup(42, 200), Lookup::Present(None));
    });
}

#[test]
fn dedup_insert_lookup_and_sweep_at_once() {
    // Three threads over a whole-table sweep: bound preemptions to 2 so the
    // model stays within CI's time.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let table: &'static DedupTable<4> = leak(DedupTable::new(LOOM_DEDUP));
        let d = table.table();
        assert_eq!(d.insert(7, 0), Insert::Inserted);
        assert!(d.set_offset(7, 70));
        // The sweeper frees id 7 (expired at 150) while an inserter adds 9
        // and a reader looks at both.
        let sweeper = thread::spawn(move || d.sweep(150));
        let reader = thread::spawn(move || {
            let seven = d.lookup(7, 50);
            let nine = d.lookup(9, 150);
            (seven, nine)
        });
        assert_eq!(d.insert(9, 150), Insert::Inserted);
        assert!(d.set_offset(9, 90));
        let freed = sweeper.join().unwrap();
        let (seven, nine) = reader.join().unwrap();
        assert_eq!(freed, 1);
        // A reader sees either nothing or the whole truth, never a torn slot.
        assert!(
            matches!(seven, Lookup::Absent | Lookup::Present(Some(70))),
            "{seven:?}"
        );
        assert!(
            matches!(
                nine,
                Lookup::Absent | Lookup::Present(None) | Lookup::Present(Some(90))
            ),
            "{nine:?}"
        );
        assert_eq!(d.lookup(9, 150), Lookup::Present(Some(90)));
        assert_eq!(d.lookup(7, 150), Lookup::Absent);
    });
}

#[test]
fn dedup_twins_in_different_slots_let_exactly_one_win() {
    // Three residents and one empty slot in a 4-slot table; a remover frees
    // a resident while both twins scan, so one twin may pick the empty slot
    // and the other the freed one, earlier in the probe order. Every
    // resident and a few ids are tried, so some combination puts the freed
    // slot in front of the empty one.
    for resident in 1..=3u64 {
        for id in 42..46u64 {
            let mut model = loom::model::Builder::new();
            model.preemption_bound = Some(2);
            model.check(move || {
                let table: &'static DedupTable<4> = leak(DedupTable::new(LOOM_DEDUP));
                let d = table.table();
                for r in 1..=3 {
                    assert_eq!(d.insert(r, 0), Insert::Inserted);
                }
                let remover = thread::spawn(move || d.remove(resident));
                let twin = thread::spawn(move || d.insert(id, 50));
                let mine = d.insert(id, 50);
                let theirs = twin.join().unwrap();
                assert!(remover.join().unwrap());
                let wins = [mine, theirs]
                    .iter()
                    .filter(|r| **r == Insert::Inserted)
                    .count();
                assert_eq!(wins, 1, "{mine:?} {theirs:?}");
                assert_eq!(d.lookup(id, 50), Lookup::Present(None));
            });
        }
    }
}

#[test]
fn dedup_hinted_set_offset_never_lands_on_a_reused_slot() {
    // The table is full of expired ids, so the inserter reuses one of their
    // slots for id 9 (with plain stores) while the storage side sets each
    // one's offset where the inserter's hint says it went: no offset lands
    // on 9.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let table: &'static DedupTable<4> = leak(DedupTable::new(LOOM_DEDUP));
        let d = table.table();
        let mut ins = d.inserter().unwrap();
        let ids = [7u64, 8, 10, 11];
        let hints = ids.map(|id| {
            let (inserted, hint) = ins.insert_hinted(id, 0);
            assert_eq!(inserted, Insert::Inserted);
            hint
        });
        let storage = thread::spawn(move || {
            for (id, hint) in ids.into_iter().zip(hints) {
                d.set_offset_hinted(id, id * 10, hint);
            }
        });
        assert_eq!(ins.insert(9, 150), Insert::Inserted);
        storage.join().unwrap();
        assert_eq!(d.lookup(9, 150), Lookup::Present(None));
        assert_eq!(ins.insert(9, 150), Insert::Duplicate(None));
    });
}

#[test]
fn dedup_single_inserter_with_reader_remover_and_sweeper() {
    // The inserter reuses an expired slot with plain stores while a reader
    // looks, the storage side sets an offset and a sweeper frees: a reader
    // sees nothing or the whole truth, and set_offset never lands on the
    // reused slot.
    let mut model = loom::model::Builder::new();
    model.preemption_bound = Some(2);
    model.check(|| {
        let table: &'static DedupTable<4> = leak(DedupTable::new(LOOM_DEDUP));
        let d = table.table();
        assert_eq!(d.insert(7, 0), Insert::Inserted);
        let mut ins = d.inserter().unwrap();
        let reader = thread::spawn(move || (d.lookup(7, 150), d.lookup(9, 150)));
        let storage = thread::spawn(move || {
            d.set_offset(7, 70);
            d.sweep(150)
        });
        assert_eq!(ins.insert(9, 150), Insert::Inserted);
        let (seven, nine) = reader.join().unwrap();
        storage.join().unwrap();
        // 7 expired at 100: it is absent at 150 whatever happened to its slot.
        assert_eq!(seven, Lookup::Absent);
        assert!(
            matches!(nine, Lookup::Absent | Lookup::Present(None)),
            "{nine:?}"
        );
        assert_eq!(d.lookup(9, 150), Lookup::Present(None));
        assert_eq!(ins.insert(9, 150), Insert::Duplicate(None));
    });
}
