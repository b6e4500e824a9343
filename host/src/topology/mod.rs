//! What runs behind ingest: the thread layout, chosen once at start and
//! seen by ingest only through [`Downstream`].
//!
//! - [`Threads`]: a ring to each processor thread (realtime, transactional,
//!   batch), a storage ring from each to the storage thread.
//! - [`Inline`]: the processors run on the ingest thread; storage is
//!   stepped by ingest for small amounts and by its own thread for large
//!   ones ([`StorageMode`](crate::writer::StorageMode)).
//!
//! Which one runs where, and the figures behind it: docs/architecture.md
//! and docs/decisions.md ("Thread layouts").

use std::io;

use eventstream_core::pipeline::Event;
use eventstream_core::Class;

mod inline;
mod threads;

pub use inline::{Inline, InlineParts};
pub use threads::Threads;

/// What ingest hands accepted events to. Ingest calls it from its loop:
/// `room` and `push` per event, the rest once per loop.
pub trait Downstream {
    /// Whether one more event of any class fits (the pool slot aside).
    fn room(&mut self) -> bool;

    /// Takes one accepted event (after `room` said it fits); false if it
    /// could not (the event is dropped, its slot freed).
    fn push(&mut self, class: Class, ev: Event<'static>, now: u64) -> bool;

    /// Whether [`prefetch`](Self::prefetch) hints are used on this thread
    /// (ingest then looks ahead in its input for them).
    fn wants_prefetch(&self) -> bool {
        false
    }

    /// Hint: an event of `class` with id `event_id` comes soon.
    fn prefetch(&self, class: Class, event_id: u64) {
        let _ = (class, event_id);
    }

    /// The pool ran out of slots: whoever holds the batch windows closes
    /// the oldest one to free some (the shared `pool_starved` flag is set).
    fn starved(&mut self) {}

    /// Once per ingest loop, after the events of the loop were pushed: the
    /// timed work, the wake-ups of the threads behind, and any storage
    /// step made here. Returns whether acks may have come (ingest then
    /// delivers them in this same loop).
    fn step(&mut self, now: u64) -> bool;

    /// When [`step`](Self::step) has timed work next (monotonic ns); None:
    /// only after new input.
    fn next_deadline(&mut self, now: u64) -> Option<u64>;

    /// Whether [`step`](Self::step) has work now without new input.
    fn has_work(&mut self) -> bool;

    /// Once the shutdown reached storage: finishes it where it has no
    /// thread of its own (the final fsync and the acks it held). Returns
    /// whether it finished it now (ingest then delivers the last acks).
    fn finish(&mut self) -> io::Result<bool> {
        Ok(false)
    }
}
