//! Power cuts, simulated: the server runs on a FUSE file system that keeps
//! every write in memory until an fsync of that file (or of the directory,
//! for creates, renames and deletes) makes it durable (tests/lazyfs). A cut
//! kills the server with SIGKILL, throws away everything not durable, and
//! starts it again on what is left, without `--repair`.
//!
//! - `--fsync always`: no acked event is ever lost, over 50 cuts.
//! - The default policy (`interval:1000`): only events acked within the
//!   last interval (and the time its fsync takes, 1 s allowed) before the
//!   cut may be lost, start-up recovers on its own,
//!   and the dedup table matches the log (a resent acked id is DUPLICATE
//!   exactly when the log still holds it).
//!
//! Needs root and /dev/fuse (CI runs as root); elsewhere it says so and
//! passes without running.

mod common;
mod lazyfs;

use std::collections::HashMap;
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use eventstream_core::wire::Status;
use eventstream_core::Priority;
use lazyfs::rig::{can_mount, Rig};

/// An acked transactional event and when its ack arrived.
#[derive(Clone, Copy, Debug)]
struct Acked {
    id: u64,
    offset: u64,
    at: Instant,
}

/// Bursts of 32 acked transactional events, `pause` apart, until the
/// server dies or `stop`.
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
    let mut next = base;
    let mut buf = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let bytes: Vec<u8> = (next..next + 32)
            .flat_map(|id| frame(id, Priority::Medium, "power/cut", &[id as u8; 200], true))
            .collect();
        next += 32;
        if std::io::Write::write_all(&mut s, &bytes).is_err() {
            break;
        }
        let acks = read_acks(&mut s, &mut buf, 32);
        for a in &acks {
            assert_eq!(a.status, Status::Stored, "event {}", a.event_id);
            acked.push(Acked {
                id: a.event_id,
                offset: a.offset,
                at: Instant::now(),
            });
        }
        if acks.len() < 32 {
            break;
        }
        std::thread::sleep(pause);
    }
    acked
}

/// Each file of the data dir with its size and what `salvage` finds in
/// it, for a failure's message.
fn listing(data: &Path) -> String {
    let mut out = String::new();
    for p in std::fs::read_dir(data).unwrap() {
        let p = p.unwrap().path();
        let bytes = std::fs::read(&p).unwrap_or_default();
        let mut pieces = Vec::new();
        if let Some(base) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            eventstream_core::record::salvage(&bytes, base, u64::MAX, |x| pieces.push(x));
        }
        out.push_str(&format!("{} {} {pieces:?}\n", p.display(), bytes.len()));
    }
    out
}

/// What the log holds: offset -> event id.
fn log_of(data: &Path) -> HashMap<u64, u64> {
    inspect_events(data)
        .iter()
        .map(|e| (e.offset, e.event_id))
        .collect()
}

/// Starts the server on the rig, runs two producers for `for_ms`, then
/// cuts the power under them; returns what was acked and when the cut
/// came.
fn cycle(rig: &mut Rig, flags: &[&str], base: u64, for_ms: u64) -> (Vec<Acked>, Instant) {
    let server = Server::start(&rig.data(), flags);
    let stop = Arc::new(AtomicBool::new(false));
    // Light load: the log is read back through FUSE at every start.
    let producers: Vec<_> = (0..2u64)
        .map(|p| {
            let (addr, stop) = (server.addr, stop.clone());
            let pause = Duration::from_millis(10);
            std::thread::spawn(move || produce(addr, base | p << 28, pause, stop))
        })
        .collect();
    std::thread::sleep(Duration::from_millis(for_ms));
    let cut_at = Instant::now();
    rig.log.extend(
        server
            .stderr()
            .lines()
            .filter(|l| !l.starts_with("eventstream: in "))
            .map(|l| format!("{l}\n")),
    );
    rig.cut(server);
    stop.store(true, Ordering::Relaxed);
    let acked = producers
        .into_iter()
        .flat_map(|p| p.join().unwrap())
        .collect();
    (acked, cut_at)
}

