//! TLS (`--tls-listen`) against a real server on 127.0.0.1, with
//! certificates made at test time: producers, readers and legacy clients
//! over TLS, with and without client certificates; refusals (a wrong CA,
//! expired certificates, a client certificate from another CA, none at
//! all), each counted by cause; hostile clients on the TLS port (a slow
//! handshake, plaintext, garbage) beside a producer that keeps going;
//! SIGHUP with a new certificate and a revoked token; the safe defaults.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use common::tls::{client, serve_args, Ca};
use common::*;
use eventstream_client::{Consumer, ConsumerOptions, Event, Options, Outcome, Producer, StartAt};
use eventstream_core::Priority;

fn opts(tls: eventstream_client::TlsClient) -> Options {
    Options {
        tls: Some(tls),
        reconnect: false,
        ..Options::default()
    }
}

/// Sends `n` events with ids from `base` through `p`; the offsets acked.
fn produce(p: &mut Producer, base: u64, n: u64, topic: &str) -> Vec<u64> {
    let payload = vec![0x5au8; 200];
    for i in 0..n {
        p.send(&Event {
            topic,
            partition: 0,
            priority: Priority::Medium,
            id: base + i,
            payload: &payload,
        })
        .unwrap();
    }
    p.flush()
        .unwrap()
        .into_iter()
        .map(|a| match a.outcome {
            Outcome::Stored(o) => o,
            other => panic!("{}: {other:?}", a.id),
        })
        .collect()
}

