//! `eventstream serve`: builds the engine from the flags (every buffer is
//! allocated here, once), recovers the log, rebuilds the dedup table and
//! runs the threads of docs/architecture.md until a graceful shutdown.

use std::io::Write;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

use eventstream_core::batch::{BatchConfig, BatchWindows, Entry, WindowMeta};
use eventstream_core::dedup::{BufferDedupTable, DedupConfig, DedupSlot, DedupStamp, DedupState};
use eventstream_core::pipeline::{Event, StorageItem};
use eventstream_core::pool::{BufferPool, SlotMeta};
use eventstream_core::process::{BatchProcessor, RealtimeProcessor, TransactionalProcessor};
use eventstream_core::ring::{BufferRing, Consumer, Producer, Slot};
use eventstream_core::route::TopicTable;
use eventstream_core::wire::{Ack, Limits};

use crate::ingest::{Ingest, IngestParts};
use crate::processors::{run_batch, run_singles, Singles};
use crate::settings::MAX_TOPICS;
use crate::settings::{FsyncPolicy, Processors, ServerConfig, StorageThread};
use crate::shared::Shared;
use crate::storage::{Log, LogOptions};
use crate::sys::{
    ignore_signal, monotonic_ns, online_cpus, pin_to_cpu, raise_nofile_limit, set_nonblocking,
    usable_cpus, wall_ns,
};
use crate::tls::ServerTls;
use crate::topology::{Inline, InlineParts, Threads};
use crate::writer::{drop_min_rate, run_prefill, run_sync, Storage, StorageMode, StorageParts};

/// The ingest thread's loop, of whichever layout.
type IngestRun = Box<dyn FnOnce() -> std::io::Result<()> + Send>;

/// Batch windows open at once.
const BATCH_WINDOWS: usize = 1024;

fn leak<T>(v: T) -> &'static mut T {
    Box::leak(Box::new(v))
}

fn leak_slice<T>(n: usize, f: impl Fn() -> T) -> &'static mut [T] {
    let mut v: Vec<T> = Vec::with_capacity(n);
    advise_huge_pages(v.as_ptr().cast(), n * std::mem::size_of::<T>());
    v.extend((0..n).map(|_| f()));
    Box::leak(v.into_boxed_slice())
}

/// Size of a transparent huge page (x86-64 and arm64 with 4 KiB pages).
const HUGE_PAGE: usize = 2 << 20;

/// Asks the kernel to back the whole huge pages inside `ptr..ptr + len`
/// (not yet touched) with transparent huge pages. The pool and the dedup
/// table are tens of MiB read at random; with 4 KiB pages nearly every
/// event's slot, state word and stamp is a TLB miss, and in a VM each miss
/// walks two page tables. Only a hint: where THP is off (or `madvise` is
/// refused) the memory stays in 4 KiB pages, with one line saying so.
fn advise_huge_pages(ptr: *const u8, len: usize) {
    let start = (ptr as usize).next_multiple_of(HUGE_PAGE);
    let end = (ptr as usize + len) & !(HUGE_PAGE - 1);
    if end <= start {
        return;
    }
    // SAFETY: madvise only changes how the kernel backs the range, which
    // lies inside one live allocation of ours; MADV_HUGEPAGE never changes
    // its contents.
    let rc = unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
    if rc != 0 {
        static ONCE: std::sync::Once = std::sync::Once::new();
        ONCE.call_once(|| {
            eprintln!(
                "eventstream: note: no transparent huge pages ({}); the pool and dedup table use 4 KiB pages",
                std::io::Error::last_os_error()
            );
        });
    }
}

fn ring<T: Send>(capacity: usize) -> Result<(Producer<'static, T>, Consumer<'static, T>), String> {
    let slots = leak_slice(capacity, Slot::new);
    let ring = leak(BufferRing::new(slots).map_err(|_| "ring capacity must be a power of two")?);
    ring.split().ok_or_else(|| "ring split twice".to_string())
}

/// A non-blocking listener on `addr`.
fn bind(addr: SocketAddr) -> Result<TcpListener, String> {
    let l = TcpListener::bind(addr).map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    l.set_nonblocking(true)
        .map_err(|e| format!("cannot listen on {addr}: {e}"))?;
    Ok(l)
}

