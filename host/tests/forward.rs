//! The forwarder (`serve --forward`, docs/scale-out.md) against real
//! `nats-server` processes with JetStream on 127.0.0.1: the stream holds
//! exactly the stored events, across a kill -9 of our server, a NATS that
//! starts late, and two of our servers that receive the same transactional
//! events. The three-node cluster is in forward_cluster.rs.

mod common;

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

use common::nats::*;
use common::*;

const STREAM: &str = "EVENTS";

/// Runs `eventstream load` for `n` events with acks against `server`.
pub fn load(server: &Server, n: u64) {
    let (ok, out, err) = run_bin(
        &[
            "load",
            "--target",
            &server.addr.to_string(),
            "--events",
            &n.to_string(),
            "--ack",
            "--connections",
            "2",
        ],
        b"",
    );
    assert!(ok, "load failed: {err} {}", String::from_utf8_lossy(&out));
}

/// Sends `n` legacy frames on one connection and waits for them in the log.
fn legacy(server: &Server, n: usize, before: usize) {
    let mut c = server.connect();
    for i in 0..n {
        c.send(&legacy_frame(
            (i % 5) as u8,
            "legacy.topic",
            format!("legacy {i}").as_bytes(),
        ));
    }
    assert!(wait_for_events(&server.data, before + n).len() >= before + n);
}

/// Waits until the forwarder has every stored event acked.
fn caught_up(server: &Server, limit: Duration) {
    let t0 = Instant::now();
    loop {
        let lag = server.metric("eventstream_forward_lag_events");
        let end = server.metric("eventstream_log_end_offset");
        let acked = server.metric("eventstream_forward_acked_offset");
        if lag == 0.0 && acked == end {
            return;
        }
        assert!(
            t0.elapsed() < limit,
            "forward lag {lag} (acked {acked} of {end}): {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn server_id(data: &Path) -> String {
    std::fs::read_to_string(data.join("server_id"))
        .unwrap()
        .trim()
        .to_string()
}

/// The subject token of a topic (docs/scale-out.md).
fn token(topic: &str) -> String {
    let mut s = String::new();
    eventstream_host::forward::escape_topic(&mut s, topic.as_bytes());
    s
}

/// Asserts that `msgs` (the stream) hold each event of the log at `data`
/// exactly once, with its payload, id, class and subject.
fn assert_mirrors(msgs: &[StreamMsg], data: &Path) {
    let events = inspect_events(data);
    let payloads = log_events(data);
    let id = server_id(data);
    let mine: Vec<&StreamMsg> = msgs.iter().filter(|m| m.server == id).collect();
    assert_eq!(mine.len(), events.len(), "stream count against the log");
    let by_offset: HashMap<u64, &StreamMsg> = mine.iter().map(|m| (m.offset, *m)).collect();
    assert_eq!(
        by_offset.len(),
        events.len(),
        "an offset twice in the stream"
    );
    for e in &events {
        let m = by_offset
            .get(&e.offset)
            .unwrap_or_else(|| panic!("offset {} not in the stream", e.offset));
        let want_id = if e.class == "transactional" && !e.legacy {
            e.event_id.to_string()
        } else {
            format!("{id}-{}", e.offset)
        };
        assert_eq!(m.msg_id, want_id, "offset {}", e.offset);
        assert_eq!(m.event_id, e.event_id);
        assert_eq!(m.class, e.class);
        assert_eq!(m.legacy, e.legacy);
        assert_eq!(m.payload, payloads[&e.offset].1, "payload of {}", e.offset);
        assert_eq!(m.subject, format!("events.{}.{}", e.class, token(&e.topic)));
    }
    let ids: HashSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), msgs.len(), "a Nats-Msg-Id twice in the stream");
}

/// A nats-server with JetStream under `dir`, ready.
fn nats(dir: &TempDir) -> Nats {
    let nats = Nats::start(dir.path());
    nats.wait_ready(WAIT);
    nats
}

fn serve_forwarding(data: &Path, urls: &str, extra: &[&str]) -> Server {
    let mut args: Vec<String> = forward_args(urls, STREAM);
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Server::start(data, &args)
}

