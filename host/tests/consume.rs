//! Read sessions (PROTOCOL.md section 7) against a real server on
//! 127.0.0.1, through the client library's Consumer and raw frames:
//! everything stored comes back exactly as `inspect` lists it; filters,
//! range errors, malformed requests, commits across a kill -9, fencing,
//! many followers with credit, and visibility under `--fsync always`.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use eventstream_client::{
    Class, Consumer, ConsumerOptions, Error, Event, Outcome, Priority, Producer, StartAt,
};
use eventstream_core::splitmix::SplitMix64;
use eventstream_core::wire::read::{
    ChunkHeader, ChunkKind, ReadRequest, SessionAnswer, SessionFrame, Start, CHUNK_HEADER_LEN,
    SESSION_ANSWER_LEN,
};
use eventstream_core::wire::Reason;

/// Produces `n` events of every class (one in ten resends an earlier id);
/// returns how many were answered STORED.
fn produce(addr: std::net::SocketAddr, n: u64, seed: u64, topic_of: impl Fn(u64) -> String) -> u64 {
    let mut p = Producer::connect(addr).unwrap();
    let mut rng = SplitMix64(seed);
    let mut sent: Vec<(u64, Priority, String, Vec<u8>)> = Vec::new();
    let mut stored = 0;
    for i in 0..n {
        let (id, priority, topic, payload) = if i % 10 == 9 && !sent.is_empty() {
            sent[(rng.next_u64() % sent.len() as u64) as usize].clone()
        } else {
            let e = (
                rng.next_u64(),
                PRIORITIES[(i % 5) as usize],
                topic_of(i),
                format!("event {i} {}", "x".repeat((i % 200) as usize)).into_bytes(),
            );
            sent.push(e.clone());
            e
        };
        p.send(&Event {
            topic: &topic,
            partition: (i % 3) as u32,
            priority,
            id,
            payload: &payload,
        })
        .unwrap();
        for a in p.take_acked().unwrap() {
            stored += matches!(a.outcome, Outcome::Stored(_)) as u64;
        }
    }
    for a in p.flush().unwrap() {
        stored += matches!(a.outcome, Outcome::Stored(_)) as u64;
    }
    stored
}

fn opts(from: StartAt) -> ConsumerOptions {
    ConsumerOptions {
        from,
        ..ConsumerOptions::default()
    }
}

fn read_all(c: &mut Consumer) -> Vec<eventstream_client::Message> {
    let mut out = Vec::new();
    while let Some(m) = c.next().unwrap() {
        out.push(m);
    }
    out
}

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

/// A raw read session: the request's bytes sent, the answer read.
fn raw_session(addr: std::net::SocketAddr, req: &[u8]) -> (TcpStream, SessionAnswer) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut a = [0u8; SESSION_ANSWER_LEN];
    s.read_exact(&mut a).unwrap();
    (s, SessionAnswer::decode(&a).unwrap())
}

fn request(r: &ReadRequest<'_>) -> Vec<u8> {
    let mut b = vec![0u8; r.encoded_len()];
    r.encode(&mut b).unwrap();
    b
}

/// A following session from the earliest offset, granted no credit yet.
fn follower_without_credit(addr: std::net::SocketAddr) -> (TcpStream, SessionAnswer) {
    raw_session(
        addr,
        &request(&ReadRequest {
            follow: true,
            credit: 0,
            ..base_request()
        }),
    )
}

