//! The `/metrics` HTTP endpoint: an event loop over non-blocking sockets
//! that never waits on a client. Each connection has a fixed request
//! buffer, a deadline for its whole request and one for its answer, and a
//! bounded number of connections may be open at once (when full, the one
//! that has waited longest is closed for the newcomer), and answers go out
//! at a bounded rate (a client scraping in a loop waits). HTTP/1.1
//! keep-alive and pipelining are served one request at a time; GET and
//! HEAD of `/metrics` are answered, other paths 404, other methods 405,
//! requests that are malformed, too large or carry a body 400.
//!
//! It runs on the housekeeping thread (see `report`), off the hot path; a
//! scrape allocates its answer.

use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

use crate::sys::Epoll;

/// Metric connections open at once; the one waiting longest is closed to
/// make room for a new one.
pub const MAX_CONNECTIONS: usize = 64;
/// The largest request head (request line and headers) taken.
pub const MAX_REQUEST: usize = 4096;
/// A request must arrive whole within this long of its first byte (or of
/// the accept).
pub const REQUEST_DEADLINE_NS: u64 = 2_000_000_000;
/// An answer must be taken by the client within this long.
pub const ANSWER_DEADLINE_NS: u64 = 10_000_000_000;
/// A kept-alive connection with no request for this long is closed.
pub const KEEPALIVE_IDLE_NS: u64 = 30_000_000_000;
/// Answers per second at the most, over all connections: a client that
/// scrapes in a loop gets this many and waits for the rest, so that
/// scrapes never take more than a sliver of a core from ingest.
pub const MAX_ANSWERS_PER_SEC: u64 = 1000;
/// Answers that may go out at once above that rate.
pub const ANSWER_BURST: u64 = 100;
const ANSWER_INTERVAL_NS: u64 = 1_000_000_000 / MAX_ANSWERS_PER_SEC;

const BURST_NS: u64 = (ANSWER_BURST - 1) * ANSWER_INTERVAL_NS;
const TOKEN_LISTENER: u64 = u64::MAX;
const SLOT_BITS: u32 = 32;

/// What the endpoint counts, rendered into `/metrics` by `report`.
#[derive(Clone, Copy, Debug, Default)]
pub struct HttpStats {
    /// Answers sent, by status: 200, 400, 401, 404, 405.
    pub answers: [u64; 5],
    /// Connections closed because their request or answer missed its
    /// deadline, or a kept-alive one idled out.
    pub deadline_closes: u64,
    /// Connections closed to make room under [`MAX_CONNECTIONS`].
    pub evictions: u64,
    /// Requests that waited for room under [`MAX_ANSWERS_PER_SEC`].
    pub throttled: u64,
    /// Metric connections open now.
    pub open: u64,
}

/// The statuses the endpoint answers with, in [`HttpStats::answers`] order.
pub const STATUSES: [u16; 5] = [200, 400, 401, 404, 405];

struct Conn {
    stream: TcpStream,
    buf: Box<[u8; MAX_REQUEST]>,
    len: usize,
    out: Vec<u8>,
    out_pos: usize,
    /// Close once `out` is written.
    close_after: bool,
    /// The peer shut its side: serve what is buffered, then close.
    peer_done: bool,
    /// A whole request waits for the answer rate (in `Endpoint::deferred`).
    deferred: bool,
    /// When the current wait began (accept, first byte of a request, or
    /// the start of an answer): the longest waiter is evicted first.
    since: u64,
    deadline: u64,
}

/// What one request asks for.
#[derive(Debug, PartialEq, Eq)]
enum Request {
    /// GET (`head: false`) or HEAD of `/metrics`; `keep_alive` as the
    /// version and `Connection` header say.
    Metrics { head: bool, keep_alive: bool },
    /// A well-formed request for another path.
    NotFound { head: bool, keep_alive: bool },
    /// A method other than GET and HEAD.
    Method,
    /// `/metrics` without the bearer token `--metrics-token-file` asks for.
    Unauthorized,
    /// Malformed, or carries a body.
    Bad,
}

