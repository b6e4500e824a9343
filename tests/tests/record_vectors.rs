//! Log records of `tests/vectors/log_records.jsonl`: parsed as the vectors
//! say, and rebuilt byte for byte from their frames.

use eventstream_core::record::{
    segment_name, Record, RecordBuilder, RecordHead, RecordKind, SEGMENT_HEADER,
};
use eventstream_core::Class;
use eventstream_tests::{hex, unhex, vector_lines};
use serde_json::Value;

fn u64_of(v: &Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a u64: {v}"))
}

#[test]
fn segment_header_and_names_match() {
    let mut seen = 0;
    for line in vector_lines("log_records.jsonl") {
        let v: Value = serde_json::from_str(&line).unwrap();
        match v["type"].as_str().unwrap() {
            "segment_header" => {
                assert_eq!(hex(&SEGMENT_HEADER), v["hex"].as_str().unwrap());
                seen += 1;
            }
            "segment_names" => {
                for (base, name) in v["names"].as_object().unwrap() {
                    assert_eq!(
                        segment_name(base.parse().unwrap()).as_str(),
                        name.as_str().unwrap()
                    );
                }
                seen += 1;
            }
            _ => {}
        }
    }
    assert_eq!(seen, 2);
}

#[test]
fn records_parse_and_rebuild_as_the_vectors_say() {
    let mut seen = 0;
    for line in vector_lines("log_records.jsonl") {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] != "record" {
            continue;
        }
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let f = &v["fields"];
        let bytes = unhex(v["hex"].as_str().unwrap());
        let rec = Record::parse(&bytes).unwrap_or_else(|e| panic!("{name}: {e:?}"));
        assert_eq!(rec.size() as u64, u64_of(&f["len"]) + 4, "{name}");
        assert_eq!(rec.offset(), u64_of(&f["offset"]), "{name}");
        assert_eq!(rec.recv_ns(), u64_of(&f["recv_ns"]), "{name}");
        assert_eq!(rec.kind() as u64, u64_of(&f["kind"]), "{name}");
        assert_eq!(
            rec.class().name(),
            f["class_name"].as_str().unwrap(),
            "{name}"
        );
        assert_eq!(rec.count() as u64, u64_of(&f["count"]), "{name}");
        // The unchecked header view reads the same fields.
        let head = RecordHead::peek(&bytes).unwrap_or_else(|| panic!("{name}"));
        assert_eq!(
            (head.size, head.offset, head.class, head.count),
            (
                rec.size() as u64,
                rec.offset(),
                rec.class().code(),
                rec.count()
            ),
            "{name}"
        );
        assert_eq!(head.next_offset(), rec.next_offset(), "{name}");
        assert!(RecordHead::peek(&bytes[..27]).is_none(), "{name}: short");
        let first = &bytes[eventstream_core::record::RECORD_HEADER_LEN..];
        let frame = rec.frames().next().unwrap().1;
        let topic = eventstream_core::wire::topic_range(first).unwrap();
        assert_eq!(&first[topic], frame.topic_bytes(), "{name}: topic_range");
        assert_eq!(rec.next_offset(), u64_of(&f["next_offset"]), "{name}");
        let frames: Vec<_> = rec.frames().collect();
        let want = f["frames"].as_array().unwrap();
        assert_eq!(frames.len(), want.len(), "{name}");
        for ((off, frame), w) in frames.iter().zip(want) {
            let j = &w["inspect_json"];
            assert_eq!(*off, u64_of(&j["offset"]), "{name}");
            assert_eq!(hex(frame.bytes()), w["hex"].as_str().unwrap(), "{name}");
            assert_eq!(frame.event_id(), u64_of(&j["event_id"]), "{name}");
            assert_eq!(
                frame.priority().name(),
                j["priority"].as_str().unwrap(),
                "{name}"
            );
            assert_eq!(frame.topic(), j["topic"].as_str().unwrap(), "{name}");
            assert_eq!(frame.partition() as u64, u64_of(&j["partition"]), "{name}");
            assert_eq!(frame.timestamp_ns(), u64_of(&j["timestamp_ns"]), "{name}");
            assert_eq!(
                frame.payload_len() as u64,
                u64_of(&j["payload_len"]),
                "{name}"
            );
            assert_eq!(frame.is_legacy(), j["legacy"].as_bool().unwrap(), "{name}");
        }
        // Rebuild: the builder assigns legacy ids from the offset itself.
        let kind = if rec.kind() == RecordKind::Batch {
            RecordKind::Batch
        } else {
            RecordKind::Single
        };
        let class = Class::from_u8(u64_of(&f["class"]) as u8).unwrap();
        let mut buf = vec![0u8; bytes.len()];
        let mut b = RecordBuilder::new(&mut buf, kind, class, rec.recv_ns()).unwrap();
        for (_, frame) in &frames {
            let mut raw = frame.bytes().to_vec();
            if frame.is_legacy() {
                // As ingest stores it before the offset is known.
                set_id(&mut raw, 0);
            }
            b.push(&raw).unwrap();
        }
        assert_eq!(
            b.finish(rec.offset()).unwrap(),
            &bytes[..],
            "{name}: rebuilt"
        );
        // Any single flipped byte is caught.
        for i in 0..bytes.len() {
            let mut bad = bytes.clone();
            bad[i] ^= 0x40;
            assert!(Record::parse(&bad).is_err(), "{name}: byte {i}");
        }
    }
    assert!(seen >= 5);
}

