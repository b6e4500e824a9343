//! Storage's answers: the one state machine that turns a processor's
//! outcome and a write's result into acks, dedup updates and metrics.
//!
//! Every embedder drives it the same way. While it builds records, it makes
//! an [`Owed`] for each stored event ([`Owed::stored`]) and for each other
//! outcome ([`Answers::outcome`], which defers a DUPLICATE whose original has
//! no offset yet). Once the write's result is known it settles every owed
//! item in order ([`Answers::settle`]). With group commit, STORED and
//! DUPLICATE acks wait in the held queue until an fsync covers their bytes
//! ([`Answers::release_held`]). The firmware's single-thread
//! [`Pipeline`](crate::pipeline::Pipeline) settles each record right after
//! its append; the host's storage thread gathers many records into one write
//! and settles them together. The queues are the embedder's ([`Fifo`]): a
//! `heapless::Deque` in the firmware, a growable queue on the host.
//!
//! The rules, in one place:
//! - STORED carries the event's offset. A transactional v1 event's offset is
//!   set in the dedup table once its write succeeded; after a failed write
//!   its id is removed, so a retry is stored (it was never in the log).
//! - DUPLICATE carries the original's offset, so it waits until the
//!   original is written; if the original's write failed, the duplicate is
//!   answered REJECTED STORAGE_FAILED.
//! - Under group commit no STORED or DUPLICATE leaves before an fsync
//!   covering everything written when it was decided.
//! - The ingest-to-stored latency is recorded when the event is stored
//!   (under group commit, when its ack is released).

use crate::dedup::{DedupHint, DedupRef, Lookup};
use crate::event::Class;
use crate::metrics::{Counter, LocalMetrics, Registry};
use crate::pipeline::{Answer, Event};
use crate::wire::{Ack, Reason, Status};

/// A first-in first-out queue the embedder provides: a
/// `heapless::Deque` (implemented here), or any growable queue.
pub trait Fifo<T> {
    /// Appends `item`; gives it back if the queue is full.
    fn push_back(&mut self, item: T) -> Result<(), T>;
    /// Takes the oldest item.
    fn pop_front(&mut self) -> Option<T>;
    /// The oldest item.
    fn front(&self) -> Option<&T>;
    /// Items held.
    fn len(&self) -> usize;
    /// Whether it holds nothing.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Whether another push would be refused.
    fn is_full(&self) -> bool;
}

impl<T, const N: usize> Fifo<T> for heapless::Deque<T, N> {
    fn push_back(&mut self, item: T) -> Result<(), T> {
        heapless::Deque::push_back(self, item)
    }
    fn pop_front(&mut self) -> Option<T> {
        heapless::Deque::pop_front(self)
    }
    fn front(&self) -> Option<&T> {
        heapless::Deque::front(self)
    }
    fn len(&self) -> usize {
        heapless::Deque::len(self)
    }
    fn is_full(&self) -> bool {
        heapless::Deque::is_full(self)
    }
}

/// Where acks go: the connection's queue, an ack ring, a radio.
pub trait AckOut {
    /// Delivers `ack` to connection `conn`.
    fn ack(&mut self, conn: u32, ack: Ack);
}

/// A duplicate waiting for its original's offset.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Deferred {
    /// Connection to answer.
    pub conn: u32,
    /// The event's id.
    pub event_id: u64,
    /// The ACK flag.
    pub ack: bool,
    /// Its class.
    pub class: Class,
}

/// What is owed for one item once its write's result is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Owed {
    /// An event in the record being written.
    Stored {
        /// Connection to answer.
        conn: u32,
        /// The event's id.
        event_id: u64,
        /// The ACK flag.
        ack: bool,
        /// The offset it is written at.
        offset: u64,
        /// Its class.
        class: Class,
        /// Monotonic ns at ingest (the latency's start).
        recv_mono: u64,
        /// For an id in the dedup table: where it went there.
        dedup: Option<DedupHint>,
        /// Frame bytes (the stored-bytes counter).
        len: u32,
    },
    /// An answer that does not depend on the write (a rejection, a
    /// duplicate whose original's offset is known).
    Answer {
        /// Connection to answer.
        conn: u32,
        /// The ack, if the event asked for one.
        ack: Option<Ack>,
        /// The counter it adds to.
        counter: Counter,
    },
}

