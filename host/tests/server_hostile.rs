//! Hostile clients against a running server: thousands of idle
//! connections (memory, `--idle-timeout`), slowloris, garbage, half frames
//! then RST, clients that never read their acks, connect-close storms. A
//! well-behaved client beside them gets every ack; the connection gauge
//! returns to what is really open; RSS stays bounded.

mod common;

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use eventstream_core::wire::Status;
use eventstream_core::Priority;

fn rss_kib(pid: i32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit with a valid rlimit struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = lim.rlim_max;
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
    lim.rlim_cur
}

#[test]
fn ten_thousand_idle_connections_cost_little_memory_and_give_it_back() {
    let limit = raise_nofile();
    let n = 10_000usize.min(limit as usize - 500);
    let dir = TempDir::new("hostile-idle");
    // The server's default pool and dedup table, so RSS is what operators
    // see.
    let server = Server::start(
        &dir.data(),
        &[
            "--pool-events",
            "65536",
            "--dedup-capacity",
            "2097152",
            "--max-connections",
            "20000",
        ],
    );
    // One busy client first: its buffers are part of the start figure.
    let mut c = server.connect();
    let batch: Vec<u8> = (1..=500)
        .flat_map(|id| frame(id, Priority::Medium, "orders/eu", &[1u8; 256], true))
        .collect();
    c.send(&batch);
    assert!(c.acks(500).iter().all(|a| a.status == Status::Stored));
    std::thread::sleep(Duration::from_millis(300));
    let start = rss_kib(server.pid());
    let idle: Vec<TcpStream> = (0..n)
        .map(|_| TcpStream::connect(server.addr).unwrap())
        .collect();
    assert_eq!(
        connections_settle(&server, (n + 1) as f64, Duration::from_secs(10)),
        (n + 1) as f64
    );
    let with_idle = rss_kib(server.pid());
    drop(idle);
    assert_eq!(
        connections_settle(&server, 1.0, Duration::from_secs(10)),
        1.0
    );
    std::thread::sleep(Duration::from_millis(300));
    let after = rss_kib(server.pid());
    eprintln!(
        "RSS: start {} KiB, with {n} idle connections {} KiB (+{} KiB, {} B each), after they closed {} KiB",
        start,
        with_idle,
        with_idle - start,
        (with_idle - start) * 1024 / n as u64,
        after
    );
    assert!(
        with_idle - start <= 64 * 1024,
        "{n} idle connections took {} KiB",
        with_idle - start
    );
    assert!(
        after <= start + 10 * 1024,
        "RSS {after} KiB after the idle connections closed, {start} KiB at start"
    );
    // The busy client is still served.
    let batch: Vec<u8> = (1001..=1500)
        .flat_map(|id| frame(id, Priority::Medium, "orders/eu", &[1u8; 256], true))
        .collect();
    c.send(&batch);
    assert!(c.acks(500).iter().all(|a| a.status == Status::Stored));
}

