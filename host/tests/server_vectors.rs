//! The test vectors of PROTOCOL.md (tests/vectors, copied from the shared
//! generator) replayed against a real server over TCP: every frame's
//! outcome and ack, the records read back by `inspect`, and every recovery
//! case at start-up.

mod common;

use std::time::Duration;

use common::*;
use eventstream_core::record::segment_name;
use eventstream_core::wire::{Ack, Status, LEGACY_ID_BASE};
use eventstream_core::Priority;
use eventstream_tests::{unhex, vector_lines};
use serde_json::Value;

fn vectors(file: &str) -> Vec<Value> {
    vector_lines(file)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn config_args(v: &Value) -> Vec<String> {
    let cfg = &v["config"];
    let mut args = vec![
        "--max-frame".to_string(),
        cfg["max_frame"].as_u64().unwrap_or(512).to_string(),
        "--max-topic".to_string(),
        cfg["max_topic"].as_u64().unwrap_or(64).to_string(),
    ];
    if cfg["max_frame"].as_u64() == Some(65536) {
        args.extend(["--pool-events".to_string(), "256".to_string()]);
    }
    args
}

const PRE: u64 = 0x7EAD_0000_0000_0001;
const POST: u64 = 0x7EAD_0000_0000_0002;

fn status_name(s: Status) -> &'static str {
    s.name()
}

#[test]
fn every_v1_frame_vector_gets_its_outcome_and_ack_over_tcp() {
    let mut checked = 0;
    for v in vectors("frames.jsonl") {
        if v["dialect"] != "v1" {
            continue;
        }
        let name = v["name"].as_str().unwrap();
        let dir = TempDir::new("vec");
        let args = config_args(&v);
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let server = Server::start(&dir.data(), &args);
        let mut c = server.connect();
        // A valid frame first puts the connection in the v1 dialect.
        c.send(&frame(PRE, Priority::High, "pre", b"x", true));
        c.send(&unhex(v["hex"].as_str().unwrap()));
        let expect = &v["expect"];
        let outcome = expect["outcome"].as_str().unwrap();
        let answered = expect["answered"].as_bool().unwrap();
        if outcome != "fatal" {
            c.send(&frame(POST, Priority::High, "post", b"y", true));
        }
        let n = 1 + usize::from(answered) + usize::from(outcome != "fatal");
        let acks = if outcome == "fatal" {
            c.acks_until_close()
        } else {
            c.acks(n)
        };
        assert_eq!(acks.len(), n, "{name}: {acks:?}");
        let find = |id: u64| acks.iter().find(|a| a.event_id == id).copied();
        assert_eq!(find(PRE).map(|a| a.status), Some(Status::Stored), "{name}");
        match outcome {
            "accepted" => {
                let id = expect["event_id"].as_u64().unwrap();
                let events = wait_for_events(&dir.data(), 3);
                let e = events.iter().find(|e| e.event_id == id).unwrap();
                if answered {
                    let a = find(id).unwrap_or_else(|| panic!("{name}: no ack for {id}"));
                    assert_eq!(a.status, Status::Stored, "{name}");
                    assert_eq!(e.offset, a.offset, "{name}");
                } else {
                    assert!(find(id).is_none(), "{name}: answered without ACK");
                }
                let f = &expect["fields"];
                assert_eq!(e.topic, f["topic"].as_str().unwrap(), "{name}");
                assert_eq!(e.class, f["class"].as_str().unwrap(), "{name}");
                assert_eq!(e.payload_len, f["payload_len"].as_u64().unwrap(), "{name}");
            }
            "rejected" => {
                if answered {
                    let want = unhex(expect["ack_hex"].as_str().unwrap());
                    let a = acks
                        .iter()
                        .find(|a| a.status == Status::Rejected)
                        .unwrap_or_else(|| panic!("{name}: no REJECTED in {acks:?}"));
                    assert_eq!(a.encode().to_vec(), want, "{name}");
                }
                // The connection stays open: the frame after it is stored.
                assert_eq!(find(POST).map(|a| a.status), Some(Status::Stored), "{name}");
                let events = wait_for_events(&dir.data(), 2);
                assert_eq!(events.len(), 2, "{name}: only the valid frames stored");
            }
            "fatal" => {
                let want = unhex(expect["ack_hex"].as_str().unwrap());
                // The earlier frame's ack first, then FATAL, then close.
                assert_eq!(acks[0].event_id, PRE, "{name}");
                assert_eq!(acks[1].encode().to_vec(), want, "{name}");
                assert_eq!(acks[1].status, Status::Fatal);
            }
            other => panic!("{name}: unknown outcome {other}"),
        }
        checked += 1;
    }
    assert_eq!(checked, 61);
}