impl Owed {
    /// What is owed for `ev`, written at `offset`.
    pub fn stored(ev: &Event<'_>, offset: u64) -> Self {
        let f = ev.frame();
        let (event_id, ack, legacy) = (f.event_id(), f.ack_requested(), f.is_legacy());
        Owed::Stored {
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

    /// The dedup slot `settle` will touch, for a prefetch ahead of it.
    pub fn dedup_slot(&self) -> Option<(u64, DedupHint)> {
        match *self {
            Owed::Stored {
                event_id,
                dedup: Some(hint),
                ..
            } => Some((event_id, hint)),
            _ => None,
        }
    }
}

/// The held queue of an embedder without group commit: always empty.
#[derive(Clone, Copy, Debug, Default)]
pub struct NoGroupCommit;

impl Fifo<Held> for NoGroupCommit {
    fn push_back(&mut self, item: Held) -> Result<(), Held> {
        Err(item)
    }
    fn pop_front(&mut self) -> Option<Held> {
        None
    }
    fn front(&self) -> Option<&Held> {
        None
    }
    fn len(&self) -> usize {
        0
    }
    fn is_full(&self) -> bool {
        true
    }
}

/// An answer waiting for an fsync (group commit).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Held {
    /// Connection and ack to send, if the event asked for one.
    pub ack: Option<(u32, Ack)>,
    /// Class and ingest time, for the ingest-to-stored latency.
    pub latency: Option<(Class, u64)>,
    /// Log bytes an fsync must cover first.
    pub position: u64,
}

/// The answer state machine. `D` holds deferred duplicates, `H` answers
/// waiting for an fsync (unused without group commit), `K` is the latency
/// samples its metrics hold between flushes and `B` the registry's bucket
/// count.
pub struct Answers<'a, D, H, const K: usize, const B: usize> {
    dedup: DedupRef<'a>,
    registry: &'a Registry<B>,
    metrics: LocalMetrics<K>,
    deferred: D,
    held: H,
    group_commit: bool,
    settled: u64,
}

impl<'a, D: Fifo<Deferred>, H: Fifo<Held>, const K: usize, const B: usize> Answers<'a, D, H, K, B> {
    /// Answers over `dedup`, counting into `registry`. With `group_commit`
    /// STORED and DUPLICATE acks wait for [`release_held`](Self::release_held);
    /// `held` must then take every answer of a write (size it for the
    /// answers in flight, or make it growable).
    pub fn new(
        dedup: DedupRef<'a>,
        registry: &'a Registry<B>,
        deferred: D,
        held: H,
        group_commit: bool,
    ) -> Self {
        Self {
            dedup,
            registry,
            metrics: LocalMetrics::empty(),
            deferred,
            held,
            group_commit,
            settled: 0,
        }
    }

    /// The metrics the answers count into (the embedder adds its own
    /// counters and flushes them).
    pub fn metrics(&mut self) -> &mut LocalMetrics<K> {
        &mut self.metrics
    }

