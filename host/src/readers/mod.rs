//! The reader thread (`es-readers`): serves read sessions (PROTOCOL.md
//! section 7) in its own epoll loop. Ingest hands over every connection
//! that starts with `ESCR`, with the bytes it had read of it, and never
//! serves it again.
//!
//! Sessions read the segment files and the page cache, never the rings:
//! records go out with `sendfile` up to the visible end the writers
//! publish (`storage::LogTail`), so a slow reader holds up only itself.
//! A follower waiting at the end sleeps in epoll; the storage thread (or,
//! under `--fsync always`, the sync thread) wakes it through an eventfd
//! when records become visible. Commits go to the commit thread
//! (`groups`), which answers through the same wake-up.
//!
//! Costs: per chunk of records one `send` for its header and one or more
//! `sendfile` calls; walking the records' headers reads the mapped segment
//! (no syscall per record). Allocation happens per session and per commit.

use std::collections::HashMap;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use eventstream_core::wire::Reason;

use crate::repair::Gaps;
use crate::shared::{Phase, Shared};
use crate::storage::{locked, LogTail};
use crate::sys::{monotonic_ns, Epoll, EventFd};

pub mod groups;
mod segments;
mod session;

use groups::{CommitDone, Groups};
use segments::Segments;
use session::{Session, State, Turn};

/// How long a request may take to arrive whole.
const REQUEST_TIMEOUT_NS: u64 = 10_000_000_000;
/// How long a CLOSING may take to reach a client that does not read.
const CLOSING_GRACE_NS: u64 = 5_000_000_000;
/// A chunk at least this often (HEARTBEAT when nothing else goes).
const HEARTBEAT_NS: u64 = 1_000_000_000;
const TOKEN_INBOX: u64 = u64::MAX;
const TOKEN_TAIL: u64 = u64::MAX - 1;

/// A connection handed over: its socket, the bytes read of it, what its
/// HELLO allows, and the bytes ingest had still to write to it (the
/// HELLO's answer).
type Handed = (
    OwnedFd,
    Vec<u8>,
    crate::auth::Access,
    Vec<u8>,
    Option<Box<crate::tls::TlsConn>>,
);

/// Connections handed over by ingest.
pub struct Inbox {
    queue: Mutex<Vec<Handed>>,
    waker: Arc<EventFd>,
}

impl Inbox {
    /// An empty inbox.
    pub fn new() -> std::io::Result<Inbox> {
        Ok(Inbox {
            queue: Mutex::new(Vec::new()),
            waker: Arc::new(EventFd::new()?),
        })
    }

    /// Ingest: the connection `fd` is a reader; `bytes` are what was read
    /// of it so far (the request, and anything pipelined behind it);
    /// `access` what its HELLO allows; `unsent` what ingest had not yet
    /// written to it, sent first; `tls` its TLS session (with any records
    /// read and not yet opened, and any not yet written).
    pub fn hand_over(
        &self,
        fd: OwnedFd,
        bytes: Vec<u8>,
        access: crate::auth::Access,
        unsent: Vec<u8>,
        tls: Option<Box<crate::tls::TlsConn>>,
    ) {
        locked(&self.queue).push((fd, bytes, access, unsent, tls));
        self.waker.notify();
    }

    /// The eventfd that wakes the reader thread.
    pub fn waker(&self) -> Arc<EventFd> {
        self.waker.clone()
    }
}

/// The read path's figures for `/metrics`.
pub struct ReaderStats {
    /// Open sessions.
    pub sessions: AtomicU64,
    /// Sessions since start.
    pub sessions_total: AtomicU64,
    /// Record bytes sent.
    pub bytes_sent: AtomicU64,
    /// Errors answered or sessions closed, by reason code.
    pub errors: [AtomicU64; Reason::ALL.len()],
    /// The log's tail (first retained and visible end offsets).
    pub tail: OnceLock<Arc<LogTail>>,
    /// The consumer groups.
    pub groups: OnceLock<Arc<Groups>>,
}

