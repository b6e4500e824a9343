//! The allocation audit of the hot path: a counting global allocator that
//! attributes every allocation to the thread that made it, the real server
//! in this process on 127.0.0.1, and 100,000 events over TCP from frames
//! built beforehand, with acks and storage on. Between warm-up and the end
//! the ingest, processor, storage and sync threads must not allocate at
//! all; housekeeping may (bounded); every thread's count is printed. Once
//! over plaintext, once over TLS (certificates made at test time).

use std::alloc::{GlobalAlloc, Layout, System};
use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicI32, AtomicU64, Ordering};
use std::time::Duration;

use clap::Parser;
use eventstream_core::wire::{FrameRepr, FLAG_ACK};
use eventstream_core::Priority;
use eventstream_host::config::{Cli, Command, ServerConfig};

#[path = "common/tls.rs"]
mod certs;

const THREADS: usize = 512;

/// Allocations per thread id, in a fixed table (the allocator itself must
/// not allocate).
struct Counting {
    tids: [AtomicI32; THREADS],
    counts: [AtomicU64; THREADS],
}

#[global_allocator]
static ALLOC: Counting = Counting {
    tids: [const { AtomicI32::new(0) }; THREADS],
    counts: [const { AtomicU64::new(0) }; THREADS],
};

fn gettid() -> i32 {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::syscall(libc::SYS_gettid) as i32 }
}

impl Counting {
    fn count(&self) {
        let tid = gettid();
        let mut i = tid as usize % THREADS;
        for _ in 0..THREADS {
            let t = self.tids[i].load(Ordering::Relaxed);
            if t == tid
                || (t == 0
                    && self.tids[i]
                        .compare_exchange(0, tid, Ordering::Relaxed, Ordering::Relaxed)
                        .is_ok())
            {
                self.counts[i].fetch_add(1, Ordering::Relaxed);
                return;
            }
            i = (i + 1) % THREADS;
        }
    }

    /// Allocations so far by thread name (read from /proc).
    fn by_thread(&self) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        let snapshot: Vec<(i32, u64)> = (0..THREADS)
            .map(|i| {
                (
                    self.tids[i].load(Ordering::Relaxed),
                    self.counts[i].load(Ordering::Relaxed),
                )
            })
            .filter(|&(t, _)| t != 0)
            .collect();
        for (tid, n) in snapshot {
            let name = std::fs::read_to_string(format!("/proc/self/task/{tid}/comm"))
                .map(|s| s.trim().to_string())
                .unwrap_or_else(|_| format!("exited-{tid}"));
            *out.entry(format!("{name} ({tid})")).or_default() += n;
        }
        out
    }
}

// SAFETY: every call is forwarded to the system allocator unchanged; the
// counting touches only atomics.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        self.count();
        // SAFETY: forwarded with the caller's layout.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        self.count();
        // SAFETY: forwarded with the caller's pointer and layouts.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: forwarded with the caller's pointer and layout.
        unsafe { System.dealloc(ptr, layout) }
    }
}

fn frames(first: u64, n: u64) -> Vec<u8> {
    let payload = [0x5Au8; 256];
    let mut out = Vec::new();
    for id in first..first + n {
        let repr = FrameRepr {
            priority: Priority::ALL[(id % 5) as usize],
            flags: FLAG_ACK,
            partition: (id % 8) as u32,
            event_id: id,
            timestamp_ns: id,
            topic: ["orders", "metrics", "alerts"][(id % 3) as usize].as_bytes(),
            payload: &payload,
        };
        let mut f = vec![0u8; repr.encoded_len()];
        repr.encode(&mut f).unwrap();
        out.extend(f);
    }
    out
}

