//! Unit tests of the wire formats (the vectors are checked in tests/).
#![allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]

use super::*;

fn frame(buf: &mut [u8], id: u64, priority: Priority) -> usize {
    FrameRepr {
        priority,
        flags: FLAG_ACK,
        partition: 7,
        event_id: id,
        timestamp_ns: 99,
        topic: b"orders",
        payload: &[0xAB; 20],
    }
    .encode(buf)
    .unwrap()
}

#[test]
fn encode_then_parse_round_trips() {
    let mut buf = [0u8; 128];
    let n = frame(&mut buf, 42, Priority::High);
    let f = Frame::parse(&buf[..n], &Limits::DEFAULT).unwrap();
    assert_eq!(f.event_id(), 42);
    assert_eq!(f.priority(), Priority::High);
    assert_eq!(f.partition(), 7);
    assert_eq!(f.topic(), "orders");
    assert_eq!(f.payload(), &[0xAB; 20]);
    assert!(f.ack_requested());
    assert_eq!(f.length() as usize, n);
    assert_eq!(Frame::check(&buf[..n], Check::Stored), Ok(f));
}

#[test]
fn v1_stream_yields_frames_then_fatal() {
    let mut stream = [0u8; 256];
    let a = frame(&mut stream, 1, Priority::Low);
    let b = frame(&mut stream[a..], 2, Priority::Batch);
    stream[a + b..a + b + 4].copy_from_slice(b"XXXX");
    let mut d = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
    let input = &stream[..a + b + 8];
    let mut pos = 0;
    let mut ids = [0u64; 2];
    let mut n = 0;
    let mut fatal = None;
    loop {
        let (used, item) = d.next(&input[pos..]);
        pos += used;
        match item {
            Some(Decoded::Frame(f)) => {
                ids[n] = f.event_id();
                n += 1;
            }
            Some(Decoded::Fatal(r)) => fatal = Some(r),
            Some(other) => panic!("unexpected {other:?}"),
            None => break,
        }
    }
    assert_eq!(ids, [1, 2]);
    assert_eq!(fatal, Some(Reason::BadMagic));
    assert!(d.is_closed());
}

#[test]
fn patched_templates_stay_valid() {
    let mut buf = [0u8; 128];
    let n = frame(&mut buf, 1, Priority::Medium);
    let mut m = Frame::check(&mut buf[..n], Check::Layout).unwrap();
    m.set_event_id(0xDEAD_BEEF);
    m.set_timestamp_ns(12345);
    m.fill_crc();
    let f = Frame::parse(&buf[..n], &Limits::DEFAULT).unwrap();
    assert_eq!((f.event_id(), f.timestamp_ns()), (0xDEAD_BEEF, 12345));
    let mut m = Frame::check(&mut buf[..n], Check::Layout).unwrap();
    m.set_event_id(7);
    m.fill_crc();
    assert_eq!(
        Frame::parse(&buf[..n], &Limits::DEFAULT)
            .unwrap()
            .event_id(),
        7
    );
    // Too short to be a frame: no view, so nothing to set.
    let mut tiny = [1u8; 10];
    assert!(Frame::check(&mut tiny[..], Check::Layout).is_err());
}

#[test]
fn limits_are_checked() {
    assert_eq!(Limits::new(40, 64), Err(LimitsError::MaxFrame));
    assert_eq!(Limits::new(65_537, 64), Err(LimitsError::MaxFrame));
    assert_eq!(Limits::new(512, 0), Err(LimitsError::MaxTopic));
    assert!(StreamDecoder::new([0u8; 100], Limits::DEFAULT).is_err());
}

#[test]
fn a_read_session_is_handed_back_whole_however_it_is_split() {
    let stream: &[u8] = b"ESCR\x20\x00\x00\x00rest of a request";
    for first in 1..=stream.len() {
        let mut d = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
        let mut got = [0u8; 64];
        let mut n = 0;
        let mut handed = false;
        for chunk in [&stream[..first], &stream[first..]] {
            let (used, item) = d.next(chunk);
            match item {
                Some(Decoded::Reader(held)) => {
                    assert!(!handed);
                    handed = true;
                    got[n..n + held.len()].copy_from_slice(held);
                    n += held.len();
                    let rest = &chunk[used..];
                    got[n..n + rest.len()].copy_from_slice(rest);
                    n += rest.len();
                }
                None if handed => {
                    // Closed: everything offered is swallowed.
                    got[n..n + chunk.len()].copy_from_slice(chunk);
                    n += chunk.len();
                }
                None => assert_eq!(used, chunk.len()),
                Some(other) => panic!("{other:?}"),
            }
        }
        assert!(handed, "split at {first}");
        assert_eq!(&got[..n], stream, "split at {first}");
        assert_eq!(d.dialect(), Some(Dialect::Read));
        assert!(d.is_closed() && !d.is_mid_frame());
    }
}

#[test]
fn a_hello_pauses_the_decoder_until_it_is_accepted() {
    let mut hello = [0u8; 64];
    let n = super::read::Hello { token: b"t0k3n" }
        .encode(&mut hello)
        .unwrap();
    let mut frame = [0u8; 64];
    let f = FrameRepr {
        priority: Priority::High,
        flags: FLAG_ACK,
        partition: 0,
        event_id: 7,
        timestamp_ns: 0,
        topic: b"t",
        payload: b"p",
    };
    let flen = f.encode(&mut frame).unwrap();
    // A HELLO, then a v1 frame.
    let mut d = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
    let (used, item) = d.next(&hello[..2]);
    assert_eq!((used, item), (2, None));
    let (used, item) = d.next(&hello[2..n]);
    // The four bytes that chose the dialect were held; the rest is unread.
    assert_eq!(item, Some(Decoded::Hello(&hello[..4])));
    assert_eq!(used, 2);
    assert_eq!(d.dialect(), Some(Dialect::Hello));
    assert!(d.is_closed());
    d.resume_after_hello();
    assert!(!d.is_closed() && d.dialect().is_none());
    match d.next(&frame[..flen]) {
        (used, Some(Decoded::Frame(got))) => {
            assert_eq!(used, flen);
            assert_eq!(got.event_id(), 7);
        }
        other => panic!("{other:?}"),
    }
    // After a HELLO: a legacy frame, or a second HELLO, is FATAL BAD_MAGIC.
    for next in [&b"\x00\x00\x00\x05\x01\x00\x01tp"[..], &hello[..n]] {
        let mut d = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
        assert!(matches!(d.next(&hello[..n]).1, Some(Decoded::Hello(_))));
        d.resume_after_hello();
        assert_eq!(d.next(next).1, Some(Decoded::Fatal(Reason::BadMagic)));
        assert!(d.is_closed());
    }
    // resume_after_hello does nothing elsewhere.
    let mut d = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
    d.resume_after_hello();
    assert!(matches!(d.next(&frame[..flen]).1, Some(Decoded::Frame(_))));
}
