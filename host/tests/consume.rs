//! Read sessions (PROTOCOL.md section 7) through the client library's
//! Consumer and the `consume` command, against a real server on 127.0.0.1:
//! everything stored comes back exactly as `inspect` lists it; filters,
//! range errors and malformed requests; a group left below the retained
//! log; `produce` and `consume` end to end.

mod common;

use std::io::Read;

use common::read::*;
use common::*;
use eventstream_client::{Class, Consumer, ConsumerOptions, Error, StartAt};
use eventstream_core::wire::read::{ReadRequest, Start};
use eventstream_core::wire::Reason;

#[test]
fn consuming_from_earliest_returns_exactly_what_inspect_lists() {
    let dir = TempDir::new("consume-all");
    let server = Server::start(&dir.data(), &["--batch-max-age", "5ms"]);
    let stored = produce(server.addr, 50_000, 11, |i| format!("t{}", i % 7));
    let listed = wait_for_events(&dir.data(), stored as usize);
    assert_eq!(listed.len() as u64, stored);
    let mut c = Consumer::connect(server.addr, opts(StartAt::Earliest)).unwrap();
    assert_eq!(c.info().start, 0);
    let got = read_all(&mut c);
    assert_eq!(got.len(), listed.len());
    let payloads = log_events(&dir.data());
    for (m, l) in got.iter().zip(&listed) {
        assert_eq!(m.offset, l.offset);
        assert_eq!(m.id, l.event_id);
        assert_eq!(String::from_utf8_lossy(&m.topic), l.topic);
        assert_eq!(format!("{:?}", m.class).to_lowercase(), l.class);
        assert_eq!(m.payload, payloads[&m.offset].1);
    }
    assert_eq!(c.position(), stored);
}

#[test]
fn filters_return_exactly_the_matching_events_and_bad_requests_get_their_reason() {
    let dir = TempDir::new("consume-filters");
    let server = Server::start(&dir.data(), &["--batch-max-age", "5ms"]);
    let topics = ["orders/eu", "orders/us", "clicks", "ord"];
    let stored = produce(server.addr, 6_000, 12, |i| {
        topics[(i % 4) as usize].to_string()
    });
    let listed = wait_for_events(&dir.data(), stored as usize);
    for (prefix, classes) in [
        ("orders/", vec![]),
        ("", vec![Class::Batch]),
        ("orders/e", vec![Class::Realtime, Class::Transactional]),
        ("ord", vec![Class::Transactional]),
        ("nothing", vec![]),
    ] {
        let want: Vec<(u64, u64)> = listed
            .iter()
            .filter(|e| e.topic.starts_with(prefix))
            .filter(|e| {
                classes.is_empty()
                    || classes
                        .iter()
                        .any(|c| format!("{c:?}").to_lowercase() == e.class)
            })
            .map(|e| (e.offset, e.event_id))
            .collect();
        let mut c = Consumer::connect(
            server.addr,
            ConsumerOptions {
                topic_prefix: prefix.into(),
                classes: classes.clone(),
                window: 64 << 10,
                ..ConsumerOptions::default()
            },
        )
        .unwrap();
        let got: Vec<(u64, u64)> = read_all(&mut c).iter().map(|m| (m.offset, m.id)).collect();
        assert_eq!(got, want, "prefix {prefix:?} classes {classes:?}");
        assert_eq!(c.position(), stored, "END reaches the end offset");
    }
    // Past the end, and malformed requests.
    match Consumer::connect(server.addr, opts(StartAt::Offset(stored + 1))) {
        Err(Error::Refused {
            reason: Reason::OutOfRange,
            first: 0,
            end,
        }) => assert_eq!(end, stored),
        other => panic!("{:?}", other.map(|c| *c.info())),
    }
    let good = request(&base_request());
    let mut bad_crc = good.clone();
    *bad_crc.last_mut().unwrap() ^= 1;
    let mut reserved = good.clone();
    reserved[10] = 2;
    eventstream_core::wire::seal(&mut reserved);
    let no_group = request(&ReadRequest {
        start: Start::Committed,
        ..base_request()
    });
    let reserved_group = request(&ReadRequest {
        group: b"_forwarder",
        ..base_request()
    });
    let offset_with_earliest = request(&ReadRequest {
        offset: 5,
        ..base_request()
    });
    for (what, bytes) in [
        ("bad crc", bad_crc),
        ("reserved flag", reserved),
        ("COMMITTED without a group", no_group),
        ("a server-reserved group", reserved_group),
        ("an offset with EARLIEST", offset_with_earliest),
    ] {
        let (mut s, a) = raw_session(server.addr, &bytes);
        assert_eq!(a.reason, Some(Reason::BadRequest), "{what}");
        assert_eq!((a.start, a.end), (u64::MAX, stored), "{what}");
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
        assert!(
            rest.is_empty(),
            "{what}: the connection closes after the answer"
        );
    }
    // Each error is counted.
    assert!(server.metric("eventstream_reader_errors_total{reason=\"bad_request\"}") >= 5.0);
    assert!(server.metric("eventstream_reader_errors_total{reason=\"out_of_range\"}") >= 1.0);
    assert_eq!(server.metric("eventstream_log_end_offset"), stored as f64);
}

