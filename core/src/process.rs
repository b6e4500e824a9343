//! The three processors as single-threaded state machines: each takes an
//! event and says what happens to it. No threads, no allocation; the dedup
//! table is the only shared state they touch.

use crate::batch::{Aggregate, BatchItem, BatchWindows};
use crate::dedup::{DedupHint, DedupRef, Insert, Inserter, Lookup};
use crate::event::Class;
use crate::wire::{Frame, Reason};

/// What a processor decided for one event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Outcome {
    /// Write it to the log.
    Store,
    /// Already stored (or on its way): answer DUPLICATE with the original's
    /// offset once known.
    Duplicate(Option<u64>),
    /// Do not store; answer REJECTED with this reason.
    Rejected(Reason),
    /// Held in a batch window; its record comes when the window closes.
    Buffered,
}

/// Where a user plugs business logic per class: called with every event a
/// processor accepts for storage, before it is stored. The default does
/// nothing.
pub trait EventHook {
    /// An event of `class` is about to be stored.
    fn on_event(&mut self, class: Class, frame: &Frame<&[u8]>) {
        let _ = (class, frame);
    }
}

/// The hook that does nothing.
impl EventHook for () {}

/// Realtime: low latency; drops an id already in the dedup table (`check`),
/// without inserting.
pub struct RealtimeProcessor<'t> {
    dedup: DedupRef<'t>,
}

impl<'t> RealtimeProcessor<'t> {
    /// A processor checking `dedup`.
    pub fn new(dedup: DedupRef<'t>) -> Self {
        Self { dedup }
    }

    /// Decides for one event at monotonic time `now_ms`.
    pub fn handle(
        &mut self,
        frame: &Frame<&[u8]>,
        now_ms: u64,
        hook: &mut impl EventHook,
    ) -> Outcome {
        if !frame.is_legacy() {
            if let Lookup::Present(offset) = self.dedup.lookup(frame.event_id(), now_ms) {
                return Outcome::Duplicate(offset);
            }
        }
        hook.on_event(Class::Realtime, frame);
        Outcome::Store
    }
}

/// Transactional: exactly once inside the dedup window (`insert`). It is
/// the table's single inserter.
pub struct TransactionalProcessor<'t> {
    dedup: Inserter<'t>,
}

impl<'t> TransactionalProcessor<'t> {
    /// A processor inserting through the table's single inserter.
    pub fn new(dedup: Inserter<'t>) -> Self {
        Self { dedup }
    }

    /// Frees expired ids and reclaims their slots (only the inserter may
    /// reclaim); returns how many it freed.
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        self.dedup.sweep(now_ms)
    }

    /// One slice of a sweep ([`Inserter::sweep_slice`]): at most
    /// `max_slots` slots below `*cursor`; the pass is over when `*cursor`
    /// is 0 again.
    pub fn sweep_slice(&mut self, now_ms: u64, cursor: &mut usize, max_slots: usize) -> usize {
        self.dedup.sweep_slice(now_ms, cursor, max_slots)
    }

    /// Decides for one event at monotonic time `now_ms`. Legacy events are
    /// never deduplicated.
    pub fn handle(
        &mut self,
        frame: &Frame<&[u8]>,
        now_ms: u64,
        hook: &mut impl EventHook,
    ) -> Outcome {
        self.handle_hinted(frame, now_ms, hook).0
    }

    /// [`Self::handle`], also saying where the id went in the dedup table,
    /// for the offset the log gives the event ([`DedupHint::NONE`] unless
    /// inserted).
    pub fn handle_hinted(
        &mut self,
        frame: &Frame<&[u8]>,
        now_ms: u64,
        hook: &mut impl EventHook,
    ) -> (Outcome, DedupHint) {
        let mut hint = DedupHint::NONE;
        if !frame.is_legacy() {
            match self.dedup.insert_hinted(frame.event_id(), now_ms) {
                (Insert::Inserted, at) => hint = at,
                (Insert::Duplicate(offset), _) => return (Outcome::Duplicate(offset), hint),
                (Insert::Full, _) => return (Outcome::Rejected(Reason::DedupFull), hint),
            }
        }
        hook.on_event(Class::Transactional, frame);
        (Outcome::Store, hint)
    }
}

