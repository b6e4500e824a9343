//! Read sessions (PROTOCOL.md section 7) at the protocol's edges, against
//! a real server on 127.0.0.1: commits across a kill -9 and fencing; a
//! hundred followers with credit beside a stalled one; a reader inside a
//! segment retention deleted; the max record bound across runs and the
//! group cap; group expiry; a request that never arrives whole.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::read::*;
use common::*;
use eventstream_client::{Consumer, ConsumerOptions, Error, Event, Priority, Producer, StartAt};
use eventstream_core::wire::read::{ChunkHeader, ChunkKind, SessionFrame, CHUNK_HEADER_LEN};
use eventstream_core::wire::Reason;

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
        log_start_past(&server, 0);
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