/// The endpoint's sockets and counters.
pub struct Endpoint {
    listener: TcpListener,
    epoll: Epoll,
    conns: Vec<Option<Conn>>,
    gens: Vec<u32>,
    events: Vec<libc::epoll_event>,
    /// An accept failed for want of descriptors: try again next round.
    accept_retry: bool,
    /// The answer rate's theoretical arrival time (GCRA): an answer may go
    /// out while it is at most a burst ahead of now.
    tat: u64,
    /// Slots whose whole request waits for the answer rate, oldest first.
    deferred: std::collections::VecDeque<usize>,
    /// Counters.
    pub stats: HttpStats,
    /// SHA-256 of the bearer token `/metrics` asks for (`None`: none).
    token: Option<[u8; 32]>,
}

impl Endpoint {
    /// Serves on `listener` (made non-blocking here); with `token`,
    /// `/metrics` answers only requests carrying `Authorization: Bearer`
    /// with it (others get 401).
    pub fn new(listener: TcpListener, token: Option<&[u8]>) -> io::Result<Self> {
        listener.set_nonblocking(true)?;
        let epoll = Epoll::new()?;
        epoll.add(
            listener.as_raw_fd(),
            TOKEN_LISTENER,
            (libc::EPOLLIN | libc::EPOLLET) as u32,
        )?;
        Ok(Self {
            listener,
            epoll,
            conns: (0..MAX_CONNECTIONS).map(|_| None).collect(),
            gens: vec![0; MAX_CONNECTIONS],
            events: vec![libc::epoll_event { events: 0, u64: 0 }; MAX_CONNECTIONS + 1],
            accept_retry: false,
            tat: 0,
            deferred: std::collections::VecDeque::with_capacity(MAX_CONNECTIONS),
            stats: HttpStats::default(),
            token: token.map(crate::auth::sha256),
        })
    }

    /// The earliest time the endpoint has something to do without a new
    /// socket event: a connection's deadline, or room for a waiting answer
    /// (monotonic ns).
    pub fn next_deadline(&self) -> Option<u64> {
        let deadline = self.conns.iter().flatten().map(|c| c.deadline).min();
        let answer = (!self.deferred.is_empty()).then(|| self.tat.saturating_sub(BURST_NS));
        deadline.into_iter().chain(answer).min()
    }

    /// Waits at most `timeout_ms` for sockets, then serves every ready one
    /// and closes those past their deadline. `now` reads the monotonic
    /// clock; `render` writes the metrics text.
    pub fn poll(
        &mut self,
        timeout_ms: i32,
        now: impl Fn() -> u64,
        render: &mut dyn FnMut(&HttpStats) -> String,
    ) {
        let timeout = if self.accept_retry {
            timeout_ms.min(100)
        } else {
            timeout_ms
        };
        let n = match self.epoll.wait(&mut self.events, timeout) {
            Ok(n) => n,
            Err(e) => {
                eprintln!("eventstream: metrics endpoint: epoll_wait failed: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
                0
            }
        };
        let t = now();
        let mut accept = std::mem::take(&mut self.accept_retry);
        for i in 0..n {
            let token = self.events[i].u64;
            if token == TOKEN_LISTENER {
                accept = true;
                continue;
            }
            let slot = (token & u64::from(u32::MAX)) as usize;
            if self.gens.get(slot).map(|&g| u64::from(g)) == Some(token >> SLOT_BITS) {
                self.drive(slot, t, render);
            }
        }
        if accept {
            self.accept_all(t);
        }
        while let Some(&slot) = self.deferred.front() {
            if self.tat.saturating_sub(t) > BURST_NS {
                break;
            }
            self.deferred.pop_front();
            if let Some(c) = self.conns[slot].as_mut() {
                c.deferred = false;
                self.drive(slot, t, render);
            }
        }
        for slot in 0..self.conns.len() {
            if self.conns[slot].as_ref().is_some_and(|c| t >= c.deadline) {
                self.stats.deadline_closes += 1;
                self.close(slot);
            }
        }
    }

    fn accept_all(&mut self, t: u64) {
        loop {
            let stream = match self.listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == io::ErrorKind::ConnectionAborted => continue,
                Err(e) => {
                    // Out of descriptors (or memory): the edge is spent, so
                    // try again on the next round rather than spin.
                    eprintln!("eventstream: metrics endpoint: accept failed: {e}");
                    self.accept_retry = true;
                    return;
                }
            };
            if let Err(e) = self.register(stream, t) {
                eprintln!("eventstream: metrics endpoint: cannot serve a connection: {e}");
            }
        }
    }

