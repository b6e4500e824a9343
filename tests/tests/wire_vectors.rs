//! Every frame, ack and CRC vector of `tests/vectors/` (generated from
//! PROTOCOL.md) decoded or encoded exactly as the vector says, for every way
//! of splitting the bytes.

use eventstream_core::crc32c;
use eventstream_core::wire::{
    Ack, Check, Frame, FrameRepr, LegacyRule, Limits, Reason, Status, FLAG_ACK, NO_OFFSET,
};
use eventstream_core::{Class, Priority};
use eventstream_tests::decode::{decode_chunks, decode_every_split, Item};
use eventstream_tests::{hex, unhex, vector_lines};
use serde_json::Value;

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

fn limits_of(v: &Value) -> Limits {
    let c = &v["config"];
    Limits::new(
        u64_of(&c["max_frame"]) as u32,
        u64_of(&c["max_topic"]) as u8,
    )
    .expect("vector limits")
}

fn reason_named(name: &str) -> Reason {
    Reason::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .unwrap_or_else(|| panic!("unknown reason {name}"))
}

fn rule_named(rule: &str) -> LegacyRule {
    match rule {
        "body_len < 3" => LegacyRule::BodyTooShort,
        "topic_len == 0" => LegacyRule::TopicEmpty,
        "3 + topic_len > body_len" => LegacyRule::TopicPastBody,
        "topic_len > max_topic" => LegacyRule::TopicTooLong,
        "topic is not UTF-8" => LegacyRule::TopicNotUtf8,
        "priority > 4" => LegacyRule::BadPriority,
        other => panic!("unknown legacy rule {other}"),
    }
}

/// A valid v1 frame that puts a connection into the v1 dialect.
fn opener() -> Vec<u8> {
    let repr = FrameRepr {
        priority: Priority::Medium,
        flags: FLAG_ACK,
        partition: 0,
        event_id: 1,
        timestamp_ns: 0,
        topic: b"open",
        payload: b"",
    };
    let mut buf = vec![0u8; repr.encoded_len()];
    repr.encode(&mut buf).unwrap();
    buf
}

fn frames() -> Vec<Value> {
    vector_lines("frames.jsonl")
        .iter()
        .map(|l| serde_json::from_str(l).expect("json"))
        .collect()
}

