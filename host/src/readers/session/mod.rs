//! One read session (PROTOCOL.md section 7): its request, its answer,
//! and the chunks it sends: runs of whole records straight from the
//! segment file (`sendfile`), heartbeats, gaps, commits, END and CLOSING,
//! never past the credit the client granted.
//!
//! Submodule `send`: the sending (queued bytes, the run in progress, the
//! next chunk); this file: the session's state, request, start and client
//! frames.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd};
use std::rc::Rc;

use eventstream_core::record::SEGMENT_HEADER_LEN;
use eventstream_core::wire::read::{
    declared_frame_length, ChunkHeader, ChunkKind, ClassSet, ReadRequest, SessionAnswer,
    SessionFrame, Start, NONE_OFFSET, READ_REQUEST_MAX, READ_REQUEST_MIN,
};
use eventstream_core::wire::Reason;

use super::segments::{Next, OpenSegment, Segments};
use super::Ctx;
use crate::sys;

mod send;

use send::Run;

/// Where a session is in its life.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum State {
    /// Reading its request.
    Request,
    /// Its group has a commit being made durable: the start is resolved
    /// once it is answered.
    AwaitGroup,
    /// Sending.
    Streaming,
    /// CLOSING (or an error answer) queued: close once it is written.
    Closing,
}

/// One reader connection.
pub(super) struct Session {
    pub(super) id: u64,
    pub(super) fd: OwnedFd,
    pub(super) state: State,
    /// Bytes received and not yet taken.
    input: Vec<u8>,
    /// Control bytes to send before `run`.
    out: Vec<u8>,
    out_pos: usize,
    run: Option<Run>,
    /// Control bytes queued while a run was being sent.
    after: Vec<u8>,
    pub(super) seg: Option<Rc<OpenSegment>>,
    pub(super) pos: u64,
    /// The offset of the record at `pos`.
    next: u64,
    start: u64,
    /// Without FOLLOW: END once everything below this is sent.
    end_limit: Option<u64>,
    credit: u64,
    classes: ClassSet,
    prefix: Vec<u8>,
    pub(super) group: Option<String>,
    follow: bool,
    /// Monotonic ns of the last chunk (for heartbeats).
    last_chunk: u64,
    ended: bool,
    /// Waiting for the visible end to move.
    pub(super) at_end: bool,
    /// Waiting for credit.
    no_credit: bool,
    /// Waiting for the socket to take more.
    blocked: bool,
    pub(super) eof: bool,
    /// Monotonic ns by which the request must be whole, or the closing
    /// written.
    pub(super) deadline: u64,
    /// The request as parsed (kept until the start is resolved).
    pending: Option<Pending>,
    /// What its HELLO allows (section 8).
    access: crate::auth::Access,
    /// Its TLS session (a connection from `--tls-listen`), and the buffer
    /// records are read into from their segment before sealing.
    tls: Option<Box<crate::tls::TlsConn>>,
    scratch: Vec<u8>,
}

/// A parsed request waiting for its group.
#[derive(Clone)]
pub(super) struct Pending {
    start: Start,
    offset: u64,
}

/// What a turn did.
#[derive(PartialEq, Eq)]
pub(super) enum Turn {
    /// Nothing more to do until an event (socket, credit, records, timer).
    Idle,
    /// The session is over: close it.
    Close,
}

impl Session {
    pub(super) fn new(
        id: u64,
        fd: OwnedFd,
        input: Vec<u8>,
        access: crate::auth::Access,
        unsent: Vec<u8>,
        tls: Option<Box<crate::tls::TlsConn>>,
        now: u64,
    ) -> Session {
        let mut out = Vec::with_capacity(256.max(unsent.len()));
        out.extend_from_slice(&unsent);
        let scratch = match &tls {
            Some(t) => vec![0; t.seal_room().min(eventstream_client::tls::MAX_PLAINTEXT)],
            None => Vec::new(),
        };
        let mut s = Session {
            id,
            fd,
            state: State::Request,
            input,
            out,
            out_pos: 0,
            run: None,
            after: Vec::new(),
            seg: None,
            pos: 0,
            next: 0,
            start: 0,
            end_limit: None,
            credit: 0,
            classes: ClassSet::ALL,
            prefix: Vec::new(),
            group: None,
            follow: false,
            last_chunk: now,
            ended: false,
            at_end: false,
            no_credit: false,
            blocked: false,
            eof: false,
            deadline: now + super::REQUEST_TIMEOUT_NS,
            pending: None,
            access,
            tls,
            scratch,
        };
        // Records that came with the request are opened now.
        s.open_records();
        s
    }