    fn register(&mut self, stream: TcpStream, t: u64) -> io::Result<()> {
        stream.set_nonblocking(true)?;
        let slot = match self.conns.iter().position(Option::is_none) {
            Some(s) => s,
            None => {
                // Full: the connection that has waited longest goes.
                let oldest = (0..self.conns.len())
                    .min_by_key(|&s| self.conns[s].as_ref().map_or(u64::MAX, |c| c.since))
                    .unwrap_or(0);
                self.stats.evictions += 1;
                self.close(oldest);
                oldest
            }
        };
        let token = u64::from(self.gens[slot]) << SLOT_BITS | slot as u64;
        self.epoll.add(
            stream.as_raw_fd(),
            token,
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        )?;
        self.conns[slot] = Some(Conn {
            stream,
            buf: Box::new([0; MAX_REQUEST]),
            len: 0,
            out: Vec::new(),
            out_pos: 0,
            close_after: false,
            peer_done: false,
            deferred: false,
            since: t,
            deadline: t + REQUEST_DEADLINE_NS,
        });
        self.stats.open += 1;
        Ok(())
    }

    fn close(&mut self, slot: usize) {
        if let Some(c) = self.conns[slot].take() {
            if c.deferred {
                self.deferred.retain(|&s| s != slot);
            }
            // Closing the socket removes it from the epoll set.
            drop(c);
            self.gens[slot] = self.gens[slot].wrapping_add(1);
            self.stats.open -= 1;
        }
    }

    /// Writes what is pending, reads, and answers whole requests, until the
    /// socket would block either way or the connection ends.
    fn drive(&mut self, slot: usize, t: u64, render: &mut dyn FnMut(&HttpStats) -> String) {
        loop {
            let Some(c) = self.conns[slot].as_mut() else {
                return;
            };
            if c.deferred {
                return;
            }
            let answered = !c.out.is_empty();
            match c.flush() {
                Ok(true) => {}
                Ok(false) => return,
                Err(_) => return self.close(slot),
            }
            if answered {
                if c.close_after {
                    return self.close(slot);
                }
                // Kept alive: the next request (perhaps pipelined) waits
                // from now.
                c.since = t;
                c.deadline = t + if c.len > 0 {
                    REQUEST_DEADLINE_NS
                } else {
                    KEEPALIVE_IDLE_NS
                };
            }
            if let Some(head_len) = head_end(&c.buf[..c.len]) {
                if self.tat.saturating_sub(t) > BURST_NS {
                    // Over the answer rate: wait (the deadline now bounds
                    // the wait for the answer) for `poll` to resume it.
                    c.deferred = true;
                    c.deadline = t + ANSWER_DEADLINE_NS;
                    self.deferred.push_back(slot);
                    self.stats.throttled += 1;
                    return;
                }
                self.tat = self.tat.max(t) + ANSWER_INTERVAL_NS;
                let req = parse(&c.buf[..head_len], self.token.as_ref());
                c.buf.copy_within(head_len..c.len, 0);
                c.len -= head_len;
                let stats = self.stats;
                let (status, close) = answer(&req, &mut c.out, || render(&stats));
                if let Some(i) = STATUSES.iter().position(|&s| s == status) {
                    self.stats.answers[i] += 1;
                }
                c.close_after = close;
                c.since = t;
                c.deadline = t + ANSWER_DEADLINE_NS;
                continue;
            }
            if c.len == MAX_REQUEST {
                answer(&Request::Bad, &mut c.out, String::new);
                c.close_after = true;
                self.stats.answers[1] += 1;
                continue;
            }
            if c.peer_done {
                return self.close(slot);
            }
            match c.stream.read(&mut c.buf[c.len..]) {
                Ok(0) => c.peer_done = true,
                Ok(n) => {
                    if c.len == 0 {
                        c.since = t;
                        c.deadline = t + REQUEST_DEADLINE_NS;
                    }
                    c.len += n;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return self.close(slot),
            }
        }
    }
}

impl Conn {
    /// Writes pending output; true once all of it is written.
    fn flush(&mut self) -> io::Result<bool> {
        while self.out_pos < self.out.len() {
            match self.stream.write(&self.out[self.out_pos..]) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.out_pos += n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(true)
    }
}

/// The length of the request head in `buf` (through its blank line), if
/// it is all there. Lines may end in CRLF or a bare LF.
fn head_end(buf: &[u8]) -> Option<usize> {
    let mut i = 0;
    while let Some(nl) = buf[i..].iter().position(|&b| b == b'\n') {
        let next = i + nl + 1;
        match &buf[next..] {
            [b'\n', ..] => return Some(next + 1),
            [b'\r', b'\n', ..] => return Some(next + 2),
            _ => i = next,
        }
    }
    None
}

/// Reads a request head (request line and headers); `token`: the digest
/// of the bearer token `/metrics` needs.
fn parse(head: &[u8], bearer: Option<&[u8; 32]>) -> Request {
    let Ok(text) = std::str::from_utf8(head) else {
        return Request::Bad;
    };
    let mut lines = text.lines();
    let mut parts = lines.next().unwrap_or("").split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Request::Bad;
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b))
    };
    if !token(method) || !target.starts_with('/') {
        return Request::Bad;
    }
    let mut bearer_ok = bearer.is_none();
    let mut keep_alive = match version {
        "HTTP/1.1" => true,
        "HTTP/1.0" => false,
        _ => return Request::Bad,
    };
    for line in lines.filter(|l| !l.is_empty()) {
        let Some((name, value)) = line.split_once(':') else {
            return Request::Bad;
        };
        if !token(name) {
            return Request::Bad;
        }
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") && value != "0"
            || name.eq_ignore_ascii_case("transfer-encoding")
        {
            // The endpoint takes no bodies; one would be read as the next
            // request.
            return Request::Bad;
        }
        if let (true, Some(want), Some(got)) = (
            name.eq_ignore_ascii_case("authorization"),
            bearer,
            value.strip_prefix("Bearer "),
        ) {
            bearer_ok = crate::auth::same_digest(&crate::auth::sha256(got.trim().as_bytes()), want);
        }
        if name.eq_ignore_ascii_case("connection") {
            for opt in value.split(',').map(str::trim) {
                if opt.eq_ignore_ascii_case("close") {
                    keep_alive = false;
                } else if opt.eq_ignore_ascii_case("keep-alive") {
                    keep_alive = true;
                }
            }
        }
    }
    let head = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Request::Method,
    };
    let path = target.split('?').next().unwrap_or("");
    if path == "/metrics" && !bearer_ok {
        Request::Unauthorized
    } else if path == "/metrics" {
        Request::Metrics { head, keep_alive }
    } else {
        Request::NotFound { head, keep_alive }
    }
}

