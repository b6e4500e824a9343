//! The storage side of `eventstream serve`: the data dir lock, CLI errors,
//! write failures, restarts, recovery, group commit, roll and retention,
//! the full policies, and graceful shutdown.

mod common;

use std::collections::HashSet;
use std::fs::OpenOptions;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;
use eventstream_core::wire::{Reason, Status};
use eventstream_core::Priority;

fn tx(id: u64) -> Vec<u8> {
    frame(id, Priority::Medium, "orders/eu", &[9u8; 200], true)
}

/// Sends one event at a time and returns its ack (each is its own record).
fn store_one(c: &mut Client, id: u64) -> u64 {
    c.send(&tx(id));
    let a = c.acks(1)[0];
    assert_eq!(a.status, Status::Stored, "{a:?}");
    a.offset
}

/// A log of ten single-event records, its server stopped; the segment.
fn ten_records_then_stop(tag: &str) -> (TempDir, PathBuf) {
    let dir = TempDir::new(tag);
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    for id in 0..10 {
        store_one(&mut c, id);
    }
    let _ = server.terminate();
    let seg = segments(&dir.data()).pop().unwrap();
    (dir, seg)
}

#[test]
fn a_second_server_on_the_same_data_dir_is_refused() {
    let dir = TempDir::new("lock");
    let _first = Server::start(&dir.data(), &[]);
    let err = Server::try_start(&dir.data(), &[]).err().expect("refused");
    assert!(!err.status.success());
    assert!(
        err.stderr.contains("locked by another running server"),
        "{}",
        err.stderr
    );
    assert_eq!(
        err.stderr.lines().count(),
        1,
        "one clear line: {}",
        err.stderr
    );
}

#[test]
fn bad_flags_and_unusable_data_dirs_give_one_line_and_a_non_zero_exit() {
    let dir = TempDir::new("flags");
    for args in [
        vec!["serve", "--fsync", "sometimes"],
        vec!["serve", "--segment-bytes", "12XB"],
        vec!["serve", "--group-commit-delay", "2s"],
        vec!["serve", "--max-frame", "20"],
        vec!["serve", "--listen", "not-an-address"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .arg("--data")
            .arg(dir.data())
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.lines().count(), 1, "{args:?}: {err}");
        assert!(err.starts_with("eventstream: error: "), "{args:?}: {err}");
    }
    // A data dir under a regular file cannot be created.
    let file = dir.path().join("plain");
    std::fs::write(&file, b"x").unwrap();
    let err = Server::try_start(&file.join("data"), &[])
        .err()
        .expect("refused");
    assert!(!err.status.success());
    assert!(
        err.stderr.contains("cannot create data dir"),
        "{}",
        err.stderr
    );
    assert_eq!(err.stderr.lines().count(), 1, "{}", err.stderr);
}

#[test]
fn a_failed_write_answers_storage_failed_and_the_server_recovers() {
    let dir = TempDir::new("fsize");
    // Files may not grow past 64 KiB: writes past it fail with EFBIG.
    let server = Server::start_with(&dir.data(), &["--fsync", "never"], |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; it runs in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 64 * 1024,
                    rlim_max: libc::RLIM_INFINITY,
                };
                libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
                Ok(())
            });
        }
    });
    let mut c = server.connect();
    let mut failed = Vec::new();
    let mut stored = 0;
    let mut id = 1;
    while failed.is_empty() {
        assert!(id < 2000, "no write ever failed");
        c.send(&tx(id));
        let a = c.acks(1)[0];
        match (a.status, a.reason) {
            (Status::Stored, _) => stored += 1,
            (Status::Rejected, Reason::StorageFailed) => failed.push(id),
            other => panic!("unexpected {other:?}"),
        }
        id += 1;
    }
    assert!(stored > 100);
    assert_eq!(server.metric("eventstream_storage_failed"), 1.0);
    // Lift the limit: within about a second the log takes writes again.
    let lim = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: prlimit on our own child.
    let rc = unsafe { libc::prlimit(server.pid(), libc::RLIMIT_FSIZE, &lim, std::ptr::null_mut()) };
    assert_eq!(rc, 0);
    std::thread::sleep(Duration::from_millis(1200));
    // The failed id was not kept for dedup: its retry is stored.
    let mut recovered = false;
    for _ in 0..50 {
        c.send(&tx(failed[0]));
        let a = c.acks(1)[0];
        if a.status == Status::Stored {
            recovered = true;
            break;
        }
        assert_eq!(a.reason, Reason::StorageFailed);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(recovered, "the server never recovered");
    assert!(server.stderr().contains("storage recovered"));
    store_one(&mut c, 5000);
    // Nothing half-written: every record checks, offsets are dense.
    let (ok, _, err) = inspect(&dir.data(), &["--verify"]);
    assert!(ok, "{err}");
    let events = inspect_events(&dir.data());
    assert_eq!(events.len(), stored + 2);
}

