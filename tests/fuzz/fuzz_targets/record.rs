//! The record parser: never panics; a record it accepts holds `count`
//! frames that the stored-frame parser accepts, at dense offsets, and fills
//! exactly its size.
#![no_main]

use eventstream_core::record::Record;
use eventstream_core::wire::{Check, Frame};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(r) = Record::parse(data) else {
        return;
    };
    assert!(r.size() <= data.len());
    assert_eq!(r.bytes().len(), r.size());
    let mut n = 0u64;
    let mut bytes = 28usize;
    for (offset, frame) in r.frames() {
        assert_eq!(offset, r.offset() + n);
        assert!(Frame::check(frame.bytes(), Check::Stored).is_ok());
        bytes += frame.bytes().len();
        n += 1;
    }
    assert_eq!(n, u64::from(r.count()));
    assert_eq!(r.next_offset(), r.offset() + n);
    assert_eq!(bytes, r.size());
});