/// An event of a batch window for the default aggregate: its frame bytes
/// and receive time.
struct Held {
    frame: Vec<u8>,
    recv_ns: u64,
}

impl eventstream_core::batch::BatchItem for Held {
    fn topic(&self) -> &[u8] {
        eventstream_core::wire::Frame::check(&self.frame[..], eventstream_core::wire::Check::Stored)
            .ok()
            .map_or(&[], |f| f.topic_bytes())
    }
    fn partition(&self) -> u32 {
        eventstream_core::wire::Frame::check(&self.frame[..], eventstream_core::wire::Check::Stored)
            .ok()
            .map_or(0, |f| f.partition())
    }
    fn frame(&self) -> Option<eventstream_core::wire::Frame<&[u8]>> {
        eventstream_core::wire::Frame::check(&self.frame[..], eventstream_core::wire::Check::Stored)
            .ok()
    }
    fn recv_ns(&self) -> u64 {
        self.recv_ns
    }
}

#[test]
fn the_default_aggregate_builds_the_vectors_batch_records() {
    use eventstream_core::batch::{BatchConfig, BatchWindows, Entry, RecordAggregate, WindowMeta};
    use eventstream_core::wire::Limits;
    let mut seen = 0;
    for line in vector_lines("log_records.jsonl") {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] != "record" || v["fields"]["kind"] != 1 || v["fields"]["class"] != 2 {
            continue;
        }
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let bytes = unhex(v["hex"].as_str().unwrap());
        let rec = Record::parse(&bytes).unwrap();
        // Feed the record's events through a window, as ingest stores them
        // (legacy ids not assigned yet), and close it by count.
        let mut meta = [WindowMeta::new(); 2];
        let mut arena: Vec<Entry<Held>> = (0..8).map(|_| Entry::new()).collect();
        let count = rec.count() as u32;
        let mut windows = BatchWindows::new(
            &mut meta,
            &mut arena,
            BatchConfig {
                max_events: count,
                max_age_ns: u64::MAX,
            },
        )
        .unwrap();
        let mut buf = vec![0u8; 28 + 8 * 512];
        let mut built = Vec::new();
        let mut agg = RecordAggregate::new(&mut buf, &Limits::DEFAULT, |b: RecordBuilder<'_>| {
            built.push(b.finish(rec.offset()).unwrap().to_vec());
        })
        .unwrap();
        for (i, (_, frame)) in rec.frames().enumerate() {
            let mut raw = frame.bytes().to_vec();
            if frame.is_legacy() {
                set_id(&mut raw, 0);
            }
            let recv_ns = if i == 0 {
                rec.recv_ns()
            } else {
                rec.recv_ns() + 7
            };
            windows.push(
                Held {
                    frame: raw,
                    recv_ns,
                },
                i as u64,
                &mut agg,
            );
        }
        assert_eq!(built, std::slice::from_ref(&bytes), "{name}");
    }
    assert!(seen >= 2);
}

