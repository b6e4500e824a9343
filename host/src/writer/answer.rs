//! Storage's write path: answering each work item, writing the buffer
//! with one syscall, and releasing the acks it covers.

use super::*;

impl Storage {
    pub(super) fn answer_work(&mut self, work: Work<'static>) {
        match work {
            Work::Duplicate {
                conn,
                event_id,
                ack,
                class,
                offset,
            } => self.answer_duplicate(conn, event_id, ack, class, offset),
            Work::Reject {
                conn,
                event_id,
                ack,
                reason,
            } => self.pending.push(Pending::Answer {
                conn,
                ack: ack.then(|| Ack::rejected(event_id, reason)),
                counter: Counter::Rejected(reason),
            }),
            Work::Store(_) | Work::Batch { .. } => {}
        }
    }

    /// DUPLICATE only once the original is written: its offset is in the
    /// table from then on. Until then the answer waits in `deferred`.
    pub(super) fn answer_duplicate(
        &mut self,
        conn: u32,
        event_id: u64,
        ack: bool,
        class: Class,
        offset: Option<u64>,
    ) {
        let now_ms = monotonic_ns() / 1_000_000;
        let offset = match offset {
            Some(o) => Some(o),
            None => match self.p.dedup.lookup(event_id, now_ms) {
                Lookup::Present(Some(o)) => Some(o),
                Lookup::Present(None) => {
                    self.deferred.push_back((conn, event_id, ack, class));
                    return;
                }
                // The original's write failed: it is not in the log.
                Lookup::Absent => None,
            },
        };
        self.pending.push(match offset {
            Some(o) => Pending::Answer {
                conn,
                ack: ack.then(|| Ack::duplicate(event_id, o)),
                counter: Counter::Duplicate(class),
            },
            None => Pending::Answer {
                conn,
                ack: ack.then(|| Ack::rejected(event_id, Reason::StorageFailed)),
                counter: Counter::Rejected(Reason::StorageFailed),
            },
        });
    }

    pub(super) fn retry_deferred(&mut self) -> bool {
        let n = self.deferred.len();
        if n == 0 || !self.p.acks.has_room(n + self.pending.len()) {
            return false;
        }
        for _ in 0..n {
            let Some((conn, id, ack, class)) = self.deferred.pop_front() else {
                break;
            };
            self.answer_duplicate(conn, id, ack, class, None);
        }
        if !self.pending.is_empty() {
            // Answers that became ready go out with the next write's acks;
            // with nothing to write, right away.
            if self.len == 0 {
                self.complete(true);
            }
            return self.deferred.len() < n;
        }
        false
    }

    /// Writes the buffer (one syscall) and answers everything pending.
    pub(super) fn write_out(&mut self) {
        let now = monotonic_ns();
        let mut ok = true;
        if self.len > 0 {
            let events = self.next - self.p.log.next_offset();
            ok = match self.failed_until {
                Some(t) if now < t => false,
                _ => self.try_write(events),
            };
            if ok {
                if self.failed_until.take().is_some() {
                    eprintln!("eventstream: storage recovered: writes succeed again");
                }
            } else {
                self.next = self.p.log.next_offset();
                if self.failed_until.is_none_or(|t| now >= t) {
                    self.failed_until = Some(now + RETRY_NS);
                }
            }
            self.p.shared.storage_failed.store(!ok, Ordering::Relaxed);
            self.len = 0;
        }
        self.complete(ok);
    }

