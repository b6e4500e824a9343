//! The storage rings, between the processors and storage. What travels
//! there is a unit of storage's work: one event to write as a single
//! record, a whole batch window to write as one batch record, or an answer
//! that writes nothing. Only this module knows how a unit lies in the ring
//! slots: the processors push with [`StorageItem::from`] and [`ToStorage`],
//! storage takes with [`take_unit`].

use crate::batch::{Aggregate, BatchConfig, Closed};
use crate::record::RecordKind;
use crate::ring::{Consumer, Producer};

use super::{Answer, Event, Work};

/// One slot of a storage ring (its layout is private to this module).
pub struct StorageItem<'p>(Piece<'p>);

// A single variant holds an event, so that a slot is no larger than a
// `Work` (64 bytes; a nested `Work`, or a second event-holding variant,
// needs a tag of its own: 72).
enum Piece<'p> {
    /// An event: a single record, or one of the events after a
    /// `BatchHead`.
    Store(Event<'p>),
    /// A batch of this many events starts: they are the next slots, pushed
    /// together with this one.
    BatchHead(u16),
    /// An outcome that writes nothing.
    Answer(Answer),
}

// A storage ring's slot is no larger than the `Work` it carries.
const _: () =
    assert!(core::mem::size_of::<StorageItem<'static>>() <= core::mem::size_of::<Work<'static>>());

impl<'p> From<Work<'p>> for StorageItem<'p> {
    fn from(work: Work<'p>) -> Self {
        Self(match work {
            Work::Store(ev) => Piece::Store(ev),
            Work::Answer(answer) => Piece::Answer(answer),
        })
    }
}

/// What storage takes from a storage ring.
pub enum Unit<'c, 'r, 'p> {
    /// One event: a single record.
    Single(Event<'p>),
    /// A closed batch window's events, in order: one batch record. Events
    /// the caller does not take are dropped (their slots freed) with it.
    Batch(BatchRun<'c, 'r, 'p>),
    /// An answer that writes nothing (a duplicate, a rejection).
    Answer(Answer),
}

/// Takes the next unit from `rx`; None when the ring is empty (or, which
/// does not happen with [`ToStorage`], a batch is not all there yet).
pub fn take_unit<'c, 'r, 'p>(
    rx: &'c mut Consumer<'r, StorageItem<'p>>,
) -> Option<Unit<'c, 'r, 'p>> {
    if let Piece::BatchHead(count) = rx.peek(0)?.0 {
        if rx.len() < 1 + usize::from(count) {
            return None;
        }
        let _ = rx.pop();
        return Some(Unit::Batch(BatchRun { rx, left: count }));
    }
    match rx.pop()?.0 {
        Piece::Store(ev) => Some(Unit::Single(ev)),
        Piece::Answer(answer) => Some(Unit::Answer(answer)),
        Piece::BatchHead(_) => None,
    }
}

/// What [`take_unit`] would take next, without taking it: None when it
/// would take nothing; `Some(None)` for an answer; otherwise the kind of
/// record the unit makes.
pub fn peek_kind(rx: &mut Consumer<'_, StorageItem<'_>>) -> Option<Option<RecordKind>> {
    let batch = match rx.peek(0)?.0 {
        Piece::BatchHead(count) => count,
        Piece::Store(_) => return Some(Some(RecordKind::Single)),
        Piece::Answer(_) => return Some(None),
    };
    (rx.len() > usize::from(batch)).then_some(Some(RecordKind::Batch))
}

/// The event `n` slots ahead in `rx`, if that slot holds one (a hint for
/// prefetching what storage copies next).
pub fn peek_event<'a, 'p>(
    rx: &'a mut Consumer<'_, StorageItem<'p>>,
    n: usize,
) -> Option<&'a Event<'p>> {
    match &rx.peek(n)?.0 {
        Piece::Store(ev) => Some(ev),
        _ => None,
    }
}

/// A batch's events as storage takes them out of the ring.
pub struct BatchRun<'c, 'r, 'p> {
    rx: &'c mut Consumer<'r, StorageItem<'p>>,
    left: u16,
}

impl<'p> BatchRun<'_, '_, 'p> {
    /// Events not taken yet.
    pub fn len(&self) -> usize {
        usize::from(self.left)
    }

    /// Whether every event was taken.
    pub fn is_empty(&self) -> bool {
        self.left == 0
    }

    /// The event `n` slots ahead of the next one, in this batch or after
    /// it (a prefetch hint).
    pub fn peek_ahead(&mut self, n: usize) -> Option<&Event<'p>> {
        peek_event(self.rx, n)
    }
}

impl<'p> Iterator for BatchRun<'_, '_, 'p> {
    type Item = Event<'p>;

    fn next(&mut self) -> Option<Event<'p>> {
        if self.left == 0 || !matches!(self.rx.peek(0)?.0, Piece::Store(_)) {
            // Only the batch's own slots are taken (a unit is pushed whole,
            // so this stops only at its end).
            self.left = 0;
            return None;
        }
        self.left -= 1;
        match self.rx.pop()?.0 {
            Piece::Store(ev) => Some(ev),
            _ => None,
        }
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (0, Some(self.len()))
    }
}

impl Drop for BatchRun<'_, '_, '_> {
    fn drop(&mut self) {
        // The rest of the batch leaves the ring with it.
        for _ in self.by_ref() {}
    }
}

/// The batch processor's aggregate into the batch storage ring: each closed
/// window goes in as one unit, published at once. The caller checks room
/// for two full windows before each push into the windows (a push can
/// close one window and open another).
pub struct ToStorage<'c, 'r, 'p> {
    /// The batch storage ring.
    pub out: &'c mut Producer<'r, StorageItem<'p>>,
}