fn args<'a>(v: &'a [String], more: &[&'a str]) -> Vec<&'a str> {
    v.iter()
        .map(String::as_str)
        .chain(more.iter().copied())
        .collect()
}

fn failures(server: &Server, cause: &str) -> f64 {
    server.metric(&format!(
        "eventstream_tls_handshake_failures_total{{cause=\"{cause}\"}}"
    ))
}

/// A connection's handshake with `tls` fails (the error as text).
fn refused(server: &Server, tls: &eventstream_client::TlsClient) -> String {
    let tcp = TcpStream::connect(server.tls_addr.unwrap()).unwrap();
    tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    match tls.handshake(tcp) {
        Ok((mut recv, mut send)) => {
            // TLS 1.3: a client certificate is checked after the client's
            // handshake ends; the refusal comes as an alert on the first
            // read.
            let _ = send.write_all(&frame(1, Priority::Medium, "t", b"x", true));
            let mut b = [0u8; 24];
            match recv.read(&mut b) {
                Ok(0) => "closed".into(),
                Ok(n) => panic!("answered {n} bytes"),
                Err(e) => e.to_string(),
            }
        }
        Err(e) => e.to_string(),
    }
}

#[test]
fn producers_readers_and_legacy_clients_work_over_tls() {
    let dir = TempDir::new("tls-basic");
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server("server");
    let tls = serve_args(&leaf);
    let server = Server::start(&dir.data(), &args(&tls, &["--batch-max-age", "5ms"]));
    let tls_addr = server.tls_addr.unwrap();
    let mut p = Producer::with_options(tls_addr, opts(client(&ca, None))).unwrap();
    let offsets = produce(&mut p, 1, 20_000, "orders");
    assert_eq!(offsets.len(), 20_000);
    // The plaintext port beside it still serves.
    let mut plain = server.connect();
    plain.send(&frame(900_000, Priority::Medium, "plain", b"x", true));
    assert_eq!(
        plain.acks(1)[0].status,
        eventstream_core::wire::Status::Stored
    );
    // Legacy frames over TLS (no acks in that dialect).
    let (r, mut s) = client(&ca, None)
        .handshake(TcpStream::connect(tls_addr).unwrap())
        .unwrap();
    for _ in 0..50 {
        s.write_all(&legacy_frame(1, "legacy", b"old client"))
            .unwrap();
    }
    let events = wait_for_events(&dir.data(), 20_051);
    assert_eq!(events.iter().filter(|e| e.topic == "legacy").count(), 50);
    // Read back over TLS: every event, as the log holds it.
    let mut c = Consumer::connect(
        tls_addr,
        ConsumerOptions {
            from: StartAt::Earliest,
            tls: Some(client(&ca, None)),
            ..ConsumerOptions::default()
        },
    )
    .unwrap();
    // Not read for a while: the server fills the socket and waits for
    // room, its last records sealed but not yet written.
    std::thread::sleep(Duration::from_secs(1));
    let mut n = 0;
    while let Some(m) = c.next().unwrap() {
        assert_eq!(m.offset, events[n].offset);
        assert_eq!(m.id, events[n].event_id);
        n += 1;
    }
    assert_eq!(n, events.len());
    assert!(server.metric("eventstream_tls_handshakes_total") >= 3.0);
    drop(p);
    drop((r, s));
    drop(c);
    assert_eq!(
        settles(0.0, || server.metric("eventstream_tls_connections")),
        0.0
    );
}

/// Waits for `want` in the server's stderr.
fn wait_stderr(server: &Server, want: &str) {
    let t0 = Instant::now();
    while !server.stderr().contains(want) {
        assert!(t0.elapsed() < WAIT, "no {want:?} in: {}", server.stderr());
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn client_certificates_and_every_refusal_counted_by_cause() {
    let dir = TempDir::new("tls-refusals");
    let ca = Ca::new(dir.path(), "ca");
    let clients_ca = Ca::new(dir.path(), "clients-ca");
    let other_ca = Ca::new(dir.path(), "other-ca");
    let leaf = ca.server("server");
    let good = clients_ca.client("good-client");
    let expired = clients_ca.expired_client("expired-client");
    let stranger = other_ca.client("stranger");
    let tls = serve_args(&leaf);
    let server = Server::start(
        &dir.data(),
        &args(&tls, &["--tls-client-ca", clients_ca.pem.to_str().unwrap()]),
    );
    let tls_addr = server.tls_addr.unwrap();
    // A producer with a good certificate, kept open throughout.
    let mut p = Producer::with_options(tls_addr, opts(client(&ca, Some(&good)))).unwrap();
    assert_eq!(produce(&mut p, 1, 1000, "mtls").len(), 1000);
    // No certificate, an expired one, one from another CA: refused.
    let e = refused(&server, &client(&ca, None));
    assert!(!e.is_empty());
    assert_eq!(settles(1.0, || failures(&server, "no_client_cert")), 1.0);
    refused(&server, &client(&ca, Some(&expired)));
    refused(&server, &client(&ca, Some(&stranger)));
    assert_eq!(settles(2.0, || failures(&server, "client_cert")), 2.0);
    // The client trusting another CA refuses the server.
    let e = refused(&server, &client(&other_ca, Some(&good)));
    assert!(e.contains("UnknownIssuer"), "{e}");
    assert_eq!(settles(1.0, || failures(&server, "peer_alert")), 1.0);
    // The producer beside them went on; a reader with a certificate reads
    // all of it.
    assert_eq!(produce(&mut p, 1001, 1000, "mtls").len(), 1000);
    let mut c = Consumer::connect(
        tls_addr,
        ConsumerOptions {
            from: StartAt::Earliest,
            tls: Some(client(&ca, Some(&good))),
            ..ConsumerOptions::default()
        },
    )
    .unwrap();
    let mut ids = Vec::new();
    while let Some(m) = c.next().unwrap() {
        ids.push(m.id);
    }
    assert_eq!(ids, (1..=2000).collect::<Vec<u64>>());
    assert_eq!(server.metric("eventstream_tls_handshakes_total"), 2.0);

    // An expired server certificate: the client refuses it, the server
    // counts the client's alert.
    let dir2 = TempDir::new("tls-expired-server");
    let old = ca.expired_server("old-server");
    let server2 = Server::start(&dir2.data(), &args(&serve_args(&old), &[]));
    let e = refused(&server2, &client(&ca, None));
    assert!(e.contains("expired"), "{e}");
    assert_eq!(settles(1.0, || failures(&server2, "peer_alert")), 1.0);
}

#[test]
fn hostile_clients_on_the_tls_port_do_not_stop_a_producer() {
    let dir = TempDir::new("tls-hostile");
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server("server");
    let tls = serve_args(&leaf);
    let server = Server::start(&dir.data(), &args(&tls, &["--frame-timeout", "1s"]));
    let tls_addr = server.tls_addr.unwrap();
    // A producer at full speed throughout.
    let tls_client = client(&ca, None);
    let producer = std::thread::spawn(move || {
        let mut p = Producer::with_options(tls_addr, opts(tls_client)).unwrap();
        let mut stored = 0;
        for round in 0..20 {
            stored += produce(&mut p, 1 + round * 10_000, 10_000, "steady").len();
        }
        stored
    });
    // A slow handshake: the first bytes of a ClientHello, then nothing.
    let mut slow = TcpStream::connect(tls_addr).unwrap();
    slow.write_all(&[0x16, 0x03, 0x01, 0x01]).unwrap();
    // A plaintext producer on the TLS port.
    let mut plain = TcpStream::connect(tls_addr).unwrap();
    plain
        .write_all(&frame(7, Priority::Medium, "t", b"x", true))
        .unwrap();
    plain.set_read_timeout(Some(WAIT)).unwrap();
    let mut rest = Vec::new();
    // Closed (after rustls' alert at most): no ack ever.
    let _ = plain.read_to_end(&mut rest);
    assert!(rest.len() < 24 || rest[..4] != *b"ESCA", "{rest:?}");
    // 1,000 garbage handshakes, 50 at a time: half bytes that are not TLS
    // at all, half records that claim to be a handshake.
    let mut seed = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    for batch in 0..20 {
        let mut open = Vec::new();
        for i in 0..50 {
            let mut s =
                TcpStream::connect(tls_addr).unwrap_or_else(|e| panic!("{e}: {}", server.stderr()));
            let mut bytes: Vec<u8> = (0..64).map(|_| next() as u8).collect();
            if (batch * 50 + i) % 2 == 0 {
                bytes[0] = 0xff;
            } else {
                bytes[..5].copy_from_slice(&[0x16, 0x03, 0x01, 0x00, 59]);
            }
            s.write_all(&bytes).unwrap();
            open.push(s);
        }
        for mut s in open {
            s.set_read_timeout(Some(WAIT)).unwrap();
            let mut sink = Vec::new();
            let _ = s.read_to_end(&mut sink);
        }
    }
    assert_eq!(producer.join().unwrap(), 200_000);
    // The slow handshake is closed after --frame-timeout (and so are
    // garbage records that announce a longer handshake message).
    slow.set_read_timeout(Some(WAIT)).unwrap();
    let mut sink = Vec::new();
    let _ = slow.read_to_end(&mut sink);
    assert!(failures(&server, "timeout") >= 1.0);
    // Every hostile connection counted once, by its cause.
    let all = || -> f64 {
        ["timeout", "malformed", "protocol", "incompatible", "closed"]
            .iter()
            .map(|c| failures(&server, c))
            .sum()
    };
    assert_eq!(settles(1002.0, all), 1002.0, "{}", server.metrics_text());
    assert!(failures(&server, "malformed") >= 500.0);
    assert_eq!(server.metric("eventstream_tls_connections"), 0.0);
    assert_eq!(wait_for_events(&dir.data(), 200_000).len(), 200_000);
}

#[test]
fn sighup_brings_a_new_certificate_and_closes_a_revoked_tokens_connection() {
    let dir = TempDir::new("tls-reload");
    let ca1 = Ca::new(dir.path(), "ca1");
    let ca2 = Ca::new(dir.path(), "ca2");
    let first = ca1.server("server1");
    let second = ca2.server("server2");
    // The files the server reads: the first certificate, at one path.
    let cert = dir.path().join("live.crt");
    let key = dir.path().join("live.key");
    std::fs::copy(&first.cert, &cert).unwrap();
    std::fs::copy(&first.key, &key).unwrap();
    let hex = |t: &[u8]| -> String {
        eventstream_host::auth::sha256(t)
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    };
    let tokens = dir.path().join("tokens");
    let both = format!(
        "token alice {} produce=* read=* groups=*\ntoken bob {} produce=* read=* groups=*\n",
        hex(b"alice-secret"),
        hex(b"bob-secret")
    );
    std::fs::write(&tokens, &both).unwrap();
    let server = Server::start(
        &dir.data(),
        &[
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert.to_str().unwrap(),
            "--tls-key",
            key.to_str().unwrap(),
            "--auth",
            tokens.to_str().unwrap(),
        ],
    );
    let tls_addr = server.tls_addr.unwrap();
    let with_token = |tls, token: &[u8]| Options {
        token: Some(token.to_vec()),
        ..opts(tls)
    };
    let mut alice =
        Producer::with_options(tls_addr, with_token(client(&ca1, None), b"alice-secret")).unwrap();
    assert_eq!(produce(&mut alice, 1, 100, "a").len(), 100);
    // bob's connection, raw: HELLO, one event, then it waits.
    let (r, s) = client(&ca1, None)
        .handshake(TcpStream::connect(tls_addr).unwrap())
        .unwrap();
    let mut bob = eventstream_client::tls::Duplex {
        recv: eventstream_client::tls::Recv::Tls(Box::new(r)),
        send: eventstream_client::tls::Send::Tls(Box::new(s)),
    };
    eventstream_client::hello(&mut bob, b"bob-secret").unwrap();
    bob.write_all(&frame(5_000, Priority::Medium, "b", b"x", true))
        .unwrap();
    let mut ack = [0u8; 24];
    bob.read_exact(&mut ack).unwrap();
    assert_eq!(
        eventstream_core::wire::Ack::decode(&ack).unwrap().status,
        eventstream_core::wire::Status::Stored
    );

    // New certificate, bob revoked, one SIGHUP.
    std::fs::copy(&second.cert, &cert).unwrap();
    std::fs::copy(&second.key, &key).unwrap();
    std::fs::write(
        &tokens,
        format!(
            "token alice {} produce=* read=* groups=*\n",
            hex(b"alice-secret")
        ),
    )
    .unwrap();
    // SAFETY: kill(2) on the server child's pid.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
    wait_stderr(&server, "TLS certificate reloaded");
    wait_stderr(&server, "--auth reloaded, 1 tokens");
    // bob: FATAL UNAUTHORIZED, then closed.
    bob.read_exact(&mut ack).unwrap();
    assert_eq!(
        eventstream_core::wire::Ack::decode(&ack).unwrap(),
        eventstream_core::wire::Ack::fatal(eventstream_core::wire::Reason::Unauthorized)
    );
    assert_eq!(bob.read(&mut ack).unwrap_or(0), 0);
    // alice's open connection keeps its session (the old certificate).
    assert_eq!(produce(&mut alice, 101, 100, "a").len(), 100);
    // New connections get the new certificate: trusted through ca2 only.
    let mut again =
        Producer::with_options(tls_addr, with_token(client(&ca2, None), b"alice-secret")).unwrap();
    assert_eq!(produce(&mut again, 201, 100, "a").len(), 100);
    let e = refused(&server, &client(&ca1, None));
    assert!(e.contains("UnknownIssuer"), "{e}");
    // A certificate file that does not load: the old one stays, counted.
    std::fs::write(&cert, "not a certificate").unwrap();
    // SAFETY: as above.
    assert_eq!(unsafe { libc::kill(server.pid(), libc::SIGHUP) }, 0);
    wait_stderr(&server, "TLS certificate not reloaded");
    assert_eq!(server.metric("eventstream_tls_reload_failures_total"), 1.0);
    let mut third =
        Producer::with_options(tls_addr, with_token(client(&ca2, None), b"alice-secret")).unwrap();
    assert_eq!(produce(&mut third, 301, 100, "a").len(), 100);
}

#[test]
fn safe_defaults_with_tls() {
    let dir = TempDir::new("tls-exposure");
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server("server");
    let cert = leaf.cert.to_str().unwrap();
    let key = leaf.key.to_str().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::write(
        &tokens,
        format!(
            "token alice {} produce=* read=* groups=*\n",
            eventstream_host::auth::sha256(b"alice-secret")
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect::<String>()
        ),
    )
    .unwrap();
    let tokens = tokens.to_str().unwrap();
    let tls_any = [
        "--tls-listen",
        "0.0.0.0:0",
        "--tls-cert",
        cert,
        "--tls-key",
        key,
    ];
    let refusals: Vec<Vec<&str>> = vec![
        // TLS beyond loopback without --auth.
        [&["--listen", "none"][..], &tls_any[..]].concat(),
        // Plaintext beyond loopback beside TLS and auth.
        [
            &["--listen", "0.0.0.0:0", "--auth", tokens][..],
            &tls_any[..],
        ]
        .concat(),
    ];
    for a in &refusals {
        let f = Server::try_start(&dir.data(), a)
            .err()
            .unwrap_or_else(|| panic!("{a:?} started"));
        assert_eq!(f.status.code(), Some(1), "{a:?}");
        let lines: Vec<&str> = f.stderr.lines().collect();
        assert_eq!(lines.len(), 1, "{a:?}: {}", f.stderr);
        assert!(lines[0].contains("--insecure"), "{}", lines[0]);
    }
    // Bad TLS flags: one line, exit 1.
    for a in [
        vec!["--listen", "none"],
        vec!["--tls-listen", "127.0.0.1:0", "--tls-cert", cert],
        vec![
            "--tls-listen",
            "127.0.0.1:0",
            "--tls-cert",
            cert,
            "--tls-key",
            cert,
        ],
        vec!["--tls-cert", cert, "--tls-key", key],
    ] {
        let f = Server::try_start(&dir.data(), &a)
            .err()
            .unwrap_or_else(|| panic!("{a:?} started"));
        assert_eq!(f.status.code(), Some(1), "{a:?}");
        assert_eq!(f.stderr.lines().count(), 1, "{a:?}: {}", f.stderr);
    }
    // TLS and auth beyond loopback, plaintext off: starts (reached here
    // through 127.0.0.1).
    let a = [&["--listen", "none", "--auth", tokens][..], &tls_any[..]].concat();
    let server = Server::start(&dir.data(), &a);
    assert!(!server.stderr().contains("warning"), "{}", server.stderr());
    let port = server.tls_addr.unwrap().port();
    let mut p = Producer::with_options(
        ("127.0.0.1", port),
        Options {
            token: Some(b"alice-secret".to_vec()),
            ..opts(client(&ca, None))
        },
    )
    .unwrap();
    assert_eq!(produce(&mut p, 1, 10, "t").len(), 10);
    drop(p);
    drop(server);
    // --insecure: starts, with a warning.
    let server = Server::start(&dir.data(), &["--listen", "0.0.0.0:0", "--insecure"]);
    assert!(
        server.stderr().contains("warning: --insecure"),
        "{}",
        server.stderr()
    );
}

#[test]
fn a_stock_rustls_client_works_and_its_key_updates_are_followed() {
    use std::sync::Arc;
    let dir = TempDir::new("tls-stock");
    let ca = Ca::new(dir.path(), "ca");
    let leaf = ca.server("server");
    let server = Server::start(&dir.data(), &args(&serve_args(&leaf), &[]));
    let mut roots = rustls::RootCertStore::empty();
    for c in eventstream_client::tls::read_certs(&ca.pem).unwrap() {
        roots.add(c).unwrap();
    }
    let config =
        rustls::ClientConfig::builder_with_provider(Arc::new(eventstream_client::tls::provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
    let config = Arc::new(config);
    let conn =
        rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
    let tcp = TcpStream::connect(server.tls_addr.unwrap()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let round = |s: &mut rustls::StreamOwned<rustls::ClientConnection, TcpStream>, base| {
        let mut bytes = Vec::new();
        for id in base..base + 100 {
            bytes.extend(frame(id, Priority::Medium, "stock", b"payload", true));
        }
        s.write_all(&bytes).unwrap();
        s.flush().unwrap();
        let mut acks = vec![0u8; 24 * 100];
        s.read_exact(&mut acks).unwrap();
        for (i, a) in acks.chunks_exact(24).enumerate() {
            let a = eventstream_core::wire::Ack::decode(a).unwrap();
            assert_eq!(a.event_id, base + i as u64);
            assert_eq!(a.status, eventstream_core::wire::Status::Stored);
        }
    };
    round(&mut s, 1);
    // A key update that asks ours back: both sides switch keys, and the
    // acks after it still decrypt.
    s.conn.refresh_traffic_keys().unwrap();
    round(&mut s, 101);
    s.conn.refresh_traffic_keys().unwrap();
    round(&mut s, 201);
    // close_notify both ways: a clean end.
    s.conn.send_close_notify();
    s.flush().unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty());
    assert_eq!(wait_for_events(&dir.data(), 300).len(), 300);

    let connect = || {
        let conn =
            rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
        let tcp = TcpStream::connect(server.tls_addr.unwrap()).unwrap();
        tcp.set_read_timeout(Some(WAIT)).unwrap();
        rustls::StreamOwned::new(conn, tcp)
    };
    // Events and close_notify in the client's last handshake flight,
    // written in one piece with its Finished: every event is acked, then
    // the connection ends cleanly.
    let mut conn =
        rustls::ClientConnection::new(config.clone(), "localhost".try_into().unwrap()).unwrap();
    let mut tcp = TcpStream::connect(server.tls_addr.unwrap()).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    conn.write_tls(&mut tcp).unwrap();
    while conn.is_handshaking() {
        conn.read_tls(&mut tcp).unwrap();
        conn.process_new_packets().unwrap();
    }
    for id in 1001..1011 {
        conn.writer()
            .write_all(&frame(id, Priority::Medium, "stock", b"early", true))
            .unwrap();
    }
    conn.send_close_notify();
    let mut flight = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut flight).unwrap();
    }
    tcp.write_all(&flight).unwrap();
    let mut s = rustls::StreamOwned::new(conn, tcp);
    let mut acks = Vec::new();
    s.read_to_end(&mut acks).unwrap();
    assert_eq!(acks.len(), 24 * 10);
    assert_eq!(failures(&server, "closed"), 0.0);
    // Key updates without data between them: the server stops after 32.
    let mut s = connect();
    round(&mut s, 2001);
    for _ in 0..40 {
        s.conn.refresh_traffic_keys().unwrap();
        s.flush().unwrap();
    }
    let mut rest = Vec::new();
    assert!(s.read_to_end(&mut rest).is_err() || rest.is_empty());
    assert_eq!(failures(&server, "timeout"), 0.0);
}
