//! Unit tests of `dedup`.

use super::*;

const CFG: DedupConfig = DedupConfig {
    window_ms: 1000,
    when_full: FullPolicy::Reject,
};

#[test]
fn insert_then_duplicate_then_offset() {
    let t: DedupTable<64> = DedupTable::new(CFG);
    let d = t.table();
    assert_eq!(d.insert(7, 0), Insert::Inserted);
    assert_eq!(d.insert(7, 10), Insert::Duplicate(None));
    assert_eq!(d.lookup(7, 10), Lookup::Present(None));
    assert!(d.set_offset(7, 1234));
    assert_eq!(d.insert(7, 20), Insert::Duplicate(Some(1234)));
    assert_eq!(d.lookup(7, 20), Lookup::Present(Some(1234)));
    assert_eq!(d.lookup(8, 20), Lookup::Absent);
}

#[test]
fn a_sweep_in_slices_frees_what_one_sweep_frees() {
    let (a, b): (DedupTable<256>, DedupTable<256>) = (DedupTable::new(CFG), DedupTable::new(CFG));
    let (mut ia, mut ib) = (a.table().inserter().unwrap(), b.table().inserter().unwrap());
    for id in 0..200u64 {
        let at = if id % 3 == 0 { 0 } else { 900 };
        assert_eq!(ia.insert(id * 7919, at), Insert::Inserted);
        assert_eq!(ib.insert(id * 7919, at), Insert::Inserted);
    }
    let whole = ia.sweep(1500);
    let mut cursor = 0;
    let mut sliced = ib.sweep_slice(1500, &mut cursor, 37);
    let mut calls = 1;
    while cursor != 0 {
        sliced += ib.sweep_slice(1500, &mut cursor, 37);
        calls += 1;
    }
    assert_eq!(whole, 67);
    assert_eq!(sliced, whole);
    assert_eq!(calls, 256usize.div_ceil(37));
    for id in 0..200u64 {
        assert_eq!(
            a.table().lookup(id * 7919, 1500),
            b.table().lookup(id * 7919, 1500)
        );
    }
}

#[test]
fn expiry_and_sweep() {
    let t: DedupTable<64> = DedupTable::new(CFG);
    let d = t.table();
    assert_eq!(d.insert(1, 0), Insert::Inserted);
    assert_eq!(d.insert(2, 500), Insert::Inserted);
    assert!(d.contains(1, 999));
    assert!(!d.contains(1, 1000));
    assert_eq!(d.insert(1, 1000), Insert::Inserted);
    assert_eq!(d.sweep(1500), 1); // id 2 expired; id 1 re-inserted at 1000
    assert_eq!(d.occupied(), 1);
}

#[test]
fn remove_undoes_an_insert() {
    let t: DedupTable<64> = DedupTable::new(CFG);
    let d = t.table();
    assert_eq!(d.insert(5, 0), Insert::Inserted);
    assert!(d.remove(5));
    assert!(!d.remove(5));
    assert_eq!(d.insert(5, 1), Insert::Inserted);
}

#[test]
fn reject_when_full_and_evict_when_asked() {
    let t: DedupTable<4> = DedupTable::new(CFG);
    let d = t.table();
    for id in 0..4 {
        assert_eq!(d.insert(id, id), Insert::Inserted);
    }
    assert_eq!(d.insert(99, 10), Insert::Full);
    let e: DedupTable<4> = DedupTable::new(DedupConfig {
        when_full: FullPolicy::Evict,
        ..CFG
    });
    let d = e.table();
    for id in 0..4 {
        assert_eq!(d.insert(id, id * 100), Insert::Inserted);
    }
    assert_eq!(d.insert(99, 350), Insert::Inserted);
    assert!(!d.contains(0, 350), "the oldest entry was evicted");
    assert_eq!(d.evictions(), 1);
    assert_eq!(d.effective_window_ms(), 350);
    assert_eq!(d.effective_window_ms(), 1000);
}

/// An id whose first `EVICT_SCAN` probe slots do not hold `away`.
fn id_not_meeting(d: &DedupRef<'_>, away: u64) -> u64 {
    let (slot, _) = d.find(away).unwrap();
    (1000..)
        .find(|&x| {
            let p = d.probe(x);
            (0..EVICT_SCAN).all(|i| p.at(i) != slot)
        })
        .unwrap()
}

