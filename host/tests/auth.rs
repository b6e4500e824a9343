//! HELLO and token authentication (PROTOCOL.md section 8) against a real
//! server on 127.0.0.1: every `hello` vector over TCP, tokens with their
//! rights (`--auth`), refusals for a wrong token, no HELLO, a forbidden
//! topic, read prefix or group, and legacy clients with and without
//! `--legacy-unauthenticated`; allowed traffic beside them unaffected.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::time::Duration;

use common::read::*;
use common::*;
use eventstream_core::wire::read::{Hello, ReadRequest, SessionAnswer, SESSION_ANSWER_LEN};
use eventstream_core::wire::{Ack, Reason, Status};
use eventstream_core::Priority;
use eventstream_tests::{unhex, vector_lines};

/// HELLO's "accepted" answer (section 8).
const ACCEPTED: &str = concat!("4553434101000000", "0000000000000000", "ffffffffffffffff");

fn hello(token: &[u8]) -> Vec<u8> {
    let h = Hello { token };
    let mut b = vec![0u8; h.encoded_len()];
    h.encode(&mut b).unwrap();
    b
}

fn sha256_hex(token: &[u8]) -> String {
    eventstream_host::auth::sha256(token)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// An auth file: alice produces to `orders.` and `audit`, reads `orders.`
/// with the group `billing`; ops may do everything.
fn auth_file(dir: &Path) -> String {
    let path = dir.join("tokens");
    std::fs::write(
        &path,
        format!(
            "# test tokens\ntoken alice {} produce=orders.,audit read=orders. groups=billing\ntoken ops {} produce=* read=* groups=*\n",
            sha256_hex(b"alice-secret"),
            sha256_hex(b"ops-secret")
        ),
    )
    .unwrap();
    path.to_str().unwrap().to_string()
}

/// Connects, sends `bytes`, reads the one ack and whether the connection
/// closed right after.
fn answer_and_close(server: &Server, bytes: &[u8]) -> (Ack, bool) {
    let mut c = server.connect();
    c.send(bytes);
    let ack = c.acks(1)[0];
    (ack, c.closed_within(Duration::from_secs(5)))
}

/// A read session opened with `first` (a HELLO, or nothing) in front of
/// the request `r`: the HELLO's answer checked, the session answer read.
fn session(server: &Server, first: &[u8], r: ReadRequest<'_>) -> (TcpStream, SessionAnswer) {
    let mut s = TcpStream::connect(server.addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut bytes = first.to_vec();
    bytes.extend_from_slice(&request(&r));
    s.write_all(&bytes).unwrap();
    if !first.is_empty() {
        let mut a = [0u8; 24];
        s.read_exact(&mut a).unwrap();
        assert_eq!(a.to_vec(), unhex(ACCEPTED));
    }
    let mut a = [0u8; SESSION_ANSWER_LEN];
    s.read_exact(&mut a).unwrap();
    let answer = SessionAnswer::decode(&a).unwrap();
    (s, answer)
}

fn ev(id: u64, topic: &str) -> Vec<u8> {
    frame(id, Priority::Medium, topic, b"payload", true)
}

#[test]
fn every_hello_vector_over_tcp_with_authentication_off() {
    let dir = TempDir::new("hello-vectors");
    let server = Server::start(&dir.data(), &[]);
    let mut n = 0;
    for line in vector_lines("read_frames.jsonl") {
        let v: serde_json::Value = serde_json::from_str(&line).unwrap();
        if v["type"] != "hello" {
            continue;
        }
        n += 1;
        let bytes = unhex(v["hex"].as_str().unwrap());
        let mut c = server.connect();
        c.send(&bytes);
        if v["expect"] == "ok" {
            // Any well-formed token is accepted with authentication off;
            // v1 frames follow on the same connection.
            let a = c.acks(1)[0];
            assert_eq!(a.encode().to_vec(), unhex(ACCEPTED), "{}", v["name"]);
            c.send(&ev(n, "t"));
            let a = c.acks(1)[0];
            assert_eq!((a.status, a.event_id), (Status::Stored, n), "{}", v["name"]);
        } else {
            let a = c.acks(1)[0];
            assert_eq!(a, Ack::fatal(Reason::Unauthorized), "{}", v["name"]);
            assert!(c.closed_within(Duration::from_secs(5)), "{}", v["name"]);
        }
    }
    assert!(n >= 9, "hello vectors: {n}");
    // A HELLO split at every byte, and a frame pipelined behind it.
    let h = hello(b"split-token");
    for cut in 1..h.len() {
        let mut c = server.connect();
        c.send(&h[..cut]);
        std::thread::sleep(Duration::from_millis(2));
        let mut rest = h[cut..].to_vec();
        rest.extend_from_slice(&ev(1000 + cut as u64, "t"));
        c.send(&rest);
        let acks = c.acks(2);
        assert_eq!(acks[0].encode().to_vec(), unhex(ACCEPTED), "cut {cut}");
        assert_eq!(acks[1].status, Status::Stored, "cut {cut}");
    }
    // After a HELLO, a legacy frame is FATAL BAD_MAGIC.
    let mut bytes = hello(b"x");
    bytes.extend_from_slice(&legacy_frame(1, "t", b"p"));
    let mut c = server.connect();
    c.send(&bytes);
    let acks = c.acks(2);
    assert_eq!(acks[1], Ack::fatal(Reason::BadMagic));
}

#[test]
fn tokens_grant_their_rights_and_refuse_the_rest() {
    let dir = TempDir::new("auth");
    let file = auth_file(dir.path());
    let server = Server::start(&dir.data(), &["--auth", &file, "--batch-max-age", "5ms"]);
    // An allowed producer beside every refusal.
    let mut good = server.connect();
    let mut h = hello(b"ops-secret");
    h.extend_from_slice(&ev(1, "any.topic"));
    good.send(&h);
    let acks = good.acks(2);
    assert_eq!(acks[1].status, Status::Stored);
    let mut next_good = 2;
    let mut check_good = |good: &mut Client| {
        good.send(&ev(next_good, "any.topic"));
        assert_eq!(good.acks(1)[0].status, Status::Stored);
        next_good += 1;
    };

    // A wrong token, and no HELLO: FATAL UNAUTHORIZED, then closed.
    let (a, closed) = answer_and_close(&server, &hello(b"alice-secreT"));
    assert!(a == Ack::fatal(Reason::Unauthorized) && closed);
    check_good(&mut good);
    let (a, closed) = answer_and_close(&server, &ev(100, "orders.eu"));
    assert!(a == Ack::fatal(Reason::Unauthorized) && closed);
    check_good(&mut good);

    // alice: her topics are stored, another is REJECTED FORBIDDEN and the
    // connection stays.
    let mut alice = server.connect();
    let mut bytes = hello(b"alice-secret");
    bytes.extend_from_slice(&ev(200, "orders.eu"));
    bytes.extend_from_slice(&ev(201, "payments"));
    bytes.extend_from_slice(&ev(202, "audit"));
    alice.send(&bytes);
    let mut acks = alice.acks(4);
    assert_eq!(acks[0].encode().to_vec(), unhex(ACCEPTED));
    // A refusal is answered at once, the stored ones once written.
    acks.sort_by_key(|a| a.event_id);
    assert_eq!(acks[1].status, Status::Stored);
    assert_eq!(acks[2], Ack::rejected(201, Reason::Forbidden));
    assert_eq!(acks[3].status, Status::Stored);
    // A forbidden id is not remembered: sent again to an allowed topic by
    // ops it is stored.
    good.send(&ev(201, "payments"));
    assert_eq!(good.acks(1)[0].status, Status::Stored);
    check_good(&mut good);

    // Legacy clients without --legacy-unauthenticated: closed, unstored.
    let mut legacy = server.connect();
    legacy.send(&legacy_frame(1, "orders.eu", b"old client"));
    assert!(legacy.closed_within(Duration::from_secs(5)));
    check_good(&mut good);

    // Read sessions: no HELLO, a prefix or a group outside the rights.
    let read = |first: &[u8], r: ReadRequest<'_>| session(&server, first, r).1;
    let a = read(b"", base_request());
    assert_eq!(a.reason, Some(Reason::Unauthorized));
    let alice_hello = hello(b"alice-secret");
    let a = read(&alice_hello, base_request());
    assert_eq!(a.reason, Some(Reason::Forbidden), "every topic");
    let a = read(
        &alice_hello,
        ReadRequest {
            prefix: b"orders.",
            group: b"other",
            ..base_request()
        },
    );
    assert_eq!(a.reason, Some(Reason::Forbidden), "another group");
    let a = read(
        &alice_hello,
        ReadRequest {
            prefix: b"orders.eu",
            group: b"billing",
            ..base_request()
        },
    );
    assert_eq!(a.reason, None, "her topics and group");
    check_good(&mut good);

    let m = |r: &str| server.metric(&format!("eventstream_rejected_total{{reason=\"{r}\"}}"));
    assert_eq!(m("unauthorized"), 3.0, "wrong token, no HELLO, legacy");
    assert_eq!(m("forbidden"), 1.0);
    assert_eq!(
        server.metric("eventstream_reader_errors_total{reason=\"unauthorized\"}"),
        1.0
    );
    assert_eq!(
        server.metric("eventstream_reader_errors_total{reason=\"forbidden\"}"),
        2.0
    );
}

#[test]
fn legacy_clients_may_produce_to_their_prefix_only() {
    let dir = TempDir::new("auth-legacy");
    let file = auth_file(dir.path());
    let server = Server::start(
        &dir.data(),
        &["--auth", &file, "--legacy-unauthenticated", "legacy."],
    );
    let mut c = server.connect();
    c.send(&legacy_frame(1, "legacy.sensor", b"kept"));
    c.send(&legacy_frame(1, "orders.eu", b"refused"));
    c.send(&legacy_frame(1, "legacy.sensor", b"kept too"));
    let events = wait_for_events(&dir.data(), 2);
    assert_eq!(events.len(), 2);
    assert!(events
        .iter()
        .all(|e| e.topic == "legacy.sensor" && e.legacy));
    assert_eq!(
        server.metric("eventstream_rejected_total{reason=\"forbidden\"}"),
        1.0
    );
    // The flag needs --auth.
    let f = Server::try_start(&dir.path().join("d2"), &["--legacy-unauthenticated", "x"])
        .err()
        .expect("started");
    assert_ne!(f.status.code(), Some(0));
    assert!(f.stderr.contains("--auth"), "{}", f.stderr);
}

#[test]
fn the_client_library_and_the_commands_carry_a_token() {
    use eventstream_client::{Consumer, ConsumerOptions, Error, Event, Options, Outcome, Producer};
    let dir = TempDir::new("auth-clients");
    let file = auth_file(dir.path());
    let server = Server::start(&dir.data(), &["--auth", &file]);
    let opts = |token: &[u8]| Options {
        token: Some(token.to_vec()),
        ..Options::default()
    };
    // A refused token is an error at once (no retries).
    match Producer::with_options(server.addr, opts(b"nope")) {
        Err(Error::Fatal(Reason::Unauthorized)) => {}
        Err(e) => panic!("{e}"),
        Ok(_) => panic!("a wrong token was let in"),
    }
    let mut p = Producer::with_options(server.addr, opts(b"alice-secret")).unwrap();
    for (id, topic) in [(1, "orders.eu"), (2, "payments"), (3, "audit")] {
        p.send(&Event {
            topic,
            partition: 0,
            priority: Priority::High,
            id,
            payload: b"x",
        })
        .unwrap();
    }
    let mut outcomes: Vec<(u64, Outcome)> = p
        .flush()
        .unwrap()
        .into_iter()
        .map(|a| (a.id, a.outcome))
        .collect();
    outcomes.sort_by_key(|o| o.0);
    assert!(matches!(outcomes[0].1, Outcome::Stored(_)));
    assert!(matches!(
        outcomes[1].1,
        Outcome::Rejected(Reason::Forbidden)
    ));
    assert!(matches!(outcomes[2].1, Outcome::Stored(_)));
    // The Consumer: her prefix and group.
    let mut c = Consumer::connect(
        server.addr,
        ConsumerOptions {
            topic_prefix: "orders.".into(),
            group: Some("billing".into()),
            token: Some(b"alice-secret".to_vec()),
            ..ConsumerOptions::default()
        },
    )
    .unwrap();
    let m = c.next().unwrap().unwrap();
    assert_eq!(m.id, 1);
    assert!(c.next().unwrap().is_none());
    match Consumer::connect(server.addr, ConsumerOptions::default()) {
        Err(Error::Refused { reason, .. }) => assert_eq!(reason, Reason::Unauthorized),
        other => panic!("{:?}", other.err()),
    }
    // The commands' --token-file.
    let tokens = dir.path().join("alice.token");
    std::fs::write(&tokens, "alice-secret\n").unwrap();
    let t = tokens.to_str().unwrap();
    let addr = server.addr.to_string();
    let (ok, _, err) = run_bin(
        &[
            "produce",
            "--target",
            &addr,
            "--topic",
            "orders.cli",
            "--token-file",
            t,
        ],
        b"one\ntwo\n",
    );
    assert!(ok, "{err}");
    let (ok, out, err) = run_bin(
        &[
            "consume",
            "--target",
            &addr,
            "--topic",
            "orders.cli",
            "--token-file",
            t,
        ],
        b"",
    );
    assert!(ok, "{err}");
    assert_eq!(String::from_utf8(out).unwrap(), "one\ntwo\n");
    let ops = dir.path().join("ops.token");
    std::fs::write(&ops, "ops-secret\n").unwrap();
    let (ok, _, err) = run_bin(
        &[
            "load",
            "--target",
            &addr,
            "--events",
            "2000",
            "--ack",
            "--token-file",
            ops.to_str().unwrap(),
        ],
        b"",
    );
    assert!(ok, "{err}");
    let (ok, _, err) = run_bin(&["load", "--target", &addr, "--events", "10", "--ack"], b"");
    assert!(!ok, "load without a token");
    let _ = err;
}

#[test]
fn sighup_reloads_the_tokens_and_closes_what_a_revoked_one_opened() {
    let dir = TempDir::new("auth-reload");
    let file = auth_file(dir.path());
    let server = Server::start(&dir.data(), &["--auth", &file]);
    let mut alice = server.connect();
    let mut bytes = hello(b"alice-secret");
    bytes.extend_from_slice(&ev(1, "orders.eu"));
    alice.send(&bytes);
    assert_eq!(alice.acks(2)[1].status, Status::Stored);
    // Her follower.
    let (mut reader, a) = session(
        &server,
        &hello(b"alice-secret"),
        ReadRequest {
            prefix: b"orders.",
            follow: true,
            ..base_request()
        },
    );
    assert_eq!(a.reason, None);
    let mut ops = server.connect();
    let mut bytes = hello(b"ops-secret");
    bytes.extend_from_slice(&ev(2, "x"));
    ops.send(&bytes);
    assert_eq!(ops.acks(2)[1].status, Status::Stored);
    // ops follows every topic.
    let (mut ops_reader, a) = session(
        &server,
        &hello(b"ops-secret"),
        ReadRequest {
            follow: true,
            ..base_request()
        },
    );
    assert_eq!(a.reason, None);

    // A file that does not load changes nothing.
    std::fs::write(&file, "token broken\n").unwrap();
    // SAFETY: kill(2) on the server child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
    let t0 = std::time::Instant::now();
    while !server.stderr().contains("the tokens stay as they were") {
        assert!(t0.elapsed() < WAIT, "{}", server.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
    alice.send(&ev(3, "orders.eu"));
    assert_eq!(alice.acks(1)[0].status, Status::Stored);

    // alice revoked: her producer gets FATAL UNAUTHORIZED, her reader
    // CLOSING UNAUTHORIZED; ops may read only `x.` now: its follower of
    // every topic gets CLOSING FORBIDDEN; ops goes on producing; alice's
    // token opens nothing new.
    std::fs::write(
        &file,
        format!(
            "token ops {} produce=* read=x. groups=*\n",
            sha256_hex(b"ops-secret")
        ),
    )
    .unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
    assert_eq!(alice.acks(1)[0], Ack::fatal(Reason::Unauthorized));
    assert!(alice.closed_within(Duration::from_secs(5)));
    let (_, reason) = read_until_closing(&mut reader, 1 << 20);
    assert_eq!(reason, Reason::Unauthorized);
    let (_, reason) = read_until_closing(&mut ops_reader, 1 << 20);
    assert_eq!(reason, Reason::Forbidden);
    assert!(server.stderr().contains("--auth reloaded, 1 tokens"));
    ops.send(&ev(4, "x"));
    assert_eq!(ops.acks(1)[0].status, Status::Stored);
    let (a, closed) = answer_and_close(&server, &hello(b"alice-secret"));
    assert!(a == Ack::fatal(Reason::Unauthorized) && closed);
}

#[test]
fn a_port_beyond_loopback_is_refused_without_insecure() {
    let dir = TempDir::new("auth-exposed");
    for args in [
        &["--listen", "0.0.0.0:0"][..],
        &["--metrics", "0.0.0.0:0"][..],
        &["--listen", "0.0.0.0:0", "--auth", &auth_file(dir.path())][..],
    ] {
        let f = Server::try_start(&dir.data(), args)
            .err()
            .unwrap_or_else(|| panic!("{args:?} started"));
        assert_eq!(f.status.code(), Some(1), "{args:?}");
        let lines: Vec<&str> = f.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{args:?}: {}", f.stderr);
        assert!(lines[0].contains("--insecure"), "{}", lines[0]);
    }
}

#[test]
fn metrics_may_ask_for_a_bearer_token() {
    let dir = TempDir::new("auth-metrics");
    let token = dir.path().join("metrics.token");
    std::fs::write(&token, "scrape-secret\n").unwrap();
    let server = Server::start(
        &dir.data(),
        &["--metrics-token-file", token.to_str().unwrap()],
    );
    let get = |auth: Option<&str>| -> String {
        let mut s = TcpStream::connect(server.metrics).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let header = auth.map_or(String::new(), |a| format!("Authorization: {a}\r\n"));
        write!(
            s,
            "GET /metrics HTTP/1.1\r\nHost: x\r\n{header}Connection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        s.read_to_string(&mut text).unwrap();
        text
    };
    for bad in [None, Some("Bearer nope"), Some("Basic scrape-secret")] {
        let t = get(bad);
        assert!(t.starts_with("HTTP/1.1 401 "), "{bad:?}: {t}");
        assert!(t.contains("WWW-Authenticate: Bearer"), "{t}");
        assert!(!t.contains("eventstream_"), "no figures without the token");
    }
    let t = get(Some("Bearer scrape-secret"));
    assert!(t.starts_with("HTTP/1.1 200 "), "{t}");
    assert!(
        t.contains("eventstream_metrics_requests_total{code=\"401\"} 3"),
        "{t}"
    );
}
