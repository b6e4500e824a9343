//! Storage's write path: answering each work item, writing the buffer
//! with one syscall, and releasing the acks it covers.

use super::*;

/// The ack ring as the answers' output.
struct AckRing<'s> {
    tx: &'s mut Producer<'static, (u32, Ack)>,
    shared: &'s Shared,
}

impl AckOut for AckRing<'_> {
    fn ack(&mut self, conn: u32, ack: Ack) {
        let mut item = (conn, ack);
        loop {
            match self.tx.push(item) {
                Ok(()) => return,
                Err(back) => {
                    // A step pushes no more acks than the ring has room for
                    // (`pending_limit`), so this is not reached; were it,
                    // ingest drains the ring (credit makes every ack fit
                    // its connection's buffer).
                    item = back;
                    self.shared.wake.ingest.wake_for_acks();
                    std::thread::yield_now();
                }
            }
        }
    }
}

impl Storage {
    /// Answers the deferred duplicates whose original is now written,
    /// when the ack ring has room for all of them.
    pub(super) fn retry_deferred(&mut self) -> bool {
        let n = self.answers.deferred();
        if n == 0 || !self.p.acks.has_room(n + self.pending.len()) {
            return false;
        }
        let now = monotonic_ns();
        let position = self.p.shared.progress.written.load(Ordering::Acquire);
        let mut out = AckRing {
            tx: &mut self.p.acks,
            shared: &self.p.shared,
        };
        self.answers
            .retry_deferred(now / 1_000_000, position, now, &mut out)
            > 0
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
            self.p
                .shared
                .gauges
                .storage_failed
                .store(!ok, Ordering::Relaxed);
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
                    .gauges
                    .storage_failures
                    .fetch_add(1, Ordering::Relaxed);
                return false;
            }
            // Under `never` the sync thread sleeps until told: the new
            // segment's directory entry is owed to it. The prefill thread
            // makes the next segment.
            self.p.shared.wake.sync.wake();
            self.p.shared.wake.prefill.wake();
        }
        match self.p.log.append(&self.buf[..len], events) {
            Ok(kick) => {
                if let Some((from, to)) = kick {
                    self.p
                        .shared
                        .progress
                        .kick_from
                        .store(from, Ordering::Relaxed);
                    self.p.shared.progress.kick_to.store(to, Ordering::Release);
                    self.p.shared.wake.sync.wake();
                }
                let written = self
                    .p
                    .shared
                    .progress
                    .written
                    .fetch_add(len as u64, Ordering::AcqRel);
                let _ = written;
                self.p.log.publish_written();
                self.p
                    .shared
                    .gauges
                    .next_offset
                    .store(self.p.log.next_offset(), Ordering::Relaxed);
                self.p
                    .shared
                    .gauges
                    .log_bytes
                    .store(self.p.log.total_bytes(), Ordering::Relaxed);
                match self.p.fsync {
                    FsyncPolicy::Always => self.p.shared.wake.sync.wake(),
                    FsyncPolicy::Interval(_) => {
                        fence(Ordering::SeqCst);
                        if self.p.shared.progress.sync_idle.load(Ordering::Relaxed)
                            && self
                                .p
                                .shared
                                .progress
                                .sync_idle
                                .swap(false, Ordering::Relaxed)
                        {
                            self.p.shared.wake.sync.wake();
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
                    .gauges
                    .storage_failures
                    .fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Settles every pending item after a write that succeeded or not.
    pub(super) fn complete(&mut self, ok: bool) {
        let now = monotonic_ns();
        let position = self.p.shared.progress.written.load(Ordering::Acquire);
        let mut out = AckRing {
            tx: &mut self.p.acks,
            shared: &self.p.shared,
        };
        for (i, &owed) in self.pending.iter().enumerate() {
            // The dedup slots were loaded long ago; start loading the one
            // a few items ahead.
            if let Some((id, hint)) = self
                .pending
                .get(i + PREFETCH_AHEAD)
                .and_then(Owed::dedup_slot)
            {
                self.p.dedup.prefetch_hinted(id, hint);
            }
            self.answers.settle(owed, ok, position, now, &mut out);
        }
        self.pending.clear();
    }

    /// Releases held answers whose bytes an fsync now covers, as many as
    /// the ack ring has room for.
    pub(super) fn release_held(&mut self) -> bool {
        let synced = self.p.shared.progress.synced.load(Ordering::Acquire);
        let now = monotonic_ns();
        let mut room = self.p.acks.free_len();
        let mut out = AckRing {
            tx: &mut self.p.acks,
            shared: &self.p.shared,
        };
        let has_room = || {
            let ok = room > 0;
            room = room.saturating_sub(1);
            ok
        };
        self.answers.release_held(synced, now, has_room, &mut out)
    }
}
