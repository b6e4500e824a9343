//! The dedup table against a HashMap reference model: random sequences of
//! insert, lookup, set_offset, remove, advancing time and sweeping.

use std::collections::HashMap;

use eventstream_core::dedup::{DedupConfig, DedupHint, DedupTable, FullPolicy, Insert, Lookup};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Insert(u64),
    Lookup(u64),
    SetOffset(u64, u64),
    Remove(u64),
    Advance(u64),
    Sweep,
}

fn op() -> impl Strategy<Value = Op> {
    // Few distinct ids, so that duplicates, expiry and reuse all happen.
    let id = prop_oneof![0u64..48, Just(u64::MAX), Just(1 << 63)];
    prop_oneof![
        5 => id.clone().prop_map(Op::Insert),
        3 => id.clone().prop_map(Op::Lookup),
        2 => (id.clone(), any::<u64>()).prop_map(|(i, o)| Op::SetOffset(i, o)),
        1 => id.prop_map(Op::Remove),
        3 => (0u64..400).prop_map(Op::Advance),
        1 => Just(Op::Sweep),
    ]
}

const WINDOW: u64 = 1000;

/// id -> (inserted at, offset once stored)
type Model = HashMap<u64, (u64, Option<u64>)>;

fn live(model: &Model, id: u64, now: u64) -> Option<Option<u64>> {
    model
        .get(&id)
        .filter(|(at, _)| now - at < WINDOW)
        .map(|(_, off)| *off)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn dedup_table_behaves_like_a_hashmap(ops in prop::collection::vec(op(), 1..300), single in any::<bool>()) {
        let table: Box<DedupTable<1024>> = Box::new(DedupTable::new(DedupConfig {
            window_ms: WINDOW as u32,
            when_full: FullPolicy::Reject,
        }));
        let d = table.table();
        // Both insert paths: any-thread `insert`, or the single inserter.
        let mut inserter = if single { d.inserter() } else { None };
        let mut model = Model::new();
        // Where the single inserter said each id went; stale ones (the id
        // removed, swept or moved since) must only cost a search.
        let mut hints: HashMap<u64, DedupHint> = HashMap::new();
        let mut now = 0u64;
        for op in ops {
            match op {
                Op::Insert(id) => {
                    let want = match live(&model, id, now) {
                        Some(off) => Insert::Duplicate(off),
                        None => {
                            model.insert(id, (now, None));
                            Insert::Inserted
                        }
                    };
                    let got = match inserter.as_mut() {
                        Some(ins) => {
                            let (got, hint) = ins.insert_hinted(id, now);
                            if got == Insert::Inserted {
                                hints.insert(id, hint);
                            }
                            got
                        }
                        None => d.insert(id, now),
                    };
                    prop_assert_eq!(got, want, "insert {} at {}", id, now);
                }
                Op::Lookup(id) => {
                    let want = live(&model, id, now).map_or(Lookup::Absent, Lookup::Present);
                    prop_assert_eq!(d.lookup(id, now), want, "lookup {} at {}", id, now);
                }
                Op::SetOffset(id, off) => {
                    // Only the storage side sets offsets, once, for ids it
                    // just inserted (still inside the window).
                    if let Some((at, None)) = model.get(&id).copied() {
                        if now - at < WINDOW {
                            let hint = hints.get(&id).copied().unwrap_or(DedupHint::NONE);
                            prop_assert!(d.set_offset_hinted(id, off, hint));
                            model.insert(id, (at, Some(off)));
                        }
                    }
                }
                Op::Remove(id) => {
                    // Undo of an insert: only for ids present in the window.
                    if live(&model, id, now).is_some() {
                        prop_assert!(d.remove(id));
                        model.remove(&id);
                    }
                }
                Op::Advance(dt) => now += dt,
                Op::Sweep => {
                    // How many slots it frees depends on which expired
                    // slots inserts reused; after it, only live ids remain.
                    model.retain(|_, (at, _)| now - *at < WINDOW);
                    match inserter.as_mut() {
                        Some(ins) => ins.sweep(now),
                        None => d.sweep(now),
                    };
                    prop_assert_eq!(d.occupied(), model.len(), "occupied after sweep at {}", now);
                }
            }
        }
        match inserter.as_mut() {
            Some(ins) => ins.sweep(now),
            None => d.sweep(now),
        };
        prop_assert_eq!(d.occupied(), model.values().filter(|(at, _)| now - at < WINDOW).count());
    }
}