/// Resends `acked` ids to a server on the rig: each is DUPLICATE at its
/// offset when `log` holds it there, and STORED otherwise (the dedup table
/// matches the log).
fn resend(server: &Server, acked: &[Acked], log: &HashMap<u64, u64>) -> (usize, usize) {
    let mut c = server.connect();
    let (mut dup, mut again) = (0, 0);
    for chunk in acked.chunks(200) {
        let bytes: Vec<u8> = chunk
            .iter()
            .flat_map(|a| frame(a.id, Priority::Medium, "power/cut", b"again", true))
            .collect();
        c.send(&bytes);
        for (ack, a) in c.acks(chunk.len()).iter().zip(chunk) {
            if log.get(&a.offset) == Some(&a.id) {
                assert_eq!(
                    (ack.status, ack.offset),
                    (Status::Duplicate, a.offset),
                    "id {} is in the log at {}",
                    a.id,
                    a.offset
                );
                dup += 1;
            } else {
                assert_eq!(ack.status, Status::Stored, "id {} is not in the log", a.id);
                again += 1;
            }
        }
    }
    (dup, again)
}

#[test]
fn power_cuts_under_fsync_always_lose_no_acked_event() {
    if !can_mount() {
        return;
    }
    let cuts: u64 = std::env::var("ES_POWER_CUTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(50);
    let mut rig = Rig::new("power-always");
    let flags = ["--fsync", "always", "--segment-bytes", "64KiB"];
    let mut rng = Rng(0xFA11);
    let mut all: Vec<Acked> = Vec::new();
    let t0 = Instant::now();
    for cut in 0..cuts {
        let (acked, _) = cycle(&mut rig, &flags, (cut + 1) << 32, 100 + rng.below(300));
        all.extend(acked);
    }
    // What is left: every acked event at its offset, and every acked id a
    // duplicate.
    let log = log_of(&rig.data());
    for a in &all {
        assert_eq!(
            log.get(&a.offset),
            Some(&a.id),
            "acked id {} at offset {} lost",
            a.id,
            a.offset
        );
    }
    let server = Server::start(&rig.data(), &flags);
    let sample: Vec<Acked> = all.iter().rev().take(2000).copied().collect();
    let (dup, again) = resend(&server, &sample, &log);
    assert_eq!(again, 0);
    let (file_syncs, dir_syncs) = rig.fs.syncs();
    eprintln!(
        "{cuts} power cuts under --fsync always in {:.1} s: {} acked events, 0 lost; {dup} resent ids all DUPLICATE; {file_syncs} file and {dir_syncs} directory fsyncs",
        t0.elapsed().as_secs_f64(),
        all.len()
    );
    assert!(
        all.len() as u64 > cuts * 32,
        "too little load: {}",
        all.len()
    );
}

#[test]
fn power_cuts_under_the_default_policy_lose_only_the_last_interval() {
    if !can_mount() {
        return;
    }
    let cuts: u64 = std::env::var("ES_POWER_CUTS_DEFAULT")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8);
    let mut rig = Rig::new("power-default");
    let flags = ["--segment-bytes", "64KiB"];
    // The policy's interval, plus the time its fsync may take on a loaded
    // test machine (the file system runs in this debug-built process).
    let allowed = Duration::from_millis(1000 + 1000);
    let mut rng = Rng(0xDEFA);
    let (mut total, mut lost_total, mut dup_total) = (0usize, 0usize, 0usize);
    for cut in 0..cuts {
        let (acked, cut_at) = cycle(&mut rig, &flags, (cut + 1) << 32, 2500 + rng.below(2000));
        // Start-up recovers on its own (no --repair) ...
        let server = match Server::try_start(&rig.data(), &flags) {
            Ok(s) => s,
            Err(f) => panic!(
                "cut {cut}: {}\n{}\nearlier starts:\n{}",
                f.stderr,
                listing(&rig.data()),
                rig.log
            ),
        };
        let log = log_of(&rig.data());
        let mut lost = 0;
        for a in &acked {
            match log.get(&a.offset) {
                Some(id) => assert_eq!(*id, a.id, "offset {} holds another event", a.offset),
                None => {
                    // ... and loses only what was acked within the interval.
                    assert!(
                        cut_at.duration_since(a.at) < allowed,
                        "id {} acked {:?} before the cut is lost",
                        a.id,
                        cut_at.duration_since(a.at)
                    );
                    lost += 1;
                }
            }
        }
        let (dup, again) = resend(&server, &acked, &log);
        assert_eq!(again, lost);
        total += acked.len();
        lost_total += lost;
        dup_total += dup;
        drop(server);
    }
    eprintln!(
        "{cuts} power cuts under the default policy: {total} acked events, {lost_total} lost (all acked within the last {allowed:?}), {dup_total} resent ids DUPLICATE and the rest STORED again"
    );
    assert!(total > 1000, "too little load: {total}");
}