    /// Opens the TLS records read so far into the input; false if the
    /// session must end (close_notify, a bad record).
    fn open_records(&mut self) -> bool {
        let Some(t) = &mut self.tls else {
            return true;
        };
        loop {
            match t.next_record() {
                Ok(Some(range)) => {
                    if self.state != State::Closing {
                        self.input.extend_from_slice(t.data(range));
                    }
                }
                Ok(None) => return true,
                Err(_) => {
                    self.eof = true;
                    return false;
                }
            }
        }
    }

    /// A last close_notify on a TLS session, if the socket takes it now.
    pub(super) fn goodbye(&mut self) {
        if let Some(t) = &mut self.tls {
            t.close_notify();
            let _ = t.flush(self.fd.as_raw_fd());
        }
    }

    /// Whether a turn could make progress without an outside event.
    pub(super) fn runnable(&self) -> bool {
        // Sealed bytes not yet written (the last chunk, END, a HELLO's
        // answer) go out whatever the state.
        if !self.blocked && self.tls.as_ref().is_some_and(|t| t.pending()) {
            return true;
        }
        match self.state {
            State::Request | State::AwaitGroup => false,
            State::Closing => !self.blocked,
            State::Streaming => {
                !self.blocked
                    && (self.out_pos < self.out.len() || self.run.is_some() || {
                        !self.ended && !self.at_end && !self.no_credit
                    })
            }
        }
    }

    /// The next offset this session would deliver (heartbeats' `b`).
    fn deliver_next(&self) -> u64 {
        self.next.max(self.start)
    }

    /// Where it reads (for the page-drop low-water mark).
    pub(super) fn position(&self) -> Option<(u64, u64)> {
        match &self.run {
            Some(run) => Some(run.at()),
            None => self.seg.as_ref().map(|s| (s.base, self.pos)),
        }
    }

    fn queue(&mut self, bytes: &[u8]) {
        if self.run.is_some() {
            self.after.extend_from_slice(bytes);
        } else {
            self.out.extend_from_slice(bytes);
        }
    }

    fn chunk(&mut self, kind: ChunkKind, reason: Reason, a: u64, b: u64, now: u64) {
        let h = ChunkHeader {
            kind,
            reason,
            bytes: 0,
            a,
            b,
        };
        self.queue(&h.encode());
        self.last_chunk = now;
    }

    /// Ends the session with CLOSING `reason`.
    pub(super) fn close_with(&mut self, ctx: &Ctx, reason: Reason, now: u64) {
        if self.state == State::Closing {
            return;
        }
        ctx.count_error(reason);
        let next = self.deliver_next();
        self.chunk(ChunkKind::Closing, reason, next, 0, now);
        self.state = State::Closing;
        self.deadline = now + super::CLOSING_GRACE_NS;
    }

    fn answer_error(&mut self, ctx: &Ctx, reason: Reason, segs: &Segments, now: u64) {
        let a = SessionAnswer {
            reason: Some(reason),
            start: NONE_OFFSET,
            first: segs.first_offset(),
            end: segs.visible().offset,
            committed: NONE_OFFSET,
            max_record: ctx.max_record,
        };
        self.refuse(ctx, a, now);
    }

    /// Answers ERROR (`a.reason`) and closes once it is written.
    fn refuse(&mut self, ctx: &Ctx, a: SessionAnswer, now: u64) {
        if let Some(reason) = a.reason {
            ctx.count_error(reason);
        }
        self.out.extend_from_slice(&a.encode());
        self.state = State::Closing;
        self.deadline = now + super::CLOSING_GRACE_NS;
    }