impl Default for ReaderStats {
    fn default() -> Self {
        ReaderStats {
            sessions: AtomicU64::new(0),
            sessions_total: AtomicU64::new(0),
            bytes_sent: AtomicU64::new(0),
            errors: std::array::from_fn(|_| AtomicU64::new(0)),
            tail: OnceLock::new(),
            groups: OnceLock::new(),
        }
    }
}

/// Everything the reader thread needs.
pub struct ReaderParts {
    /// Connections from ingest.
    pub inbox: Arc<Inbox>,
    /// The log's tail.
    pub tail: Arc<LogTail>,
    /// The consumer groups.
    pub groups: Arc<Groups>,
    /// Offset ranges lost to `--repair`.
    pub gaps: Gaps,
    /// Longest topic prefix.
    pub max_topic: u8,
    /// The answer's max record bytes.
    pub max_record: u32,
    /// The segment size limit (sizes the mappings).
    pub segment_bytes: u64,
    /// Bytes of deleted segments sessions may keep open.
    pub hold_bytes: u64,
    /// Shared state.
    pub shared: Arc<Shared>,
    /// The tokens, when authentication is on.
    pub auth: Option<Arc<crate::auth::AuthState>>,
}

/// What sessions share on the reader thread.
pub(crate) struct Ctx {
    groups: Arc<Groups>,
    gaps: Gaps,
    max_topic: u8,
    max_record: u32,
    shared: Arc<Shared>,
    /// Sessions fenced by a newer one of their group (CLOSING FENCED).
    fenced: Vec<u64>,
}