fn base_request() -> ReadRequest<'static> {
    ReadRequest {
        start: Start::Earliest,
        follow: false,
        classes: eventstream_core::wire::read::ClassSet::ALL,
        offset: 0,
        credit: 1 << 20,
        group: b"",
        prefix: b"",
    }
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
    let first = settles(1.0, || {
        (server.metric("eventstream_log_start_offset") > 0.0) as u64 as f64
    });
    assert_eq!(first, 1.0, "retention deleted segments");
    let first = server.metric("eventstream_log_start_offset") as u64;
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
fn a_commit_survives_kill_9_and_a_second_session_fences_the_first() {
    let dir = TempDir::new("consume-commit");
    let server = Server::start(&dir.data(), &[]);
    let stored = produce(server.addr, 3_000, 14, |_| "c".into());
    wait_for_events(&dir.data(), stored as usize);
    let group = ConsumerOptions {
        from: StartAt::Committed,
        group: Some("billing".into()),
        ..ConsumerOptions::default()
    };
    let mut c = Consumer::connect(server.addr, group.clone()).unwrap();
    assert_eq!((c.info().start, c.info().committed), (0, None));
    for _ in 0..1234 {
        c.next().unwrap().unwrap();
    }
    c.commit(c.position()).unwrap();
    assert_eq!(c.committed(), Some(1234));
    assert_eq!(
        server.metric("eventstream_consumer_group_committed_offset{group=\"billing\"}"),
        1234.0
    );
    assert_eq!(
        server.metric("eventstream_consumer_group_lag_events{group=\"billing\"}"),
        (stored - 1234) as f64
    );
    // A commit past the visible end closes the session BAD_REQUEST.
    drop(c);
    server.kill();
    let server = Server::start(&dir.data(), &[]);
    let following = ConsumerOptions {
        follow: true,
        ..group.clone()
    };
    let mut c = Consumer::connect(server.addr, following).unwrap();
    assert_eq!(c.info().committed, Some(1234));
    assert_eq!(c.next().unwrap().unwrap().offset, 1234);
    // A second session of the group: the first gets CLOSING FENCED.
    let mut c2 = Consumer::connect(server.addr, group.clone()).unwrap();
    assert_eq!(c2.info().start, 1234);
    let fenced = loop {
        match c.next() {
            Ok(Some(_)) => continue,
            other => break other,
        }
    };
    assert!(
        matches!(fenced, Err(Error::Closed(Reason::Fenced))),
        "{fenced:?}"
    );
    assert!(server.metric("eventstream_reader_errors_total{reason=\"fenced\"}") >= 1.0);
    // A commit beyond the end is refused with CLOSING BAD_REQUEST.
    assert!(matches!(
        c2.commit(stored + 10),
        Err(Error::Closed(Reason::BadRequest))
    ));
}

/// A follower that checks its own credit: reads chunk by chunk, grants in
/// 16 KiB steps, and asserts the server never sends past the grant.
fn credit_checking_follower(addr: std::net::SocketAddr, until: Arc<AtomicU64>) -> u64 {
    let (mut s, a) = follower_without_credit(addr);
    assert_eq!(a.reason, None);
    let grant = |s: &mut TcpStream, n: u32| {
        let mut b = [0u8; 16];
        SessionFrame::Credit(n).encode(&mut b).unwrap();
        s.write_all(&b).unwrap();
    };
    let step = a.max_record.max(16 << 10);
    grant(&mut s, step);
    let mut granted = u64::from(step);
    let mut received = 0u64;
    let mut next = 0u64;
    loop {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        if h.kind != ChunkKind::Records {
            if next >= until.load(Ordering::Acquire) && until.load(Ordering::Acquire) > 0 {
                return received;
            }
            continue;
        }
        let mut body = vec![0u8; h.bytes as usize];
        s.read_exact(&mut body).unwrap();
        received += u64::from(h.bytes);
        assert!(
            received <= granted,
            "sent {received} past a grant of {granted}"
        );
        assert_eq!(h.a, next, "records in order, none missing");
        next = h.b;
        if granted - received < u64::from(step) {
            grant(&mut s, step);
            granted += u64::from(step);
        }
        let u = until.load(Ordering::Acquire);
        if u > 0 && next >= u {
            return received;
        }
    }
}