#[test]
fn restart_after_sigterm_exits_zero_and_offsets_continue() {
    let dir = TempDir::new("restart");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    let mut bytes = Vec::new();
    for id in 0..50 {
        bytes.extend(frame(id, Priority::ALL[(id % 5) as usize], "t", b"p", true));
    }
    c.send(&bytes);
    assert_stored(&c.acks(50));
    let (status, took) = server.terminate();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    assert_eq!(store_one(&mut c, 100), 50);
}

#[test]
fn a_torn_tail_is_truncated_and_the_server_starts() {
    let (dir, seg) = ten_records_then_stop("torn");
    let good = std::fs::metadata(&seg).unwrap().len();
    let bytes = std::fs::read(&seg).unwrap();
    // Half of a copy of the last record, as a crash mid-write leaves it.
    let tail = bytes[bytes.len() - 150..bytes.len() - 40].to_vec();
    OpenOptions::new()
        .append(true)
        .open(&seg)
        .unwrap()
        .write_all(&tail)
        .unwrap();
    let server = Server::start(&dir.data(), &[]);
    assert!(server.stderr().contains("torn tail"), "{}", server.stderr());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good);
    let mut c = server.connect();
    assert_eq!(store_one(&mut c, 100), 10);
}

#[test]
fn corruption_mid_segment_refuses_to_start_without_repair() {
    let (dir, seg) = ten_records_then_stop("corrupt");
    let mut bytes = std::fs::read(&seg).unwrap();
    let record = (bytes.len() - 16) / 10;
    let bad_at = 16 + 2 * record;
    bytes[bad_at + 100] ^= 0x55;
    std::fs::write(&seg, &bytes).unwrap();
    let err = Server::try_start(&dir.data(), &[]).err().expect("refused");
    assert!(!err.status.success());
    assert!(
        err.stderr
            .contains(&format!("bad record at position {bad_at}")),
        "{}",
        err.stderr
    );
    let (ok, _, verr) = inspect(&dir.data(), &["--verify"]);
    assert!(!ok);
    assert!(verr.contains(&format!("position {bad_at}")), "{verr}");
    let server = Server::start(&dir.data(), &["--repair"]);
    assert!(server.stderr().contains("dropped"), "{}", server.stderr());
    let mut c = server.connect();
    assert_eq!(store_one(&mut c, 100), 2);
}

#[test]
fn fsync_always_acks_after_a_group_commit() {
    let dir = TempDir::new("always");
    let server = Server::start(&dir.data(), &["--fsync", "always"]);
    let mut c = server.connect();
    let mut bytes = Vec::new();
    for id in 0..2000 {
        bytes.extend(frame(
            id,
            Priority::ALL[(id % 5) as usize],
            "t",
            &[1; 100],
            true,
        ));
    }
    c.send(&bytes);
    assert_stored(&c.acks(2000));
    let fsyncs = server.metric("eventstream_fsync_total");
    assert!(fsyncs >= 1.0);
    assert!(fsyncs < 2000.0, "one fsync per event: no group commit");
    eprintln!("2000 events, {fsyncs} fsyncs");
}

