//! The reading half of a ring.

use super::*;

/// The reading half of a ring. Not `Clone`; `Send` when `T` is.
pub struct Consumer<'r, T> {
    pub(super) indices: &'r Indices,
    pub(super) slots: &'r [Slot<T>],
    pub(super) mask: u32,
    /// Our own index: only this half writes it.
    pub(super) tail: u32,
    /// The producer's index as last seen; reloaded when the ring looks empty.
    pub(super) cached_head: u32,
    pub(super) _not_sync: PhantomData<core::cell::Cell<()>>,
    /// Aligns the half to a cache line (see [`Producer`]).
    pub(super) _line: CachePadded<()>,
}

// SAFETY: the Consumer is the only reader of full slots and the only writer of
// `tail`; it may run on any one thread at a time, receiving T values.
unsafe impl<T: Send> Send for Consumer<'_, T> {}

/// Moves the consumer's tail past the slots a batch read and publishes it
/// when dropped, so items already moved out are never read again, even if
/// the caller's closure unwinds mid-batch.
struct TailGuard<'c, 'r, T> {
    consumer: &'c mut Consumer<'r, T>,
    taken: u32,
}

impl<T> Drop for TailGuard<'_, '_, T> {
    fn drop(&mut self) {
        let c = &mut *self.consumer;
        c.tail = c.tail.wrapping_add(self.taken);
        c.indices.tail.store(c.tail, Release);
    }
}

impl<T> Consumer<'_, T> {
    /// Items ready to read, reloading the producer's index if the cached one
    /// shows fewer than `want`.
    #[inline]
    fn ready(&mut self, want: u32) -> u32 {
        let mut ready = self.cached_head.wrapping_sub(self.tail);
        if ready < want {
            self.cached_head = self.indices.head.load(Acquire);
            ready = self.cached_head.wrapping_sub(self.tail);
        }
        ready
    }

    /// Moves the item at our tail (which must be full) out of its slot.
    #[inline]
    fn read(&mut self) -> T {
        // SAFETY: `mask` is `slots.len() - 1` with a power-of-two length, so
        // the index is in bounds.
        let slot = unsafe { self.slots.get_unchecked((self.tail & self.mask) as usize) };
        // SAFETY: the slot at `tail` is full (written before the producer's
        // Release of a head past it, seen by our Acquire); only this consumer
        // reads full slots, and the tail moves past it, so it is read once.
        let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
        self.tail = self.tail.wrapping_add(1);
        value
    }

    /// The `n`-th oldest item (0 is the next `pop`), without taking it.
    #[inline]
    pub fn peek(&mut self, n: usize) -> Option<&T> {
        let n = u32::try_from(n).ok()?;
        if self.ready(n.checked_add(1)?) <= n {
            return None;
        }
        let slot = self
            .slots
            .get((self.tail.wrapping_add(n) & self.mask) as usize)?;
        // SAFETY: tail..head are full (producer's Release, our Acquire in
        // `ready`); only this consumer moves them, and the borrow of `self`
        // keeps it from popping while the reference lives.
        Some(slot.value.with(|p| unsafe { (*p).assume_init_ref() }))
    }

    /// Takes the oldest item, if any.
    #[inline]
    pub fn pop(&mut self) -> Option<T> {
        if self.ready(1) == 0 {
            return None;
        }
        let value = self.read();
        self.indices.tail.store(self.tail, Release);
        Some(value)
    }

    /// Takes up to `max` items, oldest first, handing each to `f`, and frees
    /// their slots with a single store; returns how many were taken.
    pub fn pop_batch<F: FnMut(T)>(&mut self, max: usize, mut f: F) -> usize {
        let want = max.min(u32::MAX as usize) as u32;
        let n = self.ready(want).min(want);
        if n == 0 {
            return 0;
        }
        let at = (self.tail & self.mask) as usize;
        let first = (n as usize).min(self.slots.len() - at);
        let runs = [
            self.slots.get(at..at + first).unwrap_or(&[]),
            self.slots.get(..n as usize - first).unwrap_or(&[]),
        ];
        let mut guard = TailGuard {
            consumer: self,
            taken: 0,
        };
        for run in runs {
            for slot in run {
                // SAFETY: one of the `n` ready slots, full (producer's Release,
                // our Acquire); the guard counts it at once, so the tail moves
                // past it even if `f` unwinds: read once.
                let value = slot.value.with(|p| unsafe { (*p).assume_init_read() });
                guard.taken += 1;
                f(value);
            }
        }
        drop(guard);
        n as usize
    }

    /// Copies up to `out.len()` items into `out` (one store); returns how many.
    pub fn pop_slice(&mut self, out: &mut [T]) -> usize
    where
        T: Copy,
    {
        let mut dst = out.iter_mut();
        self.pop_batch(dst.len(), |v| {
            if let Some(d) = dst.next() {
                *d = v;
            }
        })
    }

    /// Items ready now (a lower bound: the producer may add more).
    pub fn len(&mut self) -> usize {
        self.ready(self.mask + 1) as usize
    }

    /// No item is ready now.
    pub fn is_empty(&mut self) -> bool {
        self.ready(1) == 0
    }

    /// Items the ring holds at most.
    pub fn capacity(&self) -> usize {
        self.mask as usize + 1
    }
}
