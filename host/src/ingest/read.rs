//! Reading and decoding: each ready connection gets one read, whose
//! frames are decoded, copied into pool slots and handed downstream.

use std::io;
use std::os::fd::AsRawFd;

use eventstream_core::pipeline::refusal;
use eventstream_core::wire::{peek_v1, Decoded};

use super::conns::give_back;
use super::*;
use crate::sys::{self, wall_ns};

impl<D: Downstream> Ingest<D> {
    pub(super) fn resume_waiting(&mut self) {
        if self.waiting_room.is_empty() || !self.room() {
            return;
        }
        for id in std::mem::take(&mut self.waiting_room) {
            if let Some(c) = self.conn_mut(id) {
                if !c.queued {
                    c.queued = true;
                    self.ready.push_back(id);
                }
            }
        }
    }

    /// Gives each ready connection one read (round robin).
    pub(super) fn serve_ready(&mut self, now: u64) {
        let wall = wall_ns();
        for _ in 0..self.ready.len() {
            let Some(id) = self.ready.pop_front() else {
                break;
            };
            let requeue = self.serve(id, now, wall);
            if let Some(c) = self.conn_mut(id) {
                c.queued = requeue;
                if requeue {
                    self.ready.push_back(id);
                }
            }
        }
    }

    /// Reads and decodes for one connection; true if it should stay ready.
    pub(super) fn serve(&mut self, id: u32, now: u64, wall: u64) -> bool {
        let slot = (id & SLOT_MASK) as usize;
        let Some(mut c) = self.conns.get_mut(slot).and_then(Option::take) else {
            return false;
        };
        let keep = self.serve_conn(&mut c, now, wall);
        let was_mid = c.mid_since.is_some();
        // A HELLO, a TLS record or a handshake half-received counts as a
        // frame (--frame-timeout).
        let mid = c.dec.is_mid_frame()
            || c.hello.is_some()
            || c.tls
                .as_ref()
                .is_some_and(|t| !t.is_open() || t.has_partial());
        match (was_mid, mid) {
            (false, true) => {
                c.mid_since = Some(now);
                if self.mid_frames == 0 {
                    self.next_timeout_scan = now + self.p.frame_timeout.as_nanos() as u64;
                }
                self.mid_frames += 1;
            }
            (true, false) => {
                c.mid_since = None;
                self.mid_frames -= 1;
            }
            _ => {}
        }
        if let Some(bytes) = c.handover.take() {
            // With what it may do, and the answer to its HELLO if that is
            // not written yet.
            let access = c.access.clone();
            let unsent = c.out.get(c.out_pos..).unwrap_or(&[]).to_vec();
            self.conns[slot] = Some(c);
            self.hand_over(id, bytes, access, unsent);
            return false;
        }
        // A decoder paused for a HELLO is not closed.
        let closed = c.dec.is_closed() && c.hello.is_none();
        let dirty = c.unsent() || c.fatal.is_some() || c.eof || c.closing;
        self.conns[slot] = Some(c);
        if dirty {
            self.mark_dirty(id);
        }
        if closed {
            if self.conn_mut(id).is_some_and(|c| c.fatal.is_none()) {
                // Legacy close: no acks exist in this dialect.
                self.close(id);
            }
            return false;
        }
        keep
    }