/// Sends `n` acked events one at a time, each after the previous ack;
/// returns the time it took and the server's fsync count.
fn one_by_one(server: &Server, n: u64) -> (Duration, f64) {
    let mut c = server.connect();
    let t0 = Instant::now();
    for id in 0..n {
        c.send(&tx(id));
        assert_stored(&c.acks(1));
    }
    (t0.elapsed(), server.metric("eventstream_fsync_total"))
}

#[test]
fn group_commit_spaces_its_fsyncs_by_the_delay() {
    // Back to back: each lone event gets its own fsync.
    let dir = TempDir::new("gc0");
    let server = Server::start(
        &dir.data(),
        &["--fsync", "always", "--group-commit-delay", "0ms"],
    );
    let (_, fsyncs) = one_by_one(&server, 40);
    assert!(fsyncs >= 40.0, "{fsyncs} fsyncs for 40 lone events");
    // 20 ms apart: the acks wait for the spacing, and no two fsyncs
    // start closer than that.
    let dir = TempDir::new("gc20");
    let server = Server::start(
        &dir.data(),
        &["--fsync", "always", "--group-commit-delay", "20ms"],
    );
    let (took, fsyncs) = one_by_one(&server, 20);
    let most = took.as_secs_f64() / 0.020 + 1.0;
    assert!(fsyncs <= most, "{fsyncs} fsyncs in {took:?}");
    assert!(took >= Duration::from_millis(19 * 20), "{took:?}");
}

/// Sends `rounds` writes of 50 transactional events, each after the last
/// one's acks, checking every ack says STORED; returns how many.
fn stored_rounds(c: &mut Client, rounds: u64) -> usize {
    for round in 0..rounds {
        let bytes: Vec<u8> = (0..50).flat_map(|i| tx(round * 100 + i)).collect();
        c.send(&bytes);
        assert_stored(&c.acks(50));
    }
    rounds as usize * 50
}

#[test]
fn segments_roll_and_retention_deletes_the_oldest() {
    let dir = TempDir::new("roll");
    let server = Server::start(
        &dir.data(),
        &["--segment-bytes", "16KiB", "--retention-bytes", "64KiB"],
    );
    stored_rounds(&mut server.connect(), 20);
    let segs = segments(&dir.data());
    assert!(segs.len() >= 3, "{segs:?}");
    let first = segs[0].file_name().unwrap().to_str().unwrap().to_string();
    assert_ne!(first, "00000000000000000000.log", "the oldest was deleted");
    let total: u64 = segs
        .iter()
        .map(|s| std::fs::metadata(s).unwrap().len())
        .sum();
    assert!(total <= 64 * 1024 + 1024 * 1024, "{total}");
    let (ok, _, err) = inspect(&dir.data(), &["--verify"]);
    assert!(ok, "{err}");
    assert!(server.stderr().contains("retention deleted"));
}

#[test]
fn segments_roll_under_group_commit_and_every_ack_survives_a_kill() {
    // The sync thread fsyncs what a roll closed; acks still wait for it.
    let dir = TempDir::new("rollalways");
    let server = Server::start(
        &dir.data(),
        &["--segment-bytes", "16KiB", "--fsync", "always"],
    );
    let acked = stored_rounds(&mut server.connect(), 20);
    let fsyncs = server.metric("eventstream_fsync_total");
    assert!(fsyncs >= 20.0, "{fsyncs} fsyncs for 20 acked rounds");
    server.kill();
    assert!(segments(&dir.data()).len() >= 10);
    let (ok, _, err) = inspect(&dir.data(), &["--verify"]);
    assert!(ok, "{err}");
    assert_eq!(inspect_events(&dir.data()).len(), acked);
}