/// A running server.
pub struct Running {
    /// The bound plaintext address of producers and readers (None:
    /// `--listen none`).
    pub listen: Option<SocketAddr>,
    /// The bound TLS address (`--tls-listen`).
    pub tls_listen: Option<SocketAddr>,
    /// The bound metrics address.
    pub metrics: SocketAddr,
    pub(crate) shared: Arc<Shared>,
    threads: Vec<(&'static str, JoinHandle<Result<(), String>>)>,
}

impl Running {
    /// Starts a graceful shutdown (what SIGINT and SIGTERM do).
    pub fn shutdown(&self) {
        self.shared.request_shutdown();
    }

    /// Waits for every thread; the first error, if any.
    pub fn wait(self) -> Result<(), String> {
        let mut result = Ok(());
        for (name, t) in self.threads {
            let r = t
                .join()
                .map_err(|_| format!("the {name} thread panicked"))
                .and_then(|r| r);
            if result.is_ok() {
                result = r;
            }
        }
        result
    }
}

/// Builds and starts the server; errors are one line for the operator.
pub fn start(cfg: ServerConfig) -> Result<Running, String> {
    let args = &cfg;
    ignore_signal(libc::SIGPIPE).map_err(|e| format!("cannot ignore SIGPIPE: {e}"))?;
    ignore_signal(libc::SIGXFSZ).map_err(|e| format!("cannot ignore SIGXFSZ: {e}"))?;
    if let Err(e) = raise_nofile_limit() {
        eprintln!("eventstream: warning: cannot raise the open-file limit: {e}");
    }
    let limits = Limits::new(args.max_frame, args.max_topic)
        .map_err(|e| format!("bad frame limits: {e:?}"))?;
    let (mut log, opened) = Log::open(
        &args.data,
        LogOptions {
            segment_bytes: args.segment_bytes,
            retention_bytes: args.retention_bytes,
            retention_age: args.retention_age,
            repair: args.repair,
            check_window: args.dedup_window,
            visible_when_durable: args.fsync == FsyncPolicy::Always,
        },
    )?;
    let server_id = crate::forward::server_id(&args.data)?;
    for note in &opened.notes {
        eprintln!("eventstream: recovery: {note}");
    }
    if !opened.gaps.ranges().is_empty() {
        let list: Vec<String> = opened
            .gaps
            .ranges()
            .iter()
            .map(|(a, b)| format!("{a}..{b}"))
            .collect();
        eprintln!(
            "eventstream: the log has {} gaps lost to --repair ({} offsets, listed in {}/{}/{}): {}",
            list.len(),
            opened.gaps.lost_offsets(),
            args.data.display(),
            crate::repair::DAMAGED_DIR,
            crate::repair::REPORT,
            list.join(", ")
        );
    }
    let listener = args.listen.map(bind).transpose()?;
    let tls = match (args.tls_listen, &args.tls) {
        (Some(addr), Some(files)) => Some((bind(addr)?, Arc::new(ServerTls::new(files.clone())?))),
        _ => None,
    };
    let metrics_listener = TcpListener::bind(args.metrics)
        .map_err(|e| format!("cannot serve metrics on {}: {e}", args.metrics))?;
    set_nonblocking(std::os::fd::AsRawFd::as_raw_fd(&metrics_listener))
        .map_err(|e| format!("cannot serve metrics: {e}"))?;
    let local = |l: &TcpListener| l.local_addr().map_err(|e| e.to_string());
    let listen = listener.as_ref().map(local).transpose()?;
    let tls_listen = tls.as_ref().map(|(l, _)| local(l)).transpose()?;
    let metrics = metrics_listener.local_addr().map_err(|e| e.to_string())?;

    // Every buffer of the engine, once.
    let window_ms = args.dedup_window.as_millis() as u32;
    let shared = Arc::new(
        Shared::new(
            u64::from(args.pool_events),
            window_ms,
            args.idle_spin.as_nanos() as u64,
        )
        .map_err(|e| format!("eventfd: {e}"))?,
    );
    shared
        .gauges
        .log_lost_offsets
        .store(opened.gaps.lost_offsets(), Ordering::Relaxed);
    let pool_meta = leak_slice(args.pool_events as usize, SlotMeta::new);
    // Written at start, like every other buffer here, so that no event pays
    // for a first touch: the pool hands out its never-used slots in order,
    // and left to the allocator's lazy zero pages the first pass over the
    // 32 MiB (0.65 s at 100,000 events/s) met a page fault every 2 MiB of
    // slots, each of which held ingest 2-3 ms in this VM.
    let pool_data = leak_slice(args.pool_events as usize * args.max_frame as usize, || 0u8);
    let pool = leak(
        BufferPool::new(pool_meta, pool_data, args.max_frame as usize)
            .map_err(|e| format!("pool: {e:?}"))?,
    );
    let acquirer = pool.acquirer().ok_or("pool acquirer taken")?;
    let dedup_states = leak_slice(cfg.dedup_capacity, DedupState::new);
    let dedup_stamps = leak_slice(cfg.dedup_capacity, DedupStamp::new);
    let dedup_slots = leak_slice(cfg.dedup_capacity, DedupSlot::new);
    let table = leak(
        BufferDedupTable::new(
            dedup_states,
            dedup_stamps,
            dedup_slots,
            DedupConfig {
                window_ms,
                when_full: args.dedup_full,
            },
        )
        .map_err(|_| "dedup capacity must be a power of two")?,
    );
    let dedup = table.table();
    let mut inserter = dedup.inserter().ok_or("dedup inserter taken")?;
    let rebuilt = crate::rebuild::rebuild_dedup(
        log.segments(),
        &mut inserter,
        args.dedup_window,
        wall_ns(),
        monotonic_ns() / 1_000_000,
    )
    .map_err(|e| format!("cannot rebuild the dedup table from the log: {e}"))?;
    if rebuilt > 0 {
        eprintln!("eventstream: dedup table rebuilt with {rebuilt} transactional ids from the log");
    }
    let mut topics: TopicTable<MAX_TOPICS> = TopicTable::new();
    for (t, p) in &cfg.topics {
        topics
            .set(t.as_bytes(), *p)
            .map_err(|e| format!("topic {t:?}: {e:?}"))?;
    }
    let router: &'static TopicTable<MAX_TOPICS> = leak(topics);
    let arena = (args.pool_events as usize / 2).max(args.batch_max_events as usize);
    let windows = BatchWindows::new(
        leak_slice(BATCH_WINDOWS, WindowMeta::new),
        leak_slice(arena, Entry::new),
        BatchConfig {
            max_events: args.batch_max_events,
            max_age_ns: args.batch_max_age.as_nanos() as u64,
        },
    )
    .map_err(|_| "batch windows: bad buffers")?;

    // The layouts and the figures behind `auto`: docs/decisions.md
    // ("Thread layouts").
    let cpus_usable = usable_cpus();
    let inline = match args.processors {
        Processors::Inline => true,
        Processors::Threads => false,
        Processors::Auto => cpus_usable <= 2,
    };
    let storage_mode = match args.storage_thread {
        StorageThread::On => StorageMode::Thread,
        StorageThread::Off if !inline => {
            return Err(
                "--storage-thread off needs the processors inline (--processors inline)".into(),
            )
        }
        StorageThread::Off => StorageMode::Ingest,
        StorageThread::Auto if inline && cpus_usable == 1 => StorageMode::Ingest,
        StorageThread::Auto if inline => StorageMode::Shared,
        StorageThread::Auto => StorageMode::Thread,
    };
    let rc = cfg.ring_capacity;
    let (srt_tx, srt_rx) = ring::<StorageItem<'static>>(rc)?;
    let (stx_tx, stx_rx) = ring::<StorageItem<'static>>(rc)?;
    let (sb_tx, sb_rx) = ring::<StorageItem<'static>>(rc)?;
    let ack_capacity = (4 * rc).max(65536).next_power_of_two();
    let (ack_tx, ack_rx) = ring::<(u32, Ack)>(ack_capacity)?;
    let realtime = RealtimeProcessor::new(dedup);
    let transactional = TransactionalProcessor::new(inserter);
    let sync_targets = log.sync_targets();
    let tail = log.tail();
    let groups = Arc::new(crate::readers::groups::Groups::load(
        &args.data,
        args.max_groups,
        args.group_expiry,
    )?);
    let inbox = Arc::new(crate::readers::Inbox::new().map_err(|e| format!("eventfd: {e}"))?);
    let max_record = crate::readers::max_record_bytes(
        &args.data,
        (eventstream_core::record::RECORD_HEADER_LEN as u64
            + u64::from(args.batch_max_events) * u64::from(args.max_frame))
        .min(u64::from(u32::MAX)) as u32,
    )?;
    let _ = shared.readers.tail.set(tail.clone());
    if let Some(a) = &cfg.auth {
        let _ = shared.auth.set(a.clone());
    }
    if let Some((_, t)) = &tls {
        let _ = shared.tls.set(t.clone());
    }
    let _ = shared.readers_waker.set(inbox.waker());
    let _ = shared.readers.groups.set(groups.clone());
    let prefill =
        (args.fsync == FsyncPolicy::Always && args.segment_prefill).then(|| log.enable_prefill());
    let storage = Storage::new(StorageParts {
        log,
        rx: [srt_rx, stx_rx, sb_rx],
        acks: ack_tx,
        dedup,
        fsync: args.fsync,
        max_frame: args.max_frame,
        batch_max_events: args.batch_max_events,
        shared: shared.clone(),
    });
    let storage = Arc::new(Mutex::new(storage));
    let parts = IngestParts {
        listener,
        tls,
        acquirer,
        ack_rx,
        router,
        limits,
        ack_credit: cfg.ack_credit,
        max_connections: args.max_connections,
        frame_timeout: args.frame_timeout,
        idle_timeout: args.idle_timeout,
        reject_when_full: args.when_full == eventstream_core::pipeline::WhenFull::Reject,
        shared: shared.clone(),
        readers: inbox.clone(),
        auth: cfg.auth.clone(),
        legacy_prefix: cfg
            .legacy_unauthenticated
            .as_ref()
            .map(|p| p.as_bytes().to_vec()),
        legacy_deny: cfg.legacy_deny,
    };
    // The thread layout (docs/architecture.md): inline, ingest runs the
    // processors; threads, a ring from ingest to each processor thread,
    // which gets its half here.
    let sweep = args.dedup_sweep;
    let (run_ingest, processor_threads): (IngestRun, _) = if inline {
        match storage_mode {
            StorageMode::Thread => {}
            StorageMode::Ingest => eprintln!("eventstream: storage runs on the ingest thread"),
            StorageMode::Shared => eprintln!(
                "eventstream: ingest writes small amounts itself, the storage thread large ones"
            ),
        }
        eprintln!("eventstream: processors run inline on the ingest thread");
        let down = Inline::new(InlineParts {
            realtime,
            transactional,
            batch: BatchProcessor::new(windows),
            dedup,
            storage_tx: [srt_tx, stx_tx, sb_tx],
            sweep_every: sweep,
            storage: storage.clone(),
            mode: storage_mode,
            shared: shared.clone(),
        });
        let ingest = Ingest::new(parts, down).map_err(|e| format!("epoll: {e}"))?;
        (Box::new(move || ingest.run()), None)
    } else {
        let (rt_tx, rt_rx) = ring::<Event<'static>>(rc)?;
        let (tx_tx, tx_rx) = ring::<Event<'static>>(rc)?;
        let (b_tx, b_rx) = ring::<Event<'static>>(rc)?;
        let down = Threads::new([rt_tx, tx_tx, b_tx], shared.clone());
        let ingest = Ingest::new(parts, down).map_err(|e| format!("epoll: {e}"))?;
        (
            Box::new(move || ingest.run()),
            Some((
                (realtime, rt_rx, srt_tx),
                (transactional, tx_rx, stx_tx),
                (windows, b_rx, sb_tx),
            )),
        )
    };
    // The forwarder first: a missing stream stops the start before any
    // engine thread runs.
    let forwarder = match &cfg.forward {
        Some(f) => Some(crate::forward::start(crate::forward::ForwardParts {
            cfg: f.clone(),
            server_id: server_id.clone(),
            tail: tail.clone(),
            gaps: opened.gaps.clone(),
            groups: groups.clone(),
            sync: sync_targets.clone(),
            shared: shared.clone(),
            start: 0,
        })?),
        None => None,
    };
    let pin = args.pin;
    let cpus = online_cpus();
    let mut threads = Vec::new();
    let mut spawn = |name: &'static str,
                     index: usize,
                     f: Box<dyn FnOnce() -> Result<(), String> + Send>|
     -> Result<(), String> {
        let handle = std::thread::Builder::new()
            .name(format!("es-{name}"))
            .spawn(move || {
                if pin {
                    if let Err(e) = pin_to_cpu(index % cpus) {
                        eprintln!("eventstream: warning: cannot pin {name}: {e}");
                    }
                }
                f()
            })
            .map_err(|e| format!("cannot start the {name} thread: {e}"))?;
        threads.push((name, handle));
        Ok(())
    };
    if let Some((rt, tx, b)) = processor_threads {
        let s = shared.clone();
        spawn(
            "realtime",
            1,
            Box::new(move || {
                let (p, rx, out) = rt;
                run_singles(Singles::Realtime(p), dedup, rx, out, s);
                Ok(())
            }),
        )?;
        let s = shared.clone();
        spawn(
            "transactional",
            1,
            Box::new(move || {
                let (p, rx, out) = tx;
                run_singles(Singles::Transactional(p, sweep), dedup, rx, out, s);
                Ok(())
            }),
        )?;
        let s = shared.clone();
        spawn(
            "batch",
            1,
            Box::new(move || {
                let (windows, rx, out) = b;
                run_batch(windows, rx, out, s);
                Ok(())
            }),
        )?;
    }
    if storage_mode != StorageMode::Ingest {
        let s = shared.clone();
        spawn(
            "storage",
            1,
            Box::new(move || Storage::run_thread(storage, s)),
        )?;
    }
    let reader_parts = crate::readers::ReaderParts {
        inbox: inbox.clone(),
        tail: tail.clone(),
        groups: groups.clone(),
        gaps: opened.gaps.clone(),
        max_topic: args.max_topic,
        max_record,
        segment_bytes: args.segment_bytes,
        hold_bytes: args.reader_hold_bytes,
        shared: shared.clone(),
        auth: cfg.auth.clone(),
    };
    spawn(
        "readers",
        1,
        Box::new(move || {
            crate::readers::run_readers(reader_parts).map_err(|e| format!("readers failed: {e}"))
        }),
    )?;
    let s = shared.clone();
    let (t, g, w) = (tail.clone(), groups.clone(), inbox.waker());
    let commit_targets = sync_targets.clone();
    spawn(
        "commit",
        0,
        Box::new(move || {
            crate::readers::groups::run_commits(g, t, commit_targets, w, s);
            Ok(())
        }),
    )?;
    let s = shared.clone();
    let policy = args.fsync;
    let commit_delay = args.group_commit_delay;
    let drop_rate = drop_min_rate(args.drop_written_pages);
    spawn(
        "sync",
        0,
        Box::new(move || {
            run_sync(
                policy,
                commit_delay,
                drop_rate,
                storage_mode != StorageMode::Thread,
                sync_targets,
                tail,
                s,
            );
            Ok(())
        }),
    )?;
    if let Some(prefill) = prefill {
        let s = shared.clone();
        spawn(
            "prefill",
            1,
            Box::new(move || {
                run_prefill(prefill, s);
                Ok(())
            }),
        )?;
    }
    let metrics_token = cfg.metrics_token.clone();
    let s = shared.clone();
    spawn(
        "housekeeping",
        0,
        Box::new(move || {
            crate::report::run_housekeeping(metrics_listener, metrics_token, dedup, s);
            Ok(())
        }),
    )?;
    spawn(
        "ingest",
        0,
        Box::new(move || run_ingest().map_err(|e| format!("ingest failed: {e}"))),
    )?;
    // Ingest finishes last in the shutdown; wait for it first so the other
    // threads' results follow.
    threads.rotate_right(1);
    if let Some(f) = forwarder {
        threads.push(("forward", f));
    }
    Ok(Running {
        listen,
        tls_listen,
        metrics,
        shared,
        threads,
    })
}

/// `eventstream serve`: runs until SIGINT/SIGTERM.
pub fn serve(cfg: ServerConfig) -> Result<(), String> {
    let running = start(cfg)?;
    crate::signals::install_signal_handlers(&running)?;
    let mut out = std::io::stdout().lock();
    if let Some(a) = running.listen {
        let _ = writeln!(out, "listening on {a}");
    }
    if let Some(a) = running.tls_listen {
        let _ = writeln!(out, "listening with TLS on {a}");
    }
    let _ = writeln!(out, "metrics on {}", running.metrics);
    let _ = out.flush();
    drop(out);
    running.wait()
}