/// Batch: no dedup; events wait in per-(topic, partition) windows.
pub struct BatchProcessor<'b, T> {
    windows: BatchWindows<'b, T>,
}

impl<'b, T: BatchItem> BatchProcessor<'b, T> {
    /// A processor over `windows`.
    pub fn new(windows: BatchWindows<'b, T>) -> Self {
        Self { windows }
    }

    /// Puts `item` in its window at monotonic `now_ns`; closed windows go
    /// to `agg`.
    pub fn handle(
        &mut self,
        item: T,
        now_ns: u64,
        hook: &mut impl EventHook,
        agg: &mut impl Aggregate<T>,
    ) -> Outcome {
        if let Some(frame) = item.frame() {
            hook.on_event(Class::Batch, &frame);
        }
        self.windows.push(item, now_ns, agg);
        Outcome::Buffered
    }

    /// The windows (age flushes, pressure flushes, draining).
    pub fn windows(&mut self) -> &mut BatchWindows<'b, T> {
        &mut self.windows
    }

    /// The processor's timed work at monotonic `now_ns`, the one rule every
    /// embedder runs: closes the oldest window past its age and, when
    /// `flush` (a drain, or no pool slot left for new events), the oldest
    /// window as well. At most two windows close, so `agg` needs room for
    /// two. Returns whether any closed.
    pub fn tick(&mut self, now_ns: u64, flush: bool, agg: &mut impl Aggregate<T>) -> bool {
        let mut moved = self.windows.poll(now_ns, agg);
        if flush && self.windows.held() > 0 {
            moved |= self.windows.flush_oldest(agg);
        }
        moved
    }

    /// When [`tick`](Self::tick) has work next: the oldest window's age
    /// deadline (monotonic ns), if a window is open.
    pub fn next_deadline(&self) -> Option<u64> {
        self.windows.next_deadline()
    }

    /// Events waiting in windows.
    pub fn held(&self) -> usize {
        self.windows.held()
    }
}

/// The periodic dedup sweep, spread over steps: every period, one pass
/// over the table, a slice per step, so a sweep never stops its thread for
/// a whole table. Whoever holds the transactional processor runs it.
pub struct Sweeper {
    every_ns: u64,
    slice: usize,
    next: u64,
    /// The pass under way: its cursor and what it freed so far.
    pass: Option<(usize, usize)>,
}

impl Sweeper {
    /// A pass every `every_ns`, the first at `now_ns + every_ns`, walking
    /// `slice` slots per step.
    pub const fn new(now_ns: u64, every_ns: u64, slice: usize) -> Self {
        Self {
            every_ns,
            slice,
            next: now_ns.saturating_add(every_ns),
            pass: None,
        }
    }

    /// Sweeps one slice if a pass is due or under way; returns how many
    /// ids the pass freed when it ends in this step.
    pub fn step(&mut self, p: &mut TransactionalProcessor<'_>, now_ns: u64) -> Option<usize> {
        if self.pass.is_none() && now_ns >= self.next {
            self.pass = Some((0, 0));
            self.next = now_ns.saturating_add(self.every_ns);
        }
        let (mut cursor, mut freed) = self.pass?;
        freed += p.sweep_slice(now_ns / 1_000_000, &mut cursor, self.slice);
        self.pass = (cursor != 0).then_some((cursor, freed));
        (cursor == 0).then_some(freed)
    }

    /// When [`step`](Self::step) has work next (monotonic ns; 0 while a
    /// pass is under way).
    pub fn next_deadline(&self) -> u64 {
        if self.pass.is_some() {
            0
        } else {
            self.next
        }
    }
}