/// Sends `bytes` from a second thread and reads `n` acks; returns STORED ones.
fn run(
    r: &mut eventstream_client::tls::Recv,
    w: &mut Option<eventstream_client::tls::Send>,
    bytes: Vec<u8>,
    n: usize,
) -> usize {
    let mut out = w.take().unwrap();
    let writer = std::thread::Builder::new()
        .name("client-writer".into())
        .spawn(move || {
            out.write_all(&bytes).unwrap();
            out
        })
        .unwrap();
    let mut buf = vec![0u8; 24 * 4096];
    let mut got = 0usize;
    let mut stored = 0usize;
    let mut held = 0usize;
    while got < n {
        let k = match r.read(&mut buf[held..]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            k => k.unwrap(),
        };
        assert!(k > 0, "server closed after {got} acks");
        let end = held + k;
        let whole = end - end % 24;
        for a in buf[..whole].chunks_exact(24) {
            got += 1;
            stored += usize::from(a[5] == 0);
        }
        buf.copy_within(whole..end, 0);
        held = end - whole;
    }
    *w = Some(writer.join().unwrap());
    stored
}

#[test]
fn the_hot_path_threads_make_no_heap_allocation() {
    // One server after the other: the counts are per thread name.
    audit("threads", "auto", false);
    audit("inline", "auto", false);
    // Ingest writes the log itself.
    audit("inline", "off", false);
    // Over TLS: records opened and sealed in place.
    audit("threads", "auto", true);
    audit("inline", "auto", true);
}

fn audit(processors: &str, storage_thread: &str, tls: bool) {
    let dir = std::env::temp_dir().join(format!(
        "es-alloc-{}-{processors}-{storage_thread}-{tls}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let ca = certs::Ca::new(&dir, "ca");
    let mut flags: Vec<String> = if tls {
        certs::serve_args(&ca.server("server"))
    } else {
        Vec::new()
    };
    flags.extend(["--listen", "127.0.0.1:0"].map(String::from));
    let data = dir.join("data");
    let cli = Cli::try_parse_from(
        [
            "eventstream",
            "serve",
            "--metrics",
            "127.0.0.1:0",
            "--data",
            data.to_str().unwrap(),
            "--processors",
            processors,
            "--storage-thread",
            storage_thread,
        ]
        .into_iter()
        .chain(flags.iter().map(String::as_str)),
    )
    .unwrap();
    let Command::Serve(args) = cli.command else {
        unreachable!()
    };
    let running = eventstream_host::server::start(ServerConfig::from_args(*args).unwrap()).unwrap();
    let (addr, client) = match running.tls_listen {
        Some(a) => (a, Some(certs::client(&ca, None))),
        None => (running.listen.unwrap(), None),
    };
    let (mut r, w) =
        eventstream_client::tls::connect(&[addr], client.as_ref(), Some(Duration::from_secs(30)))
            .unwrap();
    let mut w = Some(w);
    let warm = frames(1, 20_000);
    let load = frames(1_000_000, 100_000);
    // Warm-up: every buffer reaches its working size.
    assert_eq!(run(&mut r, &mut w, warm, 20_000), 20_000);
    std::thread::sleep(Duration::from_millis(300));
    let before = ALLOC.by_thread();
    assert_eq!(run(&mut r, &mut w, load, 100_000), 100_000);
    std::thread::sleep(Duration::from_millis(300));
    let after = ALLOC.by_thread();
    println!(
        "--processors {processors} --storage-thread {storage_thread}, tls {tls}: allocations per thread during 100,000 events (after warm-up):"
    );
    let mut hot = 0;
    for (name, n) in &after {
        let d = n - before.get(name).copied().unwrap_or(0);
        println!("  {name:<32} {d}");
        let engine = [
            "es-ingest",
            "es-realtime",
            "es-transactional",
            "es-batch",
            "es-storage",
            "es-sync",
        ];
        if engine
            .iter()
            .any(|e| name.starts_with(&e[..e.len().min(15)]))
        {
            hot += d;
        }
        if name.starts_with("es-housekeeping") {
            assert!(
                d < 10_000,
                "housekeeping allocated {d} times in a few seconds"
            );
        }
    }
    let seen = |t: &str| after.keys().any(|k| k.starts_with(t));
    assert!(
        seen("es-ingest") && (seen("es-storage") || storage_thread == "off"),
        "the engine threads were not seen: {after:?}"
    );
    if processors == "threads" {
        assert!(
            seen("es-realtime") && seen("es-transactiona") && seen("es-batch"),
            "the processor threads were not seen: {after:?}"
        );
    }
    assert_eq!(hot, 0, "the hot path allocated");
    running.shutdown();
    running.wait().unwrap();
    let _ = std::fs::remove_dir_all(&dir);
}