/// Waits (at most 10 s) until the prefill thread has the next segment
/// ready; returns whether it came.
fn prefill_ready(data: &Path) -> bool {
    let file = data.join("next-segment.prefill");
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(10) {
        // Made to its full size and left for the next roll.
        if std::fs::metadata(&file).is_ok_and(|m| m.len() == 64 * 1024) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    false
}

/// Sends `rounds` of 50 transactional events, each round once a segment
/// made ahead of use is ready for the next roll, and each after the last
/// one's acks; returns how many were stored.
fn rounds_onto_made_segments(c: &mut Client, data: &Path, rounds: std::ops::Range<u64>) -> usize {
    let mut stored = 0;
    for round in rounds {
        assert!(
            prefill_ready(data),
            "no segment made ahead of round {round}"
        );
        let bytes: Vec<u8> = (0..50).flat_map(|i| tx(round * 100 + i)).collect();
        c.send(&bytes);
        assert_stored(&c.acks(50));
        stored += 50;
    }
    stored
}

#[test]
fn under_fsync_always_segments_are_made_ahead_and_end_with_their_last_record() {
    let dir = TempDir::new("prefill");
    let data = dir.data();
    let flags = ["--segment-bytes", "64KiB", "--fsync", "always"];
    let server = Server::start(&data, &flags);
    let mut c = server.connect();
    // 50 events of about 260 bytes a round: a roll every five rounds,
    // each onto a segment made ahead of use (waited for here; a roll with
    // none ready takes a plain segment).
    let mut acked = rounds_onto_made_segments(&mut c, &data, 0..24);
    let segs = segments(&data);
    assert!(segs.len() >= 4, "{segs:?}");
    // The active segment has its full size (zeros after the records); the
    // closed ones were cut to their records, which `--verify` checks.
    let newest = segs.last().unwrap();
    assert_eq!(std::fs::metadata(newest).unwrap().len(), 64 * 1024);
    let (ok, out, err) = inspect(&data, &["--verify"]);
    assert!(ok, "{err}");
    assert!(out.contains("space made ahead of use"), "{out}");
    // A crash leaves the zeros: start-up cuts them, says so, and every
    // acked event is there.
    server.kill();
    let server = Server::start(&data, &flags);
    assert!(
        server.stderr().contains("zero-filled tail"),
        "{}",
        server.stderr()
    );
    assert_eq!(inspect_events(&data).len(), acked);
    // Rolls onto a made segment again, then a clean stop: it cuts the
    // zeros and removes the segment made for the next roll.
    let mut c = server.connect();
    let before = segments(&data).len();
    acked += rounds_onto_made_segments(&mut c, &data, 100..106);
    assert!(segments(&data).len() > before);
    let newest = segments(&data).pop().unwrap();
    assert_eq!(std::fs::metadata(&newest).unwrap().len(), 64 * 1024);
    let _ = server.terminate();
    assert!(std::fs::metadata(&newest).unwrap().len() < 64 * 1024);
    assert!(!data.join("next-segment.prefill").exists());
    let (ok, out, err) = inspect(&data, &["--verify"]);
    assert!(ok, "{err}");
    assert!(!out.contains("made ahead"), "{out}");
    assert_eq!(inspect_events(&data).len(), acked);

    // Off: no file is made, and an always segment grows by appends.
    let dir = TempDir::new("noprefill");
    let data = dir.data();
    let server = Server::start(&data, &[&flags[..], &["--no-segment-prefill"]].concat());
    let mut c = server.connect();
    for id in 0..5 {
        store_one(&mut c, id);
    }
    assert!(!data.join("next-segment.prefill").exists());
    let newest = segments(&data).pop().unwrap();
    assert!(std::fs::metadata(newest).unwrap().len() < 4096);
    let _ = server.terminate();
}

#[test]
fn a_full_dedup_table_with_reject_answers_dedup_full() {
    let dir = TempDir::new("dedupfull");
    let server = Server::start(
        &dir.data(),
        &["--dedup-capacity", "64", "--dedup-full", "reject"],
    );
    let mut c = server.connect();
    let mut bytes = Vec::new();
    for id in 0..200 {
        bytes.extend(tx(id));
    }
    c.send(&bytes);
    let acks = c.acks(200);
    let full = acks
        .iter()
        .filter(|a| a.status == Status::Rejected && a.reason == Reason::DedupFull)
        .count();
    let stored = acks.iter().filter(|a| a.status == Status::Stored).count();
    assert_eq!(full + stored, 200);
    assert!(full > 0 && stored >= 64, "full {full} stored {stored}");
    assert_eq!(
        server.metric("eventstream_rejected_total{reason=\"dedup_full\"}"),
        full as f64
    );
}

#[test]
fn reject_when_full_answers_overloaded_instead_of_pushing_back() {
    let dir = TempDir::new("overload");
    let server = Server::start(
        &dir.data(),
        &[
            "--when-full",
            "reject",
            "--pool-events",
            "64",
            "--ring-capacity",
            "256",
        ],
    );
    let mut c = server.connect();
    let mut bytes = Vec::new();
    for id in 0..2000 {
        bytes.extend(frame(id, Priority::High, "alerts", &[3; 300], true));
    }
    c.send(&bytes);
    let acks = c.acks(2000);
    let over = acks
        .iter()
        .filter(|a| a.status == Status::Rejected && a.reason == Reason::Overloaded)
        .count();
    let stored: HashSet<u64> = acks
        .iter()
        .filter(|a| a.status == Status::Stored)
        .map(|a| a.event_id)
        .collect();
    assert_eq!(over + stored.len(), 2000);
    assert!(over > 0, "nothing was overloaded");
    let logged: HashSet<u64> = wait_for_events(&dir.data(), stored.len())
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(logged, stored);
}

#[test]
fn graceful_shutdown_answers_late_frames_shutting_down_and_stores_the_rest() {
    let dir = TempDir::new("drain");
    let server = Server::start(&dir.data(), &[]);
    let c = server.connect();
    let mut w = c.stream.try_clone().unwrap();
    let pump = std::thread::spawn(move || {
        let mut id = 0u64;
        loop {
            let mut bytes = Vec::new();
            for _ in 0..50 {
                bytes.extend(frame(
                    id,
                    Priority::ALL[(id % 5) as usize],
                    "t",
                    &[1; 64],
                    true,
                ));
                id += 1;
            }
            if w.write_all(&bytes).is_err() || id > 5_000_000 {
                return id;
            }
        }
    });
    let mut c = c;
    let early = c.acks(2000);
    assert_stored(&early);
    // SAFETY: kill on our own child.
    unsafe { libc::kill(server.pid(), libc::SIGTERM) };
    let late = c.acks_until_close();
    let _ = pump.join();
    let all: Vec<_> = early.iter().chain(late.iter()).collect();
    let stored: HashSet<u64> = all
        .iter()
        .filter(|a| a.status == Status::Stored)
        .map(|a| a.event_id)
        .collect();
    let refused: Vec<_> = all
        .iter()
        .filter(|a| a.status == Status::Rejected)
        .collect();
    assert!(
        !refused.is_empty(),
        "no frame was read after the shutdown began"
    );
    assert!(refused.iter().all(|a| a.reason == Reason::ShuttingDown));
    let mut server = server;
    let status = wait_timeout(&mut server.child, Duration::from_secs(5)).expect("exit within 5 s");
    assert!(status.success());
    let logged: HashSet<u64> = inspect_events(&dir.data())
        .iter()
        .map(|e| e.event_id)
        .collect();
    assert_eq!(
        logged, stored,
        "every STORED ack is in the log, nothing else"
    );
}

#[test]
fn a_full_pool_pushes_back_and_loses_nothing() {
    let dir = TempDir::new("backpressure");
    let server = Server::start(
        &dir.data(),
        &["--pool-events", "64", "--ring-capacity", "256", "--pin"],
    );
    let mut c = server.connect();
    let mut bytes = Vec::new();
    for id in 0..5000 {
        bytes.extend(frame(
            id,
            Priority::ALL[(id % 5) as usize],
            "t",
            &[7; 300],
            true,
        ));
    }
    let mut w = c.stream.try_clone().unwrap();
    let writer = std::thread::spawn(move || w.write_all(&bytes).unwrap());
    let acks = c.acks(5000);
    writer.join().unwrap();
    assert_stored(&acks);
    assert_eq!(inspect_events(&dir.data()).len(), 5000);
    assert_eq!(
        server.metric("eventstream_rejected_total{reason=\"overloaded\"}"),
        0.0
    );
}

#[test]
fn inspect_pages_with_from_and_limit_and_summarises() {
    let dir = TempDir::new("pages");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    for id in 0..10 {
        store_one(&mut c, id);
    }
    let (ok, out, _) = inspect(&dir.data(), &["--json", "--from", "5", "--limit", "3"]);
    assert!(ok);
    let offsets: Vec<u64> = out
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["offset"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(offsets, [5, 6, 7]);
    let (ok, out, _) = inspect(&dir.data(), &[]);
    assert!(ok);
    assert!(out.contains("events:    10"), "{out}");
    assert!(out.contains("transactional  10"), "{out}");
    assert!(out.contains("offsets:   0..9"), "{out}");
}

#[test]
fn inspect_from_an_offset_seeks_through_the_segments_index() {
    let dir = TempDir::new("seek");
    let server = Server::start(&dir.data(), &["--segment-bytes", "64KiB"]);
    stored_rounds(&mut server.connect(), 30);
    let (status, _) = server.terminate();
    assert!(status.success());
    let segs = segments(&dir.data());
    assert!(segs.len() >= 3, "{segs:?}");
    let (ok, all, err) = inspect(&dir.data(), &["--json"]);
    assert!(ok, "{err}");
    let all: Vec<&str> = all.lines().collect();
    assert_eq!(all.len(), 1500);
    // Offsets inside closed segments, at their first record, and in the
    // newest one: the same lines as the whole listing from there.
    for from in [1u64, 77, 250, 251, 699, 1000, 1499] {
        let (ok, out, err) = inspect(&dir.data(), &["--json", "--from", &from.to_string()]);
        assert!(ok, "{err}");
        let got: Vec<&str> = out.lines().collect();
        assert_eq!(got, all[from as usize..], "from {from}");
    }
    // The closed segments got their index, which a damaged copy does not
    // fool.
    let index = segs[0].with_extension("index");
    assert!(index.exists(), "no {}", index.display());
    let mut bytes = std::fs::read(&index).unwrap();
    let n = bytes.len();
    bytes[n - 20] ^= 0xFF;
    std::fs::write(&index, &bytes).unwrap();
    let (ok, out, err) = inspect(&dir.data(), &["--json", "--from", "33"]);
    assert!(ok, "{err}");
    assert_eq!(out.lines().collect::<Vec<_>>(), all[33..]);
}

#[test]
fn a_failed_fsync_ends_the_process_before_any_ack_it_covers() {
    let dir = TempDir::new("fsyncfail");
    let mut server = Server::start_with(&dir.data(), &["--fsync", "always"], |cmd| {
        cmd.env("EVENTSTREAM_FAIL_FSYNC_AFTER", "0");
    });
    let mut c = server.connect();
    c.send(&tx(1));
    // The only fsync fails: no STORED ack may go out; the server exits 1.
    let acks = c.acks_until_close();
    assert!(acks.is_empty(), "{acks:?}");
    let status = wait_timeout(&mut server.child, Duration::from_secs(5)).expect("exit");
    assert_eq!(status.code(), Some(1));
    assert!(
        server.stderr().contains("fsync failed"),
        "{}",
        server.stderr()
    );
    // Start-up recovery then checks the log, and the server runs again.
    drop(server);
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    c.send(&tx(2));
    assert_eq!(c.acks(1)[0].status, Status::Stored);
}

#[test]
fn the_dedup_sweep_frees_expired_ids_and_they_are_new_again() {
    let dir = TempDir::new("sweep");
    let server = Server::start(
        &dir.data(),
        &["--dedup-window", "1s", "--dedup-sweep", "1s"],
    );
    let mut c = server.connect();
    let mut bytes = Vec::new();
    for id in 0..100u64 {
        bytes.extend(tx(id));
    }
    c.send(&bytes);
    assert_stored(&c.acks(100));
    // Inside the window the same ids are duplicates.
    c.send(&tx(7));
    assert_eq!(c.acks(1)[0].status, Status::Duplicate);
    // Past the window a sweep (slice by slice, on whichever thread runs the
    // transactional processor) frees all 100, and they are new again.
    let freed = |text: &str| -> u64 {
        text.lines()
            .filter_map(|l| l.strip_prefix("eventstream: dedup sweep freed "))
            .filter_map(|l| l.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while freed(&server.stderr()) < 100 {
        assert!(
            std::time::Instant::now() < deadline,
            "no sweep freed the ids: {}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    c.send(&tx(7));
    assert_eq!(c.acks(1)[0].status, Status::Stored);
}

#[test]
fn a_lone_batch_event_is_stored_when_its_window_ages_out() {
    // Nothing else arrives to push the window out: its age alone must
    // close it, write it and ack it, in every processor and storage mode.
    let dir = TempDir::new("lone-batch");
    let server = Server::start(&dir.data(), &["--batch-max-age", "50ms"]);
    let mut c = server.connect();
    for (round, id) in [(0u64, 1u64), (1, 2), (2, 3)] {
        let start = std::time::Instant::now();
        c.send(&frame(id, Priority::Batch, "metrics/cpu", &[7; 64], true));
        let acks = c.acks(1);
        assert_eq!(
            acks[0].status,
            Status::Stored,
            "round {round}: {:?}",
            acks[0]
        );
        assert_eq!(acks[0].event_id, id);
        // A generous bound (the window closes after 50 ms): a window left
        // open until more input would never be acked at all.
        assert!(start.elapsed() < Duration::from_secs(5), "round {round}");
    }
    let events = wait_for_events(&dir.data(), 3);
    assert_eq!(events.len(), 3);
}

/// Bytes of `path` in the page cache.
fn resident_bytes(path: &Path) -> u64 {
    use std::os::fd::AsRawFd;
    let file = std::fs::File::open(path).unwrap();
    let len = file.metadata().unwrap().len() as usize;
    // SAFETY: sysconf only reads its argument.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
    // SAFETY: a read-only shared mapping of a file open for reading, of its
    // current length; unmapped below and never dereferenced.
    let map = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            file.as_raw_fd(),
            0,
        )
    };
    assert_ne!(map, libc::MAP_FAILED, "{}", std::io::Error::last_os_error());
    let mut pages = vec![0u8; len.div_ceil(page)];
    // SAFETY: `pages` has one byte for each page of the mapping.
    let rc = unsafe { libc::mincore(map, len, pages.as_mut_ptr()) };
    let err = std::io::Error::last_os_error();
    // SAFETY: the mapping made above, not used after this.
    unsafe { libc::munmap(map, len) };
    assert_eq!(rc, 0, "{err}");
    pages.iter().filter(|&&p| p & 1 == 1).count() as u64 * page as u64
}

#[test]
fn the_logs_written_pages_leave_the_page_cache() {
    let (cached, len) = written_pages(&["--drop-written-pages", "always"], None);
    assert!(cached < len / 2, "{cached} of {len} bytes still cached");
}

#[test]
fn the_logs_written_pages_leave_the_page_cache_under_fsync_always() {
    let (cached, len) = written_pages(
        &["--drop-written-pages", "always", "--fsync", "always"],
        None,
    );
    assert!(cached < len / 2, "{cached} of {len} bytes still cached");
}

#[test]
fn the_logs_written_pages_stay_cached_with_drop_never() {
    let (cached, len) = written_pages(&["--drop-written-pages", "never"], None);
    assert!(cached > len / 2, "only {cached} of {len} bytes cached");
}

#[test]
fn slow_appends_keep_their_pages_by_default() {
    // 6,000 events/s of 3.5 KB: about 21 MB/s, under the 96 MiB/s from
    // which the default (`auto`) drops pages.
    let (cached, len) = written_pages(&[], Some("6000"));
    assert!(cached > len / 2, "only {cached} of {len} bytes cached");
}

/// Runs 16,000 acked events of 3.5 KB through a server with `flags`
/// (closed loop, or open loop at `rate` events/s) and returns how many
/// bytes of the log are in the page cache, and the log's length.
fn written_pages(flags: &[&str], rate: Option<&str>) -> (u64, u64) {
    let dir = TempDir::new("dropcache");
    let mut args = vec!["--max-frame", "4096"];
    args.extend_from_slice(flags);
    let server = Server::start(&dir.data(), &args);
    let mut load = std::process::Command::new(BIN);
    load.args(["load", "--target", &server.addr.to_string()])
        .args([
            "--events",
            "16000",
            "--connections",
            "2",
            "--payload",
            "3500",
        ])
        .args(["--ack", "--json"]);
    if let Some(r) = rate {
        load.args(["--rate", r]);
    }
    let out = load.output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let segs = segments(&dir.data());
    assert_eq!(segs.len(), 1, "{segs:?}");
    let len = std::fs::metadata(&segs[0]).unwrap().len();
    assert!(len > 50 << 20, "only {len} bytes written");
    // Everything is acked, so written; with the drop, all but the last few
    // MiB were handed to writeback and then dropped behind it.
    (resident_bytes(&segs[0]), len)
}

/// A small tmpfs mounted for one test (root only), unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return None;
        }
        std::fs::create_dir_all(at).unwrap();
        let ok = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(at)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount")
            .arg("-l")
            .arg(&self.0)
            .status();
    }
}

#[test]
fn a_full_disk_answers_storage_failed_and_resumes_when_space_returns() {
    let dir = TempDir::new("diskfull");
    let Some(fs) = Tmpfs::mount(&dir.path().join("mnt"), "4m") else {
        eprintln!("not root or no mount: the RLIMIT_FSIZE test covers write failures");
        return;
    };
    let data = fs.0.join("data");
    // Room taken by another file, to be given back later.
    std::fs::write(fs.0.join("filler"), vec![7u8; 1 << 20]).unwrap();
    let server = Server::start(&data, &["--segment-bytes", "1MiB"]);
    let mut c = server.connect();
    let mut stored: Vec<(u64, u64)> = Vec::new();
    let mut failed = None;
    let mut id = 1;
    while failed.is_none() {
        assert!(id < 100_000, "the disk never filled");
        let bytes: Vec<u8> = (id..id + 50).flat_map(tx).collect();
        c.send(&bytes);
        for (a, want) in c.acks(50).iter().zip(id..) {
            match (a.status, a.reason) {
                (Status::Stored, _) => stored.push((want, a.offset)),
                (Status::Rejected, Reason::StorageFailed) => {
                    failed.get_or_insert(want);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        id += 50;
    }
    assert!(stored.len() > 1000, "{} stored", stored.len());
    assert_eq!(server.metric("eventstream_storage_failed"), 1.0);
    // Space comes back.
    std::fs::remove_file(fs.0.join("filler")).unwrap();
    let mut recovered = false;
    for _ in 0..50 {
        c.send(&tx(failed.unwrap()));
        let a = c.acks(1)[0];
        if a.status == Status::Stored {
            stored.push((failed.unwrap(), a.offset));
            recovered = true;
            break;
        }
        assert_eq!(a.reason, Reason::StorageFailed);
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(recovered, "the server never resumed");
    let (status, _) = server.terminate();
    assert!(status.success());
    // Nothing half-written, and every STORED ack is in the log.
    let (ok, _, err) = inspect(&data, &["--verify"]);
    assert!(ok, "{err}");
    let events = inspect_events(&data);
    let at: std::collections::HashMap<u64, u64> =
        events.iter().map(|e| (e.offset, e.event_id)).collect();
    for (id, offset) in &stored {
        assert_eq!(at.get(offset), Some(id), "acked id {id} at {offset}");
    }
    drop(fs);
}