    pub(super) fn serve_conn(&mut self, c: &mut Conn, now: u64, wall: u64) -> bool {
        if c.closing || c.fatal.is_some() || (c.dec.is_closed() && c.hello.is_none()) {
            return false;
        }
        // Input held back by a full ring or pool goes first.
        if c.stash_pos < c.stash.len() {
            let stash = std::mem::take(&mut c.stash);
            let (used, stop) = self.decode(c, &stash[c.stash_pos..], now, wall);
            c.stash = stash;
            c.stash_pos += used;
            if c.stash_pos == c.stash.len() {
                c.stash_pos = 0;
                give_back(&mut self.spare_stash, std::mem::take(&mut c.stash));
            }
            match stop {
                Stop::Done => {}
                Stop::Room => {
                    self.waiting_room.push(c.id);
                    return false;
                }
                Stop::Credit | Stop::Closed => return false,
            }
        }
        if c.tls.is_some() {
            return self.serve_tls(c, now, wall);
        }
        if !c.readable || c.eof {
            return false;
        }
        let n = match sys::read(c.fd.as_raw_fd(), &mut self.read_buf) {
            Ok(0) => {
                c.eof = true;
                c.readable = false;
                return false;
            }
            Ok(n) => {
                c.last_active = now;
                n
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.readable = false;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(_) => {
                c.eof = true;
                c.readable = false;
                c.closing = true;
                return false;
            }
        };
        // A short read emptied the socket: a non-blocking TCP read returns
        // less than asked only once the receive queue is empty (a pending
        // signal does not cut it short; it only ends a read that would
        // wait). Bytes that arrive from then on raise a new edge-triggered
        // event, so the connection waits for epoll instead of paying one
        // more read (and one more loop) for EAGAIN after every wake-up.
        // Not so once the peer hung up: its FIN or RST came on the edge
        // that carried this data, no edge follows, and only the read that
        // returns 0 (or the reset) tells the connection is gone.
        if n < self.read_buf.len() && !c.hup {
            c.readable = false;
        }
        let buf = std::mem::take(&mut self.read_buf);
        let (used, stop) = self.decode(c, &buf[..n], now, wall);
        if used < n {
            if c.stash.capacity() == 0 {
                // It only ever holds the rest of one read: it never grows.
                c.stash = self
                    .spare_stash
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK));
            }
            c.stash.extend_from_slice(&buf[used..n]);
        }
        self.read_buf = buf;
        match stop {
            Stop::Done => c.readable,
            Stop::Room => {
                self.waiting_room.push(c.id);
                false
            }
            Stop::Credit | Stop::Closed => false,
        }
    }

    /// Decodes `input` for `c`; returns the bytes taken and why it stopped.
    pub(super) fn decode(
        &mut self,
        c: &mut Conn,
        input: &[u8],
        now: u64,
        wall: u64,
    ) -> (usize, Stop) {
        let mut pos = 0;
        let credit = self.p.ack_credit;
        let id = c.id;
        let mut stop = Stop::Done;
        let mut scan = 0;
        while pos < input.len() {
            if c.hello.is_some() {
                match self.take_hello(c, &input[pos..]) {
                    (used, None) => {
                        pos += used;
                        continue;
                    }
                    (_, Some(reason)) => {
                        self.metrics.add(Counter::Rejected(reason), 1);
                        c.fatal = Some(Ack::fatal(reason));
                        pos = input.len();
                        stop = Stop::Closed;
                        break;
                    }
                }
            }
            if c.dec.is_closed() {
                pos = input.len();
                stop = Stop::Closed;
                break;
            }
            self.prefetch_ahead(input, pos, &mut scan);
            if c.inflight + c.unsent_acks() + 1 > credit {
                stop = Stop::Credit;
                break;
            }
            let room = self.shutting_down || self.room();
            if !room && !self.p.reject_when_full {
                stop = Stop::Room;
                break;
            }
            let Conn {
                dec,
                out,
                inflight,
                fatal,
                handover,
                hello,
                access,
                closing,
                ..
            } = c;
            let (used, item) = dec.next(&input[pos..]);
            pos += used;
            let Some(item) = item else { break };
            if matches!(access, Access::Anonymous)
                && self.p.legacy_prefix.is_none()
                && matches!(
                    item,
                    Decoded::Legacy(_) | Decoded::LegacySkipped(_) | Decoded::KeepAlive
                )
            {
                // Authentication is on and legacy clients are not let in
                // (no --legacy-unauthenticated): closed without an answer
                // (the dialect has none).
                self.metrics.add(Counter::Rejected(Reason::Unauthorized), 1);
                *closing = true;
                pos = input.len();
                stop = Stop::Closed;
                break;
            }
            match item {
                Decoded::Frame(f) => {
                    let ack = f.ack_requested();
                    if let Access::Anonymous = access {
                        // Authentication is on and this connection sent
                        // no HELLO (section 8): FATAL UNAUTHORIZED.
                        self.metrics.add(Counter::Rejected(Reason::Unauthorized), 1);
                        *fatal = Some(Ack::fatal(Reason::Unauthorized));
                        pos = input.len();
                        stop = Stop::Closed;
                        break;
                    }
                    let refused = refusal(self.shutting_down, room).or_else(|| {
                        (!access.may_produce(f.topic_bytes())).then_some(Reason::Forbidden)
                    });
                    if let Some(reason) = refused {
                        self.metrics.add(Counter::Rejected(reason), 1);
                        if ack {
                            if out.capacity() == 0 {
                                *out = self.spare_out.pop().unwrap_or_else(|| {
                                    Vec::with_capacity((credit as usize + 1) * ACK_LEN)
                                });
                            }
                            out.extend_from_slice(&Ack::rejected(f.event_id(), reason).encode());
                        }
                        continue;
                    }
                    let class = self.p.router.route(f.topic_bytes(), f.priority());
                    let Some(mut slot) = self.spare.take() else {
                        continue;
                    };
                    let bytes = f.bytes();
                    let Some(dst) = slot.buffer_mut().get_mut(..bytes.len()) else {
                        continue;
                    };
                    dst.copy_from_slice(bytes);
                    let ev = Event::new(slot.share(bytes.len()), f.head(), id, class, wall, now);
                    self.push(class, ev, now);
                    if ack {
                        *inflight += 1;
                    }
                }
                Decoded::Legacy(ev) => {
                    let forbidden = match access {
                        Access::Anonymous => !self
                            .p
                            .legacy_prefix
                            .as_ref()
                            .is_some_and(|p| ev.topic().starts_with(p)),
                        _ => false,
                    };
                    let refused = refusal(self.shutting_down, room)
                        .or_else(|| forbidden.then_some(Reason::Forbidden));
                    if let Some(reason) = refused {
                        self.metrics.add(Counter::Rejected(reason), 1);
                        continue;
                    }
                    let class = self.p.router.route(ev.topic(), ev.priority());
                    let Some(mut slot) = self.spare.take() else {
                        continue;
                    };
                    let Ok(len) = ev.encode_v1(0, wall, slot.buffer_mut()) else {
                        continue;
                    };
                    let head = ev.v1_head();
                    let ev = Event::new(slot.share(len), head, id, class, wall, now);
                    self.push(class, ev, now);
                }
                Decoded::Rejected { .. } | Decoded::Fatal(_)
                    if matches!(access, Access::Anonymous) =>
                {
                    self.metrics.add(Counter::Rejected(Reason::Unauthorized), 1);
                    *fatal = Some(Ack::fatal(Reason::Unauthorized));
                    pos = input.len();
                    stop = Stop::Closed;
                    break;
                }
                Decoded::Rejected {
                    reason,
                    event_id,
                    ack,
                } => {
                    self.metrics.add(Counter::Rejected(reason), 1);
                    if ack {
                        if out.capacity() == 0 {
                            *out = self.spare_out.pop().unwrap_or_else(|| {
                                Vec::with_capacity((credit as usize + 1) * ACK_LEN)
                            });
                        }
                        out.extend_from_slice(&Ack::rejected(event_id, reason).encode());
                    }
                }
                Decoded::Fatal(reason) => {
                    // The acks of every earlier frame first, then FATAL,
                    // then close (flush_dirty sends it once none is left).
                    self.metrics.add(Counter::Rejected(reason), 1);
                    *fatal = Some(Ack::fatal(reason));
                    pos = input.len();
                    stop = Stop::Closed;
                    break;
                }
                Decoded::LegacySkipped(rule) => {
                    self.metrics.add(Counter::Rejected(rule.reason()), 1);
                    self.metrics.add(Counter::LegacySkipped, 1);
                }
                Decoded::KeepAlive => self.metrics.add(Counter::KeepAlives, 1),
                Decoded::Close => {
                    pos = input.len();
                    stop = Stop::Closed;
                    break;
                }
                Decoded::Hello(first) => {
                    // Its bytes so far; the rest is taken at the loop's
                    // top (take_hello).
                    let mut h = Vec::with_capacity(HELLO_MAX);
                    h.extend_from_slice(first);
                    *hello = Some(h);
                }
                Decoded::Reader(first) => {
                    // A read session: its bytes so far go to the reader
                    // thread with the socket (serve hands them over).
                    let mut bytes = Vec::with_capacity(first.len() + input.len() - pos);
                    bytes.extend_from_slice(first);
                    bytes.extend_from_slice(&input[pos..]);
                    *handover = Some(bytes);
                    pos = input.len();
                    stop = Stop::Closed;
                    break;
                }
            }
        }
        self.metrics.add(Counter::BytesReceived, pos as u64);
        (pos, stop)
    }

    /// When downstream uses the hints (the processors inline): asks the CPU to start loading the
    /// dedup slots of the frames that start in `input[*scan..pos +
    /// DEDUP_AHEAD_BYTES]` (`*scan` moves past them), so that each lookup or
    /// insert finds its slots in cache instead of waiting for memory, as it
    /// would with a prefetch issued just before it. The frames' heads are
    /// read unchecked (`peek_v1`): the hint may be wrong, never the answer.
    /// `*scan` starts at a frame boundary (0, or `pos` once `pos` passed
    /// it); it stops at the first thing that is not a whole v1 frame.
    #[inline]
    pub(super) fn prefetch_ahead(&self, input: &[u8], pos: usize, scan: &mut usize) {
        if !self.down.wants_prefetch() {
            return;
        }
        if *scan < pos {
            *scan = pos;
        }
        while *scan < pos + DEDUP_AHEAD_BYTES {
            let Some(head) = input.get(*scan..).and_then(peek_v1) else {
                break;
            };
            let class = self.p.router.route(head.topic, head.priority);
            self.down.prefetch(class, head.event_id);
            *scan += head.len;
        }
    }
}