#[test]
fn the_stream_holds_exactly_the_stored_events() {
    let dir = TempDir::new("fwd-all");
    let nats = nats(&dir);
    let server = serve_forwarding(&dir.data(), &nats.url(), &["--batch-max-age", "5ms"]);
    load(&server, 100_000);
    legacy(&server, 500, 100_000);
    caught_up(&server, Duration::from_secs(60));
    let msgs = stream_messages(&nats.url(), STREAM);
    assert_mirrors(&msgs, &dir.data());
    let classes: HashSet<&str> = msgs.iter().map(|m| m.class.as_str()).collect();
    assert_eq!(classes.len(), 3, "every class: {classes:?}");
    assert_eq!(server.metric("eventstream_forward_acked_total"), 100_500.0);
    assert_eq!(server.metric("eventstream_forward_duplicates_total"), 0.0);
    assert_eq!(server.metric("eventstream_forward_up"), 1.0);
    // The cursor is committed (every 100 ms) and survives a graceful stop.
    let (status, _) = server.terminate();
    assert!(status.success());
    let groups = std::fs::read_to_string(dir.data().join("groups")).unwrap();
    assert!(groups.contains("group _forward 100500 "), "{groups}");
}

/// The `_forward` cursor in `<data>/groups` (0: none yet).
fn committed_cursor(data: &Path) -> u64 {
    std::fs::read_to_string(data.join("groups"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("group _forward "))
        .and_then(|r| r.split(' ').next())
        .map_or(0, |o| o.parse().unwrap())
}

#[test]
fn a_kill_in_the_middle_of_forwarding_leaves_each_event_once() {
    let dir = TempDir::new("fwd-kill");
    let nats = nats(&dir);
    let server = serve_forwarding(&dir.data(), &nats.url(), &[]);
    let mut producer = std::process::Command::new(BIN)
        .args(["load", "--target", &server.addr.to_string()])
        .args(["--events", "100000", "--connections", "2"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Killed while behind, after some acks, with producers sending.
    let t0 = Instant::now();
    while server.metric("eventstream_forward_acked_offset") < 20_000.0 {
        assert!(t0.elapsed() < WAIT, "{}", server.stderr());
        std::thread::sleep(Duration::from_millis(5));
    }
    assert!(server.metric("eventstream_forward_lag_events") > 0.0);
    server.kill();
    let _ = producer.wait();
    // What the killed server had published past its committed cursor is in
    // the stream: the restart publishes exactly those again.
    std::thread::sleep(Duration::from_millis(500));
    let cursor = committed_cursor(&dir.data());
    let before = stream_messages(&nats.url(), STREAM);
    let past_cursor = before.iter().filter(|m| m.offset >= cursor).count();
    assert!(
        past_cursor > 0,
        "nothing in the stream past the cursor {cursor}"
    );
    let server = serve_forwarding(&dir.data(), &nats.url(), &[]);
    caught_up(&server, Duration::from_secs(60));
    assert_eq!(
        server.metric("eventstream_forward_duplicates_total"),
        past_cursor as f64,
        "repeats dropped by the duplicate window"
    );
    assert_mirrors(&stream_messages(&nats.url(), STREAM), &dir.data());
}

#[test]
fn a_nats_that_starts_late_is_caught_up_with() {
    let dir = TempDir::new("fwd-late");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let server = serve_forwarding(&dir.data(), &url, &["--forward-ack-timeout", "1s"]);
    assert!(
        server.stderr().contains("NATS did not answer"),
        "{}",
        server.stderr()
    );
    load(&server, 20_000);
    assert_eq!(server.metric("eventstream_forward_up"), 0.0);
    assert_eq!(server.metric("eventstream_forward_lag_events"), 20_000.0);
    // The lag's age is read off the log while NATS is away.
    let t0 = Instant::now();
    while server.metric("eventstream_forward_lag_seconds") <= 0.0 {
        assert!(t0.elapsed() < Duration::from_secs(5), "no lag age");
        std::thread::sleep(Duration::from_millis(50));
    }
    let nats = Nats::start_on(dir.path(), port, None);
    nats.wait_ready(WAIT);
    caught_up(&server, Duration::from_secs(60));
    assert_eq!(server.metric("eventstream_forward_lag_seconds"), 0.0);
    assert_eq!(server.metric("eventstream_forward_up"), 1.0);
    assert_mirrors(&stream_messages(&url, STREAM), &dir.data());
    // NATS goes away while the forwarder is idle: it says so, and the lag
    // of what comes meanwhile has an age.
    drop(nats);
    load(&server, 1_000);
    let t0 = Instant::now();
    while server.metric("eventstream_forward_up") != 0.0
        || server.metric("eventstream_forward_lag_seconds") <= 0.0
    {
        assert!(
            t0.elapsed() < Duration::from_secs(10),
            "{}",
            server.metrics_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(server.metric("eventstream_forward_lag_events"), 1_000.0);
}

#[test]
fn two_servers_store_a_transactional_id_once_and_keep_the_rest() {
    let dir = TempDir::new("fwd-two");
    let nats = nats(&dir);
    let a_dir = dir.path().join("a");
    let b_dir = dir.path().join("b");
    let a = serve_forwarding(&a_dir, &nats.url(), &["--batch-max-age", "5ms"]);
    let b = serve_forwarding(&b_dir, &nats.url(), &["--batch-max-age", "5ms"]);
    // One producer's events, each sent to both servers (a failover that
    // sent everything twice).
    const N: u64 = 5_000;
    for server in [&a, &b] {
        let mut c = server.connect();
        for i in 0..N {
            let priority = PRIORITIES[(i % 5) as usize];
            c.send(&frame(
                1_000_000 + i,
                priority,
                &format!("orders.{}", i % 7),
                format!("event {i}").as_bytes(),
                true,
            ));
        }
        assert_stored(&c.acks(N as usize));
        legacy(server, 100, N as usize);
    }
    caught_up(&a, Duration::from_secs(60));
    caught_up(&b, Duration::from_secs(60));
    let msgs = stream_messages(&nats.url(), STREAM);
    let events = inspect_events(&a_dir);
    let tx = events
        .iter()
        .filter(|e| e.class == "transactional" && !e.legacy)
        .count();
    assert!(tx > 0);
    assert_eq!(msgs.len(), 2 * events.len() - tx, "tx once, the rest twice");
    let tx_msgs: Vec<&StreamMsg> = msgs
        .iter()
        .filter(|m| m.class == "transactional" && !m.legacy)
        .collect();
    assert_eq!(tx_msgs.len(), tx);
    assert!(tx_msgs.iter().all(|m| m.msg_id == m.event_id.to_string()));
    let dups = a.metric("eventstream_forward_duplicates_total")
        + b.metric("eventstream_forward_duplicates_total");
    assert_eq!(dups, tx as f64, "the second server's transactional ids");
    // Each server's realtime, batch and legacy events are all there.
    for (data, id) in [(&a_dir, server_id(&a_dir)), (&b_dir, server_id(&b_dir))] {
        let others: HashSet<u64> = inspect_events(data)
            .iter()
            .filter(|e| e.class != "transactional" || e.legacy)
            .map(|e| e.offset)
            .collect();
        let got: HashSet<u64> = msgs
            .iter()
            .filter(|m| m.server == id && (m.class != "transactional" || m.legacy))
            .map(|m| m.offset)
            .collect();
        assert_eq!(got, others);
    }
    assert_ne!(server_id(&a_dir), server_id(&b_dir));
}

#[test]
fn a_missing_stream_without_create_and_bad_flags_stop_the_start() {
    let dir = TempDir::new("fwd-flags");
    let nats = nats(&dir);
    let url = nats.url();
    let f = Server::try_start(
        &dir.data(),
        &["--forward", &url, "--forward-stream", "NOPE"],
    )
    .err()
    .expect("started without its stream");
    assert_eq!(f.status.code(), Some(1));
    assert!(f.stderr.contains("no stream \"NOPE\""), "{}", f.stderr);
    for bad in [
        vec!["--forward", url.as_str()],
        vec!["--forward-stream", "S"],
        vec!["--forward", &url, "--forward-stream", "a.b"],
        vec![
            "--forward",
            &url,
            "--forward-stream",
            "S",
            "--forward-subject",
            "a..{topic}",
        ],
        vec![
            "--forward",
            &url,
            "--forward-stream",
            "S",
            "--forward-max-pending",
            "0",
        ],
        vec!["--forward", "nats://[::1", "--forward-stream", "S"],
    ] {
        let f = Server::try_start(&dir.data(), &bad)
            .err()
            .unwrap_or_else(|| panic!("{bad:?} started"));
        assert_ne!(f.status.code(), Some(0), "{bad:?}");
        assert!(f.stderr.contains("forward"), "{bad:?}: {}", f.stderr);
    }
}

#[test]
fn retention_waits_for_the_forwarder_up_to_twice_its_bytes_and_counts_the_rest() {
    let dir = TempDir::new("fwd-retention");
    let port = free_port();
    let url = format!("nats://127.0.0.1:{port}");
    let retention = 256 * 1024;
    let server = serve_forwarding(
        &dir.data(),
        &url,
        &[
            "--segment-bytes",
            "64KiB",
            "--retention-bytes",
            "256KiB",
            "--forward-ack-timeout",
            "1s",
        ],
    );
    // Over --retention-bytes, under twice it: NATS is down, nothing goes.
    load(&server, 1_200);
    let bytes = server.metric("eventstream_log_bytes");
    assert!(bytes > f64::from(retention) * 1.2, "{bytes}");
    assert_eq!(server.metric("eventstream_log_start_offset"), 0.0);
    // Past twice it: the oldest segments go, each said in one line.
    load(&server, 3_000);
    let first = server.metric("eventstream_log_start_offset");
    assert!(first > 0.0);
    assert!(
        server.metric("eventstream_log_bytes") <= f64::from(2 * retention + 128 * 1024),
        "the log keeps to twice --retention-bytes"
    );
    assert!(
        server.stderr().contains("will not be forwarded"),
        "{}",
        server.stderr()
    );
    // NATS comes: what is left is forwarded, what went is counted.
    let nats = Nats::start_on(dir.path(), port, None);
    nats.wait_ready(WAIT);
    caught_up(&server, Duration::from_secs(60));
    let first = server.metric("eventstream_log_start_offset");
    assert_eq!(
        server.metric("eventstream_forward_skipped_events_total"),
        first
    );
    assert!(
        server.stderr().contains(&format!(
            "offsets 0..{first} ({first} events) were deleted by retention"
        )),
        "{}",
        server.stderr()
    );
    assert_mirrors(&stream_messages(&url, STREAM), &dir.data());
}

#[test]
fn a_server_forwarding_to_an_absent_nats_stops_promptly_and_keeps_its_cursor() {
    let dir = TempDir::new("fwd-stop");
    let url = format!("nats://127.0.0.1:{}", free_port());
    let server = serve_forwarding(&dir.data(), &url, &[]);
    load(&server, 1_000);
    let (status, took) = server.terminate();
    assert!(status.success());
    assert!(took < Duration::from_secs(5), "stop took {took:?}");
    let groups = std::fs::read_to_string(dir.data().join("groups")).unwrap();
    assert!(groups.contains("group _forward 0 "), "{groups}");
}

#[test]
fn under_fsync_never_the_forwarder_makes_what_it_sends_durable() {
    let dir = TempDir::new("fwd-never");
    let nats = nats(&dir);
    let server = serve_forwarding(&dir.data(), &nats.url(), &["--fsync", "never"]);
    load(&server, 5_000);
    caught_up(&server, Duration::from_secs(30));
    assert_mirrors(&stream_messages(&nats.url(), STREAM), &dir.data());
}

#[test]
fn the_forwarder_speaks_tls_to_nats() {
    let dir = TempDir::new("fwd-tls");
    let ca = common::tls::Ca::new(dir.path(), "ca");
    let leaf = ca.server("nats");
    let tls = format!(
        "tls {{ cert_file: \"{}\", key_file: \"{}\" }}\n",
        leaf.cert.display(),
        leaf.key.display()
    );
    let nats = Nats::start_conf(dir.path(), common::nats::free_port(), None, &tls);
    nats.wait_ready(WAIT);
    let ca_pem = ca.pem.to_str().unwrap();
    let server = serve_forwarding(
        &dir.data(),
        &nats.url(),
        &["--forward-tls-ca", ca_pem, "--batch-max-age", "5ms"],
    );
    load(&server, 20_000);
    caught_up(&server, Duration::from_secs(60));
    let opts = async_nats::ConnectOptions::new()
        .add_root_certificates(ca.pem.clone())
        .require_tls(true);
    let msgs = common::nats::stream_messages_with(&nats.url(), STREAM, opts);
    assert_mirrors(&msgs, &dir.data());
    assert_eq!(msgs.len(), 20_000);
    // A CA file that does not load stops the start with one line.
    let bad = dir.path().join("bad.pem");
    std::fs::write(&bad, "nothing").unwrap();
    let mut args = forward_args(&nats.url(), STREAM);
    args.extend(["--forward-tls-ca".into(), bad.to_str().unwrap().into()]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let dir2 = TempDir::new("fwd-tls-bad");
    let f = Server::try_start(&dir2.data(), &args)
        .err()
        .expect("started");
    assert_eq!(f.status.code(), Some(1));
    assert!(f.stderr.contains("--forward-tls-ca"), "{}", f.stderr);
}