#[test]
fn evict_takes_the_oldest_of_the_first_slots_and_reject_still_finds_expired() {
    // 64 slots; under evict an id's neighbourhood is its first
    // EVICT_SCAN slots. 1,000 inserts leave every slot taken.
    let e: DedupTable<64> = DedupTable::new(DedupConfig {
        when_full: FullPolicy::Evict,
        window_ms: 10_000,
    });
    let d = e.table();
    for id in 0..1000 {
        assert_eq!(d.insert(id, id), Insert::Inserted);
    }
    assert_eq!(d.occupied(), 64);
    let before = d.evictions();
    let id_at = |at: usize| d.read(at, d.states[at].0.load(Acquire)).map(|s| s.id);
    let stamp_at = |at: usize| d.stamps[at].0.load(Relaxed);
    let x = 5000;
    let p = d.probe(x);
    let met: std::vec::Vec<usize> = (0..EVICT_SCAN).map(|i| p.at(i)).collect();
    let oldest_met = *met.iter().min_by_key(|&&at| stamp_at(at)).unwrap();
    let evicted = id_at(oldest_met).unwrap();
    let oldest_overall = (0..64).min_by_key(|&at| stamp_at(at)).unwrap();
    let kept = (!met.contains(&oldest_overall)).then(|| id_at(oldest_overall).unwrap());
    assert_eq!(d.insert(x, 2000), Insert::Inserted);
    assert_eq!(id_at(oldest_met), Some(x), "x took the oldest slot it met");
    assert!(!d.contains(evicted, 2000), "the oldest met was evicted");
    if let Some(k) = kept {
        assert!(d.contains(k, 2000), "the oldest overall was not met");
    }
    assert_eq!(d.evictions(), before + 1);

    // Reject: one expired entry, outside those first slots.
    let r: DedupTable<64> = DedupTable::new(CFG);
    let d = r.table();
    assert_eq!(d.insert(0, 0), Insert::Inserted);
    for id in 1..64 {
        assert_eq!(d.insert(id, 900), Insert::Inserted);
    }
    let x = id_not_meeting(&d, 0);
    assert_eq!(d.insert(x, 1000), Insert::Inserted);
    assert!(!d.contains(0, 1000));
    assert_eq!(d.insert(x + 1, 1000), Insert::Full);
}

#[test]
#[cfg_attr(
    miri,
    ignore = "12,288 inserts: slow under miri, and no unsafe code in them"
)]
fn a_full_evicting_table_forgets_old_entries_first() {
    // Ids one per millisecond: after two capacities' worth the table is
    // full and evicts on every insert; during the third, what it
    // evicts is old, and the newest entries are all there.
    const N: u64 = 4096;
    let t: std::boxed::Box<DedupTable<4096>> = std::boxed::Box::new(DedupTable::new(DedupConfig {
        when_full: FullPolicy::Evict,
        window_ms: 1 << 30,
    }));
    let d = t.table();
    let mut ins = d.inserter().unwrap();
    for id in 0..2 * N {
        assert_eq!(ins.insert(id, id), Insert::Inserted);
    }
    assert_eq!(d.occupied() as u64, N);
    let _ = d.effective_window_ms();
    for id in 2 * N..3 * N {
        assert_eq!(ins.insert(id, id), Insert::Inserted);
    }
    // A simulation of this policy (16,384 slots, five seeds) put the
    // youngest entry evicted at 0.41 capacity old, the newest 0.57
    // capacity all present; this table: 0.44 and 0.52.
    let youngest_evicted = u64::from(d.effective_window_ms());
    assert!(
        youngest_evicted >= N / 4,
        "evicted an entry {youngest_evicted} ms old"
    );
    let now = 3 * N;
    let kept = (0..3 * N)
        .rev()
        .take_while(|&id| d.contains(id, now))
        .count() as u64;
    assert!(kept >= N / 3, "only the newest {kept} of {N} all present");
}

#[test]
fn buffer_table_works_like_the_static_one() {
    let mut states: std::vec::Vec<DedupState> = (0..8).map(|_| DedupState::new()).collect();
    let mut stamps: std::vec::Vec<DedupStamp> = (0..8).map(|_| DedupStamp::new()).collect();
    let mut slots: std::vec::Vec<DedupSlot> = (0..8).map(|_| DedupSlot::new()).collect();
    let t = BufferDedupTable::new(&mut states, &mut stamps, &mut slots, CFG).unwrap();
    let d = t.table();
    assert_eq!(d.insert(u64::MAX, 0), Insert::Inserted);
    assert!(d.contains(u64::MAX, 1));
    let mut bad_states: std::vec::Vec<DedupState> = (0..6).map(|_| DedupState::new()).collect();
    let mut bad_stamps: std::vec::Vec<DedupStamp> = (0..6).map(|_| DedupStamp::new()).collect();
    let mut bad: std::vec::Vec<DedupSlot> = (0..6).map(|_| DedupSlot::new()).collect();
    assert!(BufferDedupTable::new(&mut bad_states, &mut bad_stamps, &mut bad, CFG).is_err());
    // Lengths that differ.
    let mut short_stamps: std::vec::Vec<DedupStamp> = (0..4).map(|_| DedupStamp::new()).collect();
    assert!(BufferDedupTable::new(&mut states, &mut short_stamps, &mut slots, CFG).is_err());
}

