//! Lock-free single-producer single-consumer ring, split into a [`Producer`]
//! and a [`Consumer`] that cannot be duplicated.
//!
//! Costs: no allocation, no locks; a push or pop is one slot copy and one
//! Release store of a 32-bit index, and each side reloads the other's index
//! (an Acquire load) only when the ring looks full or empty. Batch calls move
//! many items per store. Capacity is a power of two, as a const generic
//! ([`Ring`], usable as a `static`) or the length of a caller's buffer
//! ([`BufferRing`]): one type, [`RingOver`], with the slots' storage as a
//! parameter.

use core::marker::PhantomData;
use core::mem::MaybeUninit;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crossbeam_utils::CachePadded;

use crate::sync::{prefetch, AtomicBool, AtomicU32, UnsafeCell};

mod consumer;
pub use consumer::Consumer;

/// One cell of a ring: storage for one item, empty or full as the ring's
/// indices say. Public so that callers can provide the buffer of a
/// [`BufferRing`].
pub struct Slot<T> {
    value: UnsafeCell<MaybeUninit<T>>,
}

impl<T> Slot<T> {
    /// An empty slot.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }

    /// An empty slot.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            value: UnsafeCell::new(MaybeUninit::uninit()),
        }
    }
}

impl<T> Default for Slot<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// The indices both sides share. `head` counts pushes and `tail` counts pops,
/// both wrapping at 2^32; `head - tail` items are inside.
struct Indices {
    head: CachePadded<AtomicU32>,
    tail: CachePadded<AtomicU32>,
    split: AtomicBool,
}

impl Indices {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            head: CachePadded::new(AtomicU32::new(0)),
            tail: CachePadded::new(AtomicU32::new(0)),
            split: AtomicBool::new(false),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            head: CachePadded::new(AtomicU32::new(0)),
            tail: CachePadded::new(AtomicU32::new(0)),
            split: AtomicBool::new(false),
        }
    }

    /// The one split of a ring: both halves, or `None` if split before.
    fn split<'r, T>(&'r self, slots: &'r [Slot<T>]) -> Option<(Producer<'r, T>, Consumer<'r, T>)> {
        if self.split.swap(true, Acquire) {
            return None;
        }
        let head = self.head.load(Relaxed);
        let tail = self.tail.load(Relaxed);
        let mask = slots.len() as u32 - 1;
        Some((
            Producer {
                indices: self,
                slots,
                mask,
                head,
                cached_tail: tail,
                _not_sync: PhantomData,
                _line: CachePadded::new(()),
            },
            Consumer {
                indices: self,
                slots,
                mask,
                tail,
                cached_head: head,
                _not_sync: PhantomData,
                _line: CachePadded::new(()),
            },
        ))
    }

    /// Drops the items still inside; called by the owner, when no half can
    /// be alive any more (they borrow it).
    fn drop_items<T>(&mut self, slots: &[Slot<T>]) {
        if !core::mem::needs_drop::<T>() {
            return;
        }
        let head = self.head.load(Acquire);
        let mut tail = self.tail.load(Acquire);
        let mask = slots.len() as u32 - 1;
        while tail != head {
            if let Some(slot) = slots.get((tail & mask) as usize) {
                // SAFETY: positions tail..head hold initialised items that no
                // half can reach any more (both borrowed the owner, which is
                // being dropped); each is dropped exactly once here.
                slot.value.with_mut(|p| unsafe { (*p).assume_init_drop() });
            }
            tail = tail.wrapping_add(1);
        }
    }
}

/// A ring whose slots are inline: capacity `N` (a power of two) is a const
/// generic, and `Ring::new` is `const`, so a ring can be a `static`.
///
/// ```
/// use eventstream_core::ring::Ring;
///
/// static RING: Ring<u32, 8> = Ring::new();
/// let (mut tx, mut rx) = RING.split().unwrap();
/// assert!(RING.split().is_none(), "one producer and one consumer only");
/// tx.push(1).unwrap();
/// assert_eq!(tx.push_slice(&[2, 3]), 2);
/// assert_eq!(rx.len(), 3);
/// assert_eq!(rx.pop(), Some(1));
/// let mut got = Vec::new();
/// rx.pop_batch(8, |v| got.push(v));
/// assert_eq!(got, [2, 3]);
/// ```
pub type Ring<T, const N: usize> = RingOver<T, [Slot<T>; N]>;

/// A ring over a caller-provided buffer of [`Slot`]s, for capacities chosen
/// at run time.
pub type BufferRing<'b, T> = RingOver<T, &'b mut [Slot<T>]>;

/// Where a ring's slots live: inline (`[Slot<T>; N]`) or in a caller's
/// buffer (`&mut [Slot<T>]`).
///
/// # Safety
///
/// `slots` must return the same slots, of a power-of-two count, on every
/// call for as long as the storage lives, and nothing but the ring may
/// reach them: the ring's unsafe code reads and writes them by index.
pub unsafe trait SlotStorage<T> {
    /// The slots.
    fn slots(&self) -> &[Slot<T>];
}