fn check_accepted_fields(name: &str, bytes: &[u8], f: &Value) {
    let frame = eventstream_core::wire::Frame::parse(bytes, &Limits::new(65_536, 255).unwrap())
        .unwrap_or_else(|e| panic!("{name}: {e:?}"));
    assert_eq!(frame.length() as u64, u64_of(&f["length"]), "{name}");
    assert_eq!(
        frame.priority().code() as u64,
        u64_of(&f["priority"]),
        "{name}"
    );
    assert_eq!(
        frame.priority().class().name(),
        f["class"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(frame.flags() as u64, u64_of(&f["flags"]), "{name}");
    assert_eq!(frame.ack_requested(), f["ack"].as_bool().unwrap(), "{name}");
    assert_eq!(frame.topic_len() as u64, u64_of(&f["topic_len"]), "{name}");
    assert_eq!(frame.partition() as u64, u64_of(&f["partition"]), "{name}");
    assert_eq!(frame.event_id(), u64_of(&f["event_id"]), "{name}");
    assert_eq!(frame.timestamp_ns(), u64_of(&f["timestamp_ns"]), "{name}");
    assert_eq!(
        frame.payload_len() as u64,
        u64_of(&f["payload_len"]),
        "{name}"
    );
    assert_eq!(frame.topic(), f["topic"].as_str().unwrap(), "{name}");
    assert_eq!(
        hex(frame.topic_bytes()),
        f["topic_hex"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(
        hex(frame.payload()),
        f["payload_hex"].as_str().unwrap(),
        "{name}"
    );
    assert_eq!(frame.crc() as u64, u64_of(&f["crc"]), "{name}");
    // The encoder rebuilds the same bytes from the fields.
    let repr = FrameRepr {
        priority: frame.priority(),
        flags: frame.flags(),
        partition: frame.partition(),
        event_id: frame.event_id(),
        timestamp_ns: frame.timestamp_ns(),
        topic: frame.topic_bytes(),
        payload: frame.payload(),
    };
    let mut out = vec![0u8; repr.encoded_len()];
    repr.encode(&mut out).unwrap();
    assert_eq!(out, bytes, "{name}: encoder");
}

#[test]
fn v1_frames_decode_as_the_vectors_say_for_every_split() {
    let open = opener();
    let mut seen = 0;
    for v in frames().iter().filter(|v| v["dialect"] == "v1") {
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let limits = limits_of(v);
        let bytes = unhex(v["hex"].as_str().unwrap());
        let e = &v["expect"];
        let mut stream = open.clone();
        stream.extend_from_slice(&bytes);
        let got = decode_every_split(limits, &stream);
        assert_eq!(
            got[0],
            (Some(open.len()), Item::Frame(open.clone())),
            "{name}"
        );
        let rest = &got[1..];
        match e["outcome"].as_str().unwrap() {
            "accepted" => {
                let consumed = u64_of(&e["consumed"]) as usize;
                assert_eq!(
                    rest,
                    [(
                        Some(open.len() + consumed),
                        Item::Frame(bytes[..consumed].to_vec())
                    )],
                    "{name}"
                );
                check_accepted_fields(name, &bytes[..consumed], &e["fields"]);
                assert_eq!(
                    bytes[10] & FLAG_ACK != 0,
                    e["answered"].as_bool().unwrap(),
                    "{name}"
                );
            }
            "rejected" => {
                let consumed = u64_of(&e["consumed"]) as usize;
                let reason = reason_named(e["reason"].as_str().unwrap());
                let answered = e["answered"].as_bool().unwrap();
                let event_id = u64_of(&e["event_id"]);
                assert_eq!(
                    rest,
                    [(
                        Some(open.len() + consumed),
                        Item::Rejected {
                            reason,
                            event_id,
                            ack: answered
                        }
                    )],
                    "{name}"
                );
                assert_eq!(reason.code() as u64, u64_of(&e["reason_code"]), "{name}");
                match e["ack_hex"].as_str() {
                    Some(ack_hex) => {
                        assert!(answered, "{name}");
                        assert_eq!(
                            hex(&Ack::rejected(event_id, reason).encode()),
                            ack_hex,
                            "{name}"
                        );
                    }
                    None => assert!(!answered, "{name}"),
                }
                // The connection stays open: a frame after it still decodes.
                let mut more = stream.clone();
                more.extend_from_slice(&open);
                let after = decode_chunks(limits, [&more[..]]);
                assert_eq!(after.len(), 3, "{name}: frame after a rejection");
                assert_eq!(after[2].1, Item::Frame(open.clone()), "{name}");
            }
            "fatal" => {
                let reason = reason_named(e["reason"].as_str().unwrap());
                assert_eq!(rest, [(None, Item::Fatal(reason))], "{name}");
                assert_eq!(
                    hex(&Ack::fatal(reason).encode()),
                    e["ack_hex"].as_str().unwrap(),
                    "{name}"
                );
                // Decided exactly when `decided_after_bytes` have arrived.
                let k = u64_of(&e["decided_after_bytes"]) as usize;
                let before = decode_chunks(limits, [&stream[..open.len() + k - 1]]);
                assert_eq!(before.len(), 1, "{name}: decided too early");
                let at = decode_chunks(limits, [&stream[..open.len() + k]]);
                assert_eq!(
                    at.last().unwrap().1,
                    Item::Fatal(reason),
                    "{name}: not decided at {k}"
                );
                // Nothing after a FATAL is decoded.
                let mut more = stream.clone();
                more.extend_from_slice(&open);
                assert_eq!(decode_chunks(limits, [&more[..]]).len(), 2, "{name}");
            }
            other => panic!("{name}: unknown outcome {other}"),
        }
    }
    assert!(seen > 50, "v1 vectors missing");
}

#[test]
fn legacy_frames_decode_as_the_vectors_say_for_every_split() {
    let mut seen = 0;
    for v in frames().iter().filter(|v| v["dialect"] == "legacy") {
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let limits = limits_of(v);
        let bytes = unhex(v["hex"].as_str().unwrap());
        let e = &v["expect"];
        let got = decode_every_split(limits, &bytes);
        match e["outcome"].as_str().unwrap() {
            "stored" => {
                let consumed = u64_of(&e["consumed"]) as usize;
                assert_eq!(consumed, bytes.len(), "{name}");
                let s = &e["stored_as"];
                let [(
                    Some(at),
                    Item::Legacy {
                        priority,
                        topic,
                        payload,
                    },
                )] = &got[..]
                else {
                    panic!("{name}: {got:?}");
                };
                assert_eq!(*at, consumed, "{name}");
                assert_eq!(priority.code() as u64, u64_of(&s["priority"]), "{name}");
                assert_eq!(
                    priority.class().name(),
                    s["class"].as_str().unwrap(),
                    "{name}"
                );
                assert_eq!(topic, s["topic"].as_str().unwrap().as_bytes(), "{name}");
                assert_eq!(hex(payload), s["payload_hex"].as_str().unwrap(), "{name}");
                // The v1 frame stored for it, byte for byte.
                let ex = &s["example"];
                let id = u64_of(&ex["event_id"]);
                assert_eq!(id, (1u64 << 63) + u64_of(&ex["offset"]), "{name}");
                let mut dec =
                    eventstream_core::wire::StreamDecoder::new([0u8; 65_536], limits).unwrap();
                let (_, item) = dec.next(&bytes);
                let Some(eventstream_core::wire::Decoded::Legacy(ev)) = item else {
                    panic!("{name}");
                };
                let mut out = vec![0u8; ev.v1_len()];
                ev.encode_v1(id, u64_of(&ex["receive_time_ns"]), &mut out)
                    .unwrap();
                assert_eq!(hex(&out), ex["frame_hex"].as_str().unwrap(), "{name}");
                assert_eq!(out.len() as u64, u64_of(&s["length"]), "{name}");
                let stored = Frame::check(&out[..], Check::Stored).expect("stored frame parses");
                assert!(stored.is_legacy(), "{name}");
                assert_eq!(stored.flags() as u64, u64_of(&s["flags"]), "{name}");
                assert_eq!(stored.partition(), 0, "{name}");
            }
            "skipped" => {
                let consumed = u64_of(&e["consumed"]) as usize;
                let expected = match e["why"].as_str().unwrap() {
                    "keep-alive" => Item::KeepAlive,
                    _ => Item::Skipped(rule_named(e["rule"].as_str().unwrap())),
                };
                assert_eq!(got, [(Some(consumed), expected)], "{name}");
                // The connection stays open: a keep-alive after it is seen.
                let mut more = bytes.clone();
                more.extend_from_slice(&[0, 0, 0, 0]);
                assert_eq!(
                    decode_chunks(limits, [&more[..]]).last().unwrap().1,
                    Item::KeepAlive,
                    "{name}"
                );
            }
            "close" => {
                assert_eq!(got, [(None, Item::Close)], "{name}");
                // Decided from the 4 length bytes alone.
                assert_eq!(
                    decode_chunks(limits, [&bytes[..4]]),
                    [(None, Item::Close)],
                    "{name}"
                );
            }
            other => panic!("{name}: unknown outcome {other}"),
        }
    }
    assert!(seen > 20, "legacy vectors missing");
}

#[test]
fn dialect_is_chosen_by_the_first_four_bytes() {
    let mut seen = 0;
    for v in frames().iter().filter(|v| v["dialect"] == "detect") {
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let bytes = unhex(v["hex"].as_str().unwrap());
        for split in 0..=bytes.len() {
            let mut dec =
                eventstream_core::wire::StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
            let (a, b) = bytes.split_at(split);
            let _ = dec.next(a);
            if split < 4 {
                assert_eq!(dec.dialect(), None, "{name}: decided before 4 bytes");
            }
            let mut pos = 0;
            while pos < b.len() {
                let (used, _) = dec.next(&b[pos..]);
                pos += used;
            }
            let want = match v["expect"]["dialect"].as_str().unwrap() {
                "v1" => eventstream_core::wire::Dialect::V1,
                _ => eventstream_core::wire::Dialect::Legacy,
            };
            assert_eq!(dec.dialect(), Some(want), "{name}");
        }
    }
    assert_eq!(seen, 4);
}

#[test]
fn v1_streams_give_the_expected_acks_for_every_split() {
    let mut seen = 0;
    for v in frames().iter().filter(|v| v["dialect"] == "v1-stream") {
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let e = &v["expect"];
        let bytes = unhex(v["hex"].as_str().unwrap());
        let got = decode_every_split(limits_of(v), &bytes);
        let mut acks = Vec::new();
        let mut stored = Vec::new();
        let mut unanswered = Vec::new();
        let mut fatal = None;
        for (_, item) in &got {
            assert!(fatal.is_none(), "{name}: result after FATAL");
            match item {
                Item::Frame(f) => {
                    let frame = Frame::check(f, Check::Stored).ok().unwrap();
                    stored.push(frame.event_id());
                    if frame.ack_requested() {
                        acks.push(("STORED", None, frame.event_id()));
                    } else {
                        unanswered.push(frame.event_id());
                    }
                }
                Item::Rejected {
                    reason,
                    event_id,
                    ack,
                } => {
                    if *ack {
                        acks.push(("REJECTED", Some(reason.name()), *event_id));
                    }
                }
                Item::Fatal(r) => fatal = Some(*r),
                other => panic!("{name}: {other:?}"),
            }
        }
        let list = e
            .get("acks_in_any_order_before_fatal")
            .or_else(|| e.get("acks_in_any_order"))
            .unwrap()
            .as_array()
            .unwrap();
        let mut want: Vec<_> = list
            .iter()
            .map(|a| {
                (
                    a["status"].as_str().unwrap(),
                    a["reason"].as_str(),
                    u64_of(&a["event_id"]),
                )
            })
            .collect();
        want.sort();
        acks.sort();
        assert_eq!(acks, want, "{name}");
        if let Some(then) = e.get("then") {
            let r = reason_named(then["reason"].as_str().unwrap());
            assert_eq!(fatal, Some(r), "{name}");
            assert_eq!(then["status"], "FATAL");
        } else {
            assert_eq!(fatal, None, "{name}");
        }
        if let Some(ids) = e.get("stored_event_ids") {
            let ids: Vec<u64> = ids.as_array().unwrap().iter().map(u64_of).collect();
            assert_eq!(stored, ids, "{name}");
        }
        if let Some(ids) = e.get("unanswered_event_ids") {
            let ids: Vec<u64> = ids.as_array().unwrap().iter().map(u64_of).collect();
            assert_eq!(unanswered, ids, "{name}");
        }
    }
    assert_eq!(seen, 2);
}

#[test]
fn acks_encode_and_decode_as_the_vectors_say() {
    let lines = vector_lines("acks.jsonl");
    assert!(lines.len() >= 10);
    for line in lines {
        let v: Value = serde_json::from_str(&line).unwrap();
        let name = v["name"].as_str().unwrap();
        let f = &v["fields"];
        let bytes = unhex(v["hex"].as_str().unwrap());
        let ack = Ack::decode(&bytes).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(ack.status.name(), f["status"].as_str().unwrap(), "{name}");
        assert_eq!(ack.status as u64, u64_of(&f["status_code"]), "{name}");
        assert_eq!(ack.reason.name(), f["reason"].as_str().unwrap(), "{name}");
        assert_eq!(
            ack.reason.code() as u64,
            u64_of(&f["reason_code"]),
            "{name}"
        );
        assert_eq!(ack.event_id, u64_of(&f["event_id"]), "{name}");
        assert_eq!(ack.offset, u64_of(&f["offset"]), "{name}");
        assert_eq!(ack.encode().to_vec(), bytes, "{name}: encode");
        let built = match ack.status {
            Status::Stored => Ack::stored(ack.event_id, ack.offset),
            Status::Duplicate => Ack::duplicate(ack.event_id, ack.offset),
            Status::Rejected => Ack::rejected(ack.event_id, ack.reason),
            Status::Fatal => Ack::fatal(ack.reason),
        };
        assert_eq!(built, ack, "{name}: constructor");
        if matches!(ack.status, Status::Rejected | Status::Fatal) {
            assert_eq!(ack.offset, NO_OFFSET, "{name}");
        }
    }
}

#[test]
fn malformed_acks_are_refused() {
    let good = Ack::stored(5, 6).encode();
    for i in 0..good.len() {
        assert!(Ack::decode(&good[..i]).is_err());
    }
    for (at, value) in [(0, b'X'), (4, 2), (5, 4), (6, 17), (7, 1)] {
        let mut bad = good;
        bad[at] = value;
        assert!(Ack::decode(&bad).is_err(), "byte {at} = {value}");
    }
}

#[test]
fn crc32c_matches_every_vector() {
    let lines = vector_lines("crc32c.jsonl");
    assert!(lines.len() >= 6);
    for line in lines {
        let v: Value = serde_json::from_str(&line).unwrap();
        let input = unhex(v["input_hex"].as_str().unwrap());
        assert_eq!(
            crc32c::checksum(&input) as u64,
            u64_of(&v["crc32c"]),
            "{}",
            v["name"]
        );
        assert_eq!(
            format!("0x{:08X}", crc32c::checksum(&input)),
            v["crc32c_hex"].as_str().unwrap()
        );
    }
}

#[test]
fn classes_route_as_protocol_section_5_says() {
    for v in frames()
        .iter()
        .filter(|v| v["expect"]["outcome"] == "accepted")
    {
        let f = &v["expect"]["fields"];
        let p = Priority::from_u8(u64_of(&f["priority"]) as u8).unwrap();
        let class = p.class();
        assert_eq!(class.name(), f["class"].as_str().unwrap());
        assert_eq!(Class::from_u8(class.code()), Some(class));
    }
}
