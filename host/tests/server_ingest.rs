//! `eventstream serve` over real TCP on 127.0.0.1: acks, offsets, dedup,
//! the legacy dialect, many connections, slow readers, idle cost, metrics.

mod common;

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use common::*;
use eventstream_core::wire::{Ack, Reason, Status, LEGACY_ID_BASE};
use eventstream_core::Priority;

const TOPICS: [&str; 3] = ["orders/eu", "metrics/cpu", "alerts"];

fn mixed_frames(n: u64, base: u64, rng: &mut Rng) -> (Vec<u8>, Vec<u64>) {
    let mut bytes = Vec::new();
    let mut ids = Vec::new();
    for i in 0..n {
        let id = base + i;
        let prio = Priority::ALL[rng.below(5) as usize];
        let len = 16 + rng.below(300) as usize;
        let payload: Vec<u8> = (0..len).map(|j| (j as u8) ^ (id as u8)).collect();
        bytes.extend(frame(
            id,
            prio,
            TOPICS[rng.below(3) as usize],
            &payload,
            true,
        ));
        ids.push(id);
    }
    (bytes, ids)
}

/// Writes `bytes` in random pieces from a second thread while the caller
/// reads acks (so credit never stalls the test itself).
fn send_split(client: &Client, bytes: Vec<u8>, seed: u64) -> std::thread::JoinHandle<()> {
    let mut w = client.stream.try_clone().unwrap();
    std::thread::spawn(move || {
        let mut rng = Rng(seed);
        let mut pos = 0;
        while pos < bytes.len() {
            let n = (1 + rng.below(700) as usize).min(bytes.len() - pos);
            w.write_all(&bytes[pos..pos + n]).unwrap();
            pos += n;
        }
    })
}

#[test]
fn frames_split_at_random_points_are_all_stored_at_their_acked_offsets() {
    let dir = TempDir::new("split");
    let server = Server::start(&dir.data(), &[]);
    let mut rng = Rng(7);
    let (bytes, ids) = mixed_frames(3000, 1 << 40, &mut rng);
    let mut c = server.connect();
    let writer = send_split(&c, bytes, 11);
    let acks = c.acks(ids.len());
    writer.join().unwrap();
    assert_stored(&acks);
    let acked: HashMap<u64, u64> = acks.iter().map(|a| (a.event_id, a.offset)).collect();
    assert_eq!(acked.len(), ids.len(), "one ack per event");
    let events = wait_for_events(&dir.data(), ids.len());
    assert_eq!(events.len(), ids.len());
    for e in &events {
        assert_eq!(acked.get(&e.event_id), Some(&e.offset), "{e:?}");
    }
    let (ok, _, err) = inspect(&dir.data(), &["--verify"]);
    assert!(ok, "{err}");
}

#[test]
fn transactional_duplicates_are_answered_with_the_originals_offset_across_restarts() {
    let dir = TempDir::new("dup");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    let tx = |id| frame(id, Priority::Medium, "orders/eu", b"payload", true);
    // Original and duplicate in one write: the duplicate's answer waits
    // for the original's offset.
    let mut burst = tx(1000);
    burst.extend(tx(1000));
    c.send(&burst);
    let acks = c.acks(2);
    let original = acks
        .iter()
        .find(|a| a.status == Status::Stored)
        .unwrap()
        .offset;
    let dup = acks.iter().find(|a| a.status == Status::Duplicate).unwrap();
    assert_eq!(dup.offset, original);
    // Later duplicates, transactional and realtime.
    c.send(&tx(1000));
    c.send(&frame(1000, Priority::High, "alerts", b"rt", true));
    for a in c.acks(2) {
        assert_eq!((a.status, a.offset), (Status::Duplicate, original));
    }
    // A realtime id that is not in the table is stored; batch never dedups.
    c.send(&frame(2000, Priority::Critical, "alerts", b"rt", true));
    assert_eq!(c.acks(1)[0].status, Status::Stored);
    let (status, took) = server.terminate();
    assert!(status.success(), "{status}");
    assert!(took < Duration::from_secs(5), "shutdown took {took:?}");
    let events = inspect_events(&dir.data());
    assert_eq!(
        events.iter().filter(|e| e.event_id == 1000).count(),
        1,
        "stored once"
    );
    // After a restart the table is rebuilt from the log.
    let server = Server::start(&dir.data(), &[]);
    assert!(server.stderr().contains("rebuilt with 1 transactional ids"));
    let mut c = server.connect();
    c.send(&tx(1000));
    let a = c.acks(1)[0];
    assert_eq!((a.status, a.offset), (Status::Duplicate, original));
    c.send(&frame(1000, Priority::High, "alerts", b"rt", true));
    assert_eq!(c.acks(1)[0].status, Status::Duplicate);
    c.send(&tx(1001));
    let a = c.acks(1)[0];
    assert_eq!(a.status, Status::Stored);
    assert_eq!(a.offset, events.len() as u64, "offsets continue");
}