    pub(super) fn try_write(&mut self, events: u64) -> bool {
        let len = self.len;
        let sync_old = self.p.fsync != FsyncPolicy::Never;
        if self.p.log.needs_roll(len) {
            if let Err(e) = self.p.log.roll(sync_old) {
                eprintln!("eventstream: storage failed: cannot roll the log: {e}");
                self.p
                    .shared
                    .storage_failures
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
            // Under `never` the sync thread sleeps until told: the new
            // segment's directory entry is owed to it. The prefill thread
            // makes the next segment.
            self.p.shared.sync.wake();
            self.p.shared.prefill.wake();
        }
        match self.p.log.append(&self.buf[..len], events) {
            Ok(kick) => {
                if let Some((from, to)) = kick {
                    self.p.shared.kick_from.store(from, Ordering::Relaxed);
                    self.p.shared.kick_to.store(to, Ordering::Release);
                    self.p.shared.sync.wake();
                }
                let written = self
                    .p
                    .shared
                    .written
                    .fetch_add(len as u64, Ordering::AcqRel);
                let _ = written;
                self.p
                    .shared
                    .next_offset
                    .store(self.p.log.next_offset(), Ordering::Relaxed);
                self.p
                    .shared
                    .log_bytes
                    .store(self.p.log.total_bytes(), Ordering::Relaxed);
                match self.p.fsync {
                    FsyncPolicy::Always => self.p.shared.sync.wake(),
                    FsyncPolicy::Interval(_) => {
                        fence(Ordering::SeqCst);
                        if self.p.shared.sync_idle.load(Ordering::Relaxed)
                            && self.p.shared.sync_idle.swap(false, Ordering::Relaxed)
                        {
                            self.p.shared.sync.wake();
                        }
                    }
                    FsyncPolicy::Never => {}
                }
                true
            }
            Err(e) => {
                eprintln!(
                    "eventstream: storage failed: write of {len} bytes: {e}; answering STORAGE_FAILED and retrying each second"
                );
                self.p
                    .shared
                    .storage_failures
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Answers every pending item after a write that succeeded or not.
    pub(super) fn complete(&mut self, ok: bool) {
        let now = monotonic_ns();
        let position = self.p.shared.written.load(Ordering::Acquire);
        let pending = std::mem::take(&mut self.pending);
        for (i, p) in pending.iter().enumerate() {
            if let Some(Pending::Stored {
                event_id,
                dedup: Some(hint),
                ..
            }) = pending.get(i + PREFETCH_AHEAD)
            {
                self.p.dedup.prefetch_hinted(*event_id, *hint);
            }
            self.finished += 1;
            self.metrics.event();
            match *p {
                Pending::Stored {
                    conn,
                    event_id,
                    ack,
                    offset,
                    class,
                    recv_mono,
                    dedup,
                    len,
                } => {
                    if ok {
                        self.metrics.add(Counter::Stored(class), 1);
                        self.metrics.add(Counter::BytesStored, u64::from(len));
                        if let Some(hint) = dedup {
                            self.p.dedup.set_offset_hinted(event_id, offset, hint);
                        }
                        let ack = ack.then(|| (conn, Ack::stored(event_id, offset)));
                        if self.p.fsync == FsyncPolicy::Always {
                            self.held.push_back(Held {
                                ack,
                                latency: Some((class, recv_mono)),
                                position,
                            });
                        } else {
                            self.metrics.latency(
                                &self.p.shared.registry,
                                class,
                                now.saturating_sub(recv_mono),
                            );
                            if let Some((conn, a)) = ack {
                                self.send(conn, a);
                            }
                        }
                    } else {
                        self.metrics
                            .add(Counter::Rejected(Reason::StorageFailed), 1);
                        if dedup.is_some() {
                            self.p.dedup.remove(event_id);
                        }
                        if ack {
                            self.send(conn, Ack::rejected(event_id, Reason::StorageFailed));
                        }
                    }
                }
                Pending::Answer { conn, ack, counter } => {
                    self.metrics.add(counter, 1);
                    match ack {
                        // DUPLICATE means "in the log": with group commit,
                        // after an fsync covering everything written so far.
                        Some(a)
                            if self.p.fsync == FsyncPolicy::Always
                                && a.status == eventstream_core::wire::Status::Duplicate =>
                        {
                            self.held.push_back(Held {
                                ack: Some((conn, a)),
                                latency: None,
                                position,
                            });
                        }
                        Some(a) => self.send(conn, a),
                        None => {}
                    }
                }
            }
        }
        self.pending = pending;
        self.pending.clear();
    }

    pub(super) fn send(&mut self, conn: u32, ack: Ack) {
        let mut item = (conn, ack);
        loop {
            match self.p.acks.push(item) {
                Ok(()) => return,
                Err(back) => {
                    // A step pushes no more acks than the ring has room for
                    // (`pending_limit`), so this is not reached; were it,
                    // ingest drains the ring (credit makes every ack fit
                    // its connection's buffer).
                    item = back;
                    self.p.shared.ingest.wake_for_acks();
                    std::thread::yield_now();
                }
            }
        }
    }

    /// Releases held answers whose bytes an fsync now covers.
    pub(super) fn release_held(&mut self) -> bool {
        let synced = self.p.shared.synced.load(Ordering::Acquire);
        let now = monotonic_ns();
        let mut moved = false;
        while let Some(&h) = self.held.front() {
            if h.position > synced || !self.p.acks.has_room(1) {
                break;
            }
            self.held.pop_front();
            moved = true;
            if let Some((class, recv_mono)) = h.latency {
                self.metrics.latency(
                    &self.p.shared.registry,
                    class,
                    now.saturating_sub(recv_mono),
                );
            }
            if let Some((conn, ack)) = h.ack {
                self.send(conn, ack);
            }
        }
        moved
    }
}

pub(super) fn stored(ev: &Event<'_>, offset: u64) -> Pending {
    let (event_id, ack, legacy) = ev.frame().map_or((0, false, true), |f| {
        (f.event_id(), f.ack_requested(), f.is_legacy())
    });
    Pending::Stored {
        conn: ev.conn,
        event_id,
        ack,
        offset,
        class: ev.class,
        recv_mono: ev.recv_mono_ns,
        dedup: (ev.class == Class::Transactional && !legacy).then_some(ev.dedup),
        len: ev.bytes().len() as u32,
    }
}
