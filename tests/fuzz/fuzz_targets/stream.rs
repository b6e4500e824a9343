//! The stream decoder (either dialect): the same results whole, split at a
//! point the input chooses, and one byte at a time.
#![no_main]

use eventstream_core::wire::Limits;
use eventstream_tests::decode::decode_chunks;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let limits = Limits::new(512, 64).unwrap();
    let whole = decode_chunks(limits, [stream]);
    let at = (usize::from(cut) * stream.len()) / 255;
    let (a, b) = stream.split_at(at.min(stream.len()));
    assert_eq!(decode_chunks(limits, [a, b]), whole, "split at {at}");
    assert_eq!(
        decode_chunks(limits, stream.chunks(1)),
        whole,
        "byte by byte"
    );
    assert_eq!(
        decode_chunks(limits, stream.chunks(7)),
        whole,
        "7 bytes at a time"
    );
});