impl ToStorage<'_, '_, '_> {
    /// Free slots the batch storage ring needs before each push into the
    /// windows: two closing windows, each at most `max_events` events and
    /// the slot that starts them.
    pub fn room_needed(config: &BatchConfig) -> usize {
        2 * (config.max_events as usize + 1)
    }
}

impl<'p> Aggregate<Event<'p>> for ToStorage<'_, '_, 'p> {
    fn aggregate(&mut self, mut window: Closed<'_, Event<'p>>) {
        let count = window.len().min(usize::from(u16::MAX)) as u16;
        let head = core::iter::once(StorageItem(Piece::BatchHead(count)));
        let members = window
            .drain()
            .take(usize::from(count))
            .map(|ev| StorageItem(Piece::Store(ev)));
        // One store publishes the whole window (room was checked).
        let _ = self.out.push_from(head.chain(members));
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;
    use crate::batch::{BatchWindows, Entry, WindowMeta};
    use crate::pool::{Acquirer, EventPool};
    use crate::ring::Ring;
    use crate::wire::{Frame, FrameRepr, Limits};
    use crate::{Class, Priority};
    use std::vec::Vec;

    fn event<'p>(acq: &mut Acquirer<'p>, id: u64, class: Class) -> Event<'p> {
        let mut slot = acq.acquire().unwrap();
        let repr = FrameRepr {
            priority: Priority::Batch,
            flags: 0,
            partition: 0,
            event_id: id,
            timestamp_ns: 0,
            topic: b"t",
            payload: &[1; 8],
        };
        let n = repr.encode(slot.buffer_mut()).unwrap();
        let head = Frame::parse(&slot.buffer_mut()[..n], &Limits::DEFAULT)
            .unwrap()
            .head();
        Event::new(slot.share(n), head, 0, class, 0, 0)
    }

    fn ids(run: impl Iterator<Item = Event<'static>>) -> Vec<u64> {
        run.map(|e| e.frame().event_id()).collect()
    }

    #[test]
    fn a_closed_window_comes_out_as_one_batch_between_singles() {
        static POOL: EventPool<16, 128> = EventPool::new();
        let mut acq = POOL.acquirer().unwrap();
        let ring: Ring<StorageItem<'static>, 16> = Ring::new();
        let (mut tx, mut rx) = ring.split().unwrap();
        let mut meta = [WindowMeta::new(); 2];
        let mut arena: Vec<Entry<Event<'static>>> = (0..8).map(|_| Entry::new()).collect();
        let config = BatchConfig {
            max_events: 3,
            max_age_ns: u64::MAX,
        };
        let mut windows = BatchWindows::new(&mut meta, &mut arena, config).unwrap();

        let _ = tx.push(StorageItem::from(Work::Store(event(
            &mut acq,
            1,
            Class::Realtime,
        ))));
        for id in 10..13 {
            windows.push(
                event(&mut acq, id, Class::Batch),
                0,
                &mut ToStorage { out: &mut tx },
            );
        }
        let _ = tx.push(StorageItem::from(Work::Answer(Answer::Reject {
            conn: 0,
            event_id: 2,
            ack: true,
            reason: crate::wire::Reason::DedupFull,
        })));

        assert!(matches!(take_unit(&mut rx), Some(Unit::Single(e)) if e.frame().event_id() == 1));
        match take_unit(&mut rx) {
            Some(Unit::Batch(run)) => {
                assert_eq!(run.len(), 3);
                assert_eq!(ids(run), [10, 11, 12]);
            }
            _ => panic!("a batch"),
        }
        assert!(matches!(
            take_unit(&mut rx),
            Some(Unit::Answer(Answer::Reject { event_id: 2, .. }))
        ));
        assert!(take_unit(&mut rx).is_none());
    }

    #[test]
    fn a_batch_left_half_taken_leaves_the_ring_whole() {
        static POOL: EventPool<16, 128> = EventPool::new();
        let mut acq = POOL.acquirer().unwrap();
        let ring: Ring<StorageItem<'static>, 16> = Ring::new();
        let (mut tx, mut rx) = ring.split().unwrap();
        let mut meta = [WindowMeta::new(); 2];
        let mut arena: Vec<Entry<Event<'static>>> = (0..8).map(|_| Entry::new()).collect();
        let config = BatchConfig {
            max_events: 4,
            max_age_ns: u64::MAX,
        };
        let mut windows = BatchWindows::new(&mut meta, &mut arena, config).unwrap();
        for id in 0..4 {
            windows.push(
                event(&mut acq, id, Class::Batch),
                0,
                &mut ToStorage { out: &mut tx },
            );
        }
        let _ = tx.push(StorageItem::from(Work::Store(event(
            &mut acq,
            9,
            Class::Realtime,
        ))));
        match take_unit(&mut rx) {
            Some(Unit::Batch(mut run)) => {
                assert_eq!(run.next().map(|e| e.frame().event_id()), Some(0));
                // The next events, and the one after the batch, are in view.
                assert_eq!(run.peek_ahead(0).map(|e| e.frame().event_id()), Some(1));
                assert_eq!(run.peek_ahead(3).map(|e| e.frame().event_id()), Some(9));
            }
            _ => panic!("a batch"),
        }
        // Dropped half-taken: its other events left with it.
        assert!(matches!(take_unit(&mut rx), Some(Unit::Single(e)) if e.frame().event_id() == 9));
        assert!(take_unit(&mut rx).is_none());
        // Every slot came back to the pool.
        let held: Vec<_> = (0..16).map(|_| acq.acquire()).collect();
        assert!(held.iter().all(Option::is_some));
    }
}