/// Appends the answer to `req` to `out`; returns its status and whether
/// the connection closes after it.
fn answer(req: &Request, out: &mut Vec<u8>, render: impl FnOnce() -> String) -> (u16, bool) {
    const TEXT: &str = "text/plain; charset=utf-8";
    let (status, reason, ctype, body, head, keep, extra) = match *req {
        Request::Metrics { head, keep_alive } => (
            200,
            "OK",
            "text/plain; version=0.0.4; charset=utf-8",
            render(),
            head,
            keep_alive,
            "",
        ),
        Request::NotFound { head, keep_alive } => (
            404,
            "Not Found",
            TEXT,
            "not found; try GET /metrics\n".to_string(),
            head,
            keep_alive,
            "",
        ),
        Request::Unauthorized => (
            401,
            "Unauthorized",
            TEXT,
            "a bearer token is needed\n".to_string(),
            false,
            false,
            "WWW-Authenticate: Bearer realm=\"eventstream\"\r\n",
        ),
        Request::Method => (
            405,
            "Method Not Allowed",
            TEXT,
            "only GET and HEAD\n".to_string(),
            false,
            false,
            "Allow: GET, HEAD\r\n",
        ),
        Request::Bad => (
            400,
            "Bad Request",
            TEXT,
            "bad request\n".to_string(),
            false,
            false,
            "",
        ),
    };
    let connection = if keep { "keep-alive" } else { "close" };
    let _ = write!(
        out,
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\n{extra}Connection: {connection}\r\n\r\n",
        body.len()
    );
    if !head {
        out.extend_from_slice(body.as_bytes());
    }
    (status, !keep)
}

#[cfg(test)]
#[path = "endpoint_tests.rs"]
mod tests;
