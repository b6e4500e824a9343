//! The crash loop: the server under load is killed with SIGKILL at random
//! points (during writes, segment rolls and group commits: segments are
//! small and half the cycles run `--fsync always`), restarted, and checked:
//! every acked event is in the log at its acked offset, no transactional id
//! is stored twice, and acked transactional ids resent after the restart
//! are answered DUPLICATE with their original offset.
//!
//! The test command runs 20 cycles; for more:
//!
//!   ES_CRASH_CYCLES=100 cargo test --release -p eventstream-host --test crash_loop -- --nocapture
//!
//! (`ES_CRASH_PAUSE_MS`, 2 by default, is the producers' pause between
//! bursts; 0 runs them at full speed.)

mod common;

use std::collections::{HashMap, HashSet};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use eventstream_core::wire::Status;
use eventstream_core::Priority;

/// One acked event: its id, priority and offset.
#[derive(Clone, Copy, Debug)]
struct Acked {
    id: u64,
    transactional: bool,
    offset: u64,
}

/// Sends bursts of 64 acked events, `pause` apart, on one connection until
/// the server dies or `stop`; returns what was acked.
fn produce(
    addr: std::net::SocketAddr,
    base: u64,
    pause: Duration,
    stop: Arc<AtomicBool>,
) -> Vec<Acked> {
    let mut acked = Vec::new();
    let Ok(mut s) = TcpStream::connect(addr) else {
        return acked;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let mut rng = Rng(base | 1);
    let mut next = base;
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut sent = HashMap::new();
        let mut bytes = Vec::new();
        for _ in 0..64 {
            // Two of three transactional, the rest realtime (stored on
            // their own, not deduplicated).
            let tx = rng.below(3) != 0;
            let prio = if tx { Priority::Medium } else { Priority::High };
            let len = 32 + rng.below(400) as usize;
            bytes.extend(frame(
                next,
                prio,
                "crash/loop",
                &vec![next as u8; len],
                true,
            ));
            sent.insert(next, tx);
            next += 1;
        }
        if std::io::Write::write_all(&mut s, &bytes).is_err() {
            break;
        }
        let acks = read_acks(&mut s, &mut buf, 64);
        for a in &acks {
            match a.status {
                Status::Stored => acked.push(Acked {
                    id: a.event_id,
                    transactional: sent[&a.event_id],
                    offset: a.offset,
                }),
                Status::Rejected => {}
                other => panic!("event {}: {other:?}", a.event_id),
            }
        }
        if acks.len() < 64 {
            break;
        }
        std::thread::sleep(pause);
    }
    acked
}

#[test]
fn acked_events_survive_kill_9_at_random_points() {
    let cycles: u64 = std::env::var("ES_CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20);
    // A pause between bursts keeps the log (and the writeback it leaves
    // for the tests after this one) moderate; 0 for full speed.
    let pause = Duration::from_millis(
        std::env::var("ES_CRASH_PAUSE_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(2),
    );
    let dir = TempDir::new("crash-loop");
    let mut rng = Rng(0xC0FFEE);
    let all: Arc<Mutex<Vec<Acked>>> = Arc::default();
    let t0 = Instant::now();
    let mut restarts = Vec::new();
    for cycle in 0..cycles {
        let always = cycle % 2 == 1;
        let mut flags = vec!["--segment-bytes", "256KiB", "--batch-max-age", "5ms"];
        if always {
            flags.extend(["--fsync", "always"]);
        }
        let started = Instant::now();
        let server = Server::start(&dir.data(), &flags);
        restarts.push(started.elapsed());
        // The last cycle's acked transactional ids are duplicates now.
        let previous: Vec<Acked> = {
            let all = all.lock().unwrap();
            all.iter()
                .rev()
                .filter(|a| a.transactional)
                .take(200)
                .copied()
                .collect()
        };
        if !previous.is_empty() {
            let mut c = server.connect();
            let bytes: Vec<u8> = previous
                .iter()
                .flat_map(|a| frame(a.id, Priority::Medium, "crash/loop", b"again", true))
                .collect();
            c.send(&bytes);
            for (ack, a) in c.acks(previous.len()).iter().zip(&previous) {
                assert_eq!(
                    (ack.status, ack.event_id, ack.offset),
                    (Status::Duplicate, a.id, a.offset),
                    "cycle {cycle}: a resent acked id"
                );
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let producers: Vec<_> = (0..2u64)
            .map(|p| {
                let (addr, stop) = (server.addr, stop.clone());
                let base = (cycle + 1) << 32 | p << 28;
                std::thread::spawn(move || produce(addr, base, pause, stop))
            })
            .collect();
        std::thread::sleep(Duration::from_millis(50 + rng.below(400)));
        server.kill();
        stop.store(true, Ordering::Relaxed);
        for p in producers {
            all.lock().unwrap().extend(p.join().unwrap());
        }
    }
    // A last clean start (recovery of the last kill) and stop, then the log.
    let server = Server::start(&dir.data(), &[]);
    let (status, _) = server.terminate();
    assert!(status.success());
    let events = inspect_events(&dir.data());
    let at: HashMap<u64, &Inspected> = events.iter().map(|e| (e.offset, e)).collect();
    let all = all.lock().unwrap();
    for a in all.iter() {
        let e = at.get(&a.offset).unwrap_or_else(|| {
            panic!(
                "acked event {} at offset {} is not in the log",
                a.id, a.offset
            )
        });
        assert_eq!(e.event_id, a.id, "offset {}", a.offset);
    }
    let mut seen = HashSet::new();
    for e in events.iter().filter(|e| e.class == "transactional") {
        assert!(
            seen.insert(e.event_id),
            "transactional id {} stored twice",
            e.event_id
        );
    }
    restarts.sort();
    eprintln!(
        "{cycles} kill -9 cycles in {:.1} s: {} acked events, 0 lost, {} events in the log, restart median {:?} max {:?}",
        t0.elapsed().as_secs_f64(),
        all.len(),
        events.len(),
        restarts[restarts.len() / 2],
        restarts.last().unwrap()
    );
    assert!(
        all.len() as u64 > cycles * 100,
        "too little load: {}",
        all.len()
    );
}
