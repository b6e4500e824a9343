//! Connections that end right behind their last bytes (FIN or RST on the
//! same edge as the data) are seen closed and give back their slot.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::time::Duration;

use common::*;
use eventstream_core::wire::Status;
use eventstream_core::Priority;

/// Frames without ACK, written in one call.
fn unacked(base: u64, n: u64) -> Vec<u8> {
    (0..n)
        .flat_map(|i| frame(base + i, Priority::Medium, "orders/eu", &[7u8; 200], false))
        .collect()
}

#[test]
fn a_close_right_behind_the_last_data_frees_the_connection() {
    let dir = TempDir::new("close-fin");
    // A frame timeout far beyond the test: only seeing the close frees them.
    let server = Server::start(&dir.data(), &["--frame-timeout", "60s"]);
    let mut stored = 0u64;
    // v1 frames without ACK, then FIN.
    for c in 0..50u64 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(&unacked(c << 20, 5)).unwrap();
        stored += 5;
        drop(s);
    }
    // The same, then RST.
    for c in 50..100u64 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        s.write_all(&unacked(c << 20, 5)).unwrap();
        reset_on_close(&s);
        drop(s);
    }
    // Legacy frames, then FIN.
    for _ in 0..20 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let bytes: Vec<u8> = (0..3)
            .flat_map(|_| legacy_frame(2, "legacy", b"hello"))
            .collect();
        s.write_all(&bytes).unwrap();
        stored += 3;
        drop(s);
    }
    // Half a frame, then RST.
    for c in 0..20u64 {
        let mut s = TcpStream::connect(server.addr).unwrap();
        let f = frame(1 << 40 | c, Priority::High, "alerts", b"x", true);
        s.write_all(&f[..20]).unwrap();
        reset_on_close(&s);
        drop(s);
    }
    // All 140 accepted (none still in the listen backlog), then none open.
    let key = "eventstream_connections_accepted_total";
    assert_eq!(settles(140.0, || server.metric(key)), 140.0);
    let open = connections_settle(&server, 0.0, Duration::from_secs(5));
    assert_eq!(
        open, 0.0,
        "connections left open after their clients closed"
    );
    // The FIN clients' frames were all stored (the RST ones may lose what
    // the reset discarded from the server's receive queue).
    let events = inspect_events_after_stop(server, &dir);
    assert!(
        events >= stored,
        "{events} events stored, {stored} sent before FIN"
    );
}

#[test]
fn clients_that_close_at_once_do_not_lock_others_out() {
    let dir = TempDir::new("close-slots");
    let server = Server::start(
        &dir.data(),
        &["--max-connections", "10", "--frame-timeout", "60s"],
    );
    for round in 0..5u64 {
        for c in 0..10u64 {
            let mut s = TcpStream::connect(server.addr).unwrap();
            s.write_all(&unacked(round << 30 | c << 20, 3)).unwrap();
            drop(s);
        }
        // The round's connections are all accepted (not still waiting in
        // the listen backlog) before the gauge's 0 says anything.
        let accepted = ((round + 1) * 10) as f64;
        let key = "eventstream_connections_accepted_total";
        assert_eq!(settles(accepted, || server.metric(key)), accepted);
        assert_eq!(
            connections_settle(&server, 0.0, Duration::from_secs(5)),
            0.0,
            "round {round}: closed clients still hold their slots"
        );
    }
    let mut c = server.connect();
    c.send(&frame(1 << 50, Priority::High, "alerts", b"after", true));
    assert_eq!(c.acks(1)[0].status, Status::Stored);
}

/// Stops the server cleanly and counts the events in its log.
fn inspect_events_after_stop(server: Server, dir: &TempDir) -> u64 {
    let (status, _) = server.terminate();
    assert!(status.success(), "server exit: {status}");
    inspect_events(&dir.data()).len() as u64
}
