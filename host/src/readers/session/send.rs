//! A session's sending: the queued control bytes, the run of records in
//! progress (`sendfile`), and the next chunk: records within the credit
//! and the filters, END, GAP, CLOSING, heartbeats.

use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use eventstream_core::record::SEGMENT_HEADER_LEN;
use eventstream_core::wire::read::{ChunkHeader, ChunkKind};
use eventstream_core::wire::Reason;

use super::{Session, State, Turn};
use crate::readers::segments::{Next, OpenSegment, Segments};
use crate::readers::Ctx;
use crate::sys;

/// Record bytes sent under one chunk header at most.
const MAX_RUN: u64 = 2 << 20;
/// Filtered records skipped per turn at most (then other sessions go on).
const SKIP_BUDGET: usize = 65_536;

/// A run of records being sent with `sendfile`.
pub(super) struct Run {
    seg: Rc<OpenSegment>,
    pos: u64,
    left: u64,
}

impl Run {
    /// Where its unsent bytes start: segment base and byte position.
    pub(super) fn at(&self) -> (u64, u64) {
        (self.seg.base, self.pos)
    }
}

fn tls_error(e: crate::tls::Failure) -> io::Error {
    io::Error::other(format!("{e:?}"))
}

impl Session {
    /// What a `send` or `sendfile` did: bytes sent (0 when interrupted:
    /// try again), or why the turn ends (the socket is full: wait for
    /// EPOLLOUT; the connection is gone: close).
    fn progress(&mut self, r: io::Result<usize>) -> Result<usize, Turn> {
        match r {
            Ok(n) => Ok(n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.blocked = true;
                Err(Turn::Idle)
            }
            Err(_) => Err(Turn::Close),
        }
    }

    /// Sends what it can: queued bytes, the run in progress, then new
    /// chunks, until the socket, the credit or the records run out.
    pub(in crate::readers) fn turn(
        &mut self,
        ctx: &mut Ctx,
        segs: &mut Segments,
        now: u64,
    ) -> Turn {
        loop {
            if let Some(t) = &mut self.tls {
                if t.pending() {
                    let r = t.flush(self.fd.as_raw_fd()).map(|()| 0);
                    if let Err(turn) = self.progress(r) {
                        return turn;
                    }
                    continue;
                }
            }
            if self.out_pos < self.out.len() {
                let r = match &mut self.tls {
                    None => sys::send(self.fd.as_raw_fd(), &self.out[self.out_pos..]),
                    Some(t) => t.seal(&self.out[self.out_pos..]).map_err(tls_error),
                };
                match self.progress(r) {
                    Ok(n) => self.out_pos += n,
                    Err(turn) => return turn,
                }
                continue;
            }
            self.out.clear();
            self.out_pos = 0;
            if let Some(run) = &mut self.run {
                if run.left > 0 {
                    let want = run.left.min(MAX_RUN) as usize;
                    let (base, at) = (run.seg.base, run.pos);
                    let r = match &mut self.tls {
                        None => sys::sendfile(
                            self.fd.as_raw_fd(),
                            run.seg.file.as_raw_fd(),
                            &mut run.pos,
                            want,
                        ),
                        // TLS: read from the segment, sealed into the
                        // session's output (queued; the loop's top writes
                        // it).
                        Some(t) => {
                            let want = want.min(self.scratch.len());
                            let buf = &mut self.scratch[..want];
                            match run.seg.file.read_at(buf, run.pos) {
                                Ok(n) => t.seal(&buf[..n]).map_err(tls_error).inspect(|&n| {
                                    run.pos += n as u64;
                                }),
                                Err(e) => Err(e),
                            }
                        }
                    };
                    if matches!(r, Ok(0)) {
                        // The file is shorter than its records said.
                        eprintln!(
                            "eventstream: reader session: segment {base} ended early at byte {at}"
                        );
                        return Turn::Close;
                    }
                    match self.progress(r) {
                        Ok(n) => {
                            if let Some(run) = &mut self.run {
                                run.left -= n as u64;
                            }
                            ctx.bytes_sent(n as u64);
                        }
                        Err(turn) => return turn,
                    }
                    continue;
                }
                self.run = None;
                std::mem::swap(&mut self.out, &mut self.after);
                continue;
            }
            match self.state {
                State::Closing => return Turn::Close,
                State::Streaming if !self.ended => {
                    if !self.fill(ctx, segs, now) {
                        return Turn::Idle;
                    }
                }
                _ => return Turn::Idle,
            }
        }
    }