#[test]
fn a_hint_leads_set_offset_to_the_entry_and_a_wrong_one_costs_only_a_search() {
    // 8 slots: every neighbourhood is the whole table, so ids collide.
    let t: DedupTable<8> = DedupTable::new(CFG);
    let d = t.table();
    let mut ins = d.inserter().unwrap();
    let mut hints = [DedupHint::NONE; 8];
    for (id, hint) in hints.iter_mut().enumerate() {
        let (answer, h) = ins.insert_hinted(id as u64, 1);
        assert_eq!(answer, Insert::Inserted);
        assert_ne!(h, DedupHint::NONE);
        assert_eq!(
            d.at_hint(id as u64, h).map(|(at, _)| at),
            d.find(id as u64).map(|(at, _)| at)
        );
        *hint = h;
    }
    assert_eq!(
        ins.insert_hinted(3, 2),
        (Insert::Duplicate(None), DedupHint::NONE)
    );
    // Its own hint.
    assert!(d.set_offset_hinted(0, 100, hints[0]));
    assert_eq!(d.lookup(0, 2), Lookup::Present(Some(100)));
    // Another id's hint, no hint, a hint past the neighbourhood.
    assert!(d.set_offset_hinted(1, 101, hints[2]));
    assert!(d.set_offset_hinted(2, 102, DedupHint::NONE));
    assert!(d.set_offset_hinted(3, 103, DedupHint(200)));
    for id in 1..4 {
        assert_eq!(d.lookup(id, 2), Lookup::Present(Some(100 + id)));
    }
    // An id no longer there: its old hint finds nothing.
    assert!(d.remove(4));
    assert!(!d.set_offset_hinted(4, 104, hints[4]));
    assert!(!d.set_offset_hinted(99, 199, hints[5]));
}

#[test]
fn the_single_inserter_takes_over_inserting() {
    let t: DedupTable<64> = DedupTable::new(CFG);
    let d = t.table();
    assert_eq!(d.insert(1, 0), Insert::Inserted);
    let mut ins = d.inserter().unwrap();
    assert!(d.inserter().is_none());
    assert_eq!(
        d.insert(2, 0),
        Insert::Full,
        "only the inserter inserts now"
    );
    assert_eq!(ins.insert(1, 5), Insert::Duplicate(None));
    assert_eq!(ins.insert(2, 5), Insert::Inserted);
    assert!(d.set_offset(2, 22));
    assert_eq!(ins.insert(2, 6), Insert::Duplicate(Some(22)));
    assert!(d.remove(2));
    assert_eq!(ins.insert(2, 7), Insert::Inserted);
    assert_eq!(d.sweep(2000), 2);
    assert_eq!(ins.sweep(2000), 0);
    assert_eq!(d.occupied(), 0);
    assert_eq!(ins.insert(1, 2000), Insert::Inserted);
    assert!(d.contains(1, 2001));
}

#[test]
fn concurrent_inserters_of_the_same_ids_insert_each_once() {
    let t: DedupTable<1024> = DedupTable::new(DedupConfig {
        window_ms: 1 << 30,
        when_full: FullPolicy::Reject,
    });
    let d = t.table();
    let n = if cfg!(miri) { 40 } else { 400 };
    let wins: [std::sync::atomic::AtomicUsize; 2] = Default::default();
    std::thread::scope(|s| {
        for w in &wins {
            s.spawn(move || {
                for id in 0..n {
                    match d.insert(id, 0) {
                        Insert::Inserted => {
                            w.fetch_add(1, Relaxed);
                        }
                        Insert::Duplicate(_) => {}
                        Insert::Full => panic!("table full"),
                    }
                }
            });
        }
    });
    let total: usize = wins.iter().map(|w| w.load(Relaxed)).sum();
    assert_eq!(total as u64, n);
    assert_eq!(d.occupied() as u64, n);
}
