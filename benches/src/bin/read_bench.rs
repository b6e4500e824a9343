//! The read path's benchmark client (benches/read.sh runs it).
//!
//! `read_bench catchup ADDR DATA_DIR ROUNDS`: reads the whole log of a
//! running server from the earliest offset, alternating three readers per
//! round: a raw read session that discards what it gets (the server's
//! path), the client library's `Consumer` (which also checks every
//! record's CRC and splits its events), and the floor: a bare `sendfile`
//! of the same segment files over loopback to a reader that discards.
//! Prints each run and the medians (events/s, MB/s, and the ratio to the
//! floor).
//!
//! `read_bench follow ADDR SECONDS`: follows the log from its end with a
//! raw read session for SECONDS (the records are walked, not checked: the
//! follower costs the machine little beside the server) and prints one
//! JSON line: events read, and per class and over all the
//! produce-to-consume latency (this machine's wall clock at receipt minus
//! the producer timestamp that `eventstream load` sets at send, of each
//! record's first event, counted for each of its events) p50, p99 and
//! p99.9 in microseconds.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use eventstream_client::{Consumer, ConsumerOptions};
use eventstream_core::metrics::Histogram;
use eventstream_core::record::{RecordHead, RECORD_HEADER_LEN};
use eventstream_core::wire::read::{
    ChunkHeader, ChunkKind, ClassSet, ReadRequest, SessionAnswer, SessionFrame, Start,
    CHUNK_HEADER_LEN, SESSION_ANSWER_LEN,
};
use eventstream_core::wire::{declared_length, Check, Frame};

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("catchup") if args.len() == 5 => catchup(
            &args[2],
            Path::new(&args[3]),
            args[4].parse().expect("rounds"),
        ),
        Some("follow") if args.len() == 4 => follow(&args[2], args[3].parse().expect("seconds")),
        _ => {
            eprintln!("usage: read_bench catchup ADDR DATA_DIR ROUNDS | follow ADDR SECONDS");
            std::process::exit(2);
        }
    }
}

/// (events, record bytes, seconds) of one run.
type Run = (u64, u64, f64);

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Prints one reader's run and keeps its MB/s and events/s.
fn report(round: usize, label: &str, (e, b, s): Run, mbs: &mut Vec<f64>, evs: &mut Vec<f64>) {
    println!(
        "round {round} {label}: {e} events, {:.0} MB in {s:.3} s: {:.0} events/s, {:.0} MB/s",
        b as f64 / 1e6,
        e as f64 / s,
        b as f64 / 1e6 / s
    );
    mbs.push(b as f64 / 1e6 / s);
    evs.push(e as f64 / s);
}

