//! The legacy dialect: a connection that opened with a valid legacy frame,
//! then anything. Never panics, and every split gives the same results.
#![no_main]

use eventstream_core::wire::Limits;
use eventstream_tests::decode::{decode_chunks, Item};
use libfuzzer_sys::fuzz_target;

/// A valid legacy frame: body length, priority, topic length, topic,
/// payload (PROTOCOL.md section 4).
const OPENING: &[u8] = &[
    0, 0, 0, 10, 2, 0, 5, b'h', b'e', b'l', b'l', b'o', b'x', b'y',
];

fuzz_target!(|data: &[u8]| {
    let limits = Limits::new(512, 64).unwrap();
    let stream = [OPENING, data].concat();
    let whole = decode_chunks(limits, [&stream[..]]);
    assert!(
        matches!(whole.first(), Some((_, Item::Legacy { .. }))),
        "the opening frame selects legacy: {whole:?}"
    );
    assert_eq!(
        decode_chunks(limits, stream.chunks(1)),
        whole,
        "byte by byte"
    );
    assert_eq!(
        decode_chunks(limits, stream.chunks(5)),
        whole,
        "5 bytes at a time"
    );
});
