//! Ingest's connections: accepting, registering, looking up and closing
//! them, and the scans for half-received frames and idle connections.

use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use eventstream_core::wire::{Ack, StreamDecoder, ACK_LEN};

use super::*;
use crate::sys;
use crate::tls::TlsConn;

/// One producer connection.
pub(super) struct Conn {
    pub(super) fd: OwnedFd,
    pub(super) id: u32,
    pub(super) dec: StreamDecoder<Box<[u8]>>,
    /// Encoded acks not yet written; `out_pos` bytes of it are written.
    pub(super) out: Vec<u8>,
    pub(super) out_pos: usize,
    /// Acked events in the pipeline.
    pub(super) inflight: u32,
    /// Input read but not yet decoded (the rings or pool were full).
    pub(super) stash: Vec<u8>,
    pub(super) stash_pos: usize,
    pub(super) readable: bool,
    pub(super) writable: bool,
    pub(super) eof: bool,
    /// epoll reported RDHUP, HUP or ERR: the peer closed (or reset) its
    /// side, so reads go on until one returns 0 or an error, short ones
    /// included (no further edge will come).
    pub(super) hup: bool,
    /// FATAL to send once every earlier acked event is answered.
    pub(super) fatal: Option<Ack>,
    /// Close once the acks are written.
    pub(super) closing: bool,
    /// In the ready list.
    pub(super) queued: bool,
    /// In the dirty list (acks to write).
    pub(super) in_dirty: bool,
    /// Monotonic ns since a frame has been half-received.
    pub(super) mid_since: Option<u64>,
    /// Monotonic ns of the last read that brought bytes (or the accept).
    pub(super) last_active: u64,
    /// It opened a read session: these bytes go with it to the reader
    /// thread.
    pub(super) handover: Option<Vec<u8>>,
    /// A HELLO being received (its bytes so far).
    pub(super) hello: Option<Vec<u8>>,
    /// What it may do (its HELLO's token, when authentication is on).
    pub(super) access: Access,
    /// Its TLS state (accepted on `--tls-listen`).
    pub(super) tls: Option<Box<TlsConn>>,
}

/// Gives `c` an ack buffer if it has none (from `spare` when one is kept).
pub(super) fn ensure_out(c: &mut Conn, spare: &mut Vec<Vec<u8>>, capacity: usize) {
    if c.out.capacity() == 0 {
        c.out = spare.pop().unwrap_or_else(|| Vec::with_capacity(capacity));
    }
}

/// The spare list of buffers of `capacity` bytes, with its first ones made.
pub(super) fn spares(capacity: usize) -> Vec<Vec<u8>> {
    let mut v = Vec::with_capacity(SPARE_BUFFERS);
    v.extend((0..SPARE_AT_START).map(|_| Vec::with_capacity(capacity)));
    v
}

/// Keeps `buf` for another connection, or frees it when enough are kept.
pub(super) fn give_back(spare: &mut Vec<Vec<u8>>, mut buf: Vec<u8>) {
    if buf.capacity() > 0 && spare.len() < SPARE_BUFFERS {
        buf.clear();
        spare.push(buf);
    }
}

impl Conn {
    /// Bytes are waiting to be written (acks, or TLS records).
    pub(super) fn unsent(&self) -> bool {
        self.out_pos < self.out.len() || self.tls.as_ref().is_some_and(|t| t.pending())
    }

    pub(super) fn unsent_acks(&self) -> u32 {
        ((self.out.len() - self.out_pos) / ACK_LEN) as u32
    }

    pub(super) fn push_ack(&mut self, ack: &Ack) {
        self.out.extend_from_slice(&ack.encode());
    }
}