fn catchup(addr: &str, data: &Path, rounds: usize) {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(data)
        .expect("data dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "log"))
        .collect();
    segments.sort();
    let mut raw_rates = Vec::new();
    let mut lib_rates = Vec::new();
    let mut floor_rates = Vec::new();
    let mut raw_ev = Vec::new();
    let mut lib_ev = Vec::new();
    for round in 0..rounds {
        let (e, b, s) = raw_session(addr);
        report(round, "raw session", (e, b, s), &mut raw_rates, &mut raw_ev);
        let (e, b, s) = library(addr);
        report(round, "Consumer", (e, b, s), &mut lib_rates, &mut lib_ev);
        let (b, s) = floor(&segments);
        println!(
            "round {round} floor:       {:.0} MB in {s:.3} s: {:.0} MB/s",
            b as f64 / 1e6,
            b as f64 / 1e6 / s
        );
        floor_rates.push(b as f64 / 1e6 / s);
    }
    let (raw, lib, fl) = (median(raw_rates), median(lib_rates), median(floor_rates));
    println!(
        "median: raw session {:.0} events/s {raw:.0} MB/s ({:.2} of the floor); Consumer {:.0} events/s {lib:.0} MB/s ({:.2}); floor {fl:.0} MB/s",
        median(raw_ev),
        raw / fl,
        median(lib_ev),
        lib / fl
    );
}

/// A read session with 64 MiB of credit, its answer checked.
fn open_session(addr: &str, start: Start, follow: bool) -> TcpStream {
    let req = ReadRequest {
        start,
        follow,
        classes: ClassSet::ALL,
        offset: 0,
        credit: 64 << 20,
        group: b"",
        prefix: b"",
    };
    let mut b = vec![0u8; req.encoded_len()];
    req.encode(&mut b).expect("request");
    let mut s = TcpStream::connect(addr).expect("connect");
    s.write_all(&b).expect("request");
    let mut a = [0u8; SESSION_ANSWER_LEN];
    s.read_exact(&mut a).expect("answer");
    let answer = SessionAnswer::decode(&a).expect("answer");
    assert!(answer.reason.is_none(), "{answer:?}");
    s
}

/// Grants `taken` bytes again once they reach 32 MiB; returns what is
/// still to grant.
fn regrant(s: &mut TcpStream, taken: u64) -> u64 {
    if taken < 32 << 20 {
        return taken;
    }
    let mut c = [0u8; 16];
    SessionFrame::Credit(taken as u32)
        .encode(&mut c)
        .expect("credit");
    s.write_all(&c).expect("credit");
    0
}

/// A read session from the earliest offset that discards its records.
fn raw_session(addr: &str) -> Run {
    let t0 = Instant::now();
    let mut s = open_session(addr, Start::Earliest, false);
    let mut buf = vec![0u8; 1 << 20];
    let (mut bytes, mut events, mut since_grant) = (0u64, 0u64, 0u64);
    loop {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        s.read_exact(&mut h).expect("chunk");
        let h = ChunkHeader::decode(&h).expect("chunk");
        match h.kind {
            ChunkKind::Records => {
                let mut left = h.bytes as usize;
                while left > 0 {
                    let n = s.read(&mut buf[..left.min(1 << 20)]).expect("records");
                    assert!(n > 0, "closed mid-chunk");
                    left -= n;
                }
                bytes += u64::from(h.bytes);
                events += h.b - h.a;
                since_grant = regrant(&mut s, since_grant + u64::from(h.bytes));
            }
            ChunkKind::End => return (events, bytes, t0.elapsed().as_secs_f64()),
            ChunkKind::Closing => panic!("closed: {:?}", h.reason),
            _ => {}
        }
    }
}

/// The client library's Consumer from the earliest offset.
fn library(addr: &str) -> Run {
    let t0 = Instant::now();
    let mut c = Consumer::connect(
        addr,
        ConsumerOptions {
            window: 64 << 20,
            ..ConsumerOptions::default()
        },
    )
    .expect("consumer");
    let (mut events, mut bytes) = (0u64, 0u64);
    while let Some(e) = c.next_ref().expect("read") {
        events += 1;
        bytes += e.frame_bytes().len() as u64;
    }
    // Record bytes as the server sent them (frames plus record headers) are
    // not visible here; report frame bytes.
    (events, bytes, t0.elapsed().as_secs_f64())
}

/// A bare `sendfile` of `segments` over loopback to a reader that discards.
fn floor(segments: &[PathBuf]) -> (u64, f64) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let files: Vec<PathBuf> = segments.to_vec();
    let sender = std::thread::spawn(move || {
        let (s, _) = listener.accept().expect("accept");
        let mut total = 0u64;
        for path in files {
            let f = File::open(path).expect("segment");
            let len = f.metadata().expect("segment").len();
            let mut off: libc::off_t = 0;
            while (off as u64) < len {
                let want = (len - off as u64).min(2 << 20) as usize;
                // SAFETY: both descriptors are open for the call; `off` is a
                // valid, exclusively borrowed offset.
                let n = unsafe { libc::sendfile(s.as_raw_fd(), f.as_raw_fd(), &mut off, want) };
                assert!(n > 0, "sendfile: {}", std::io::Error::last_os_error());
                total += n as u64;
            }
        }
        total
    });
    let t0 = Instant::now();
    let mut s = TcpStream::connect(addr).expect("connect");
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    loop {
        let n = s.read(&mut buf).expect("read");
        if n == 0 {
            break;
        }
        got += n as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    assert_eq!(sender.join().expect("sender"), got);
    (got, secs)
}

fn follow(addr: &str, seconds: u64) {
    let mut s = open_session(addr, Start::Latest, true);
    // Per class, then all.
    let mut h: [Histogram; 4] = std::array::from_fn(|_| Histogram::new());
    let end = Instant::now() + Duration::from_secs(seconds);
    let (mut events, mut since_grant) = (0u64, 0u64);
    let mut body = Vec::new();
    while Instant::now() < end {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        s.read_exact(&mut head).expect("chunk");
        let c = ChunkHeader::decode(&head).expect("chunk");
        if c.kind != ChunkKind::Records {
            continue;
        }
        body.resize(c.bytes as usize, 0);
        s.read_exact(&mut body).expect("records");
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        // Each record's first frame is its oldest event: its latency
        // stands for the record's events (a batch's later ones are newer).
        let mut at = 0;
        while let Some(r) = RecordHead::peek(&body[at..]) {
            let class = usize::from(r.class).min(2);
            let frame = &body[at + RECORD_HEADER_LEN..];
            let len = declared_length(frame).expect("frame") as usize;
            let ts = Frame::check(&frame[..len], Check::Layout)
                .expect("frame")
                .timestamp_ns();
            let lat = now.saturating_sub(ts);
            for _ in 0..r.count {
                h[class].record(lat);
                h[3].record(lat);
            }
            events += u64::from(r.count);
            at += r.size as usize;
        }
        since_grant = regrant(&mut s, since_grant + u64::from(c.bytes));
    }
    let us = |h: &Histogram, q: f64| h.quantile(q) as f64 / 1000.0;
    let mut out = format!("{{\"events\":{events}");
    for (name, h) in ["realtime", "transactional", "batch", "all"].iter().zip(&h) {
        out.push_str(&format!(
            ",\"{name}\":{{\"p50_us\":{:.0},\"p99_us\":{:.0},\"p999_us\":{:.0}}}",
            us(h, 0.5),
            us(h, 0.99),
            us(h, 0.999)
        ));
    }
    println!("{out}}}");
}