#[test]
fn connections_idle_past_the_timeout_are_closed_and_busy_ones_kept() {
    let dir = TempDir::new("hostile-idle-timeout");
    let server = Server::start(&dir.data(), &["--idle-timeout", "1s"]);
    let mut quiet = server.connect();
    quiet.send(&frame(1, Priority::High, "alerts", b"x", true));
    assert_eq!(quiet.acks(1)[0].status, Status::Stored);
    let mut busy = server.connect();
    let t0 = Instant::now();
    let mut id = 100;
    while t0.elapsed() < Duration::from_millis(2500) {
        busy.send(&frame(id, Priority::High, "alerts", b"x", true));
        assert_eq!(busy.acks(1)[0].status, Status::Stored);
        id += 1;
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(quiet.closed_within(Duration::from_secs(2)));
    busy.send(&frame(id, Priority::High, "alerts", b"x", true));
    assert_eq!(busy.acks(1)[0].status, Status::Stored);
    assert_eq!(server.metric("eventstream_idle_closed_total"), 1.0);
    // An idle timeout of 0 turns it off.
    let dir = TempDir::new("hostile-idle-off");
    let server = Server::start(&dir.data(), &["--idle-timeout", "0s"]);
    let mut c = server.connect();
    c.send(&frame(1, Priority::High, "alerts", b"x", true));
    c.acks(1);
    assert!(!c.closed_within(Duration::from_millis(1500)));
}

/// Hostile clients of every kind at once, until `stop`.
fn attack(
    addr: std::net::SocketAddr,
    stop: Arc<AtomicBool>,
    storm: Arc<AtomicU64>,
) -> Vec<std::thread::JoinHandle<u64>> {
    let mut threads = Vec::new();
    // Slowloris: one byte of a frame every 100 ms on 50 connections.
    let s = stop.clone();
    threads.push(std::thread::spawn(move || {
        let mut conns: Vec<TcpStream> = (0..50)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        let f = frame(1 << 40, Priority::High, "alerts", &[0u8; 200], true);
        let mut i = 0;
        while !s.load(Ordering::Relaxed) {
            for c in &mut conns {
                let _ = c.write_all(&f[i % f.len()..i % f.len() + 1]);
            }
            i += 1;
            std::thread::sleep(Duration::from_millis(100));
        }
        conns.len() as u64
    }));
    // Garbage streams, half frames then RST, connect-close storms.
    let s = stop.clone();
    threads.push(std::thread::spawn(move || {
        let mut n = 0u64;
        let mut seed = 0x9E37_79B9_7F4A_7C15u64;
        let garbage: Vec<u8> = (0..8192)
            .map(|_| {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                seed as u8
            })
            .collect();
        let half = frame(1 << 41, Priority::High, "alerts", &[0u8; 200], true);
        while !s.load(Ordering::Relaxed) {
            if let Ok(mut c) = TcpStream::connect(addr) {
                match n % 3 {
                    0 => {
                        let _ = c.write_all(&garbage);
                    }
                    1 => {
                        let _ = c.write_all(&half[..100]);
                        reset_on_close(&c);
                    }
                    _ => {}
                }
                n += 1;
                storm.store(n, Ordering::Relaxed);
            }
        }
        n
    }));
    // Clients that never read their acks.
    let s = stop.clone();
    threads.push(std::thread::spawn(move || {
        let mut sent = 0u64;
        let mut conns: Vec<TcpStream> = (0..4)
            .filter_map(|_| TcpStream::connect(addr).ok())
            .collect();
        for c in &conns {
            c.set_nonblocking(true).unwrap();
        }
        let batch: Vec<u8> = (0..50)
            .flat_map(|i| frame(1 << 42 | i, Priority::Low, "noisy", &[2u8; 256], true))
            .collect();
        while !s.load(Ordering::Relaxed) {
            for c in &mut conns {
                if c.write(&batch).is_ok() {
                    sent += 50;
                }
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        sent
    }));
    threads
}

/// A well-behaved client: `rounds` bursts of 200 acked events; returns the
/// events per second it got.
fn behaved(server: &Server, base: u64, rounds: u64) -> f64 {
    let mut c = server.connect();
    let t0 = Instant::now();
    for r in 0..rounds {
        let ids: Vec<u64> = (0..200).map(|i| base + r * 1000 + i).collect();
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| frame(id, Priority::Medium, "orders/eu", &[3u8; 256], true))
            .collect();
        c.send(&bytes);
        let acks = c.acks(ids.len());
        for (a, id) in acks.iter().zip(&ids) {
            assert_eq!((a.status, a.event_id), (Status::Stored, *id));
        }
    }
    (rounds * 200) as f64 / t0.elapsed().as_secs_f64()
}

#[test]
fn a_well_behaved_client_gets_every_ack_beside_hostile_ones() {
    let dir = TempDir::new("hostile-mix");
    let server = Server::start(&dir.data(), &["--frame-timeout", "2s"]);
    let start_rss = rss_kib(server.pid());
    let alone = behaved(&server, 1 << 30, 50);
    let stop = Arc::new(AtomicBool::new(false));
    let storm = Arc::new(AtomicU64::new(0));
    let threads = attack(server.addr, stop.clone(), storm.clone());
    std::thread::sleep(Duration::from_millis(500));
    let beside = behaved(&server, 2 << 30, 50);
    // The storm goes on until it made its connections (however slow this
    // machine is), with the well-behaved client checked once more inside it.
    let until = Instant::now() + Duration::from_secs(30);
    let mut k = 0;
    while storm.load(Ordering::Relaxed) < 300 && Instant::now() < until {
        behaved(&server, (3 << 30) + k * 1000, 1);
        k += 1;
    }
    let during_rss = rss_kib(server.pid());
    stop.store(true, Ordering::Relaxed);
    let counts: Vec<u64> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    eprintln!(
        "well-behaved client: {alone:.0} events/s alone, {beside:.0} beside the attack ({:.2}); attack counts {counts:?}; RSS {start_rss} KiB at start, {during_rss} KiB during",
        beside / alone
    );
    assert!(
        counts[1] >= 300,
        "the storm made only {} connections in 30 s",
        counts[1]
    );
    // Every hostile connection is gone once closed (the slowloris ones by
    // their close, the others by theirs or by the frame timeout).
    assert_eq!(
        connections_settle(&server, 0.0, Duration::from_secs(10)),
        0.0
    );
    assert!(
        during_rss <= start_rss + 64 * 1024,
        "RSS grew from {start_rss} to {during_rss} KiB"
    );
}