#[test]
fn offsets_below_the_first_retained_one_are_out_of_range() {
    let dir = TempDir::new("consume-retained");
    let server = Server::start(
        &dir.data(),
        &["--segment-bytes", "64KiB", "--retention-bytes", "256KiB"],
    );
    let stored = produce(server.addr, 6_000, 13, |_| "r".into());
    let first = log_start_past(&server, 0);
    match Consumer::connect(server.addr, opts(StartAt::Offset(first - 1))) {
        Err(Error::Refused {
            reason: Reason::OutOfRange,
            first: f,
            end,
        }) => assert_eq!((f, end), (first, stored)),
        other => panic!("{:?}", other.map(|c| *c.info())),
    }
    // From the first retained offset: everything from there, in order.
    let mut c = Consumer::connect(server.addr, opts(StartAt::Earliest)).unwrap();
    assert_eq!(c.info().start, first);
    let got = read_all(&mut c);
    assert_eq!(got.len() as u64, stored - first);
    assert!(got
        .iter()
        .enumerate()
        .all(|(i, m)| m.offset == first + i as u64));
}

#[test]
fn produce_and_consume_commands_end_to_end_with_a_non_utf8_payload() {
    let dir = TempDir::new("consume-cli");
    let server = Server::start(&dir.data(), &[]);
    let target = server.addr.to_string();
    let input: &[u8] = b"hello\n\xff\xfe raw\n{\"quoted\": \"x\"}\n";
    let (ok, _, err) = run_bin(
        &[
            "produce",
            "--target",
            &target,
            "--topic",
            "cli/t",
            "--id",
            "line-number",
            "--id-base",
            "100",
        ],
        input,
    );
    assert!(ok, "{err}");
    wait_for_events(&dir.data(), 3);
    let (ok, out, err) = run_bin(&["consume", "--target", &target, "--json"], b"");
    assert!(ok, "{err}");
    let lines: Vec<serde_json::Value> = String::from_utf8(out)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let listed = inspect_events(&dir.data());
    assert_eq!(lines.len(), 3);
    for (got, want) in lines.iter().zip(&listed) {
        // The keys of inspect --json, same values, plus the payload.
        for (k, v) in want.json.as_object().unwrap() {
            assert_eq!(&got[k], v, "key {k}");
        }
    }
    assert_eq!(lines[0]["payload"], "hello");
    assert_eq!(lines[1]["payload_b64"], "//4gcmF3");
    assert!(lines[1].get("payload").is_none());
    assert_eq!(lines[2]["payload"], "{\"quoted\": \"x\"}");
    assert_eq!(lines[1]["event_id"], 102);
    // Plain lines, a class filter, a group with commits, a limit.
    let (ok, out, _) = run_bin(&["consume", "--target", &target, "--limit", "1"], b"");
    assert!(ok);
    assert_eq!(out, b"hello\n");
    let group = [
        "consume",
        "--target",
        &target,
        "--group",
        "cli",
        "--from",
        "committed",
        "--commit-every",
        "1",
        "--limit",
        "2",
    ];
    let (ok, out, err) = run_bin(&group, b"");
    assert!(ok, "{err}");
    assert_eq!(out.iter().filter(|&&b| b == b'\n').count(), 2);
    let (ok, out, _) = run_bin(&group, b"");
    assert!(ok);
    assert_eq!(
        out, b"{\"quoted\": \"x\"}\n",
        "the group resumes at its commit"
    );
    let (ok, out, _) = run_bin(&["consume", "--target", &target, "--class", "batch"], b"");
    assert!(ok);
    assert!(out.is_empty());
    // Bad input is a non-zero exit with a reason.
    let (ok, _, err) = run_bin(&["consume", "--target", &target, "--from", "999"], b"");
    assert!(!ok && err.contains("OUT_OF_RANGE"), "{err}");
    let (ok, _, err) = run_bin(
        &["consume", "--target", &target, "--from", "committed"],
        b"",
    );
    assert!(!ok && err.contains("--group"), "{err}");
    let (ok, _, err) = run_bin(&["consume", "--target", &target, "--class", "nope"], b"");
    assert!(!ok && err.contains("nope"), "{err}");
}

