//! The latency floor of this machine for a server that stores what it
//! receives before it answers: the least any event engine could show in
//! `eventstream load --rate`'s open-loop latency row, measured in the same
//! run as that row.
//!
//!   echo_floor SECONDS DIR [--no-log | --fsync-always]
//!
//! One process, the same traffic shape as `eventstream load --rate 100000
//! --connections 4 --payload 256 --ack` with its default 100 us tick: four
//! TCP connections on 127.0.0.1 write in turn, one write per tick, each
//! write carrying the connection's 10 messages of 310 bytes due since its
//! last one. The server is one thread on epoll, as `eventstream serve`'s
//! ingest is, and does the least work that still stores: per read it
//! appends the bytes read to a file in DIR with one `pwrite` (nothing
//! parsed, nothing checksummed), then writes one 24-byte answer per whole
//! message in one `write`. A second server thread follows serve's default
//! `--fsync interval:1000`: `fdatasync` once a second, and writeback started
//! (`sync_file_range`) for each MiB written. `--no-log` leaves out the file
//! and the sync thread (loopback and wake-ups only). `--fsync-always`
//! follows `--fsync always` instead: the server `fdatasync`s after each
//! append and answers after it (a group commit of whatever one read
//! brought), with no sync thread. A message's latency runs
//! from its write's planned start (its tick) to the arrival of its answer,
//! read by one thread that polls every connection, as `load`'s receiver
//! does. Prints one JSON object: messages answered, latency p50/p99/p99.9/max
//! in microseconds, and the sender's lateness p50/p99 (from a tick to the
//! return of its write).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventstream_core::metrics::Histogram;

/// Bytes per message: a v1 frame with a 256-byte payload and its header.
const MSG: usize = 310;
/// Bytes per answer: a v1 ack.
const ANSWER: usize = 24;
/// Messages per connection per write: 100,000/s over four connections,
/// each writing every 4 ticks of 100 us.
const PER_WRITE: usize = 10;
const CONNECTIONS: usize = 4;
const TICK: Duration = Duration::from_micros(100);
/// Start writeback after this many bytes (as serve's sync thread does).
const KICK_BYTES: u64 = 1 << 20;

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("echo_floor: {what}: {e}");
    std::process::exit(1);
}

/// Returns `rc` unless it is -1, which ends the process with the OS error.
fn check(rc: libc::c_int, what: &str) -> libc::c_int {
    if rc == -1 {
        fail(what, std::io::Error::last_os_error());
    }
    rc
}

/// The server: one epoll thread; per read, one pwrite of the bytes read to
/// the log, then one write of an answer per whole message.
fn serve(
    conns: Vec<TcpStream>,
    log: Option<(File, Arc<AtomicU64>)>,
    always: bool,
    stop: &AtomicBool,
) {
    // SAFETY: epoll_create1 takes no pointers; the result is checked.
    let rc = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let epfd = check(rc, "epoll_create1");
    // The sockets stay blocking: a read only follows readiness, and an
    // answer that finds the client's buffer full waits for room.
    for (i, c) in conns.iter().enumerate() {
        let mut ev = libc::epoll_event {
            events: libc::EPOLLIN as u32,
            u64: i as u64,
        };
        // SAFETY: `ev` is a valid epoll_event for the call; the fds are open.
        let rc = unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &mut ev) };
        check(rc, "epoll_ctl");
    }
    let mut events = [libc::epoll_event { events: 0, u64: 0 }; CONNECTIONS];
    let mut buf = vec![0u8; 64 << 10];
    let answers = vec![0u8; ANSWER * (64 << 10) / MSG + ANSWER];
    let mut partial = [0usize; CONNECTIONS];
    let mut at = 0u64;
    let mut conns = conns;
    while !stop.load(Ordering::Relaxed) {
        // SAFETY: `events` is writable for its length; the result is checked.
        let n =
            unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), CONNECTIONS as libc::c_int, 100) };
        if n == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        for ev in &events[..check(n, "epoll_wait") as usize] {
            let i = ev.u64 as usize;
            let got = match conns[i].read(&mut buf) {
                Ok(0) => return,
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => fail("server read", e),
            };
            if let Some((file, written)) = &log {
                file.write_all_at(&buf[..got], at)
                    .unwrap_or_else(|e| fail("pwrite", e));
                at += got as u64;
                written.store(at, Ordering::Release);
                if always {
                    file.sync_data().unwrap_or_else(|e| fail("fdatasync", e));
                }
            }
            let whole = (partial[i] + got) / MSG;
            partial[i] = (partial[i] + got) % MSG;
            if whole > 0 {
                conns[i]
                    .write_all(&answers[..whole * ANSWER])
                    .unwrap_or_else(|e| fail("server write", e));
            }
        }
    }
}