impl<D: Downstream> Ingest<D> {
    /// Accepts every pending connection of the plaintext listener, or of
    /// the TLS one.
    pub(super) fn accept_all(&mut self, tls: bool) {
        loop {
            let listener = if tls {
                &self.tls_listener
            } else {
                &self.listener
            };
            let Some(listener) = listener else {
                return;
            };
            let fd = match sys::accept(listener.as_raw_fd()) {
                Ok(fd) => fd,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) if matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE)) => {
                    // Out of descriptors: free the spare, accept the
                    // connection and close it at once, so epoll does not
                    // report the same pending connection forever.
                    // (accept4 reports EMFILE even with nothing pending.)
                    if self.spare_fd.take().is_none() {
                        // No spare either: stop watching the listener for a
                        // while instead of spinning on it.
                        self.pause_accepting();
                        return;
                    }
                    // Accepted and closed at once.
                    let pending = sys::accept(listener.as_raw_fd()).map(drop);
                    self.spare_fd = File::open("/dev/null").ok();
                    if pending.is_err() {
                        return;
                    }
                    self.p
                        .shared
                        .gauges
                        .connections_refused
                        .fetch_add(1, Ordering::Relaxed);
                    eprintln!("eventstream: out of file descriptors; connection refused");
                    continue;
                }
                Err(e) => {
                    eprintln!("eventstream: accept failed: {e}");
                    return;
                }
            };
            let open = self.conns.len() - self.free_slots.len();
            if open >= self.p.max_connections as usize {
                self.p
                    .shared
                    .gauges
                    .connections_refused
                    .fetch_add(1, Ordering::Relaxed);
                continue;
            }
            if let Err(e) = self.register(fd, tls) {
                eprintln!("eventstream: cannot register a connection: {e}");
            }
        }
    }

    /// Takes the listener out of epoll for [`ACCEPT_PAUSE_NS`].
    pub(super) fn pause_accepting(&mut self) {
        if self.accept_paused_until.is_some() {
            return;
        }
        for l in self.listener.iter().chain(&self.tls_listener) {
            if let Err(e) = self.epoll.delete(l.as_raw_fd()) {
                eprintln!("eventstream: cannot pause accepting: {e}");
                return;
            }
        }
        eprintln!("eventstream: out of file descriptors; accepting paused");
        self.accept_paused_until = Some(monotonic_ns() + ACCEPT_PAUSE_NS);
    }

    pub(super) fn resume_accepting(&mut self, now: u64) {
        let Some(until) = self.accept_paused_until else {
            return;
        };
        if now < until {
            return;
        }
        self.accept_paused_until = None;
        if self.spare_fd.is_none() {
            self.spare_fd = File::open("/dev/null").ok();
        }
        let listeners = [
            (&self.listener, TOKEN_LISTENER),
            (&self.tls_listener, TOKEN_TLS_LISTENER),
        ];
        for (l, token) in listeners {
            let Some(l) = l else { continue };
            if let Err(e) = self.epoll.add(l.as_raw_fd(), token, libc::EPOLLIN as u32) {
                eprintln!("eventstream: cannot resume accepting: {e}");
            }
        }
    }

    pub(super) fn register(&mut self, fd: OwnedFd, tls: bool) -> io::Result<()> {
        sys::set_nodelay(fd.as_raw_fd())?;
        let tls = match (&self.p.tls, tls) {
            (Some((_, server)), true) => Some(Box::new(
                TlsConn::new(server.clone()).map_err(|e| io::Error::other(format!("{e:?}")))?,
            )),
            _ => None,
        };
        let slot = match self.free_slots.pop() {
            Some(s) => s,
            None => {
                self.conns.push(None);
                self.gens.push(0);
                (self.conns.len() - 1) as u32
            }
        };
        let now = monotonic_ns();
        let handshake = tls.is_some();
        let gen = self.gens[slot as usize];
        let id = (gen << SLOT_BITS) | slot;
        let stash = vec![0u8; self.p.limits.max_frame() as usize].into_boxed_slice();
        let mut dec = StreamDecoder::new(stash, self.p.limits)
            .map_err(|_| io::Error::other("decoder stash too small"))?;
        if self.p.legacy_deny {
            dec.refuse_legacy();
        }
        self.epoll.add(
            fd.as_raw_fd(),
            u64::from(id),
            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
        )?;
        self.conns[slot as usize] = Some(Conn {
            fd,
            id,
            dec,
            // Taken when needed (see ensure_out): an idle connection holds
            // no buffer but its decoder's.
            out: Vec::new(),
            out_pos: 0,
            inflight: 0,
            stash: Vec::new(),
            stash_pos: 0,
            readable: false,
            writable: true,
            eof: false,
            hup: false,
            fatal: None,
            closing: false,
            queued: false,
            in_dirty: false,
            // A handshake must finish within --frame-timeout of the accept.
            mid_since: tls.is_some().then_some(now),
            last_active: now,
            handover: None,
            hello: None,
            access: if self.p.auth.is_some() {
                Access::Anonymous
            } else {
                Access::Open
            },
            tls,
        });
        if handshake {
            if self.mid_frames == 0 {
                self.next_timeout_scan = now + self.p.frame_timeout.as_nanos() as u64;
            }
            self.mid_frames += 1;
        }
        self.p
            .shared
            .gauges
            .connections
            .fetch_add(1, Ordering::Relaxed);
        self.p
            .shared
            .gauges
            .connections_total
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// The size of a connection's ack buffer: its credit and one FATAL.
    pub(super) fn out_capacity(&self) -> usize {
        (self.p.ack_credit as usize + 1) * ACK_LEN
    }

    /// Queues `id` for an ack write (once, however many acks it has).
    pub(super) fn mark_dirty(&mut self, id: u32) {
        if let Some(c) = self.conn_mut(id) {
            if !c.in_dirty {
                c.in_dirty = true;
                self.dirty.push(id);
            }
        }
    }

    pub(super) fn conn_mut(&mut self, id: u32) -> Option<&mut Conn> {
        self.conns
            .get_mut((id & SLOT_MASK) as usize)?
            .as_mut()
            .filter(|c| c.id == id)
    }

    pub(super) fn on_socket_event(&mut self, id: u32, flags: u32) {
        let Some(c) = self.conn_mut(id) else { return };
        if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0
        {
            c.readable = true;
        }
        if flags & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
            c.hup = true;
        }
        if flags & libc::EPOLLOUT as u32 != 0 {
            c.writable = true;
        }
        let flush = c.unsent();
        let queue = c.readable && !c.queued;
        if queue {
            c.queued = true;
        }
        if flush {
            self.mark_dirty(id);
        }
        if queue {
            self.ready.push_back(id);
        }
    }

    pub(super) fn close(&mut self, id: u32) {
        if let Some(c) = self.conn_mut(id) {
            let fd = c.fd.as_raw_fd();
            if let Some(t) = c.tls.as_mut() {
                // A last close_notify, if the socket takes it now.
                t.close_notify();
                let _ = t.flush(fd);
            }
        }
        drop(self.release(id));
    }

    /// Gives the connection `id` (a reader) to the reader thread with the
    /// bytes read of it; ingest never serves it again.
    pub(super) fn hand_over(&mut self, id: u32, bytes: Vec<u8>, access: Access, unsent: Vec<u8>) {
        let tls = self.conn_mut(id).and_then(|c| c.tls.take());
        let Some(fd) = self.release(id) else {
            return;
        };
        if let Err(e) = self.epoll.delete(fd.as_raw_fd()) {
            eprintln!("eventstream: cannot hand a reader over: {e}");
            return;
        }
        self.p.readers.hand_over(fd, bytes, access, unsent, tls);
    }

    /// Frees the connection's slot; returns its socket.
    fn release(&mut self, id: u32) -> Option<OwnedFd> {
        let slot = (id & SLOT_MASK) as usize;
        let c = self.conns.get_mut(slot).and_then(Option::take)?;
        {
            if c.mid_since.is_some() {
                self.mid_frames = self.mid_frames.saturating_sub(1);
            }
            give_back(&mut self.spare_out, c.out);
            give_back(&mut self.spare_stash, c.stash);
            self.gens[slot] = (self.gens[slot] + 1) & (u32::MAX >> SLOT_BITS);
            self.free_slots.push(slot as u32);
            self.p
                .shared
                .gauges
                .connections
                .fetch_sub(1, Ordering::Relaxed);
        }
        Some(c.fd)
    }

    /// Closes connections with nothing in flight (no acks owed or unsent,
    /// no input held back) and nothing received for `--idle-timeout`, and
    /// sets when the next one could expire.
    pub(super) fn scan_idle(&mut self, now: u64) {
        let Some(limit) = self.p.idle_timeout.map(|d| d.as_nanos() as u64) else {
            return;
        };
        let mut next = now + limit;
        // A connection past the limit but not quiet (acks owed) is looked
        // at again a second later (or one limit, if shorter).
        let floor = now + limit.min(1_000_000_000);
        let mut expired = Vec::new();
        for c in self.conns.iter().flatten() {
            let quiet = c.inflight == 0 && !c.unsent() && c.stash.is_empty();
            let expiry = c.last_active + limit;
            if quiet && expiry <= now {
                expired.push(c.id);
            } else {
                next = next.min(expiry.max(floor));
            }
        }
        if !expired.is_empty() {
            eprintln!(
                "eventstream: closed {} connections idle past --idle-timeout",
                expired.len()
            );
            self.p
                .shared
                .gauges
                .idle_closed
                .fetch_add(expired.len() as u64, Ordering::Relaxed);
        }
        for id in expired {
            self.close(id);
        }
        self.next_idle_scan = next;
    }

    /// Closes connections whose frame stayed half-received too long.
    pub(super) fn scan_frame_timeouts(&mut self, now: u64) {
        let limit = self.p.frame_timeout.as_nanos() as u64;
        let mut next = u64::MAX;
        let mut expired = Vec::new();
        for c in self.conns.iter().flatten() {
            if let Some(since) = c.mid_since {
                if now.saturating_sub(since) >= limit {
                    expired.push(c.id);
                } else {
                    next = next.min(since + limit);
                }
            }
        }
        for id in expired {
            if let Some(t) = self.conn_mut(id).and_then(|c| c.tls.as_mut()) {
                if !t.is_open() {
                    // Counted as a failed handshake, not a frame.
                    t.abandoned(crate::tls::Cause::Timeout);
                    self.close(id);
                    continue;
                }
            }
            eprintln!("eventstream: connection closed: frame half-received past --frame-timeout");
            self.p
                .shared
                .gauges
                .frame_timeouts
                .fetch_add(1, Ordering::Relaxed);
            self.close(id);
        }
        self.next_timeout_scan = if next == u64::MAX { now + limit } else { next };
    }
}