#[test]
fn a_group_left_below_the_retained_log_is_out_of_range_and_reset_chooses_where_to_go() {
    let dir = TempDir::new("consume-reset");
    let server = Server::start(
        &dir.data(),
        &["--segment-bytes", "64KiB", "--retention-bytes", "256KiB"],
    );
    let target = server.addr.to_string();
    produce(server.addr, 100, 16, |_| "r".into());
    wait_for_events(&dir.data(), 90);
    let mut c = Consumer::connect(
        server.addr,
        ConsumerOptions {
            from: StartAt::Committed,
            group: Some("slow".into()),
            ..ConsumerOptions::default()
        },
    )
    .unwrap();
    for _ in 0..3 {
        c.next().unwrap().unwrap();
    }
    c.commit(3).unwrap();
    // seek: a new session of the group, from an offset.
    c.seek(StartAt::Offset(10)).unwrap();
    assert_eq!(c.next().unwrap().unwrap().offset, 10);
    drop(c);
    let mut c2 = Consumer::connect(
        server.addr,
        ConsumerOptions {
            group: Some("slow2".into()),
            ..ConsumerOptions::default()
        },
    )
    .unwrap();
    c2.commit(3).unwrap();
    drop(c2);
    produce(server.addr, 6_000, 17, |_| "r".into());
    let first = log_start_past(&server, 3);
    let end = server.metric("eventstream_log_end_offset") as u64;
    let group = [
        "consume",
        "--target",
        &target,
        "--group",
        "slow",
        "--from",
        "committed",
        "--json",
        "--limit",
        "1",
    ];
    let (ok, _, err) = run_bin(&group, b"");
    assert!(
        !ok && err.contains("OUT_OF_RANGE"),
        "default --reset error: {err}"
    );
    let (ok, out, err) = run_bin(&[&group[..], &["--reset", "earliest"]].concat(), b"");
    assert!(ok, "{err}");
    let v: serde_json::Value = serde_json::from_slice(&out).unwrap();
    assert_eq!(v["offset"], first, "earliest: the first retained offset");
    // --reset latest: only new events, so none without --follow.
    let slow2 = [
        "consume",
        "--target",
        &target,
        "--group",
        "slow2",
        "--from",
        "committed",
        "--reset",
        "latest",
    ];
    let (ok, out, err) = run_bin(&slow2, b"");
    assert!(ok && out.is_empty(), "{err}");
    // The earliest run committed after its one event.
    assert_eq!(
        server.metric("eventstream_consumer_group_committed_offset{group=\"slow\"}"),
        (first + 1) as f64
    );
    assert!(end >= first);
}
