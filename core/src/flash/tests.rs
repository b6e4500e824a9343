//! Unit tests of the flash log, on a [`MemFlash`] that can lose power at
//! any program or erase step.

use std::vec;
use std::vec::Vec;

use super::*;
use crate::dedup::{DedupConfig, DedupTable, FullPolicy as DedupFull, Lookup};
use crate::record::{RecordBuilder, RecordKind};
use crate::wire::{FrameRepr, FLAG_ACK};
use crate::Priority;

const SECTOR: usize = 1024;
type Flash<'a> = MemFlash<'a, 4, SECTOR>;
const BUF: usize = 4096;

/// A record of `ids.len()` events at `offset`: transactional singles, or
/// batch records of several.
fn record(offset: u64, ids: &[u64], payload: usize) -> Vec<u8> {
    let (kind, class) = if ids.len() == 1 {
        (RecordKind::Single, Class::Transactional)
    } else {
        (RecordKind::Batch, Class::Batch)
    };
    let mut buf = vec![0u8; BUF];
    let mut b = RecordBuilder::new(&mut buf, kind, class, 1_000_000_000 + offset).unwrap();
    let body = vec![0x5au8; payload];
    for &id in ids {
        let repr = FrameRepr {
            priority: Priority::Medium,
            flags: FLAG_ACK,
            partition: 0,
            event_id: id,
            timestamp_ns: id,
            topic: b"sensors",
            payload: &body,
        };
        let mut f = vec![0u8; repr.encoded_len()];
        repr.encode(&mut f).unwrap();
        b.push(&f).unwrap();
    }
    b.finish(offset).unwrap().to_vec()
}

/// Every record the log holds undelivered, in order.
fn read_all(log: &mut FlashLog<Flash<'_>, 16>) -> Vec<Vec<u8>> {
    let mut buf = vec![0u8; BUF];
    let mut out = Vec::new();
    let Some(mut c) = log.first() else {
        return out;
    };
    while let Some(r) = log.next_record(&mut c, &mut buf).unwrap() {
        out.push(r.bytes().to_vec());
    }
    out
}

/// One step of the scripted run.
#[derive(Clone, Copy)]
enum Op {
    Append { ids: usize, payload: usize },
    Deliver,
}

/// The script: appends of singles and batches, deliveries now and then,
/// enough to wrap the ring of 6 sectors twice.
fn script() -> Vec<Op> {
    let mut ops = Vec::new();
    for i in 0..90usize {
        let ids = if i % 3 == 0 { 1 + i % 4 } else { 1 };
        ops.push(Op::Append {
            ids,
            payload: 20 + (i * 37) % 120,
        });
        if i % 10 == 9 {
            ops.push(Op::Deliver);
        }
    }
    ops
}

/// What a run did before it stopped.
#[derive(Default)]
struct Done {
    /// Records whose append returned Ok.
    records: Vec<Vec<u8>>,
    /// Everything below this offset was reported delivered (or was being
    /// reported when the power went).
    delivered: u64,
    /// The record being appended when the power went.
    torn: Option<Vec<u8>>,
}

/// Runs the script on `mem`, losing power after `cut` steps (None:
/// never); the total steps taken.
fn run(mem: &mut [u8], cut: Option<u64>, done: &mut Done) -> u64 {
    let mut flash = Flash::new(mem);
    if let Some(c) = cut {
        flash.cut_after(c);
    }
    let mut buf = vec![0u8; BUF];
    let mut log: FlashLog<Flash<'_>, 16> =
        match FlashLog::open(flash, super::FullPolicy::StopAccepting, &mut buf) {
            Ok(l) => l,
            Err(_) => return 0,
        };
    let mut next_id = 1u64;
    for op in script() {
        match op {
            Op::Append { ids, payload } => {
                let idv: Vec<u64> = (0..ids as u64).map(|k| next_id + k).collect();
                next_id += ids as u64;
                let r = record(log.next_offset(), &idv, payload);
                match log.append(&r) {
                    Ok(_) => done.records.push(r),
                    Err(FlashLogError::Full) => {}
                    Err(e) => {
                        if cut.is_none() {
                            panic!("append failed without a cut: {e:?}");
                        }
                        done.torn = Some(r);
                        break;
                    }
                }
            }
            Op::Deliver => {
                // Everything but the newest three records is delivered.
                let n = done.records.len();
                if n > 3 {
                    let below = RecordHead::peek(&done.records[n - 4])
                        .unwrap()
                        .next_offset();
                    // Asked: records below may be gone from here on, even
                    // if the power goes during the call.
                    done.delivered = below;
                    if log.delivered_below(below).is_err() {
                        break;
                    }
                }
            }
        }
    }
    let f = log.into_flash();
    f.steps()
}

