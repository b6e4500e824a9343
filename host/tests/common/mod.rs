//! Harness of the server tests: a real `eventstream serve` process on
//! 127.0.0.1 (port 0) over a temp data dir, TCP clients, and `inspect`.
#![allow(dead_code)]

pub mod nats;
pub mod read;
pub mod tls;

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use eventstream_core::wire::{Ack, FrameRepr, Status, FLAG_ACK};
use eventstream_core::Priority;

/// The server binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_eventstream");

/// Longest any single wait in these tests may take.
pub const WAIT: Duration = Duration::from_secs(20);

/// A temp directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "es-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
    pub fn path(&self) -> &Path {
        &self.0
    }
    pub fn data(&self) -> PathBuf {
        self.0.join("data")
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server process.
pub struct Server {
    pub child: Child,
    /// The plaintext address, or the TLS one with `--listen none`.
    pub addr: SocketAddr,
    /// The TLS address (`--tls-listen`).
    #[allow(dead_code)]
    pub tls_addr: Option<SocketAddr>,
    pub metrics: SocketAddr,
    pub stderr: PathBuf,
    pub data: PathBuf,
}

/// What a start that should fail printed.
pub struct Failed {
    pub status: ExitStatus,
    pub stderr: String,
}

fn command(data: &Path, stderr: &Path, args: &[&str]) -> Command {
    let mut cmd = Command::new(BIN);
    // Small defaults keep many test servers cheap; a test's own flags win.
    let mut defaults: Vec<String> = Vec::new();
    // ES_TEST_PROCESSORS=threads|inline runs every test server in that
    // mode (the test command runs the suite in both).
    // ES_TEST_STORAGE_THREAD=auto|on|off likewise for --storage-thread.
    let processors = std::env::var("ES_TEST_PROCESSORS").unwrap_or_else(|_| "auto".into());
    let storage = std::env::var("ES_TEST_STORAGE_THREAD").unwrap_or_else(|_| "auto".into());
    for (flag, value) in [
        ("--pool-events", "8192"),
        ("--dedup-capacity", "65536"),
        ("--processors", processors.as_str()),
        ("--storage-thread", storage.as_str()),
    ] {
        if !args.contains(&flag) {
            defaults.extend([flag.to_string(), value.to_string()]);
        }
    }
    for flag in ["--listen", "--metrics"] {
        if !args.contains(&flag) {
            defaults.extend([flag.to_string(), "127.0.0.1:0".to_string()]);
        }
    }
    cmd.arg("serve")
        .args(defaults)
        .arg("--data")
        .arg(data)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(std::fs::File::create(stderr).unwrap());
    cmd
}

impl Server {
    /// Starts a server on `data` with extra flags; panics if it does not
    /// come up.
    pub fn start(data: &Path, args: &[&str]) -> Server {
        Self::start_with(data, args, |_| {})
    }

    /// Like `start`, with a hook on the command (rlimits, say).
    pub fn start_with(data: &Path, args: &[&str], hook: impl FnOnce(&mut Command)) -> Server {
        match Self::try_start_with(data, args, hook) {
            Ok(s) => s,
            Err(f) => panic!("server did not start ({}): {}", f.status, f.stderr),
        }
    }

    /// Starts a server, or returns how it failed.
    pub fn try_start(data: &Path, args: &[&str]) -> Result<Server, Failed> {
        Self::try_start_with(data, args, |_| {})
    }

    fn try_start_with(
        data: &Path,
        args: &[&str],
        hook: impl FnOnce(&mut Command),
    ) -> Result<Server, Failed> {
        static N: AtomicU32 = AtomicU32::new(0);
        let stderr = std::env::temp_dir().join(format!(
            "es-serve-{}-{}.err",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let mut cmd = command(data, &stderr, args);
        hook(&mut cmd);
        let mut child = cmd.spawn().expect("spawn eventstream serve");
        let out = child.stdout.take().unwrap();
        let mut lines = BufReader::new(out).lines();
        let mut addr = None;
        let mut tls_addr = None;
        let mut metrics = None;
        // "metrics on" comes last.
        while metrics.is_none() {
            match lines.next() {
                Some(Ok(l)) => {
                    if let Some(a) = l.strip_prefix("listening on ") {
                        addr = Some(a.parse().unwrap());
                    } else if let Some(a) = l.strip_prefix("listening with TLS on ") {
                        tls_addr = Some(a.parse().unwrap());
                    } else if let Some(a) = l.strip_prefix("metrics on ") {
                        metrics = Some(a.parse().unwrap());
                    }
                }
                _ => {
                    let status = child.wait().unwrap();
                    let text = std::fs::read_to_string(&stderr).unwrap_or_default();
                    let _ = std::fs::remove_file(&stderr);
                    return Err(Failed {
                        status,
                        stderr: text,
                    });
                }
            }
        }
        Ok(Server {
            child,
            addr: addr.or(tls_addr).expect("a listening address"),
            tls_addr,
            metrics: metrics.unwrap(),
            stderr,
            data: data.to_path_buf(),
        })
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends SIGTERM and waits (at most 10 s) for the exit.
    pub fn terminate(mut self) -> (ExitStatus, Duration) {
        let t0 = Instant::now();
        // SAFETY: kill on our own child's pid.
        unsafe { libc::kill(self.pid(), libc::SIGTERM) };
        let status = wait_timeout(&mut self.child, Duration::from_secs(10))
            .expect("server did not exit within 10 s of SIGTERM");
        (status, t0.elapsed())
    }

    /// Kills the process at once (no graceful shutdown).
    pub fn kill(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// GET /metrics.
    pub fn metrics_text(&self) -> String {
        let mut s = TcpStream::connect(self.metrics).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .unwrap();
        let mut body = String::new();
        s.read_to_string(&mut body).unwrap();
        let (head, text) = body.split_once("\r\n\r\n").unwrap();
        assert!(head.starts_with("HTTP/1.1 200"), "{head}");
        text.to_string()
    }

    /// The value of one metric line (`name{labels}` exactly as printed).
    pub fn metric(&self, key: &str) -> f64 {
        let text = self.metrics_text();
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
            .unwrap_or_else(|| panic!("metric {key} missing"))
            .parse()
            .unwrap()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.stderr);
    }
}

/// Polls `read` until it returns `want` or 2 s pass; returns the last
/// value (counters published after the acks settle within milliseconds).
pub fn settles(want: f64, read: impl Fn() -> f64) -> f64 {
    let until = std::time::Instant::now() + Duration::from_secs(2);
    loop {
        let v = read();
        if v == want || std::time::Instant::now() >= until {
            return v;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

pub fn wait_timeout(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let t0 = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if t0.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A v1 frame.
pub fn frame(id: u64, priority: Priority, topic: &str, payload: &[u8], ack: bool) -> Vec<u8> {
    let repr = FrameRepr {
        priority,
        flags: if ack { FLAG_ACK } else { 0 },
        partition: (id % 4) as u32,
        event_id: id,
        timestamp_ns: 1_764_253_200_000_000_000 + id,
        topic: topic.as_bytes(),
        payload,
    };
    let mut out = vec![0u8; repr.encoded_len()];
    repr.encode(&mut out).unwrap();
    out
}

/// A legacy frame of the original C++ clients.
pub fn legacy_frame(priority: u8, topic: &str, payload: &[u8]) -> Vec<u8> {
    let body_len = 3 + topic.len() + payload.len();
    let mut out = Vec::new();
    out.extend_from_slice(&(body_len as u32).to_be_bytes());
    out.push(priority);
    out.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    out.extend_from_slice(topic.as_bytes());
    out.extend_from_slice(payload);
    out
}

/// A producer connection.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        let stream = TcpStream::connect(addr).unwrap();
        stream.set_read_timeout(Some(WAIT)).unwrap();
        stream.set_nodelay(true).unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Reads exactly `n` acks (panics on timeout or close).
    pub fn acks(&mut self, n: usize) -> Vec<Ack> {
        let mut out = Vec::with_capacity(n);
        let mut chunk = [0u8; 65536];
        while out.len() < n {
            while self.buf.len() >= 24 && out.len() < n {
                out.push(Ack::decode(&self.buf[..24]).expect("valid ack"));
                self.buf.drain(..24);
            }
            if out.len() == n {
                break;
            }
            let got = match self.stream.read(&mut chunk) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => r.unwrap_or_else(|e| panic!("reading acks ({} of {n}): {e}", out.len())),
            };
            assert!(got > 0, "connection closed after {} of {n} acks", out.len());
            self.buf.extend_from_slice(&chunk[..got]);
        }
        out
    }

    /// Reads until the server closes; returns the acks that came first.
    pub fn acks_until_close(&mut self) -> Vec<Ack> {
        let mut chunk = [0u8; 65536];
        loop {
            match self.stream.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => break,
                // A socket read with a timeout returns EINTR after a signal
                // or a freeze of the process, even with SA_RESTART.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => panic!("waiting for close: {e}"),
            }
        }
        let acks = self
            .buf
            .chunks(24)
            .map(|c| Ack::decode(c).expect("valid ack"))
            .collect();
        self.buf.clear();
        acks
    }

    /// True if the server closed the connection (read returns 0 or reset)
    /// within `limit`.
    pub fn closed_within(&mut self, limit: Duration) -> bool {
        self.stream.set_read_timeout(Some(limit)).unwrap();
        let mut b = [0u8; 64];
        let r = loop {
            match self.stream.read(&mut b) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                r => break r,
            }
        };
        self.stream.set_read_timeout(Some(WAIT)).unwrap();
        match r {
            Ok(0) => true,
            Ok(_) => false,
            Err(e) => e.kind() == std::io::ErrorKind::ConnectionReset,
        }
    }
}

/// One event as `inspect --json` prints it.
#[derive(Clone, Debug)]
pub struct Inspected {
    pub offset: u64,
    pub event_id: u64,
    pub class: String,
    pub priority: String,
    pub topic: String,
    pub legacy: bool,
    pub payload_len: u64,
    pub json: serde_json::Value,
}

/// Runs `eventstream inspect` with `args`; returns (success, stdout, stderr).
pub fn inspect(data: &Path, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(BIN)
        .arg("inspect")
        .arg(data)
        .args(args)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

/// Every event of the log, via `inspect --json`.
pub fn inspect_events(data: &Path) -> Vec<Inspected> {
    let (ok, out, err) = inspect(data, &["--json"]);
    assert!(ok, "inspect failed: {err}");
    out.lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            Inspected {
                offset: v["offset"].as_u64().unwrap(),
                event_id: v["event_id"].as_u64().unwrap(),
                class: v["class"].as_str().unwrap().to_string(),
                priority: v["priority"].as_str().unwrap().to_string(),
                topic: v["topic"].as_str().unwrap().to_string(),
                legacy: v["legacy"].as_bool().unwrap(),
                payload_len: v["payload_len"].as_u64().unwrap(),
                json: v,
            }
        })
        .collect()
}

/// Polls inspect until at least `n` events are in the log.
pub fn wait_for_events(data: &Path, n: usize) -> Vec<Inspected> {
    let t0 = Instant::now();
    loop {
        let ev = inspect_events(data);
        if ev.len() >= n || t0.elapsed() > WAIT {
            return ev;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Maps event id -> offsets it is stored at.
pub fn offsets_by_id(events: &[Inspected]) -> HashMap<u64, Vec<u64>> {
    let mut m: HashMap<u64, Vec<u64>> = HashMap::new();
    for e in events {
        m.entry(e.event_id).or_default().push(e.offset);
    }
    m
}

pub fn assert_stored(acks: &[Ack]) {
    for a in acks {
        assert_eq!(a.status, Status::Stored, "{a:?}");
    }
}

/// A small deterministic generator (splitmix64).
#[allow(unused_imports)]
pub use eventstream_core::splitmix::SplitMix64 as Rng;

/// Makes the next close of `s` send RST instead of FIN.
pub fn reset_on_close(s: &TcpStream) {
    use std::os::fd::AsRawFd;
    let linger = libc::linger {
        l_onoff: 1,
        l_linger: 0,
    };
    // SAFETY: setsockopt on an open socket with a valid linger struct.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_LINGER,
            (&linger as *const libc::linger).cast(),
            std::mem::size_of::<libc::linger>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "SO_LINGER: {}", std::io::Error::last_os_error());
}

/// Polls the connection gauge until it reads `want` or `limit` passes;
/// returns the last value.
pub fn connections_settle(server: &Server, want: f64, limit: Duration) -> f64 {
    let until = Instant::now() + limit;
    loop {
        let v = server.metric("eventstream_connections");
        if v == want || Instant::now() >= until {
            return v;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The segment files of a data dir, oldest first.
pub fn segments(data: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(data)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "log"))
        .collect();
    v.sort();
    v
}

/// Asserts that `promtool check metrics` accepts `text`.
pub fn promtool_accepts(text: &[u8]) {
    let out = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .and_then(|mut p| {
            p.stdin.take().unwrap().write_all(text)?;
            p.wait_with_output()
        })
        .expect("promtool (Debian package prometheus; scripts/test-all.sh installs it)");
    assert!(
        out.status.success(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Reads up to `n` acks from `s` (bytes past them stay in `buf`); fewer
/// if the connection ends first (a killed server).
pub fn read_acks(s: &mut TcpStream, buf: &mut Vec<u8>, n: usize) -> Vec<Ack> {
    let mut chunk = [0u8; 4096];
    while buf.len() < n * 24 {
        match s.read(&mut chunk) {
            Ok(0) | Err(_) => break,
            Ok(k) => buf.extend_from_slice(&chunk[..k]),
        }
    }
    let whole = (buf.len() / 24).min(n) * 24;
    let acks = buf[..whole]
        .chunks(24)
        .map(|c| Ack::decode(c).expect("valid ack"))
        .collect();
    buf.drain(..whole);
    acks
}

/// (offset -> (event id, payload)) of every event in the log.
pub fn log_events(data: &Path) -> HashMap<u64, (u64, Vec<u8>)> {
    let mut out = HashMap::new();
    for seg in segments(data) {
        let bytes = std::fs::read(&seg).unwrap();
        let base: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        eventstream_host::storage::read_records(&bytes, base, |rec| {
            for (offset, f) in rec.frames() {
                out.insert(offset, (f.event_id(), f.payload().to_vec()));
            }
        })
        .unwrap();
    }
    out
}

/// Runs `eventstream ARGS` with `stdin`; returns (success, stdout, stderr).
pub fn run_bin(args: &[&str], stdin: &[u8]) -> (bool, Vec<u8>, String) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(stdin).unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.success(),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Every priority, highest first.
pub const PRIORITIES: [Priority; 5] = [
    Priority::Critical,
    Priority::High,
    Priority::Medium,
    Priority::Low,
    Priority::Batch,
];