// SAFETY: an inline array is always the same N slots (N a power of two,
// checked at compile time by `Ring::new`), owned by the ring.
unsafe impl<T, const N: usize> SlotStorage<T> for [Slot<T>; N] {
    fn slots(&self) -> &[Slot<T>] {
        self
    }
}

// SAFETY: a buffer borrowed mutably for the ring's life is always the same
// slots (their count checked by `BufferRing::new`), reachable by nobody else.
unsafe impl<T> SlotStorage<T> for &mut [Slot<T>] {
    fn slots(&self) -> &[Slot<T>] {
        self
    }
}

/// The ring: its indices over slots stored in `S` ([`Ring`], [`BufferRing`]).
/// Both forms run the same code.
pub struct RingOver<T, S: SlotStorage<T>> {
    indices: Indices,
    slots: S,
    _items: PhantomData<T>,
}

// SAFETY: the ring hands out at most one Producer and one Consumer (the split
// flag), which move items of type T between threads; T: Send suffices, and
// the storage is only read through `slots()` (the cells are the ring's).
unsafe impl<T: Send, S: SlotStorage<T> + Send> Sync for RingOver<T, S> {}
// SAFETY: owning the ring owns its items; moving it moves T values.
unsafe impl<T: Send, S: SlotStorage<T> + Send> Send for RingOver<T, S> {}

impl<T, const N: usize> RingOver<T, [Slot<T>; N]> {
    const CAPACITY_OK: () = assert!(
        N.is_power_of_two() && N <= 1 << 31,
        "ring capacity must be a power of two up to 2^31"
    );

    /// An empty ring.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        let () = Self::CAPACITY_OK;
        Self {
            indices: Indices::new(),
            slots: [const { Slot::new() }; N],
            _items: PhantomData,
        }
    }

    /// An empty ring.
    #[cfg(loom)]
    pub fn new() -> Self {
        let () = Self::CAPACITY_OK;
        Self {
            indices: Indices::new(),
            slots: core::array::from_fn(|_| Slot::new()),
            _items: PhantomData,
        }
    }
}

impl<T, const N: usize> Default for RingOver<T, [Slot<T>; N]> {
    fn default() -> Self {
        Self::new()
    }
}

/// A buffer length that is not a power of two between 1 and 2^31.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BadCapacity;

impl<'b, T> RingOver<T, &'b mut [Slot<T>]> {
    /// A ring over `slots`, whose length must be a power of two up to 2^31.
    /// Holding `&mut` guarantees no other ring uses the buffer.
    pub fn new(slots: &'b mut [Slot<T>]) -> Result<Self, BadCapacity> {
        if !slots.len().is_power_of_two() || slots.len() > 1 << 31 {
            return Err(BadCapacity);
        }
        Ok(Self {
            indices: Indices::new(),
            slots,
            _items: PhantomData,
        })
    }
}

impl<T, S: SlotStorage<T>> RingOver<T, S> {
    /// The producer and consumer halves; `None` after the first call, so a
    /// `static` ring can be split safely from anywhere.
    pub fn split(&self) -> Option<(Producer<'_, T>, Consumer<'_, T>)> {
        self.indices.split(self.slots.slots())
    }

    /// Items the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.slots.slots().len()
    }
}

impl<T, S: SlotStorage<T>> Drop for RingOver<T, S> {
    fn drop(&mut self) {
        let Self { indices, slots, .. } = self;
        indices.drop_items(slots.slots());
    }
}

/// The writing half of a ring. Not `Clone`; `Send` when `T` is.
pub struct Producer<'r, T> {
    indices: &'r Indices,
    slots: &'r [Slot<T>],
    mask: u32,
    /// Our own index: only this half writes it.
    head: u32,
    /// The consumer's index as last seen; reloaded when the ring looks full.
    cached_tail: u32,
    _not_sync: PhantomData<core::cell::Cell<()>>,
    /// Aligns the half to a cache line, so the two halves never share one
    /// even when they are stored side by side.
    _line: CachePadded<()>,
}

// SAFETY: the Producer is the only writer of `head` and of the free slots; it
// may run on any one thread at a time, moving T values to the consumer.
unsafe impl<T: Send> Send for Producer<'_, T> {}

