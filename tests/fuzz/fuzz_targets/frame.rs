//! The v1 frame decoder: never panics; what it accepts, the stored-frame
//! parsers accept alike and the encoder rebuilds byte for byte.
#![no_main]

use eventstream_core::wire::{parse_stored, trusted_frame, Frame, FrameRepr, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::new(512, 64).unwrap();
    let Ok(f) = Frame::parse(data, &limits) else {
        return;
    };
    let bytes = f.bytes();
    assert!(bytes.len() <= data.len());
    let stored = parse_stored(bytes).expect("an accepted frame parses as stored");
    assert_eq!(stored.bytes(), bytes);
    let trusted = trusted_frame(bytes).expect("an accepted frame is trusted");
    assert_eq!(trusted.event_id(), f.event_id());
    let repr = FrameRepr {
        priority: f.priority(),
        flags: f.flags(),
        partition: f.partition(),
        event_id: f.event_id(),
        timestamp_ns: f.timestamp_ns(),
        topic: f.topic_bytes(),
        payload: f.payload(),
    };
    let mut out = vec![0u8; repr.encoded_len()];
    repr.encode(&mut out).unwrap();
    assert_eq!(out, bytes);
});
