//! Recovery of a newest segment against the reader `inspect` uses, and
//! `salvage` of a closed one: the prefix recovery keeps is exactly what the
//! reader reads; salvage's pieces cover the offsets in order.
#![no_main]

use eventstream_core::record::{recover, salvage, Piece, Recovery, SEGMENT_HEADER};
use eventstream_host::storage::read_records;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // Most inputs get a valid header, so the fuzzer spends its time on
    // records; the first byte chooses.
    let Some((&choice, rest)) = data.split_first() else {
        return;
    };
    let seg = if choice & 1 == 0 {
        [&SEGMENT_HEADER[..], rest].concat()
    } else {
        rest.to_vec()
    };
    let base = u64::from(choice >> 1);
    let read = read_records(&seg, base, |_| {});
    match recover(&seg, base) {
        Recovery::Clean { next_offset } => assert_eq!(read, Ok(next_offset)),
        Recovery::Truncate { to, next_offset } => {
            assert_eq!(read_records(&seg[..to], base, |_| {}), Ok(next_offset));
            assert!(read.is_err());
        }
        Recovery::Refuse {
            bad_at,
            next_offset,
            ..
        } => {
            assert_eq!(read_records(&seg[..bad_at], base, |_| {}), Ok(next_offset));
            assert_eq!(read.map_err(|e| e.0), Err(bad_at));
        }
        Recovery::RewriteEmpty { .. } | Recovery::BadHeader => assert!(read.is_err()),
    }
    let end = base + 64;
    let mut at = base;
    salvage(&seg, base, end, |p| match p {
        Piece::Run { first, next, .. } => {
            assert!(first == at && next > first);
            at = next;
        }
        Piece::Lost { first, end: e, .. } => {
            assert!(first == at && e >= first);
            at = e;
        }
    });
    // Up to `end` at least (a run may only reach past it where a record
    // starting below `end` does).
    assert!(at >= end, "covered to {at} of {end}");
});