    /// The registry the metrics flush into.
    pub fn registry(&self) -> &'a Registry<B> {
        self.registry
    }

    /// Flushes the metrics if due (`busy`) or now.
    pub fn flush_metrics(&mut self, now_ns: u64, busy: bool) {
        if busy {
            self.metrics.maybe_flush(self.registry, now_ns);
        } else {
            self.metrics.flush(self.registry, now_ns);
        }
    }

    /// Items settled so far (each event and each answer once).
    pub fn settled(&self) -> u64 {
        self.settled
    }

    /// Duplicates waiting for their original's offset.
    pub fn deferred(&self) -> usize {
        self.deferred.len()
    }

    /// Whether another duplicate could be deferred: when not, stop taking
    /// outcomes until [`retry_deferred`](Self::retry_deferred) made room.
    pub fn can_defer(&self) -> bool {
        !self.deferred.is_full()
    }

    /// Answers waiting for an fsync.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Whether an fsync that reached `synced` releases a held answer.
    pub fn held_ready(&self, synced: u64) -> bool {
        self.held.front().is_some_and(|h| h.position <= synced)
    }

    /// What is owed for an outcome that writes nothing (stored events are
    /// owed with [`Owed::stored`]): the answer, or None while a duplicate
    /// waits for its original's offset.
    pub fn outcome(&mut self, answer: Answer, now_ms: u64) -> Option<Owed> {
        match answer {
            Answer::Duplicate {
                conn,
                event_id,
                ack,
                class,
                offset,
            } => {
                let d = Deferred {
                    conn,
                    event_id,
                    ack,
                    class,
                };
                self.duplicate(d, offset, now_ms)
            }
            Answer::Reject {
                conn,
                event_id,
                ack,
                reason,
            } => Some(Owed::Answer {
                conn,
                ack: ack.then(|| Ack::rejected(event_id, reason)),
                counter: Counter::Rejected(reason),
            }),
        }
    }

    /// A duplicate's answer once its original's offset is known; deferred
    /// (None) until then.
    fn duplicate(&mut self, d: Deferred, offset: Option<u64>, now_ms: u64) -> Option<Owed> {
        let offset = match offset {
            Some(o) => Some(o),
            None => match self.dedup.lookup(d.event_id, now_ms) {
                Lookup::Present(Some(o)) => Some(o),
                Lookup::Present(None) => {
                    // A full queue keeps the oldest waiting; the caller
                    // checks `can_defer` before taking outcomes.
                    let _ = self.deferred.push_back(d);
                    return None;
                }
                // The original's write failed (its id was removed): it is
                // not in the log, so a retry is safe.
                Lookup::Absent => None,
            },
        };
        Some(match offset {
            Some(o) => Owed::Answer {
                conn: d.conn,
                ack: d.ack.then(|| Ack::duplicate(d.event_id, o)),
                counter: Counter::Duplicate(d.class),
            },
            None => Owed::Answer {
                conn: d.conn,
                ack: d
                    .ack
                    .then(|| Ack::rejected(d.event_id, Reason::StorageFailed)),
                counter: Counter::Rejected(Reason::StorageFailed),
            },
        })
    }

    /// Looks again at the deferred duplicates (each once) and settles
    /// those whose original is now written or failed (`position` and `now`
    /// as for [`settle`](Self::settle)). Returns how many were answered.
    pub fn retry_deferred(
        &mut self,
        now_ms: u64,
        position: u64,
        now: u64,
        out: &mut impl AckOut,
    ) -> usize {
        let mut answered = 0;
        for _ in 0..self.deferred.len() {
            let Some(d) = self.deferred.pop_front() else {
                break;
            };
            if let Some(owed) = self.duplicate(d, None, now_ms) {
                answered += 1;
                self.settle(owed, true, position, now, out);
            }
        }
        answered
    }

    /// Settles one owed item after its write succeeded (`ok`) or failed:
    /// counts it, updates the dedup table, and acks it (or holds the ack
    /// until an fsync reaches `position`, the log's written bytes after the
    /// write). `now` is the monotonic time in ns.
    pub fn settle(&mut self, owed: Owed, ok: bool, position: u64, now: u64, out: &mut impl AckOut) {
        self.settled += 1;
        match owed {
            Owed::Stored {
                conn,
                event_id,
                ack,
                offset,
                class,
                recv_mono,
                dedup,
                len,
            } => {
                if !ok {
                    self.metrics.event();
                    self.metrics
                        .add(Counter::Rejected(Reason::StorageFailed), 1);
                    if dedup.is_some() {
                        self.dedup.remove(event_id);
                    }
                    if ack {
                        out.ack(conn, Ack::rejected(event_id, Reason::StorageFailed));
                    }
                    return;
                }
                self.metrics.add(Counter::Stored(class), 1);
                self.metrics.add(Counter::BytesStored, u64::from(len));
                if let Some(hint) = dedup {
                    self.dedup.set_offset_hinted(event_id, offset, hint);
                }
                let ack = ack.then(|| (conn, Ack::stored(event_id, offset)));
                if self.group_commit {
                    self.hold(Held {
                        ack,
                        latency: Some((class, recv_mono)),
                        position,
                    });
                } else {
                    self.metrics
                        .latency(self.registry, class, now.saturating_sub(recv_mono));
                    if let Some((conn, a)) = ack {
                        out.ack(conn, a);
                    }
                }
            }
            Owed::Answer { conn, ack, counter } => {
                self.metrics.event();
                self.metrics.add(counter, 1);
                match ack {
                    // DUPLICATE means "in the log": with group commit,
                    // after an fsync covering everything written so far.
                    Some(a) if self.group_commit && a.status == Status::Duplicate => {
                        self.hold(Held {
                            ack: Some((conn, a)),
                            latency: None,
                            position,
                        });
                    }
                    Some(a) => out.ack(conn, a),
                    None => {}
                }
            }
        }
    }

    fn hold(&mut self, h: Held) {
        // A bounded held queue the embedder overfilled (see `new`) cannot
        // keep the answer until its fsync. Sending it now could claim bytes
        // durable that are not yet; so the ack is withheld, and the client's
        // resend is answered from the dedup table or stored again.
        let _ = self.held.push_back(h);
    }

    fn release(&mut self, h: Held, now: u64, out: &mut impl AckOut) {
        if let Some((class, recv_mono)) = h.latency {
            self.metrics
                .latency(self.registry, class, now.saturating_sub(recv_mono));
        }
        if let Some((conn, ack)) = h.ack {
            out.ack(conn, ack);
        }
    }

    /// Releases held answers whose bytes an fsync up to `synced` covers,
    /// oldest first, while `room` says the acks have somewhere to go.
    /// Returns whether any was released.
    pub fn release_held(
        &mut self,
        synced: u64,
        now: u64,
        mut room: impl FnMut() -> bool,
        out: &mut impl AckOut,
    ) -> bool {
        let mut moved = false;
        while self.held_ready(synced) && room() {
            let Some(h) = self.held.pop_front() else {
                break;
            };
            moved = true;
            self.release(h, now, out);
        }
        moved
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
