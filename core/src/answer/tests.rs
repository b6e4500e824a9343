//! Unit tests of `answer`.

use super::*;
use crate::dedup::{DedupConfig, DedupTable, Insert};
use crate::wire::Status;
use std::vec::Vec;

#[derive(Default)]
struct Out(Vec<(u32, Ack)>);
impl AckOut for Out {
    fn ack(&mut self, conn: u32, ack: Ack) {
        self.0.push((conn, ack));
    }
}

type Machine<'a> = Answers<
    'a,
    heapless::Deque<Deferred, 4>,
    heapless::Deque<Held, 8>,
    8,
    { crate::metrics::FINE },
>;

/// A machine over `table` counting into `registry`, with or without group
/// commit.
fn machine<'a>(
    table: &'a DedupTable<64>,
    registry: &'a Registry,
    group_commit: bool,
) -> Machine<'a> {
    Answers::new(
        table.table(),
        registry,
        Default::default(),
        Default::default(),
        group_commit,
    )
}

fn stored(id: u64, offset: u64, dedup: Option<DedupHint>) -> Owed {
    Owed::Stored {
        conn: 7,
        event_id: id,
        ack: true,
        offset,
        class: Class::Transactional,
        recv_mono: 0,
        dedup,
        len: 300,
    }
}

fn dup(id: u64) -> Answer {
    Answer::Duplicate {
        conn: 9,
        event_id: id,
        ack: true,
        class: Class::Transactional,
        offset: None,
    }
}

#[test]
fn a_stored_event_gets_its_offset_in_the_ack_and_the_table() {
    let table: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
    let registry = Registry::new();
    let mut ins = table.table().inserter().unwrap();
    let (r, hint) = ins.insert_hinted(5, 1);
    assert_eq!(r, Insert::Inserted);
    let mut a = machine(&table, &registry, false);
    let mut out = Out::default();
    a.settle(stored(5, 40, Some(hint)), true, 0, 10, &mut out);
    assert_eq!(out.0, [(7, Ack::stored(5, 40))]);
    assert_eq!(table.table().lookup(5, 2), Lookup::Present(Some(40)));
    assert_eq!(a.settled(), 1);
    a.flush_metrics(10, false);
    assert_eq!(
        registry
            .snapshot()
            .get(Counter::Stored(Class::Transactional)),
        1
    );
    assert_eq!(registry.snapshot().get(Counter::BytesStored), 300);
}

#[test]
fn a_failed_write_rejects_and_forgets_the_id_so_a_retry_is_stored() {
    let table: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
    let registry = Registry::new();
    let mut ins = table.table().inserter().unwrap();
    let (_, hint) = ins.insert_hinted(5, 1);
    let mut a = machine(&table, &registry, false);
    let mut out = Out::default();
    a.settle(stored(5, 40, Some(hint)), false, 0, 10, &mut out);
    assert_eq!(out.0, [(7, Ack::rejected(5, Reason::StorageFailed))]);
    assert_eq!(table.table().lookup(5, 2), Lookup::Absent);
    assert_eq!(ins.insert(5, 3), Insert::Inserted);
}

#[test]
fn a_duplicate_waits_for_its_originals_offset() {
    let table: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
    let registry = Registry::new();
    let mut ins = table.table().inserter().unwrap();
    let (_, hint) = ins.insert_hinted(5, 1);
    let mut a = machine(&table, &registry, false);
    let mut out = Out::default();
    // The original is not written yet: the duplicate is deferred.
    assert_eq!(a.outcome(dup(5), 2), None);
    assert_eq!(a.deferred(), 1);
    assert_eq!(a.retry_deferred(2, 0, 10, &mut out), 0);
    assert!(out.0.is_empty());
    // Written: the retry answers DUPLICATE with the original's offset.
    a.settle(stored(5, 40, Some(hint)), true, 0, 10, &mut out);
    assert_eq!(a.retry_deferred(2, 0, 10, &mut out), 1);
    assert_eq!(out.0[1], (9, Ack::duplicate(5, 40)));
    assert_eq!(a.deferred(), 0);
    // A known offset is answered at once.
    let known = Answer::Duplicate {
        conn: 9,
        event_id: 5,
        ack: true,
        class: Class::Realtime,
        offset: Some(3),
    };
    let owed = a.outcome(known, 2).unwrap();
    a.settle(owed, true, 0, 10, &mut out);
    assert_eq!(out.0[2], (9, Ack::duplicate(5, 3)));
}