/// serve's default fsync policy: fdatasync once a second, writeback
/// started for each MiB.
fn sync_loop(file: &File, written: &AtomicU64, stop: &AtomicBool) {
    let fd = file.as_raw_fd();
    let (mut kicked, mut last) = (0u64, Instant::now());
    while !stop.load(Ordering::Relaxed) {
        std::thread::sleep(Duration::from_millis(1));
        let at = written.load(Ordering::Acquire);
        if at - kicked >= KICK_BYTES {
            // SAFETY: plain integer arguments on an open fd; checked.
            let rc = unsafe {
                libc::sync_file_range(
                    fd,
                    kicked as libc::off64_t,
                    (at - kicked) as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WRITE,
                )
            };
            check(rc, "sync_file_range");
            kicked = at;
        }
        if last.elapsed() >= Duration::from_secs(1) {
            file.sync_data().unwrap_or_else(|e| fail("fdatasync", e));
            last = Instant::now();
        }
    }
}

/// Monotonic nanoseconds.
fn now_ns(origin: Instant) -> u64 {
    origin.elapsed().as_nanos() as u64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (secs, dir) = match (args.get(1).map(|s| s.parse::<f64>()), args.get(2)) {
        (Some(Ok(s)), Some(d)) if s > 0.0 => (s, PathBuf::from(d)),
        _ => {
            eprintln!("usage: echo_floor SECONDS DIR [--no-log | --fsync-always]");
            std::process::exit(2);
        }
    };
    let (with_log, always) = match args.get(3).map(String::as_str) {
        None => (true, false),
        Some("--no-log") => (false, false),
        Some("--fsync-always") => (true, true),
        Some(other) => {
            eprintln!("echo_floor: unknown option {other}");
            std::process::exit(2);
        }
    };
    let listener = TcpListener::bind("127.0.0.1:0").unwrap_or_else(|e| fail("bind", e));
    let addr = listener
        .local_addr()
        .unwrap_or_else(|e| fail("local_addr", e));
    let mut clients = Vec::new();
    let mut served = Vec::new();
    for _ in 0..CONNECTIONS {
        let c = TcpStream::connect(addr).unwrap_or_else(|e| fail("connect", e));
        c.set_nodelay(true).unwrap_or_else(|e| fail("nodelay", e));
        let (s, _) = listener.accept().unwrap_or_else(|e| fail("accept", e));
        s.set_nodelay(true).unwrap_or_else(|e| fail("nodelay", e));
        clients.push(c);
        served.push(s);
    }
    let stop = Arc::new(AtomicBool::new(false));
    let log = with_log.then(|| {
        std::fs::create_dir_all(&dir).unwrap_or_else(|e| fail("mkdir", e));
        let file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(dir.join("echo_floor.log"))
            .unwrap_or_else(|e| fail("open log", e));
        (file, Arc::new(AtomicU64::new(0)))
    });
    let syncer = log.as_ref().filter(|_| !always).map(|(file, written)| {
        let file = file.try_clone().unwrap_or_else(|e| fail("dup", e));
        let (written, stop) = (written.clone(), stop.clone());
        std::thread::spawn(move || sync_loop(&file, &written, &stop))
    });
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || serve(served, log, always, &stop))
    };
    let origin = Instant::now();
    let total_ticks = (secs * 1e6 / TICK.as_micros() as f64) as u64;
    let per_conn = (total_ticks / CONNECTIONS as u64) as usize;
    let start = now_ns(origin) + 1_000_000;
    let readers: Vec<TcpStream> = clients
        .iter()
        .map(|c| c.try_clone().unwrap_or_else(|e| fail("dup", e)))
        .collect();
    let receiver = std::thread::spawn(move || receive(readers, start, per_conn, origin));
    // SAFETY: prctl with integer arguments; a failure only costs precision.
    let _ = unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0) };
    let message = vec![0x5au8; MSG * PER_WRITE];
    let mut lateness = Histogram::new();
    for k in 0..per_conn {
        for (c, client) in clients.iter_mut().enumerate() {
            let tick = planned(start, k, c);
            let now = now_ns(origin);
            if tick > now {
                std::thread::sleep(Duration::from_nanos(tick - now));
            }
            client
                .write_all(&message)
                .unwrap_or_else(|e| fail("client write", e));
            lateness.record(now_ns(origin).saturating_sub(tick));
        }
    }
    let latency = receiver
        .join()
        .unwrap_or_else(|_| fail("receiver", "panicked"));
    stop.store(true, Ordering::Relaxed);
    drop(clients);
    let _ = server.join();
    if let Some(s) = syncer {
        let _ = s.join();
    }
    let us = |v: u64| v as f64 / 1e3;
    println!(
        "{{\"messages\":{},\"log\":{with_log},\"fsync_always\":{always},\"latency_us\":{{\"p50\":{:.1},\"p99\":{:.1},\"p999\":{:.1},\"max\":{:.1}}},\"send_lateness_us\":{{\"p50\":{:.1},\"p99\":{:.1}}}}}",
        latency.count(),
        us(latency.quantile(0.5)),
        us(latency.quantile(0.99)),
        us(latency.quantile(0.999)),
        us(latency.max()),
        us(lateness.quantile(0.5)),
        us(lateness.quantile(0.99)),
    );
}