/// The base offset a recovery vector's segment name gives.
fn segment_base(v: &Value) -> u64 {
    v["segment_name"]
        .as_str()
        .unwrap()
        .trim_end_matches(".log")
        .parse()
        .unwrap()
}

#[test]
fn recovery_does_what_every_vector_says() {
    use eventstream_core::record::{recover, Recovery};
    let mut seen = 0;
    for line in vector_lines("log_records.jsonl") {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] != "recovery" {
            continue;
        }
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let base = segment_base(&v);
        let seg = unhex(v["segment_hex"].as_str().unwrap());
        let e = &v["expect"];
        let got = recover(&seg, base);
        let want = match e["action"].as_str().unwrap() {
            "none" => Recovery::Clean {
                next_offset: u64_of(&e["next_offset"]),
            },
            "rewrite_empty" => Recovery::RewriteEmpty {
                next_offset: u64_of(&e["next_offset"]),
            },
            "truncate" => Recovery::Truncate {
                to: u64_of(&e["truncate_to"]) as usize,
                next_offset: u64_of(&e["next_offset"]),
            },
            "refuse" => {
                let r = &e["repair"];
                assert_eq!(r["action"], "truncate", "{name}");
                assert_eq!(r["truncate_to"], e["bad_record_at"], "{name}");
                let (a, b) = r["dropped_offsets"]
                    .as_str()
                    .unwrap()
                    .split_once("..")
                    .unwrap();
                Recovery::Refuse {
                    bad_at: u64_of(&e["bad_record_at"]) as usize,
                    valid_at: u64_of(&e["valid_record_at"]) as usize,
                    next_offset: u64_of(&r["next_offset"]),
                    dropped_bytes: u64_of(&r["dropped_bytes"]) as usize,
                    dropped_offsets: (a.parse().unwrap(), b.parse().unwrap()),
                }
            }
            other => panic!("{name}: unknown action {other}"),
        };
        assert_eq!(got, want, "{name}");
    }
    assert_eq!(seen, 16);
    // A full-length header that is not ours is refused, not rewritten.
    assert_eq!(recover(&[0xAB; 40], 0), Recovery::BadHeader);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]

    /// Any bytes after a header: recovery never panics, and what it keeps
    /// is a prefix that recovers clean.
    #[test]
    fn recovery_of_arbitrary_tails_keeps_a_clean_prefix(tail in proptest::collection::vec(proptest::prelude::any::<u8>(), 0..600)) {
        use eventstream_core::record::{recover, Recovery};
        let v: Value = serde_json::from_str(&vector_lines("log_records.jsonl")[2]).unwrap();
        let mut seg = SEGMENT_HEADER.to_vec();
        seg.extend_from_slice(&unhex(v["hex"].as_str().unwrap()));
        seg.extend_from_slice(&tail);
        let keep = match recover(&seg, 0) {
            Recovery::Clean { .. } => seg.len(),
            Recovery::Truncate { to, .. } => to,
            Recovery::Refuse { bad_at, .. } => bad_at,
            other => panic!("{other:?}"),
        };
        let clean = matches!(recover(&seg[..keep], 0), Recovery::Clean { .. });
        proptest::prop_assert!(clean);
    }
}

