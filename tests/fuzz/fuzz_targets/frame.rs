//! The v1 frame validator: never panics; what it accepts off the wire, the
//! weaker checks (stored, layout) accept alike, the head it keeps reads the
//! same, and the encoder rebuilds it byte for byte.
#![no_main]

use eventstream_core::wire::{Check, Frame, FrameRepr, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits::new(512, 64).unwrap();
    let Ok(f) = Frame::parse(data, &limits) else {
        return;
    };
    let bytes = f.bytes();
    assert!(bytes.len() <= data.len());
    let stored = Frame::check(bytes, Check::Stored).expect("an accepted frame parses as stored");
    assert_eq!(stored, f);
    let layout = Frame::check(bytes, Check::Layout).expect("an accepted frame has its layout");
    assert_eq!(layout, f);
    assert_eq!(Frame::with_head(bytes, f.head()), f);
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