#[test]
fn a_hundred_followers_get_every_event_and_a_stalled_one_stalls_only_itself() {
    let dir = TempDir::new("consume-followers");
    let server = Server::start(&dir.data(), &["--batch-max-age", "5ms"]);
    let addr = server.addr;
    // The stalled reader: credit 0, never grants.
    let (mut stalled, a) = follower_without_credit(addr);
    assert_eq!(a.reason, None);
    let until = Arc::new(AtomicU64::new(0));
    let followers: Vec<_> = (0..99)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Consumer::connect(
                    addr,
                    ConsumerOptions {
                        follow: true,
                        window: 32 << 10,
                        ..ConsumerOptions::default()
                    },
                )
                .unwrap();
                let mut ids = Vec::new();
                loop {
                    let m = c.next().unwrap().unwrap();
                    assert_eq!(m.offset, ids.len() as u64, "follower {i}: in order");
                    ids.push(m.id);
                    if ids.len() == 20_000 {
                        return ids;
                    }
                }
            })
        })
        .collect();
    let checker = {
        let until = until.clone();
        std::thread::spawn(move || credit_checking_follower(addr, until))
    };
    let t0 = Instant::now();
    // Two producers, 10,000 realtime events each (never deduplicated).
    let producers: Vec<_> = (0..2u64)
        .map(|p| {
            std::thread::spawn(move || {
                let mut pr = Producer::connect(addr).unwrap();
                for i in 0..10_000u64 {
                    pr.send(&Event {
                        topic: "f",
                        partition: 0,
                        priority: Priority::High,
                        id: p << 32 | i,
                        payload: b"follow me",
                    })
                    .unwrap();
                }
                pr.flush().unwrap().len()
            })
        })
        .collect();
    let acked: usize = producers.into_iter().map(|p| p.join().unwrap()).sum();
    assert_eq!(acked, 20_000, "the producers were not held up");
    until.store(20_000, Ordering::Release);
    let listed: Vec<u64> = wait_for_events(&dir.data(), 20_000)
        .iter()
        .map(|e| e.event_id)
        .collect();
    for f in followers {
        assert_eq!(f.join().unwrap(), listed);
    }
    assert!(checker.join().unwrap() > 0);
    // The stalled reader got only heartbeats (no records) meanwhile.
    stalled
        .set_read_timeout(Some(Duration::from_millis(1500)))
        .unwrap();
    let mut h = [0u8; CHUNK_HEADER_LEN];
    let mut beats = 0;
    let t1 = Instant::now();
    while t1.elapsed() < Duration::from_millis(2500) {
        stalled.read_exact(&mut h).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        assert_eq!(h.kind, ChunkKind::Heartbeat);
        assert_eq!((h.a, h.b), (20_000, 0), "it would deliver offset 0 next");
        beats += 1;
    }
    assert!(beats >= 2, "an idle session gets a heartbeat every second");
    assert_eq!(
        settles(1.0, || server.metric("eventstream_reader_sessions")),
        1.0
    );
    eprintln!("100 followers and 20,000 events in {:?}", t0.elapsed());
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

/// Reads chunks until CLOSING; returns the record chunks' (a, b) and the
/// CLOSING's reason, granting `grant` bytes first.
fn read_until_closing(s: &mut TcpStream, grant: u32) -> (Vec<(u64, u64)>, Reason) {
    if grant > 0 {
        let mut b = [0u8; 16];
        SessionFrame::Credit(grant).encode(&mut b).unwrap();
        s.write_all(&b).unwrap();
    }
    let mut runs = Vec::new();
    loop {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        match h.kind {
            ChunkKind::Records => {
                let mut body = vec![0u8; h.bytes as usize];
                s.read_exact(&mut body).unwrap();
                runs.push((h.a, h.b));
            }
            ChunkKind::Closing => return (runs, h.reason),
            _ => {}
        }
    }
}