#[test]
fn zeros_after_the_last_record_are_cut_and_a_record_after_them_is_not_hidden() {
    // The unused end of a segment made ahead of use (`--fsync always`).
    use eventstream_core::record::{recover, Recovery};
    let mut seen = 0;
    for line in vector_lines("log_records.jsonl") {
        let v: Value = serde_json::from_str(&line).unwrap();
        if v["type"] != "recovery" || v["expect"]["action"] != "none" {
            continue;
        }
        seen += 1;
        let base = segment_base(&v);
        let seg = unhex(v["segment_hex"].as_str().unwrap());
        let Recovery::Clean { next_offset } = recover(&seg, base) else {
            panic!("{line}");
        };
        for zeros in [1, 4095, 100_000] {
            let mut padded = seg.clone();
            padded.resize(seg.len() + zeros, 0);
            assert_eq!(
                recover(&padded, base),
                Recovery::Truncate {
                    to: seg.len(),
                    next_offset
                },
                "{zeros} zeros"
            );
        }
        // Zeros with the records after them: refused, as for any other bad
        // stretch before valid records.
        if seg.len() > SEGMENT_HEADER.len() {
            let mut later = SEGMENT_HEADER.to_vec();
            later.resize(SEGMENT_HEADER.len() + 4096, 0);
            later.extend_from_slice(&seg[SEGMENT_HEADER.len()..]);
            assert!(
                matches!(recover(&later, base), Recovery::Refuse { bad_at, valid_at, .. }
                    if bad_at == SEGMENT_HEADER.len() && valid_at == bad_at + 4096),
                "{line}"
            );
        }
    }
    assert!(seen >= 1);
}

/// The base offset a segment file name gives.
fn base_of(name: &str) -> u64 {
    name.trim_end_matches(".log").parse().unwrap()
}