#[test]
fn the_v1_stream_vectors_give_their_acks_then_fatal() {
    for v in vectors("frames.jsonl") {
        if v["dialect"] != "v1-stream" {
            continue;
        }
        let name = v["name"].as_str().unwrap();
        let dir = TempDir::new("stream");
        let server = Server::start(&dir.data(), &[]);
        let mut c = server.connect();
        let bytes = unhex(v["hex"].as_str().unwrap());
        let expect = &v["expect"];
        if let Some(want) = expect["acks_in_any_order"].as_array() {
            // One byte per write.
            for b in &bytes {
                c.send(std::slice::from_ref(b));
            }
            let acks = c.acks(want.len());
            for w in want {
                let id = w["event_id"].as_u64().unwrap();
                let a = acks.iter().find(|a| a.event_id == id).unwrap();
                assert_eq!(
                    status_name(a.status),
                    w["status"].as_str().unwrap(),
                    "{name}"
                );
            }
            continue;
        }
        c.send(&bytes);
        let acks = c.acks_until_close();
        let before = expect["acks_in_any_order_before_fatal"].as_array().unwrap();
        assert_eq!(acks.len(), before.len() + 1, "{name}: {acks:?}");
        for w in before {
            let id = w["event_id"].as_u64().unwrap();
            let a = acks[..before.len()]
                .iter()
                .find(|a| a.event_id == id)
                .unwrap_or_else(|| panic!("{name}: no ack for {id}"));
            assert_eq!(
                status_name(a.status),
                w["status"].as_str().unwrap(),
                "{name}"
            );
            if let Some(r) = w["reason"].as_str() {
                assert_eq!(a.reason.name(), r);
            }
        }
        let last: &Ack = acks.last().unwrap();
        assert_eq!(last.status, Status::Fatal);
        assert_eq!(
            last.reason.name(),
            expect["then"]["reason"].as_str().unwrap()
        );
        let stored: Vec<u64> = expect["stored_event_ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|x| x.as_u64().unwrap())
            .collect();
        let events = wait_for_events(&dir.data(), stored.len());
        let mut ids: Vec<u64> = events.iter().map(|e| e.event_id).collect();
        ids.sort_unstable();
        assert_eq!(ids, stored, "{name}");
    }
}

#[test]
fn every_legacy_and_dialect_vector_behaves_over_tcp() {
    let dir = TempDir::new("legacyvec");
    let server = Server::start(&dir.data(), &[]);
    let mut expected_events = 0usize;
    let mut checked = 0;
    for (i, v) in vectors("frames.jsonl").into_iter().enumerate() {
        let dialect = v["dialect"].as_str().unwrap();
        if dialect != "legacy" && dialect != "detect" {
            continue;
        }
        let name = v["name"].as_str().unwrap();
        let bytes = unhex(v["hex"].as_str().unwrap());
        let marker_topic = format!("marker-{i}");
        let marker = legacy_frame(3, &marker_topic, b"m");
        let mut c = server.connect();
        let expect = &v["expect"];
        if dialect == "detect" {
            match name {
                "dialect/ESC1 selects v1" => {
                    let f = frame(77_000 + i as u64, Priority::High, "t", b"x", true);
                    assert_eq!(&f[..4], &bytes[..]);
                    c.send(&f);
                    assert_eq!(c.acks(1)[0].status, Status::Stored, "{name}");
                    expected_events += 1;
                }
                "dialect/ESCA selects legacy" => {
                    // As a legacy length it is far past max_frame: closed
                    // without any ack (a v1 reading would answer FATAL).
                    c.send(&bytes);
                    let acks = c.acks_until_close();
                    assert!(acks.is_empty(), "{name}");
                }
                "dialect/legacy body_len 0x0000001A" => {
                    let mut f = bytes.clone();
                    f.extend(&legacy_frame(3, "twenty-one-byte-topic", b"ok")[4..]);
                    assert_eq!(f.len(), 4 + 0x1A);
                    c.send(&f);
                    c.send(&marker);
                    expected_events += 2;
                }
                "dialect/keep-alive first selects legacy" => {
                    c.send(&bytes);
                    c.send(&marker);
                    expected_events += 1;
                }
                other => panic!("unknown detect vector {other}"),
            }
        } else {
            c.send(&bytes);
            c.send(&marker);
            match expect["outcome"].as_str().unwrap() {
                "stored" => expected_events += 2,
                "skipped" => expected_events += 1,
                "close" => {
                    assert!(c.closed_within(Duration::from_secs(5)), "{name}");
                }
                other => panic!("{name}: {other}"),
            }
        }
        let events = wait_for_events(&dir.data(), expected_events);
        assert_eq!(events.len(), expected_events, "{name}");
        for e in events.iter().filter(|e| e.legacy) {
            assert_eq!(e.event_id, LEGACY_ID_BASE + e.offset, "{name}");
        }
        if expect["outcome"] == "stored" {
            let sa = &expect["stored_as"];
            let topic = sa["topic"].as_str().unwrap();
            let e = events
                .iter()
                .rev()
                .find(|e| e.topic == topic)
                .unwrap_or_else(|| panic!("{name}: not stored"));
            assert!(e.legacy);
            assert_eq!(e.payload_len, sa["payload_len"].as_u64().unwrap(), "{name}");
            assert_eq!(e.class, sa["class"].as_str().unwrap(), "{name}");
            assert_eq!(e.json["partition"], 0);
        }
        // No acks in the legacy dialect.
        if dialect == "legacy" && expect["outcome"] != "close" {
            assert!(!c.closed_within(Duration::from_millis(50)), "{name}");
        }
        checked += 1;
    }
    assert_eq!(checked, 29);
}

#[test]
fn inspect_reads_every_record_vector_as_it_says() {
    let mut checked = 0;
    for v in vectors("log_records.jsonl") {
        if v["type"] != "record" {
            continue;
        }
        let name = v["name"].as_str().unwrap();
        let f = &v["fields"];
        let dir = TempDir::new("rec");
        std::fs::create_dir_all(dir.data()).unwrap();
        let mut seg = eventstream_core::record::SEGMENT_HEADER.to_vec();
        seg.extend(unhex(v["hex"].as_str().unwrap()));
        let offset = f["offset"].as_u64().unwrap();
        std::fs::write(dir.data().join(segment_name(offset).as_str()), &seg).unwrap();
        let events = inspect_events(&dir.data());
        let frames = f["frames"].as_array().unwrap();
        assert_eq!(events.len(), frames.len(), "{name}");
        for (e, want) in events.iter().zip(frames) {
            assert_eq!(e.json, want["inspect_json"], "{name}");
        }
        let (ok, out, err) = inspect(&dir.data(), &["--verify"]);
        assert!(ok, "{name}: {err}");
        assert!(out.contains("1 records"), "{name}: {out}");
        checked += 1;
    }
    assert!(checked >= 5);
}

#[test]
fn every_recovery_vector_behaves_at_start_up() {
    for v in vectors("log_records.jsonl") {
        if v["type"] != "recovery" {
            continue;
        }
        let name = v["name"].as_str().unwrap();
        let expect = &v["expect"];
        let dir = TempDir::new("recovery");
        std::fs::create_dir_all(dir.data()).unwrap();
        let seg = dir.data().join(v["segment_name"].as_str().unwrap());
        let bytes = unhex(v["segment_hex"].as_str().unwrap());
        std::fs::write(&seg, &bytes).unwrap();
        let next_offset_after = |server: &Server| {
            let mut c = server.connect();
            c.send(&frame(1 << 60, Priority::High, "probe", b"x", true));
            let a = c.acks(1)[0];
            assert_eq!(a.status, Status::Stored, "{name}");
            a.offset
        };
        let len = || std::fs::metadata(&seg).unwrap().len();
        match expect["action"].as_str().unwrap() {
            "none" => {
                let server = Server::start(&dir.data(), &[]);
                assert_eq!(len(), bytes.len() as u64, "{name}");
                assert_eq!(
                    next_offset_after(&server),
                    expect["next_offset"].as_u64().unwrap()
                );
            }
            "truncate" => {
                let server = Server::start(&dir.data(), &[]);
                assert_eq!(len(), expect["truncate_to"].as_u64().unwrap(), "{name}");
                assert!(server.stderr().contains("torn tail"), "{name}");
                assert_eq!(
                    next_offset_after(&server),
                    expect["next_offset"].as_u64().unwrap()
                );
            }
            "rewrite_empty" => {
                let server = Server::start(&dir.data(), &[]);
                assert_eq!(len(), 16, "{name}");
                assert_eq!(
                    next_offset_after(&server),
                    expect["next_offset"].as_u64().unwrap()
                );
            }
            "refuse" => {
                let bad = expect["bad_record_at"].as_u64().unwrap();
                let err = Server::try_start(&dir.data(), &[]).err().expect(name);
                assert!(!err.status.success(), "{name}");
                assert!(
                    err.stderr
                        .contains(&format!("bad record at position {bad}")),
                    "{name}: {}",
                    err.stderr
                );
                assert_eq!(
                    len(),
                    bytes.len() as u64,
                    "{name}: refused start changed the file"
                );
                let repair = &expect["repair"];
                let server = Server::start(&dir.data(), &["--repair"]);
                assert_eq!(len(), repair["truncate_to"].as_u64().unwrap(), "{name}");
                let log = server.stderr();
                let dropped = format!(
                    "dropped {} bytes, offsets {}",
                    repair["dropped_bytes"].as_u64().unwrap(),
                    repair["dropped_offsets"].as_str().unwrap()
                );
                assert!(log.contains(&dropped), "{name}: {log}");
                assert_eq!(
                    next_offset_after(&server),
                    repair["next_offset"].as_u64().unwrap()
                );
            }
            other => panic!("{name}: {other}"),
        }
    }
}

/// The non-comment lines of `damaged/report`.
fn report_lines(data: &std::path::Path) -> Vec<String> {
    std::fs::read_to_string(data.join("damaged").join("report"))
        .unwrap_or_default()
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

/// The segment files of a data dir, by name, with their bytes.
fn segment_files(data: &std::path::Path) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<(String, Vec<u8>)> = std::fs::read_dir(data)
        .unwrap()
        .filter_map(|e| {
            let e = e.ok()?;
            let name = e.file_name().into_string().ok()?;
            name.ends_with(".log")
                .then(|| (name, std::fs::read(e.path()).unwrap()))
        })
        .collect();
    out.sort();
    out
}

fn files_of(list: &Value) -> Vec<(String, Vec<u8>)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|s| {
            (
                s["name"].as_str().unwrap().to_string(),
                unhex(s["hex"].as_str().unwrap()),
            )
        })
        .collect()
}