impl Ctx {
    fn count_error(&self, reason: Reason) {
        if let Some(c) = self.shared.readers.errors.get(reason as usize) {
            c.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn bytes_sent(&self, n: u64) {
        self.shared
            .readers
            .bytes_sent
            .fetch_add(n, Ordering::Relaxed);
    }
}

/// The file that keeps the largest record size any run could write.
pub const MAX_RECORD_FILE: &str = "max_record";

/// The session answer's `max record bytes`: the largest record this run
/// can write (`now`) or any earlier run on `dir` could, kept in
/// `<dir>/max_record` (an upper bound: retention may have deleted the
/// records that set it). Raised and fsynced before any record is written.
pub fn max_record_bytes(dir: &std::path::Path, now: u32) -> Result<u32, String> {
    let path = dir.join(MAX_RECORD_FILE);
    let before = match std::fs::read_to_string(&path) {
        Ok(t) => t
            .trim()
            .parse::<u32>()
            .map_err(|_| format!("{}: not a number; remove it to start again", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
    };
    if now <= before {
        return Ok(before);
    }
    crate::storage::replace_durably(dir, MAX_RECORD_FILE, format!("{now}\n").as_bytes())
        .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
    Ok(now)
}

/// Builds the closed segments' missing offset indexes (at start, on the
/// reader thread: readers seek with them; no producer waits for this).
fn index_closed(tail: &LogTail) {
    let (segments, _) = tail.segments();
    for s in segments.iter().filter(|s| s.closed_len.is_some()) {
        let seg = crate::storage::Segment {
            base: s.base,
            path: s.path.clone(),
            size: s.closed_len.unwrap_or(0),
        };
        if let Err(e) = crate::storage::SegmentIndex::of_closed(&seg) {
            eprintln!(
                "eventstream: cannot index {}: {e} (readers will try again)",
                s.path.display()
            );
        }
    }
}

/// Runs the reader thread until the stop.
pub fn run_readers(p: ReaderParts) -> std::io::Result<()> {
    let epoll = Epoll::new()?;
    let inbox_waker = p.inbox.waker();
    epoll.add(inbox_waker.raw(), TOKEN_INBOX, libc::EPOLLIN as u32)?;
    epoll.add(p.tail.waker().raw(), TOKEN_TAIL, libc::EPOLLIN as u32)?;
    index_closed(&p.tail);
    let mut segs = Segments::new(p.tail.clone(), p.segment_bytes);
    let mut ctx = Ctx {
        groups: p.groups.clone(),
        gaps: p.gaps,
        max_topic: p.max_topic,
        max_record: p.max_record,
        shared: p.shared.clone(),
        fenced: Vec::new(),
    };
    let mut sessions: HashMap<u64, Session> = HashMap::new();
    let mut next_id = 1u64;
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 256];
    let mut buf = vec![0u8; 16 * 1024];
    let mut done: Vec<CommitDone> = Vec::new();
    let mut seen_end = segs.visible().offset;
    let mut draining = false;
    let mut auth_seen = 0;
    loop {
        let now = monotonic_ns();
        let phase = p.shared.phase();
        if phase == Phase::Stop && (sessions.is_empty() || draining) {
            break;
        }
        if phase != Phase::Run && !draining {
            draining = true;
            for s in sessions.values_mut() {
                if s.state == State::Streaming || s.state == State::AwaitGroup {
                    s.close_with(&ctx, Reason::ShuttingDown, now);
                } else {
                    s.state = State::Closing;
                }
            }
        }
        segs.refresh();
        // New sessions from ingest.
        let handed = std::mem::take(&mut *locked(&p.inbox.queue));
        for (fd, bytes, mut access, unsent, tls) in handed {
            // Rights as of now (a reload may have come after ingest's
            // last check).
            if let (Some(state), crate::auth::Access::Token(r)) = (&p.auth, &access) {
                access = match state.current().refresh(r) {
                    Some(now_rights) => crate::auth::Access::Token(now_rights),
                    None => crate::auth::Access::Anonymous,
                };
            }
            let id = next_id;
            next_id += 1;
            let flags = (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32;
            if let Err(e) = epoll.add(fd.as_raw_fd(), id, flags) {
                eprintln!("eventstream: cannot watch a reader connection: {e}");
                continue;
            }
            let mut s = Session::new(id, fd, bytes, access, unsent, tls, now);
            if draining {
                s.close_with(&ctx, Reason::ShuttingDown, now);
            }
            s.take_input(&mut ctx, &mut segs, now);
            sessions.insert(id, s);
            p.shared
                .readers
                .sessions_total
                .fetch_add(1, Ordering::Relaxed);
        }
        // Commits answered.
        p.groups.take_done(&mut done);
        for d in done.drain(..) {
            let ready = {
                let mut g = p.groups.lock();
                g.get_mut(&d.group).map(|g| {
                    g.inflight = g.inflight.saturating_sub(1);
                    (g.inflight == 0).then_some(g.session).flatten()
                })
            };
            if let Some(s) = sessions.get_mut(&d.session) {
                s.committed(&ctx, d.offset, d.ok, now);
            }
            if let Some(Some(waiting)) = ready {
                if let Some(s) = sessions.get_mut(&waiting) {
                    s.group_ready(&mut ctx, &mut segs, now);
                }
            }
        }
        fence_old(&mut ctx, &mut sessions, now);
        // A reload of --auth (SIGHUP): sessions of revoked tokens end.
        if let Some(state) = &p.auth {
            if state.generation() != auth_seen {
                auth_seen = state.generation();
                let auth = state.current();
                for s in sessions.values_mut() {
                    s.recheck_token(&ctx, &auth, now);
                }
            }
        }
        // Retention (taken in by the refresh at the top): sessions inside
        // deleted segments keep them, up to the cap; past it the ones there
        // are closed OUT_OF_RANGE.
        if segs.holds_deleted() && segs.held_bytes() > p.hold_bytes {
            for s in sessions.values_mut().filter(|s| s.in_deleted()) {
                s.close_with(&ctx, Reason::OutOfRange, now);
            }
        }
        let end = segs.visible().offset;
        if end != seen_end {
            seen_end = end;
            for s in sessions.values_mut() {
                s.visible_moved();
            }
        }
        let mut next_beat = u64::MAX;
        for s in sessions.values_mut() {
            next_beat = next_beat.min(s.heartbeat(&segs, now));
        }
        // Turns for every session that can go on.
        let mut gone = Vec::new();
        for (id, s) in sessions.iter_mut() {
            if (s.runnable() && s.turn(&mut ctx, &mut segs, now) == Turn::Close)
                // The client closed: it reads no more (nor commits).
                || s.eof
                || (s.state != State::Streaming && now >= s.deadline)
            {
                gone.push(*id);
            }
        }
        fence_old(&mut ctx, &mut sessions, now);
        for id in gone {
            close(&epoll, &mut sessions, id, &p.groups);
        }
        p.tail
            .set_low_water(sessions.values().filter_map(Session::position).min());
        p.shared
            .readers
            .sessions
            .store(sessions.len() as u64, Ordering::Relaxed);
        if sessions.values().any(Session::runnable) {
            // More to send: look at the sockets without sleeping.
            wait(
                &epoll,
                &inbox_waker,
                &mut events,
                0,
                &mut sessions,
                &mut ctx,
                &mut segs,
                &mut buf,
            )?;
            continue;
        }
        let mut timeout = next_beat.saturating_sub(now).min(HEARTBEAT_NS);
        for s in sessions.values() {
            if s.state != State::Streaming {
                timeout = timeout.min(s.deadline.saturating_sub(now));
            }
        }
        if draining {
            timeout = timeout.min(10_000_000);
        }
        let waiting = sessions.values().any(|s| s.at_end);
        if waiting && !p.tail.prepare_wait(seen_end) {
            continue;
        }
        let ms = timeout.div_ceil(1_000_000).min(1000) as i32;
        wait(
            &epoll,
            &inbox_waker,
            &mut events,
            ms,
            &mut sessions,
            &mut ctx,
            &mut segs,
            &mut buf,
        )?;
    }
    for (_, s) in sessions.drain() {
        let _ = epoll.delete(s.fd.as_raw_fd());
    }
    p.shared.readers.sessions.store(0, Ordering::Relaxed);
    Ok(())
}

/// Waits up to `ms` for socket and wake-up events and handles them.
#[allow(clippy::too_many_arguments)]
fn wait(
    epoll: &Epoll,
    inbox: &EventFd,
    events: &mut [libc::epoll_event],
    ms: i32,
    sessions: &mut HashMap<u64, Session>,
    ctx: &mut Ctx,
    segs: &mut Segments,
    buf: &mut [u8],
) -> std::io::Result<()> {
    let n = match epoll.wait(events, ms) {
        Ok(n) => n,
        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => 0,
        Err(e) => return Err(e),
    };
    let now = monotonic_ns();
    for ev in events.iter().take(n) {
        let (token, flags) = (ev.u64, ev.events);
        match token {
            // The handovers and commits are taken at the loop's top.
            TOKEN_INBOX => inbox.drain(),
            TOKEN_TAIL => segs.tail().waker().drain(),
            id => {
                let Some(s) = sessions.get_mut(&id) else {
                    continue;
                };
                if flags & libc::EPOLLOUT as u32 != 0 {
                    s.writable();
                }
                if flags
                    & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                    != 0
                {
                    s.read_input(buf);
                    s.take_input(ctx, segs, now);
                }
            }
        }
    }
    Ok(())
}

/// Sends CLOSING FENCED to the sessions a newer one of their group
/// replaced.
fn fence_old(ctx: &mut Ctx, sessions: &mut HashMap<u64, Session>, now: u64) {
    for id in std::mem::take(&mut ctx.fenced) {
        if let Some(s) = sessions.get_mut(&id) {
            s.close_with(ctx, Reason::Fenced, now);
            // Its group is no longer its own.
            s.group = None;
        }
    }
}

/// Closes the session `id` and lets its group go.
fn close(epoll: &Epoll, sessions: &mut HashMap<u64, Session>, id: u64, groups: &Groups) {
    let Some(mut s) = sessions.remove(&id) else {
        return;
    };
    if let Err(e) = epoll.delete(s.fd.as_raw_fd()) {
        eprintln!("eventstream: cannot unwatch a reader connection: {e}");
    }
    s.goodbye();
    if let Some(g) = &s.group {
        let mut all = groups.lock();
        if let Some(g) = all.get_mut(g) {
            if g.session == Some(id) {
                g.session = None;
                g.touched_ms = crate::sys::wall_ns() / 1_000_000;
            }
        }
    }
}