    /// Queues the next chunk; false if there is none to send now.
    fn fill(&mut self, ctx: &mut Ctx, segs: &mut Segments, now: u64) -> bool {
        let visible = segs.visible();
        let mut skipped = 0;
        let mut run_pos = 0;
        let mut run_len = 0u64;
        let mut run_first = 0;
        loop {
            if let Some(limit) = self.end_limit {
                if self.next >= limit {
                    break;
                }
            }
            let Some(seg) = self.seg.clone() else {
                return false;
            };
            let end = segs.readable_end(&seg, &visible);
            if self.pos >= end {
                if run_len > 0 {
                    break;
                }
                // A segment is done once a newer one holds visible records
                // (or retention deleted it); else this is the visible end.
                let done = seg.deleted.get() || (segs.is_closed(&seg) && visible.base > seg.base);
                if !done {
                    self.at_end = true;
                    return false;
                }
                let next = match segs.after(&seg, self.next, &ctx.gaps) {
                    Ok(Ok(n)) => n,
                    Ok(Err(msg)) => {
                        eprintln!("eventstream: reader session {}: {msg}", self.id);
                        self.close_with(ctx, Reason::StorageFailed, now);
                        return true;
                    }
                    Err(e) => {
                        eprintln!("eventstream: reader session {}: {e}", self.id);
                        self.close_with(ctx, Reason::OutOfRange, now);
                        return true;
                    }
                };
                match next {
                    Next::Segment(s) => {
                        self.seg = Some(s);
                        self.pos = SEGMENT_HEADER_LEN as u64;
                        continue;
                    }
                    Next::Gap(a, b) => {
                        self.chunk(ChunkKind::Gap, Reason::None, a, b, now);
                        self.next = b;
                        match segs.locate(b) {
                            Ok(Next::Segment(s)) => {
                                self.seg = Some(s);
                                self.pos = SEGMENT_HEADER_LEN as u64;
                            }
                            _ => self.close_with(ctx, Reason::OutOfRange, now),
                        }
                        return true;
                    }
                    Next::Gone => {
                        self.close_with(ctx, Reason::OutOfRange, now);
                        return true;
                    }
                    Next::Nothing => {
                        self.at_end = true;
                        return false;
                    }
                }
            }
            let Some(r) = seg.record(self.pos, end).filter(|r| r.offset == self.next) else {
                eprintln!(
                    "eventstream: reader session {}: no valid record with offset {} at byte {} of segment {}",
                    self.id, self.next, self.pos, seg.base
                );
                self.close_with(ctx, Reason::StorageFailed, now);
                return true;
            };
            let wanted = (self.classes.bits() == 0 || self.classes.bits() & (1 << r.class) != 0)
                && seg.topic_starts_with(self.pos, r.size, &self.prefix);
            if !wanted {
                if run_len > 0 {
                    break;
                }
                self.pos += r.size;
                self.next = r.next_offset();
                skipped += 1;
                if skipped >= SKIP_BUDGET {
                    return false;
                }
                continue;
            }
            if r.size > self.credit - run_len {
                if run_len == 0 {
                    self.no_credit = true;
                    return false;
                }
                break;
            }
            if run_len > 0 && run_len + r.size > MAX_RUN {
                break;
            }
            if run_len == 0 {
                run_pos = self.pos;
                run_first = r.offset;
            }
            run_len += r.size;
            self.pos += r.size;
            self.next = r.next_offset();
        }
        if let Some(seg) = &self.seg {
            seg.release(self.pos);
        }
        if run_len > 0 {
            let Some(seg) = self.seg.clone() else {
                return false;
            };
            let h = ChunkHeader {
                kind: ChunkKind::Records,
                reason: Reason::None,
                bytes: run_len as u32,
                a: run_first,
                b: self.next,
            };
            self.out.extend_from_slice(&h.encode());
            self.credit -= run_len;
            self.last_chunk = now;
            self.run = Some(Run {
                seg,
                pos: run_pos,
                left: run_len,
            });
            return true;
        }
        if let Some(limit) = self.end_limit {
            if self.next >= limit {
                self.chunk(ChunkKind::End, Reason::None, limit, 0, now);
                self.ended = true;
                return true;
            }
        }
        false
    }

    /// A heartbeat if the session sent nothing for a second; returns when
    /// the next one is due.
    pub(in crate::readers) fn heartbeat(&mut self, segs: &Segments, now: u64) -> u64 {
        if self.state != State::Streaming || self.ended {
            return u64::MAX;
        }
        let due = self.last_chunk + crate::readers::HEARTBEAT_NS;
        if now < due {
            return due;
        }
        if self.run.is_none() {
            let end = segs.visible().offset;
            let next = self.deliver_next();
            self.chunk(ChunkKind::Heartbeat, Reason::None, end, next, now);
        }
        now + crate::readers::HEARTBEAT_NS
    }
}