impl<T> Producer<'_, T> {
    /// Slots ahead of the head whose cache line a push asks for: about
    /// 256 bytes ahead, at least one slot.
    const PREFETCH_AHEAD: u32 = {
        let size = core::mem::size_of::<Slot<T>>();
        if size == 0 || size >= 256 {
            1
        } else {
            (256 / size) as u32
        }
    };

    /// Free slots, reloading the consumer's index if the cached one shows
    /// fewer than `want`.
    #[inline]
    fn free(&mut self, want: u32) -> u32 {
        let cap = self.mask + 1;
        let mut free = cap - self.head.wrapping_sub(self.cached_tail);
        if free < want {
            self.cached_tail = self.indices.tail.load(Acquire);
            free = cap - self.head.wrapping_sub(self.cached_tail);
        }
        free
    }

    /// Writes `value` into the slot at our head (which must be free).
    #[inline]
    fn write(&mut self, value: T) {
        // SAFETY: `mask` is `slots.len() - 1` with a power-of-two length, so
        // the index is in bounds.
        let slot = unsafe { self.slots.get_unchecked((self.head & self.mask) as usize) };
        // SAFETY: the slot at `head` is free (checked against the consumer's
        // tail, which it publishes with Release after reading the slot), and
        // only this producer writes free slots.
        slot.value.with_mut(|p| unsafe { (*p).write(value) });
        self.head = self.head.wrapping_add(1);
        // The consumer read the slots ahead last, so they sit in its
        // core's cache: ask for one a few hundred bytes ahead now, so its
        // write does not wait for the transfer. Only when the consumer is
        // at least as far past that slot (as far as we know; it may be
        // further), so a line it still reads stays with it.
        let ahead = self.head.wrapping_add(Self::PREFETCH_AHEAD);
        let limit = (self.mask + 1).saturating_sub(Self::PREFETCH_AHEAD);
        if ahead.wrapping_sub(self.cached_tail) <= limit {
            // SAFETY: masked into bounds as above.
            let slot = unsafe { self.slots.get_unchecked((ahead & self.mask) as usize) };
            prefetch(slot as *const Slot<T>, true);
        }
    }

    /// Appends `value`, or gives it back if the ring is full.
    #[inline]
    pub fn push(&mut self, value: T) -> Result<(), T> {
        if self.free(1) == 0 {
            return Err(value);
        }
        self.write(value);
        self.indices.head.store(self.head, Release);
        Ok(())
    }

    /// Appends items from `items` while there is room, publishing them with a
    /// single store; returns how many were taken. Items the ring had no room
    /// for stay in the iterator (pass `&mut iter` to keep them). If the
    /// iterator panics, the items written so far are published by the next
    /// push: none is lost or read twice.
    pub fn push_from<I: Iterator<Item = T>>(&mut self, items: I) -> usize {
        let mut items = items;
        // Refresh the consumer's index unless the cached one already shows
        // room for everything the iterator may yield.
        let (low, high) = items.size_hint();
        let want = high
            .unwrap_or(usize::MAX)
            .max(low)
            .max(1)
            .min(self.capacity()) as u32;
        let free = self.free(want) as usize;
        // The free slots as at most two contiguous runs: from our head to the
        // end of the buffer, then from its start.
        let at = (self.head & self.mask) as usize;
        let first = free.min(self.slots.len() - at);
        let runs = [
            self.slots.get(at..at + first).unwrap_or(&[]),
            self.slots.get(..free - first).unwrap_or(&[]),
        ];
        // The count lives in a guard on our stack, so a panicking iterator
        // still leaves every written slot accounted (and published), and the
        // loop does not store to `self` per item.
        let (slots, head, mask) = (self.slots, self.head, self.mask);
        let mut guard = HeadGuard {
            producer: self,
            pushed: 0,
        };
        'fill: for run in runs {
            for slot in run {
                let Some(value) = items.next() else {
                    break 'fill;
                };
                // SAFETY: the slot is free (inside the `free` slots past our
                // head, checked against the consumer's published tail), and
                // only this producer writes free slots.
                slot.value.with_mut(|p| unsafe { (*p).write(value) });
                guard.pushed += 1;
                // Ask for a free slot's line a few hundred bytes ahead, as
                // `write` does; only inside the free slots, which the
                // consumer has left.
                let ahead = guard.pushed + Self::PREFETCH_AHEAD;
                if (ahead as usize) < free {
                    if let Some(next) = slots.get((head.wrapping_add(ahead) & mask) as usize) {
                        prefetch(next as *const Slot<T>, true);
                    }
                }
            }
        }
        guard.pushed as usize
    }

    /// Appends copies of `items` while there is room (one store); returns how
    /// many were taken.
    pub fn push_slice(&mut self, items: &[T]) -> usize
    where
        T: Copy,
    {
        self.push_from(items.iter().copied())
    }

    /// At least `n` slots are free. Reloads the consumer's index only when
    /// the cached one shows fewer, so a producer that checks before each
    /// push does not touch the consumer's cache line every time.
    #[inline]
    pub fn has_room(&mut self, n: usize) -> bool {
        let n = n.min(u32::MAX as usize) as u32;
        self.free(n) >= n
    }

    /// Free slots now (a lower bound: the consumer may free more). Always
    /// reloads the consumer's index unless the ring looks empty; prefer
    /// [`has_room`](Self::has_room) on the hot path.
    pub fn free_len(&mut self) -> usize {
        self.free(self.mask + 1) as usize
    }

    /// Items the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.mask as usize + 1
    }
}

/// Moves the producer's head past the slots a batch wrote and publishes it
/// when dropped, also if the iterator unwinds mid-batch.
struct HeadGuard<'p, 'r, T> {
    producer: &'p mut Producer<'r, T>,
    pushed: u32,
}

impl<T> Drop for HeadGuard<'_, '_, T> {
    fn drop(&mut self) {
        if self.pushed > 0 {
            let p = &mut *self.producer;
            p.head = p.head.wrapping_add(self.pushed);
            p.indices.head.store(p.head, Release);
        }
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