#[test]
fn legacy_clients_are_stored_with_offset_ids_and_the_legacy_flag() {
    let dir = TempDir::new("legacy");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    let mut bytes = legacy_frame(4, "sensors/a", b"hello");
    bytes.extend(legacy_frame(2, "orders/x", b"order"));
    bytes.extend([0, 0, 0, 0]); // keep-alive
    bytes.extend(legacy_frame(0, "bulk", &[7u8; 100]));
    bytes.extend(legacy_frame(9, "bad-priority", b"x")); // skipped
    bytes.extend(legacy_frame(2, "orders/x", b"order")); // never deduplicated
    c.send(&bytes);
    let events = wait_for_events(&dir.data(), 4);
    assert_eq!(events.len(), 4);
    for e in &events {
        assert!(e.legacy);
        assert_eq!(e.event_id, LEGACY_ID_BASE + e.offset);
    }
    let classes: HashSet<&str> = events.iter().map(|e| e.class.as_str()).collect();
    assert_eq!(
        classes,
        HashSet::from(["realtime", "transactional", "batch"])
    );
    let rt = events.iter().find(|e| e.topic == "sensors/a").unwrap();
    assert_eq!((rt.priority.as_str(), rt.payload_len), ("critical", 5));
    assert_eq!(events.iter().filter(|e| e.topic == "orders/x").count(), 2);
    // No acks in this dialect.
    assert!(!c.closed_within(Duration::from_millis(300)));
    assert!(server
        .metrics_text()
        .contains("eventstream_legacy_skipped_total 1"));
}