#[test]
fn a_duplicate_of_a_failed_original_is_rejected_storage_failed() {
    let table: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
    let registry = Registry::new();
    let mut ins = table.table().inserter().unwrap();
    let (_, hint) = ins.insert_hinted(5, 1);
    let mut a = machine(&table, &registry, false);
    let mut out = Out::default();
    assert_eq!(a.outcome(dup(5), 2), None);
    a.settle(stored(5, 40, Some(hint)), false, 0, 10, &mut out);
    assert_eq!(a.retry_deferred(2, 0, 10, &mut out), 1);
    assert_eq!(out.0[1], (9, Ack::rejected(5, Reason::StorageFailed)));
}

#[test]
fn a_rejection_passes_through_and_no_ack_flag_means_no_ack() {
    let table: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
    let registry = Registry::new();
    let mut a = machine(&table, &registry, true);
    let mut out = Out::default();
    let rej = Answer::Reject {
        conn: 1,
        event_id: 8,
        ack: true,
        reason: Reason::DedupFull,
    };
    let owed = a.outcome(rej, 0).unwrap();
    a.settle(owed, true, 100, 10, &mut out);
    // Not held under group commit: a rejection claims nothing durable.
    assert_eq!(out.0, [(1, Ack::rejected(8, Reason::DedupFull))]);
    let quiet = Answer::Reject {
        conn: 1,
        event_id: 9,
        ack: false,
        reason: Reason::DedupFull,
    };
    let owed = a.outcome(quiet, 0).unwrap();
    a.settle(owed, true, 100, 10, &mut out);
    assert_eq!(out.0.len(), 1);
    a.flush_metrics(10, false);
    assert_eq!(
        registry
            .snapshot()
            .get(Counter::Rejected(Reason::DedupFull)),
        2
    );
}

#[test]
fn group_commit_holds_stored_and_duplicate_until_an_fsync_covers_them() {
    let table: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
    let registry = Registry::new();
    let mut a = machine(&table, &registry, true);
    let mut out = Out::default();
    a.settle(stored(1, 0, None), true, 100, 10, &mut out);
    let d = Answer::Duplicate {
        conn: 9,
        event_id: 1,
        ack: true,
        class: Class::Realtime,
        offset: Some(0),
    };
    let owed = a.outcome(d, 0).unwrap();
    a.settle(owed, true, 200, 10, &mut out);
    assert!(out.0.is_empty());
    assert_eq!(a.held(), 2);
    assert!(!a.held_ready(99));
    assert!(!a.release_held(99, 20, || true, &mut out));
    // An fsync to 150 covers the first; no room holds the rest back.
    assert!(a.release_held(150, 20, || true, &mut out));
    assert_eq!(out.0, [(7, Ack::stored(1, 0))]);
    assert!(!a.release_held(500, 20, || false, &mut out));
    assert!(a.release_held(500, 20, || true, &mut out));
    assert_eq!(out.0[1], (9, Ack::duplicate(1, 0)));
    assert_eq!(a.held(), 0);
    a.flush_metrics(30, false);
    assert_eq!(registry.snapshot().latency(Class::Transactional).count(), 1);
}

#[test]
fn outcomes_settle_in_order_from_a_store_of_events() {
    // `Status` of each ack follows the rule table above.
    let table: DedupTable<64> = DedupTable::new(DedupConfig::DEFAULT);
    let registry = Registry::new();
    let mut a = machine(&table, &registry, false);
    let mut out = Out::default();
    for i in 0..3 {
        a.settle(stored(i, i, None), true, 0, 10, &mut out);
    }
    let statuses: Vec<_> = out.0.iter().map(|(_, a)| (a.status, a.offset)).collect();
    assert_eq!(
        statuses,
        [
            (Status::Stored, 0),
            (Status::Stored, 1),
            (Status::Stored, 2)
        ]
    );
}