/// The planned start of connection `c`'s `k`-th write: the connections
/// write in turn, one per tick from `start`.
fn planned(start: u64, k: usize, c: usize) -> u64 {
    start + ((k * CONNECTIONS + c) as u64) * TICK.as_nanos() as u64
}

/// Reads every connection's answers (poll, then one read per ready
/// connection) until each has answered its `per_conn` writes, recording
/// each message's latency from its write's planned start (a connection's
/// answers arrive in the order of its messages).
fn receive(mut conns: Vec<TcpStream>, start: u64, per_conn: usize, origin: Instant) -> Histogram {
    let mut latency = Histogram::new();
    let mut answered = vec![0usize; conns.len()];
    let mut held = vec![0usize; conns.len()];
    let mut buf = vec![0u8; 64 << 10];
    let want = per_conn * PER_WRITE;
    let deadline =
        Instant::now() + Duration::from_secs(60) + TICK * (per_conn * CONNECTIONS) as u32;
    let mut fds: Vec<libc::pollfd> = conns
        .iter()
        .map(|c| libc::pollfd {
            fd: c.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while answered.iter().any(|&a| a < want) {
        if Instant::now() > deadline {
            fail("receiver", "answers missing after the deadline");
        }
        // SAFETY: `fds` is a valid, writable array of its length.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, 100) };
        if n == -1 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
            continue;
        }
        check(n, "poll");
        for (i, fd) in fds.iter().enumerate() {
            if fd.revents == 0 {
                continue;
            }
            let got = match conns[i].read(&mut buf) {
                Ok(0) => fail("receiver", "the server closed a connection"),
                Ok(got) => got,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => fail("receiver read", e),
            };
            let now = now_ns(origin);
            held[i] += got;
            while held[i] >= ANSWER && answered[i] < want {
                held[i] -= ANSWER;
                let tick = planned(start, answered[i] / PER_WRITE, i);
                latency.record(now.saturating_sub(tick));
                answered[i] += 1;
            }
        }
    }
    latency
}