#[test]
fn two_hundred_connections_sending_at_once_are_each_stored_exactly_once() {
    let dir = TempDir::new("many");
    let server = Server::start(&dir.data(), &[]);
    let addr = server.addr;
    let per = 100u64;
    let threads: Vec<_> = (0..200u64)
        .map(|conn| {
            std::thread::spawn(move || {
                let mut rng = Rng(conn);
                let (bytes, ids) = mixed_frames(per, (conn + 1) << 32, &mut rng);
                let mut c = Client::connect(addr);
                c.send(&bytes);
                let acks = c.acks(ids.len());
                acks.into_iter()
                    .map(|a| (a.event_id, a))
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    let mut acked = HashMap::new();
    for t in threads {
        for (id, a) in t.join().unwrap() {
            assert_eq!(a.status, Status::Stored);
            assert!(acked.insert(id, a.offset).is_none(), "one ack per event");
        }
    }
    assert_eq!(acked.len(), 200 * per as usize);
    let events = wait_for_events(&dir.data(), acked.len());
    assert_eq!(events.len(), acked.len(), "stored exactly once");
    for e in &events {
        assert_eq!(acked.get(&e.event_id), Some(&e.offset));
    }
}

#[test]
fn a_thousand_concurrent_connections_are_served() {
    // The test process itself needs the descriptors.
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on this process.
    unsafe {
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        lim.rlim_cur = lim.rlim_max;
        libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
    }
    assert!(
        lim.rlim_cur >= 2100,
        "need 2100 descriptors, have {}",
        lim.rlim_cur
    );
    let dir = TempDir::new("thousand");
    let server = Server::start(&dir.data(), &[]);
    let mut clients: Vec<Client> = (0..1000).map(|_| server.connect()).collect();
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&frame(
            10_000 + i as u64,
            Priority::High,
            "alerts",
            b"x",
            true,
        ));
    }
    for c in &mut clients {
        assert_eq!(c.acks(1)[0].status, Status::Stored);
    }
    assert_eq!(server.metric("eventstream_connections"), 1000.0);
}

#[test]
fn running_out_of_descriptors_does_not_spin() {
    let dir = TempDir::new("emfile");
    // A hard limit of 64 descriptors: accept hits EMFILE quickly.
    let server = Server::start_with(&dir.data(), &[], |cmd| {
        use std::os::unix::process::CommandExt;
        // SAFETY: setrlimit is async-signal-safe; it runs in the child
        // between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: 64,
                    rlim_max: 64,
                };
                libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
                Ok(())
            });
        }
    });
    let mut first = server.connect();
    let extra: Vec<_> = (0..120)
        .filter_map(|_| std::net::TcpStream::connect(server.addr).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let before = cpu_ticks(server.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = cpu_ticks(server.pid()) - before;
    assert!(used < 40, "server burnt {used} ticks in 2 s at EMFILE");
    // Connections already open keep working.
    first.send(&frame(5, Priority::High, "alerts", b"x", true));
    assert_eq!(first.acks(1)[0].status, Status::Stored);
    // Once descriptors free up, new connections (metrics too) are served.
    drop(extra);
    std::thread::sleep(Duration::from_millis(500));
    assert!(server.metric("eventstream_connections_refused_total") > 0.0);
    let mut late = server.connect();
    late.send(&frame(6, Priority::High, "alerts", b"x", true));
    assert_eq!(late.acks(1)[0].status, Status::Stored);
}

fn cpu_ticks(pid: i32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat (11 and 12 after the
    // command name).
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

fn smaps_kib(pid: i32, key: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup"))
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap()
}

#[test]
fn the_dedup_table_and_the_pool_sit_in_huge_pages() {
    let thp =
        std::fs::read_to_string("/sys/kernel/mm/transparent_hugepage/enabled").unwrap_or_default();
    if thp.is_empty() || thp.contains("[never]") {
        eprintln!("skipped: transparent huge pages are off on this machine ({thp:?})");
        return;
    }
    let dir = TempDir::new("huge");
    // The default sizes: 2,097,152 dedup ids (40 MiB of state words,
    // stamps and slots, every page written at start) and 65,536 pool slots
    // (32 MiB of frame bytes, mapped at start): at least 70 MiB, as the
    // allocations need not start on a 2 MiB boundary.
    let server = Server::start(
        &dir.data(),
        &["--dedup-capacity", "2097152", "--pool-events", "65536"],
    );
    let at_start = smaps_kib(server.pid(), "AnonHugePages:");
    assert!(at_start >= 70 << 10, "{at_start} KiB in huge pages");
    let mut c = server.connect();
    let mut rng = Rng(7);
    for round in 0..20 {
        let (bytes, _) = mixed_frames(500, round * 1000, &mut rng);
        c.send(&bytes);
        let _ = c.acks(500);
    }
    let after = smaps_kib(server.pid(), "AnonHugePages:");
    assert!(
        after >= at_start,
        "{after} KiB in huge pages after 10,000 events, {at_start} KiB at start"
    );
    let _ = server.terminate();
}

#[test]
fn the_pool_is_mapped_before_the_first_event() {
    // 131,072 slots of 512 bytes: 64 MiB, far more than the rest of the
    // server (a small dedup table); without mapping at start the pool's
    // pages would be resident only once events had used them.
    let dir = TempDir::new("mapped");
    let server = Server::start(
        &dir.data(),
        &["--dedup-capacity", "65536", "--pool-events", "131072"],
    );
    let rss = smaps_kib(server.pid(), "Rss:");
    assert!(rss >= 64 << 10, "{rss} KiB resident at start");
    let _ = server.terminate();
}

#[test]
fn an_idle_server_uses_under_two_percent_of_a_core() {
    let dir = TempDir::new("idle");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    c.send(&frame(1, Priority::Low, "orders/eu", b"x", true));
    c.acks(1);
    let _idle: Vec<Client> = (0..20).map(|_| server.connect()).collect();
    std::thread::sleep(Duration::from_millis(1500));
    // SAFETY: sysconf only reads a system constant.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let before = cpu_ticks(server.pid());
    std::thread::sleep(Duration::from_secs(5));
    let used = (cpu_ticks(server.pid()) - before) as f64 / hz;
    let share = used / 5.0;
    eprintln!("idle server: {:.2}% of one core", share * 100.0);
    assert!(
        share < 0.02,
        "idle server used {:.2}% of a core",
        share * 100.0
    );
}

#[test]
fn a_client_that_never_reads_its_acks_stalls_only_itself() {
    let dir = TempDir::new("slow");
    let server = Server::start(&dir.data(), &["--ack-buffer", "4KiB"]);
    let slow = server.connect();
    let mut w = slow.stream.try_clone().unwrap();
    let stalled = std::thread::spawn(move || {
        let mut sent = 0u64;
        let batch: Vec<u8> = (0..100)
            .flat_map(|i| frame(1 << 50 | i, Priority::High, "alerts", &[1u8; 256], true))
            .collect();
        // Blocks for good once the server stops reading this connection
        // and the socket buffers are full; ends when the socket is shut.
        while w.write_all(&batch).is_ok() {
            sent += 100;
            if sent > 2_000_000 {
                break;
            }
        }
        sent
    });
    std::thread::sleep(Duration::from_millis(500));
    let mut fast = server.connect();
    let mut rng = Rng(3);
    for round in 0..20u64 {
        let (bytes, ids) = mixed_frames(500, (round + 1) << 20, &mut rng);
        fast.send(&bytes);
        let acks = fast.acks(ids.len());
        assert_stored(&acks);
    }
    assert!(
        !stalled.is_finished(),
        "the slow client was never pushed back"
    );
    slow.stream.shutdown(std::net::Shutdown::Both).unwrap();
    let sent = stalled.join().unwrap();
    assert!(sent < 2_000_000, "slow client sent {sent} without reading");
}

#[test]
fn frames_left_half_received_past_the_timeout_close_the_connection() {
    let dir = TempDir::new("timeout");
    let server = Server::start(&dir.data(), &["--frame-timeout", "1s"]);
    let mut c = server.connect();
    let f = frame(1, Priority::High, "alerts", b"x", true);
    c.send(&f);
    assert_eq!(c.acks(1)[0].status, Status::Stored);
    c.send(&f[..20]);
    let t0 = Instant::now();
    assert!(c.closed_within(Duration::from_secs(5)));
    assert!(t0.elapsed() >= Duration::from_millis(900));
    assert_eq!(server.metric("eventstream_frame_timeouts_total"), 1.0);
}

#[test]
fn rejected_frames_do_not_disturb_the_valid_frames_around_them() {
    let dir = TempDir::new("reject");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    let mut bad_crc = frame(2, Priority::High, "alerts", b"x", true);
    let n = bad_crc.len();
    bad_crc[n - 1] ^= 0xFF;
    let mut bytes = frame(1, Priority::High, "alerts", b"x", true);
    bytes.extend(bad_crc);
    bytes.extend(frame(3, Priority::Low, "orders", b"y", true));
    c.send(&bytes);
    let acks = c.acks(3);
    let by_id: HashMap<u64, _> = acks.iter().map(|a| (a.event_id, *a)).collect();
    assert_eq!(by_id[&1].status, Status::Stored);
    assert_eq!(
        (by_id[&2].status, by_id[&2].reason),
        (Status::Rejected, Reason::BadCrc)
    );
    assert_eq!(by_id[&3].status, Status::Stored);
    let events = wait_for_events(&dir.data(), 2);
    let ids: Vec<u64> = events.iter().map(|e| e.event_id).collect();
    assert_eq!(ids.len(), 2);
    assert!(ids.contains(&1) && ids.contains(&3));
    assert_eq!(
        server.metric("eventstream_rejected_total{reason=\"bad_crc\"}"),
        1.0
    );
}

#[test]
fn the_counters_catch_up_with_the_acks_once_the_server_is_idle() {
    // Two bursts less than a millisecond apart: the second one's counts
    // must not wait in a thread's local metrics for traffic that never
    // comes.
    let dir = TempDir::new("idlemetrics");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    let tx = |id| frame(id, Priority::Medium, "orders/eu", b"payload", true);
    let burst: Vec<u8> = (0..100).flat_map(tx).collect();
    c.send(&burst);
    assert_stored(&c.acks(100));
    c.send(&burst);
    assert!(c.acks(100).iter().all(|a| a.status == Status::Duplicate));
    let key = "eventstream_duplicates_total{class=\"transactional\"}";
    assert_eq!(settles(100.0, || server.metric(key)), 100.0);
    let key = "eventstream_events_stored_total{class=\"transactional\"}";
    assert_eq!(settles(100.0, || server.metric(key)), 100.0);
}

#[test]
fn metrics_endpoint_passes_promtool() {
    let dir = TempDir::new("prom");
    let server = Server::start(&dir.data(), &[]);
    let mut c = server.connect();
    let mut rng = Rng(5);
    let (bytes, ids) = mixed_frames(500, 1, &mut rng);
    c.send(&bytes);
    c.acks(ids.len());
    let text = server.metrics_text();
    for name in [
        "eventstream_events_received_total{class=\"batch\"}",
        "eventstream_events_stored_total{class=\"transactional\"}",
        "eventstream_ingest_to_stored_seconds{class=\"realtime\",quantile=\"0.999\"}",
        "eventstream_ring_depth{ring=\"storage_batch\"}",
        "eventstream_pool_free_slots",
        "eventstream_fsync_seconds_count",
        "eventstream_batches_total",
        "eventstream_connections",
    ] {
        assert!(text.contains(name), "{name} missing");
    }
    assert_eq!(
        server.metric("eventstream_events_stored_total{class=\"realtime\"}")
            + server.metric("eventstream_events_stored_total{class=\"transactional\"}")
            + server.metric("eventstream_events_stored_total{class=\"batch\"}"),
        500.0
    );
    promtool_accepts(text.as_bytes());
}

#[test]
fn topic_priorities_from_flags_and_a_topics_file_only_raise() {
    let dir = TempDir::new("topics");
    let file = dir.path().join("topics.conf");
    std::fs::write(
        &file,
        "# the original's format\nbilling:MEDIUM\n\nalerts:LOW\n",
    )
    .unwrap();
    let server = Server::start(
        &dir.data(),
        &[
            "--topic-priority",
            "alerts=critical",
            "--topics-file",
            file.to_str().unwrap(),
        ],
    );
    let mut c = server.connect();
    let mut bytes = frame(1, Priority::Batch, "alerts", b"x", true);
    bytes.extend(frame(2, Priority::Batch, "billing", b"x", true));
    bytes.extend(frame(3, Priority::Critical, "billing", b"x", true));
    bytes.extend(frame(4, Priority::Batch, "other", b"x", true));
    c.send(&bytes);
    assert_stored(&c.acks(4));
    let events = wait_for_events(&dir.data(), 4);
    let class = |id: u64| {
        let e = events.iter().find(|e| e.event_id == id).unwrap();
        (e.class.clone(), e.priority.clone())
    };
    // The class follows the raised priority; the stored frame keeps the
    // producer's.
    assert_eq!(class(1), ("realtime".into(), "batch".into()));
    assert_eq!(class(2), ("transactional".into(), "batch".into()));
    assert_eq!(class(3), ("realtime".into(), "critical".into()));
    assert_eq!(class(4), ("batch".into(), "batch".into()));
    let bad = Server::try_start(&dir.path().join("d2"), &["--topic-priority", "nope"])
        .err()
        .expect("refused");
    assert!(bad.stderr.contains("--topic-priority"), "{}", bad.stderr);
}

#[test]
fn legacy_deny_closes_a_connection_that_starts_with_anything_but_a_magic() {
    let dir = TempDir::new("legacy-deny");
    let server = Server::start(&dir.data(), &["--legacy", "deny"]);
    // A legacy client: FATAL BAD_MAGIC, closed.
    let mut old = server.connect();
    old.send(&legacy_frame(2, "old", b"payload"));
    assert_eq!(old.acks(1)[0], Ack::fatal(Reason::BadMagic));
    assert!(old.closed_within(Duration::from_secs(5)));
    // A byte link that comes up in the middle of a frame: the same.
    let f = frame(1, Priority::Medium, "t", b"half a frame", true);
    let mut mid = server.connect();
    mid.send(&f[f.len() / 2..]);
    assert_eq!(mid.acks(1)[0], Ack::fatal(Reason::BadMagic));
    assert!(mid.closed_within(Duration::from_secs(5)));
    // v1 frames are served.
    let mut v1 = server.connect();
    v1.send(&f);
    assert_eq!(v1.acks(1)[0].status, Status::Stored);
    let events = wait_for_events(&dir.data(), 1);
    assert_eq!(events.len(), 1);
    drop(server);
    // --legacy deny with --legacy-unauthenticated: one line, exit 1.
    let f = Server::try_start(
        &dir.data(),
        &["--legacy", "deny", "--legacy-unauthenticated", "x"],
    )
    .err()
    .expect("started");
    assert_eq!(f.status.code(), Some(1));
    assert_eq!(f.stderr.lines().count(), 1, "{}", f.stderr);
}