#[test]
fn a_reader_keeps_a_deleted_segment_within_the_cap_and_is_closed_past_it() {
    for (hold, tag) in [("1GiB", "within"), ("1", "past")] {
        let dir = TempDir::new(&format!("consume-hold-{tag}"));
        let server = Server::start(
            &dir.data(),
            &[
                "--segment-bytes",
                "64KiB",
                "--retention-bytes",
                "256KiB",
                "--reader-hold-bytes",
                hold,
            ],
        );
        // Inside the first segment, with no credit yet.
        let (mut s, a) = follower_without_credit(server.addr);
        assert_eq!((a.reason, a.start), (None, 0));
        produce(server.addr, 6_000, 15, |_| "h".into());
        assert_eq!(
            settles(
                1.0,
                || (server.metric("eventstream_log_start_offset") > 0.0) as u8 as f64
            ),
            1.0
        );
        let (runs, reason) = read_until_closing(&mut s, if tag == "within" { 1 << 20 } else { 0 });
        assert_eq!(reason, Reason::OutOfRange, "{tag}");
        if tag == "within" {
            // The whole deleted segment, from 0 and in order, then the
            // closing where the next one is gone too.
            assert_eq!(runs.first().map(|r| r.0), Some(0));
            assert!(runs.windows(2).all(|w| w[0].1 == w[1].0));
            assert!(runs.last().unwrap().1 > 100);
        } else {
            assert!(runs.is_empty(), "past the cap: closed before sending");
        }
    }
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
    assert_eq!(
        settles(
            1.0,
            || (server.metric("eventstream_log_start_offset") > 3.0) as u8 as f64
        ),
        1.0
    );
    let first = server.metric("eventstream_log_start_offset") as u64;
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

#[test]
fn max_record_bytes_covers_earlier_runs_and_groups_are_capped() {
    let dir = TempDir::new("consume-limits");
    let big = Server::start(
        &dir.data(),
        &["--max-frame", "4096", "--batch-max-events", "100"],
    );
    let a = Consumer::connect(big.addr, opts(StartAt::Earliest)).unwrap();
    assert_eq!(a.info().max_record, 28 + 100 * 4096);
    drop(a);
    big.kill();
    // A later run with smaller limits still announces the larger records
    // the log may hold; groups past --max-groups are refused.
    let small = Server::start(&dir.data(), &["--max-groups", "2"]);
    let group = |g: &str| {
        Consumer::connect(
            small.addr,
            ConsumerOptions {
                group: Some(g.into()),
                ..ConsumerOptions::default()
            },
        )
    };
    let g1 = group("one").unwrap();
    assert_eq!(g1.info().max_record, 28 + 100 * 4096);
    let _g2 = group("two").unwrap();
    assert!(matches!(
        group("three"),
        Err(Error::Refused {
            reason: Reason::BadRequest,
            ..
        })
    ));
    // An existing group is not new.
    drop(g1);
    assert!(group("one").is_ok());
}

#[test]
fn an_idle_group_is_forgotten_after_the_expiry() {
    let dir = TempDir::new("consume-expiry");
    let server = Server::start(&dir.data(), &["--max-groups", "1", "--group-expiry", "1s"]);
    produce(server.addr, 50, 18, |_| "e".into());
    let group = |g: &str| {
        Consumer::connect(
            server.addr,
            ConsumerOptions {
                group: Some(g.into()),
                ..ConsumerOptions::default()
            },
        )
    };
    let mut a = group("a").unwrap();
    a.commit(5).unwrap();
    drop(a);
    // Within the expiry, "a" still holds the only place.
    assert!(matches!(
        group("b"),
        Err(Error::Refused {
            reason: Reason::BadRequest,
            ..
        })
    ));
    std::thread::sleep(Duration::from_millis(1600));
    // Past it, with no session and no commit, "a" is forgotten.
    let b = group("b").unwrap();
    assert_eq!(b.info().committed, None);
    assert!(!server
        .metrics_text()
        .contains("eventstream_consumer_group_committed_offset{group=\"a\"}"));
}

#[test]
fn a_request_that_never_arrives_whole_is_closed_after_ten_seconds() {
    let dir = TempDir::new("consume-timeout");
    let server = Server::start(&dir.data(), &[]);
    let mut s = TcpStream::connect(server.addr).unwrap();
    // The magic and half the length: a read session that stalls.
    s.write_all(b"ESCR\x20\x00").unwrap();
    let t0 = Instant::now();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    let waited = t0.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(15),
        "{waited:?}"
    );
    assert_eq!(
        settles(0.0, || server.metric("eventstream_reader_sessions")),
        0.0
    );
}