/// Recovery after a cut: every completed, undelivered record is there in
/// order, nothing else but completed records; the next offset follows the
/// last completed record; the dedup table holds exactly the recovered
/// transactional ids; the log takes appends again.
fn check(mem: &mut [u8], done: &Done, cut: u64) {
    let mut buf = vec![0u8; BUF];
    let mut log: FlashLog<Flash<'_>, 16> =
        FlashLog::open(Flash::new(mem), super::FullPolicy::StopAccepting, &mut buf)
            .unwrap_or_else(|e| panic!("cut {cut}: open failed: {e:?}"));
    let got = read_all(&mut log);
    let first = got
        .first()
        .map_or(log.next_offset(), |r| RecordHead::peek(r).unwrap().offset);
    // The record being appended when the power went is there only if
    // every one of its bytes was (the cut fell in its last word's padding).
    let torn_kept = done.torn.as_ref().filter(|t| got.last() == Some(*t));
    let want: Vec<&Vec<u8>> = done
        .records
        .iter()
        .chain(torn_kept)
        .filter(|r| RecordHead::peek(r).unwrap().offset >= first)
        .collect();
    assert_eq!(got.len(), want.len(), "cut {cut}: records");
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g, *w, "cut {cut}: a record differs");
    }
    // Nothing undelivered was lost.
    for r in &done.records {
        if RecordHead::peek(r).unwrap().offset >= done.delivered {
            assert!(
                got.contains(r),
                "cut {cut}: undelivered record at {} missing; delivered {}, got {:?}, completed {:?}, stats {:?}",
                RecordHead::peek(r).unwrap().offset,
                done.delivered,
                got.iter().map(|g| RecordHead::peek(g).unwrap().offset).collect::<Vec<_>>(),
                done.records.iter().map(|g| RecordHead::peek(g).unwrap().offset).collect::<Vec<_>>(),
                log.stats()
            );
        }
    }
    let end = done
        .records
        .iter()
        .chain(torn_kept)
        .last()
        .map_or(0, |r| RecordHead::peek(r).unwrap().next_offset());
    assert_eq!(log.next_offset(), end, "cut {cut}: next offset");
    assert_eq!(log.stats().lost_events, 0, "cut {cut}");
    // The dedup table from the log: the recovered transactional ids, with
    // their offsets; the torn record's id is not there.
    let table: DedupTable<1024> = DedupTable::new(DedupConfig {
        window_ms: 60_000,
        when_full: DedupFull::Reject,
    });
    let d = table.table();
    let wall = 2_000_000_000u64;
    log.rebuild_dedup(d, 60_000, wall, 100_000, &mut buf)
        .unwrap();
    for r in &got {
        let rec = Record::parse(r).unwrap();
        if rec.class() == Class::Transactional {
            for (offset, f) in rec.frames() {
                assert_eq!(
                    d.lookup(f.event_id(), 100_000),
                    Lookup::Present(Some(offset)),
                    "cut {cut}: id {}",
                    f.event_id()
                );
            }
        }
    }
    if let Some(t) = done.torn.as_ref().filter(|_| torn_kept.is_none()) {
        let rec = Record::parse(t).unwrap();
        if rec.class() == Class::Transactional {
            for (_, f) in rec.frames() {
                assert_eq!(d.lookup(f.event_id(), 100_000), Lookup::Absent, "cut {cut}");
            }
        }
    }
    // Appends go on.
    let r = record(log.next_offset(), &[9_999_999], 50);
    match log.append(&r) {
        Ok(_) | Err(FlashLogError::Full) => {}
        Err(e) => panic!("cut {cut}: append after recovery: {e:?}"),
    }
}

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn appends_read_back_wrap_the_ring_and_survive_a_reopen() {
    let mut mem = vec![0xFFu8; SECTOR * 6];
    let mut done = Done::default();
    let steps = run(&mut mem, None, &mut done);
    assert!(steps > 10_000, "{steps}");
    assert_eq!(done.records.len(), 90, "no append refused as full");
    check(&mut mem, &done, u64::MAX);
    let mut buf = vec![0u8; BUF];
    let log: FlashLog<Flash<'_>, 16> = FlashLog::open(
        Flash::new(&mut mem),
        super::FullPolicy::StopAccepting,
        &mut buf,
    )
    .unwrap();
    assert!(!log.stats().torn_tail);
}

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn a_power_cut_at_every_program_and_erase_step_keeps_every_completed_record() {
    let mut mem = vec![0xFFu8; SECTOR * 6];
    let total = run(&mut mem, None, &mut Done::default());
    let mut torn = 0;
    for cut in 0..total {
        let mut mem = vec![0xFFu8; SECTOR * 6];
        let mut done = Done::default();
        run(&mut mem, Some(cut), &mut done);
        check(&mut mem, &done, cut);
        torn += usize::from(done.torn.is_some());
    }
    std::println!("{total} cut points, {torn} inside an append");
    assert!(torn > 1000, "cuts inside an append: {torn} of {total}");
}

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn a_full_ring_refuses_or_drops_the_oldest_batch_sector() {
    for policy in [
        super::FullPolicy::StopAccepting,
        super::FullPolicy::DropOldestBatch,
    ] {
        let mut mem = vec![0xFFu8; SECTOR * 3];
        let mut buf = vec![0u8; BUF];
        let mut log: FlashLog<Flash<'_>, 16> =
            FlashLog::open(Flash::new(&mut mem), policy, &mut buf).unwrap();
        // Batch records only, until the ring is full.
        let mut id = 1;
        let mut stored = 0u64;
        let refused = loop {
            let r = record(log.next_offset(), &[id, id + 1], 100);
            id += 2;
            match log.append(&r) {
                Ok(_) => stored += 2,
                Err(FlashLogError::Full) => break true,
                Err(e) => panic!("{e:?}"),
            }
            if stored > 200 {
                break false;
            }
        };
        match policy {
            super::FullPolicy::StopAccepting => assert!(refused && stored < 200),
            super::FullPolicy::DropOldestBatch => {
                assert!(!refused);
                assert!(log.stats().dropped_events > 0);
                let left: u64 = read_all(&mut log)
                    .iter()
                    .map(|r| u64::from(RecordHead::peek(r).unwrap().count))
                    .sum();
                assert_eq!(left + log.stats().dropped_events, stored);
            }
        }
    }
    // A transactional event in the oldest sector: refused, not dropped.
    let mut mem = vec![0xFFu8; SECTOR * 3];
    let mut buf = vec![0u8; BUF];
    let mut log: FlashLog<Flash<'_>, 16> = FlashLog::open(
        Flash::new(&mut mem),
        super::FullPolicy::DropOldestBatch,
        &mut buf,
    )
    .unwrap();
    log.append(&record(0, &[1], 100)).unwrap();
    let mut id = 2;
    let full = loop {
        match log.append(&record(log.next_offset(), &[id, id + 1], 100)) {
            Ok(_) => id += 2,
            Err(e) => break e,
        }
    };
    assert_eq!(full, FlashLogError::Full);
    assert_eq!(log.stats().dropped_events, 0);
}

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn bad_records_and_geometry_are_refused() {
    let mut mem = vec![0xFFu8; SECTOR * 3];
    let mut buf = vec![0u8; BUF];
    let mut log: FlashLog<Flash<'_>, 16> = FlashLog::open(
        Flash::new(&mut mem),
        super::FullPolicy::StopAccepting,
        &mut buf,
    )
    .unwrap();
    assert_eq!(
        log.append(&record(5, &[1], 10)),
        Err(FlashLogError::BadRecord)
    );
    let mut r = record(0, &[1], 10);
    let last = r.len() - 1;
    r[last] ^= 1;
    assert_eq!(log.append(&r), Err(FlashLogError::BadRecord));
    assert_eq!(
        log.append(&record(0, &[1], 1100)),
        Err(FlashLogError::TooLarge)
    );
    assert_eq!(log.append(&[1, 2, 3]), Err(FlashLogError::BadRecord));
    let mut small = vec![0xFFu8; SECTOR];
    assert!(matches!(
        FlashLog::<Flash<'_>, 16>::open(
            Flash::new(&mut small),
            super::FullPolicy::StopAccepting,
            &mut buf
        ),
        Err(FlashLogError::Geometry)
    ));
    // Garbage everywhere: no valid header, an empty log.
    let mut junk: Vec<u8> = (0..SECTOR * 4).map(|i| (i * 7 + 3) as u8).collect();
    let log: FlashLog<Flash<'_>, 16> = FlashLog::open(
        Flash::new(&mut junk),
        super::FullPolicy::StopAccepting,
        &mut buf,
    )
    .unwrap();
    assert_eq!((log.next_offset(), log.first()), (0, None));
}

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn a_damaged_record_is_skipped_and_the_records_after_it_are_kept() {
    let mut mem = vec![0xFFu8; SECTOR * 4];
    let mut buf = vec![0u8; BUF];
    let mut records = Vec::new();
    {
        let mut log: FlashLog<Flash<'_>, 16> = FlashLog::open(
            Flash::new(&mut mem),
            super::FullPolicy::StopAccepting,
            &mut buf,
        )
        .unwrap();
        for id in 1..=6u64 {
            let r = record(log.next_offset(), &[id], 60);
            log.append(&r).unwrap();
            records.push(r);
        }
    }
    // A bit flips in the third record's payload.
    let third = SECTOR_HEADER_LEN as usize
        + records[..2]
            .iter()
            .map(|r| r.len().div_ceil(4) * 4)
            .sum::<usize>();
    mem[third + 60] ^= 0x10;
    let mut log: FlashLog<Flash<'_>, 16> = FlashLog::open(
        Flash::new(&mut mem),
        super::FullPolicy::StopAccepting,
        &mut buf,
    )
    .unwrap();
    let got = read_all(&mut log);
    let want: Vec<Vec<u8>> = records
        .iter()
        .enumerate()
        .filter(|&(i, _)| i != 2)
        .map(|(_, r)| r.clone())
        .collect();
    assert_eq!(got, want, "the records after the damage are kept");
    // No offset is given out again, and the loss is counted.
    assert_eq!(log.next_offset(), 6);
    assert_eq!((log.stats().lost_events, log.stats().damaged_spans), (1, 1));
    // The damaged sector takes no more appends; the next one does.
    let r = record(6, &[7], 60);
    assert_eq!(log.append(&r), Ok(6));
    let got = read_all(&mut log);
    assert_eq!(got.last(), Some(&r));
    assert_eq!(got.len(), 6);
}