/// Starts on `data`, checks the next offset and the lost-offsets gauge,
/// and that `inspect --verify` accepts the gaps.
fn starts_with(data: &std::path::Path, name: &str, next: u64, lost: u64, gaps: &[(u64, u64)]) {
    let server = Server::start(data, &[]);
    assert_eq!(
        server.metric("eventstream_log_lost_offsets"),
        lost as f64,
        "{name}"
    );
    let mut c = server.connect();
    c.send(&frame(1 << 60, Priority::High, "probe", b"x", true));
    let a = c.acks(1)[0];
    assert_eq!((a.status, a.offset), (Status::Stored, next), "{name}");
    drop(server);
    let (ok, out, err) = inspect(data, &["--verify"]);
    assert!(ok, "{name}: inspect --verify: {err}");
    for (a, b) in gaps {
        assert!(
            out.contains(&format!("gap:       {a}..{b}")),
            "{name}: {out}"
        );
    }
}

#[test]
fn every_repair_vector_behaves_at_start_up() {
    let mut seen = 0;
    for v in vectors("repair.jsonl") {
        seen += 1;
        let name = v["name"].as_str().unwrap();
        let dir = TempDir::new("repair");
        let data = dir.data();
        std::fs::create_dir_all(&data).unwrap();
        for (file, bytes) in files_of(&v["segments"]) {
            std::fs::write(data.join(file), bytes).unwrap();
        }
        if let Some(report) = v["report"].as_str() {
            std::fs::create_dir_all(data.join("damaged")).unwrap();
            std::fs::write(data.join("damaged").join("report"), report).unwrap();
        }
        let start = &v["start"];
        if start["result"] == "ok" {
            let gaps: Vec<(u64, u64)> = start["gaps"]
                .as_array()
                .unwrap()
                .iter()
                .map(|g| (g[0].as_u64().unwrap(), g[1].as_u64().unwrap()))
                .collect();
            let lost = gaps.iter().map(|g| g.1 - g.0).sum();
            if let Some(after) = start.get("segments_after") {
                drop(Server::start(&data, &[]));
                assert_eq!(segment_files(&data), files_of(after), "{name}");
            }
            starts_with(
                &data,
                name,
                start["next_offset"].as_u64().unwrap(),
                lost,
                &gaps,
            );
            continue;
        }
        let before = segment_files(&data);
        let err = Server::try_start(&data, &[]).err().expect(name);
        assert!(!err.status.success(), "{name}");
        let line = err
            .stderr
            .lines()
            .find(|l| l.contains("refusing to start"))
            .unwrap_or_else(|| panic!("{name}: {}", err.stderr));
        for want in start["error_contains"].as_array().unwrap() {
            assert!(line.contains(want.as_str().unwrap()), "{name}: {line}");
        }
        assert_eq!(
            segment_files(&data),
            before,
            "{name}: a refused start changed files"
        );
        let repair = &v["repair"];
        let listed_before = report_lines(&data);
        let server = Server::start(&data, &["--repair"]);
        assert!(server.stderr().contains("--repair: lost"), "{name}");
        drop(server);
        assert_eq!(
            segment_files(&data),
            files_of(&repair["segments"]),
            "{name}: segment files after the repair"
        );
        for moved in repair["damaged"].as_array().unwrap() {
            let moved = moved.as_str().unwrap();
            let original = before.iter().find(|(n, _)| n == moved).unwrap();
            assert_eq!(
                std::fs::read(data.join("damaged").join(moved)).unwrap(),
                original.1,
                "{name}: the damaged file is kept as it was"
            );
        }
        let added: Vec<String> = report_lines(&data)[listed_before.len()..].to_vec();
        let want: Vec<String> = repair["report_lines"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l.as_str().unwrap().to_string())
            .collect();
        assert_eq!(added, want, "{name}");
        // From now on the listed gaps are accepted without --repair; the
        // ones inside the log show in inspect (one before the first
        // retained offset is like retention's).
        let files = files_of(&repair["segments"]);
        let first_base: u64 = files[0].0.trim_end_matches(".log").parse().unwrap();
        let listed: Vec<(u64, u64)> = want
            .iter()
            .map(|l| {
                let f: Vec<&str> = l.split(' ').collect();
                (f[1].parse().unwrap(), f[2].parse().unwrap())
            })
            .collect();
        // Each offset counts once, however often a repair listed it.
        let mut all: std::collections::BTreeSet<u64> = std::collections::BTreeSet::new();
        for l in listed_before.iter().chain(&want) {
            let f: Vec<&str> = l.split(' ').collect();
            all.extend(f[1].parse::<u64>().unwrap()..f[2].parse::<u64>().unwrap());
        }
        let lost = all.len() as u64;
        let inside: Vec<(u64, u64)> = listed
            .into_iter()
            .filter(|g| g.0 < g.1 && g.0 >= first_base)
            .collect();
        starts_with(
            &data,
            name,
            repair["next_offset"].as_u64().unwrap(),
            lost,
            &inside,
        );
    }
    assert_eq!(seen, 9);
}