#[test]
fn salvage_keeps_and_reports_what_every_repair_vector_says() {
    use eventstream_core::record::{salvage, Piece};
    let mut damaged_seen = 0;
    for line in vector_lines("repair.jsonl") {
        let v: Value = serde_json::from_str(&line).unwrap();
        let name = v["name"].as_str().unwrap();
        let segs = v["segments"].as_array().unwrap();
        if let Some(after) = v["start"].get("segments_after") {
            // A power cut's torn end: recovery's torn-tail rule cuts the
            // closed segment where the kept file ends.
            let torn = unhex(segs[0]["hex"].as_str().unwrap());
            let kept = unhex(after[0]["hex"].as_str().unwrap());
            let base = base_of(segs[0]["name"].as_str().unwrap());
            match eventstream_core::record::recover(&torn, base) {
                eventstream_core::record::Recovery::Truncate { to, .. } => {
                    assert_eq!(to, kept.len(), "{name}")
                }
                eventstream_core::record::Recovery::Clean { .. } => {
                    assert_eq!(torn, kept, "{name}")
                }
                other => panic!("{name}: {other:?}"),
            }
            continue;
        }
        let Some(repair) = v.get("repair") else {
            // A clean (or listed-gap) directory: nothing lost but listed gaps.
            for pair in segs.windows(2) {
                let bytes = unhex(pair[0]["hex"].as_str().unwrap());
                let (base, end) = (
                    base_of(pair[0]["name"].as_str().unwrap()),
                    base_of(pair[1]["name"].as_str().unwrap()),
                );
                let mut damaged = false;
                salvage(&bytes, base, end, |p| {
                    damaged |= matches!(p, Piece::Lost { bytes, .. } if bytes > 0)
                });
                assert!(!damaged, "{name}");
            }
            continue;
        };
        let mut files: Vec<(String, Vec<u8>)> = Vec::new();
        let mut lines: Vec<String> = Vec::new();
        for (i, s) in segs.iter().enumerate() {
            let file = s["name"].as_str().unwrap().to_string();
            let bytes = unhex(s["hex"].as_str().unwrap());
            let Some(next) = segs.get(i + 1) else {
                files.push((file, bytes));
                break;
            };
            let (base, end) = (base_of(&file), base_of(next["name"].as_str().unwrap()));
            let mut pieces = Vec::new();
            salvage(&bytes, base, end, |p| pieces.push(p));
            let damaged = pieces
                .iter()
                .any(|p| matches!(p, Piece::Lost { bytes, .. } if *bytes > 0));
            if !damaged {
                files.push((file.clone(), bytes.clone()));
            }
            damaged_seen += usize::from(damaged);
            let mut last_next = None;
            for p in pieces {
                match p {
                    Piece::Run {
                        at,
                        len,
                        first,
                        next,
                    } if damaged => {
                        match files.last_mut() {
                            Some((_, body)) if last_next == Some(first) => {
                                body.extend_from_slice(&bytes[at..at + len])
                            }
                            _ => files.push((
                                segment_name(first).as_str().to_string(),
                                [&SEGMENT_HEADER[..], &bytes[at..at + len]].concat(),
                            )),
                        }
                        last_next = Some(next);
                    }
                    Piece::Run { .. } => {}
                    Piece::Lost {
                        first,
                        end,
                        bytes: n,
                        ..
                    } => {
                        let named = if damaged {
                            file.clone()
                        } else {
                            segment_name(first).as_str().to_string()
                        };
                        lines.push(format!("lost {first} {end} {n} {named}"));
                    }
                }
            }
        }
        let want_files: Vec<(String, Vec<u8>)> = repair["segments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| {
                (
                    s["name"].as_str().unwrap().to_string(),
                    unhex(s["hex"].as_str().unwrap()),
                )
            })
            .collect();
        assert_eq!(files, want_files, "{name}");
        let want_lines: Vec<String> = repair["report_lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        assert_eq!(lines, want_lines, "{name}");
    }
    assert_eq!(damaged_seen, 3);
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 256, failure_persistence: None, ..Default::default() })]

    /// Any damage to a closed segment: the runs and lost ranges `salvage`
    /// reports cover `base..end` exactly, in order; every run is valid
    /// records back to back; it never panics.
    #[test]
    fn salvage_covers_the_segment_in_order(
        flips in proptest::collection::vec((0usize..4000, 1u8..=255), 0..6),
        cut in 0usize..4000,
        extra in 0u64..5,
    ) {
        use eventstream_core::record::{salvage, Piece, Record, SEGMENT_HEADER_LEN};
        let mut seg = SEGMENT_HEADER.to_vec();
        let base = 100u64;
        let mut builder_buf = vec![0u8; 4096];
        for i in 0..12u64 {
            let frame = {
                let repr = eventstream_core::wire::FrameRepr {
                    priority: eventstream_core::Priority::Medium,
                    flags: 0,
                    partition: 0,
                    event_id: i,
                    timestamp_ns: 1,
                    topic: b"t",
                    payload: &[i as u8; 100],
                };
                let mut out = vec![0u8; repr.encoded_len()];
                repr.encode(&mut out).unwrap();
                out
            };
            let mut b = RecordBuilder::new(&mut builder_buf, RecordKind::Single, Class::Transactional, 1).unwrap();
            b.push(&frame).unwrap();
            seg.extend_from_slice(b.finish(base + i).unwrap());
        }
        let end = base + 12 + extra;
        for (at, x) in flips {
            let at = at % seg.len();
            seg[at] ^= x;
        }
        seg.truncate(cut.max(1).min(seg.len()));
        let mut at_offset = base;
        let mut ok = true;
        salvage(&seg, base, end, |p| match p {
            Piece::Run { at, len, first, next } => {
                ok &= first == at_offset && next > first;
                let mut pos = at;
                let mut off = first;
                while pos < at + len {
                    match Record::parse(&seg[pos..at + len]) {
                        Ok(r) if r.offset() == off => {
                            pos += r.size();
                            off = r.next_offset();
                        }
                        _ => {
                            ok = false;
                            break;
                        }
                    }
                }
                ok &= off == next && pos >= SEGMENT_HEADER_LEN.min(seg.len());
                at_offset = next;
            }
            Piece::Lost { first, end: e, .. } => {
                ok &= first == at_offset && e >= first;
                at_offset = e;
            }
        });
        proptest::prop_assert!(ok);
        proptest::prop_assert_eq!(at_offset, end);
    }
}

/// Sets a stored frame's event id and seals it again.
fn set_id(raw: &mut [u8], id: u64) {
    let mut f = eventstream_core::wire::Frame::check(raw, eventstream_core::wire::Check::Layout)
        .expect("a frame");
    f.set_event_id(id);
    f.fill_crc();
}