    /// Reads what the socket has; false once the peer is gone.
    pub(super) fn read_input(&mut self, buf: &mut [u8]) -> bool {
        let fd = self.fd.as_raw_fd();
        loop {
            // Over TLS the bytes land in its buffer and are opened there.
            let r = match &mut self.tls {
                None => sys::read(fd, buf),
                Some(t) => t.read(fd).map(|(n, _)| n),
            };
            match r {
                Ok(0) => {
                    self.eof = true;
                    return false;
                }
                Ok(n) => {
                    if self.tls.is_some() {
                        if !self.open_records() {
                            return false;
                        }
                    } else if self.state != State::Closing {
                        self.input.extend_from_slice(&buf[..n]);
                    }
                    if self.input.len() > 64 * 1024 {
                        // A client never sends this much unanswered.
                        return true;
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return true,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => {
                    self.eof = true;
                    return false;
                }
            }
        }
    }

    /// Takes the request, or the CREDIT and COMMIT frames, from the input.
    pub(super) fn take_input(&mut self, ctx: &mut Ctx, segs: &mut Segments, now: u64) {
        if self.state == State::Request && matches!(self.access, crate::auth::Access::Anonymous) {
            // Authentication is on and no HELLO came first: whatever the
            // request holds, the answer is UNAUTHORIZED.
            self.answer_error(ctx, Reason::Unauthorized, segs, now);
            return;
        }
        if self.state == State::Request {
            let Some(len) = declared_frame_length(&self.input) else {
                return;
            };
            if !(READ_REQUEST_MIN..=READ_REQUEST_MAX).contains(&len) {
                self.answer_error(ctx, Reason::BadRequest, segs, now);
                return;
            }
            if self.input.len() < len {
                return;
            }
            let bytes: Vec<u8> = self.input.drain(..len).collect();
            match ReadRequest::parse(&bytes, ctx.max_topic) {
                Ok(req) => self.begin(ctx, segs, &req, now),
                Err(reason) => self.answer_error(ctx, reason, segs, now),
            }
        }
        if self.state != State::Streaming && self.state != State::AwaitGroup {
            return;
        }
        let mut used = 0;
        loop {
            match SessionFrame::decode(&self.input[used..]) {
                Ok(None) => break,
                Ok(Some((SessionFrame::Credit(n), len))) => {
                    used += len;
                    self.credit += u64::from(n);
                    self.no_credit = false;
                }
                Ok(Some((SessionFrame::Commit(offset), len))) => {
                    used += len;
                    let visible = segs.visible().offset;
                    match &self.group {
                        Some(g) if offset >= segs.first_offset() && offset <= visible => {
                            ctx.groups.commit(super::groups::CommitReq {
                                session: self.id,
                                group: g.clone(),
                                offset,
                            });
                        }
                        _ => {
                            self.close_with(ctx, Reason::BadRequest, now);
                            break;
                        }
                    }
                }
                Err(reason) => {
                    self.close_with(ctx, reason, now);
                    break;
                }
            }
        }
        self.input.drain(..used);
    }

    /// A well-formed request: fences the group's old session, then
    /// resolves the start (or waits for the group's commit in flight).
    fn begin(&mut self, ctx: &mut Ctx, segs: &mut Segments, req: &ReadRequest<'_>, now: u64) {
        use crate::auth::Access;
        let refused = match &self.access {
            Access::Open => None,
            // Authentication is on and no HELLO came first.
            Access::Anonymous => Some(Reason::Unauthorized),
            Access::Token(r) => (!r.may_read(req.prefix)
                || (!req.group.is_empty() && !r.may_use_group(req.group)))
            .then_some(Reason::Forbidden),
        };
        if let Some(reason) = refused {
            self.answer_error(ctx, reason, segs, now);
            return;
        }
        self.follow = req.follow;
        self.classes = req.classes;
        self.prefix = req.prefix.to_vec();
        self.credit = u64::from(req.credit);
        let pending = Pending {
            start: req.start,
            offset: req.offset,
        };
        if !req.group.is_empty() {
            let name = String::from_utf8_lossy(req.group).into_owned();
            let mut groups = ctx.groups.lock();
            if !groups.contains_key(&name) && !ctx.groups.room_for_new(&mut groups) {
                drop(groups);
                self.answer_error(ctx, Reason::BadRequest, segs, now);
                return;
            }
            let g = groups.entry(name.clone()).or_default();
            let old = g.session.replace(self.id);
            g.touched_ms = sys::wall_ns() / 1_000_000;
            let wait = g.inflight > 0;
            drop(groups);
            if let Some(old) = old {
                ctx.fenced.push(old);
            }
            self.group = Some(name);
            if wait {
                self.pending = Some(pending);
                self.state = State::AwaitGroup;
                return;
            }
        }
        self.resolve(ctx, segs, pending, now);
    }

    /// The group's commits are all answered: the start can be resolved.
    pub(super) fn group_ready(&mut self, ctx: &mut Ctx, segs: &mut Segments, now: u64) {
        if self.state == State::AwaitGroup {
            if let Some(p) = self.pending.take() {
                self.state = State::Request;
                self.resolve(ctx, segs, p, now);
            }
        }
    }

    fn resolve(&mut self, ctx: &mut Ctx, segs: &mut Segments, req: Pending, now: u64) {
        segs.refresh();
        let first = segs.first_offset();
        let visible = segs.visible();
        let end = visible.offset;
        let committed = self
            .group
            .as_ref()
            .and_then(|g| ctx.groups.lock().get(g).and_then(|g| g.committed));
        let start = match req.start {
            Start::Offset => req.offset,
            Start::Earliest => first,
            Start::Latest => end,
            Start::Committed => committed.unwrap_or(first),
        };
        let answer = |reason, start| SessionAnswer {
            reason,
            start,
            first,
            end,
            committed: committed.unwrap_or(NONE_OFFSET),
            max_record: ctx.max_record,
        };
        if start < first || start > end {
            self.refuse(ctx, answer(Some(Reason::OutOfRange), NONE_OFFSET), now);
            return;
        }
        let mut at = self.position_at(segs, start, &visible);
        if at
            .as_ref()
            .is_err_and(|e| e.kind() == io::ErrorKind::NotFound)
            && segs.refresh()
        {
            // Retention deleted it just now.
            at = self.position_at(segs, start, &visible);
        }
        match at {
            Ok(()) => {}
            Err(e) if e.kind() == io::ErrorKind::NotFound => {
                self.refuse(ctx, answer(Some(Reason::OutOfRange), NONE_OFFSET), now);
                return;
            }
            Err(e) => {
                eprintln!("eventstream: reader session cannot open the log at offset {start}: {e}");
                self.refuse(ctx, answer(Some(Reason::StorageFailed), NONE_OFFSET), now);
                return;
            }
        }
        self.start = start;
        self.end_limit = (!self.follow).then_some(end);
        self.out.extend_from_slice(&answer(None, start).encode());
        self.state = State::Streaming;
        self.last_chunk = now;
    }

    fn position_at(
        &mut self,
        segs: &mut Segments,
        start: u64,
        visible: &crate::storage::Position,
    ) -> io::Result<()> {
        let seg = match segs.locate(start)? {
            Next::Segment(s) => s,
            _ => return Err(io::Error::other("no segment holds it")),
        };
        let end = segs.readable_end(&seg, visible);
        match segs.seek(&seg, start, end)? {
            Some((pos, first)) => {
                self.pos = pos;
                self.next = first;
            }
            None if seg.base == visible.base => {
                self.pos = visible.bytes;
                self.next = visible.offset;
            }
            None if seg.base == start => {
                self.pos = SEGMENT_HEADER_LEN as u64;
                self.next = start;
            }
            None => {
                // The start lies past this segment's records (in a gap
                // listed as lost): walk on from its end.
                self.pos = end;
                self.next = start;
            }
        }
        self.seg = Some(seg);
        Ok(())
    }

    /// The visible end moved: a session waiting at it looks again.
    pub(super) fn visible_moved(&mut self) {
        self.at_end = false;
    }

    /// The socket can take more.
    pub(super) fn writable(&mut self) {
        self.blocked = false;
    }

    /// A commit of this session is durable (or failed).
    pub(super) fn committed(&mut self, ctx: &Ctx, offset: u64, ok: bool, now: u64) {
        if self.state == State::Closing {
            return;
        }
        if ok {
            self.chunk(ChunkKind::Committed, Reason::None, offset, 0, now);
        } else {
            self.close_with(ctx, Reason::StorageFailed, now);
        }
    }

    /// After a reload of `--auth`: a session whose token is gone gets
    /// CLOSING UNAUTHORIZED (before its answer: ERROR UNAUTHORIZED), one
    /// whose new rights no longer cover its prefix or group CLOSING
    /// FORBIDDEN; the others take their new rights.
    pub(super) fn recheck_token(&mut self, ctx: &Ctx, auth: &crate::auth::Auth, now: u64) {
        use crate::auth::Access;
        let Access::Token(r) = &self.access else {
            return;
        };
        let refreshed = auth.refresh(r);
        let started = matches!(self.state, State::Streaming | State::AwaitGroup);
        match refreshed {
            None if started => {
                self.access = Access::Anonymous;
                self.close_with(ctx, Reason::Unauthorized, now);
            }
            // Not answered yet: the answer says it.
            None => self.access = Access::Anonymous,
            Some(rights) => {
                let allowed = rights.may_read(&self.prefix)
                    && self
                        .group
                        .as_ref()
                        .is_none_or(|g| rights.may_use_group(g.as_bytes()));
                self.access = Access::Token(rights);
                if started && !allowed {
                    self.close_with(ctx, Reason::Forbidden, now);
                }
            }
        }
    }

    /// Whether it holds a segment retention deleted.
    pub(super) fn in_deleted(&self) -> bool {
        self.seg.as_ref().is_some_and(|s| s.deleted.get())
    }
}
