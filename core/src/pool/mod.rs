//! Event pool: fixed slots of bytes handed out in O(1) and returned
//! automatically when the last handle to them drops.
//!
//! Costs: no allocation, no locks. Acquire is a few plain loads (one atomic
//! swap per refill of the acquirer's private free list); a release is one
//! CAS push on a lock-free stack. One [`Acquirer`] per pool (it is handed out
//! once); [`EventRef`] handles may be cloned and dropped on any thread.
//!
//! ABA: releasers only push, and the acquirer takes the whole stack with one
//! swap, so no thread ever pops a node another thread may pop as well.

use core::marker::PhantomData;
use core::sync::atomic::Ordering::{Acquire, Relaxed, Release};

use crossbeam_utils::CachePadded;

use crate::sync::{fence, prefetch, AtomicBool, AtomicU32, UnsafeCell};

/// End of a free list.
const NIL: u32 = u32::MAX;
/// How much of the next free slot `acquire` asks the CPU to fetch ahead:
/// the frames this engine carries are 256 to 512 bytes.
const PREFETCH_SLOT_BYTES: usize = 512;
/// Bytes per cache line on the targets that prefetch (x86_64).
const CACHE_LINE: usize = 64;
/// Past this many references a slot is never freed (handles leaked with
/// `mem::forget` on a massive scale): a leak instead of a counter overflow.
const STICKY: u32 = 1 << 31;

/// Per-slot bookkeeping. Public so that callers can provide the buffer of a
/// [`BufferPool`].
pub struct SlotMeta {
    refs: AtomicU32,
    next: AtomicU32,
    /// Stands for the slot's bytes in loom's model, so that loom checks every
    /// access to them against the ownership protocol (zero-sized otherwise).
    access: UnsafeCell<()>,
}

impl SlotMeta {
    /// Bookkeeping of a free slot.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            refs: AtomicU32::new(0),
            next: AtomicU32::new(NIL),
            access: UnsafeCell::new(()),
        }
    }

    /// Bookkeeping of a free slot.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            refs: AtomicU32::new(0),
            next: AtomicU32::new(NIL),
            access: UnsafeCell::new(()),
        }
    }
}

impl Default for SlotMeta {
    fn default() -> Self {
        Self::new()
    }
}

/// State shared by every handle of a pool. Padded to whole cache lines, and
/// `released` on a line of its own: every releasing thread writes it, while
/// every acquire and slot read reads `slot_size`, and neither should drag
/// the other's line (or a neighbour's) between cores.
struct Shared {
    /// Top of the stack of released slots.
    released: CachePadded<AtomicU32>,
    acquirer_taken: AtomicBool,
    /// Bytes per slot (here rather than in every handle, which stays small).
    slot_size: usize,
}

impl Shared {
    #[cfg(not(loom))]
    const fn new(slot_size: usize) -> Self {
        Self {
            released: CachePadded::new(AtomicU32::new(NIL)),
            acquirer_taken: AtomicBool::new(false),
            slot_size,
        }
    }

    #[cfg(loom)]
    fn new(slot_size: usize) -> Self {
        Self {
            released: CachePadded::new(AtomicU32::new(NIL)),
            acquirer_taken: AtomicBool::new(false),
            slot_size,
        }
    }
}

/// The one code path behind both pool types: shared state, bookkeeping and
/// `meta.len()` slots of `shared.slot_size` bytes at `data`.
#[derive(Clone, Copy)]
struct View<'p> {
    shared: &'p Shared,
    meta: &'p [SlotMeta],
    data: *mut u8,
}

// SAFETY: a View is only a set of shared references plus the base pointer of
// the slot bytes, whose every access follows the ownership protocol (one
// SlotMut, or only readers, per slot); sending it between threads is sound.
unsafe impl Send for View<'_> {}
// SAFETY: as above; all mutation goes through atomics or owned slots.
unsafe impl Sync for View<'_> {}

impl<'p> View<'p> {
    fn acquirer(self) -> Option<Acquirer<'p>> {
        if self.shared.acquirer_taken.swap(true, Acquire) {
            return None;
        }
        Some(Acquirer {
            view: self,
            local: NIL,
            fresh: 0,
            _not_sync: PhantomData,
        })
    }

    /// Bytes of slot `index` (which must be below `meta.len()`).
    fn slot_ptr(&self, index: u32) -> *mut u8 {
        // The offset stays inside the data region: index < meta.len() and the
        // region holds meta.len() * slot_size bytes.
        self.data.wrapping_add(index as usize * self.slot_size())
    }

    /// Bytes per slot.
    #[inline]
    fn slot_size(&self) -> usize {
        self.shared.slot_size
    }

    /// Pushes slot `index` onto the released stack.
    fn release(&self, index: u32) {
        let Some(meta) = self.meta.get(index as usize) else {
            return;
        };
        let mut top = self.shared.released.load(Relaxed);
        loop {
            meta.next.store(top, Relaxed);
            match self
                .shared
                .released
                .compare_exchange_weak(top, index, Release, Relaxed)
            {
                Ok(_) => return,
                Err(now) => top = now,
            }
        }
    }
}

/// A pool of `N` slots of `SLOT` bytes whose storage is part of the value;
/// `new` is `const`, so a pool can be a `static` (firmware).
///
/// ```
/// use eventstream_core::pool::EventPool;
///
/// static POOL: EventPool<4, 64> = EventPool::new();
/// let mut acquirer = POOL.acquirer().unwrap();
/// let mut slot = acquirer.acquire().unwrap();
/// slot.buffer_mut()[..5].copy_from_slice(b"hello");
/// // Shared read-only from here on; the last handle dropped frees the slot.
/// let event = slot.share(5);
/// let copy = event.clone();
/// assert_eq!(copy.bytes(), b"hello");
/// assert_eq!(event.ref_count(), 2);
/// drop((event, copy));
/// ```
pub type EventPool<const N: usize, const SLOT: usize> = PoolOver<InlineSlots<N, SLOT>>;

/// A pool over caller-provided buffers, for sizes chosen at run time.
pub type BufferPool<'b> = PoolOver<BorrowedSlots<'b>>;

/// Where a pool's slots live: in the value ([`InlineSlots`]) or in a
/// caller's buffers ([`BorrowedSlots`]).
///
/// # Safety
///
/// `data` must point to at least `meta().len() * slot_size` bytes (the
/// pool's slot size) that stay valid and are only accessed through the pool
/// for as long as the storage lives.
pub unsafe trait SlotStorage {
    /// Each slot's bookkeeping.
    fn meta(&self) -> &[SlotMeta];
    /// The first byte of the slots' bytes.
    fn data(&self) -> *mut u8;
}

/// `N` slots of `SLOT` bytes, inline.
pub struct InlineSlots<const N: usize, const SLOT: usize> {
    meta: [SlotMeta; N],
    data: core::cell::UnsafeCell<[[u8; SLOT]; N]>,
}

// SAFETY: `data` is the inline array of N * SLOT bytes, which lives as long
// as the storage; the pool (its only user) follows the slot protocol.
unsafe impl<const N: usize, const SLOT: usize> SlotStorage for InlineSlots<N, SLOT> {
    fn meta(&self) -> &[SlotMeta] {
        &self.meta
    }
    fn data(&self) -> *mut u8 {
        self.data.get().cast::<u8>()
    }
}

/// Slots in a caller's buffers.
pub struct BorrowedSlots<'b> {
    meta: &'b [SlotMeta],
    data: *mut u8,
    _data: PhantomData<&'b mut [u8]>,
}

// SAFETY: `data` comes from a `&'b mut [u8]` of at least meta.len() *
// slot_size bytes (checked by `BufferPool::new`), borrowed for 'b.
unsafe impl SlotStorage for BorrowedSlots<'_> {
    fn meta(&self) -> &[SlotMeta] {
        self.meta
    }
    fn data(&self) -> *mut u8 {
        self.data
    }
}

/// An event pool: the shared bookkeeping over slots stored in `S`
/// ([`EventPool`], [`BufferPool`]). Both forms run the same code.
pub struct PoolOver<S: SlotStorage> {
    shared: CachePadded<Shared>,
    slots: S,
}

// SAFETY: slot bytes are only written through the unique SlotMut of a slot
// and only read through EventRefs while no SlotMut exists; the bookkeeping is
// atomic. Sharing the pool between threads is therefore sound.
unsafe impl<S: SlotStorage> Sync for PoolOver<S> {}
// SAFETY: the pool owns its slots (or its borrow of them); moving it is sound.
unsafe impl<S: SlotStorage> Send for PoolOver<S> {}

impl<const N: usize, const SLOT: usize> PoolOver<InlineSlots<N, SLOT>> {
    const SIZE_OK: () = assert!(
        N < NIL as usize && SLOT > 0,
        "pool needs fewer than 2^32 - 1 slots of at least one byte"
    );

    /// A pool with every slot free.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        let () = Self::SIZE_OK;
        Self {
            shared: CachePadded::new(Shared::new(SLOT)),
            slots: InlineSlots {
                meta: [const { SlotMeta::new() }; N],
                data: core::cell::UnsafeCell::new([[0; SLOT]; N]),
            },
        }
    }

    /// A pool with every slot free.
    #[cfg(loom)]
    pub fn new() -> Self {
        let () = Self::SIZE_OK;
        Self {
            shared: CachePadded::new(Shared::new(SLOT)),
            slots: InlineSlots {
                meta: core::array::from_fn(|_| SlotMeta::new()),
                data: core::cell::UnsafeCell::new([[0; SLOT]; N]),
            },
        }
    }
}

impl<const N: usize, const SLOT: usize> Default for PoolOver<InlineSlots<N, SLOT>> {
    fn default() -> Self {
        Self::new()
    }
}

/// Buffers that do not describe a pool.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum PoolError {
    /// `slot_size` is zero, or there are no slots or 2^32 - 1 or more.
    Shape,
    /// `data` is shorter than `meta.len() * slot_size`.
    DataTooSmall,
}

impl<'b> PoolOver<BorrowedSlots<'b>> {
    /// A pool of `meta.len()` slots of `slot_size` bytes stored in `data`.
    pub fn new(
        meta: &'b mut [SlotMeta],
        data: &'b mut [u8],
        slot_size: usize,
    ) -> Result<Self, PoolError> {
        if slot_size == 0 || meta.is_empty() || meta.len() >= NIL as usize {
            return Err(PoolError::Shape);
        }
        match meta.len().checked_mul(slot_size) {
            Some(need) if need <= data.len() => {}
            _ => return Err(PoolError::DataTooSmall),
        }
        for m in meta.iter_mut() {
            *m = SlotMeta::new();
        }
        Ok(Self {
            shared: CachePadded::new(Shared::new(slot_size)),
            slots: BorrowedSlots {
                meta,
                data: data.as_mut_ptr(),
                _data: PhantomData,
            },
        })
    }
}

impl<S: SlotStorage> PoolOver<S> {
    /// The pool's one acquirer; `None` after the first call.
    pub fn acquirer(&self) -> Option<Acquirer<'_>> {
        View {
            shared: &self.shared,
            meta: self.slots.meta(),
            data: self.slots.data(),
        }
        .acquirer()
    }

    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.meta().len()
    }

    /// Bytes per slot.
    pub fn slot_size(&self) -> usize {
        self.shared.slot_size
    }
}

/// The single thread that takes slots from a pool. Not `Clone`, not `Sync`.
pub struct Acquirer<'p> {
    view: View<'p>,
    /// Private free list (taken whole from the released stack).
    local: u32,
    /// Slots never used yet are `fresh..N`.
    fresh: u32,
    _not_sync: PhantomData<core::cell::Cell<()>>,
}

impl<'p> Acquirer<'p> {
    /// Bytes per slot of its pool.
    pub fn slot_size(&self) -> usize {
        self.view.slot_size()
    }

    /// A free slot, or `None` when every slot is in use (never blocks).
    #[inline]
    pub fn acquire(&mut self) -> Option<SlotMut<'p>> {
        if self.local == NIL {
            if (self.fresh as usize) < self.view.meta.len() {
                let index = self.fresh;
                self.fresh += 1;
                return Some(self.take(index));
            }
            self.local = self.view.shared.released.swap(NIL, Acquire);
            if self.local == NIL {
                return None;
            }
        }
        let index = self.local;
        let meta = self.view.meta.get(index as usize)?;
        self.local = meta.next.load(Relaxed);
        self.prefetch_next();
        Some(self.take(index))
    }

    /// Starts loading the next free slot's metadata and its first bytes:
    /// another thread released it, so both sit in that core's cache, and
    /// the next acquire and the copy into the slot would each wait for a
    /// transfer. By then the hint has fetched them.
    #[inline]
    fn prefetch_next(&self) {
        if let Some(next) = self.view.meta.get(self.local as usize) {
            prefetch(next as *const SlotMeta, true);
            let data = self.view.slot_ptr(self.local);
            for at in (0..self.view.slot_size().min(PREFETCH_SLOT_BYTES)).step_by(CACHE_LINE) {
                prefetch(data.wrapping_add(at), true);
            }
        }
    }

    fn take(&self, index: u32) -> SlotMut<'p> {
        if let Some(meta) = self.view.meta.get(index as usize) {
            meta.refs.store(1, Relaxed);
            meta.access.with_mut(|_| ());
        }
        SlotMut {
            view: self.view,
            index,
        }
    }

    /// Slots that can be acquired without looking at the released stack.
    pub fn ready(&self) -> usize {
        let mut n = self.view.meta.len() - self.fresh as usize;
        let mut i = self.local;
        while let Some(meta) = self.view.meta.get(i as usize) {
            n += 1;
            i = meta.next.load(Relaxed);
        }
        n
    }
}

/// A slot owned by exactly one party, writable. Dropping it returns the slot.
pub struct SlotMut<'p> {
    view: View<'p>,
    index: u32,
}

impl<'p> SlotMut<'p> {
    /// The slot's bytes.
    pub fn buffer_mut(&mut self) -> &mut [u8] {
        // SAFETY: this SlotMut is the slot's only handle (it returns to the
        // pool only when this or its last EventRef drops), so nothing else
        // refers to these bytes; the range lies inside the data region.
        unsafe {
            core::slice::from_raw_parts_mut(self.view.slot_ptr(self.index), self.view.slot_size())
        }
    }

    /// Slot index, `0..capacity`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Makes the first `len` bytes (clamped to the slot size) readable
    /// through shared, clonable handles.
    pub fn share(self, len: usize) -> EventRef<'p> {
        let this = core::mem::ManuallyDrop::new(self);
        EventRef {
            view: this.view,
            index: this.index,
            len: len.min(this.view.slot_size()) as u32,
        }
    }
}

impl Drop for SlotMut<'_> {
    fn drop(&mut self) {
        if let Some(meta) = self.view.meta.get(self.index as usize) {
            meta.refs.store(0, Relaxed);
        }
        self.view.release(self.index);
    }
}

/// A shared, read-only, reference-counted handle to the bytes of a slot. The
/// last one dropped returns the slot to its pool.
pub struct EventRef<'p> {
    view: View<'p>,
    index: u32,
    len: u32,
}

impl EventRef<'_> {
    /// The bytes that were shared.
    #[inline]
    pub fn bytes(&self) -> &[u8] {
        if let Some(meta) = self.view.meta.get(self.index as usize) {
            meta.access.with(|_| ());
        }
        // SAFETY: while any EventRef to the slot exists, no SlotMut exists
        // (share consumed it) and the slot is not free, so the bytes are not
        // written; len <= slot_size keeps the range inside the slot.
        unsafe { core::slice::from_raw_parts(self.view.slot_ptr(self.index), self.len as usize) }
    }

    /// Starts loading the shared bytes, and the slot's count that the last
    /// drop writes, into this core's cache, so that a read of them a little
    /// later does not wait for memory or for the core that wrote them. A
    /// consumer calls it a few items ahead of the one it is working on.
    /// Only a hint: it changes nothing.
    #[inline]
    pub fn prefetch(&self) {
        let data = self.view.slot_ptr(self.index);
        for at in (0..self.len as usize).step_by(CACHE_LINE) {
            prefetch(data.wrapping_add(at), false);
        }
        if let Some(meta) = self.view.meta.get(self.index as usize) {
            prefetch(meta as *const SlotMeta, true);
        }
    }

    /// Slot index, `0..capacity`.
    pub fn index(&self) -> u32 {
        self.index
    }

    /// Handles to this slot right now (for tests and metrics).
    pub fn ref_count(&self) -> u32 {
        self.view
            .meta
            .get(self.index as usize)
            .map_or(0, |m| m.refs.load(Relaxed))
    }
}

impl Clone for EventRef<'_> {
    fn clone(&self) -> Self {
        if let Some(meta) = self.view.meta.get(self.index as usize) {
            // Relaxed suffices, as for Arc: the new handle comes from an
            // existing one, so the count cannot reach zero concurrently.
            if meta.refs.fetch_add(1, Relaxed) >= STICKY {
                meta.refs.store(STICKY, Relaxed);
            }
        }
        Self {
            view: self.view,
            index: self.index,
            len: self.len,
        }
    }
}

impl Drop for EventRef<'_> {
    fn drop(&mut self) {
        let Some(meta) = self.view.meta.get(self.index as usize) else {
            return;
        };
        match meta.refs.load(Acquire) {
            // The only handle: nobody else can clone or drop concurrently,
            // and the Acquire load orders every earlier handle's reads
            // before the reuse; no read-modify-write needed.
            1 => {}
            n if n >= STICKY => return,
            _ => {
                if meta.refs.fetch_sub(1, Release) != 1 {
                    return;
                }
                // Every other handle's reads happen before the slot is reused.
                fence(Acquire);
            }
        }
        self.view.release(self.index);
    }
}

// SAFETY: an EventRef only reads bytes that nobody writes while it exists, and
// its count is atomic: it may move to and be shared with any thread.
unsafe impl Send for EventRef<'_> {}
// SAFETY: as above.
unsafe impl Sync for EventRef<'_> {}
// SAFETY: a SlotMut is the unique owner of its slot's bytes; moving it to
// another thread moves that ownership.
unsafe impl Send for SlotMut<'_> {}

impl core::fmt::Debug for EventRef<'_> {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("EventRef")
            .field("index", &self.index)
            .field("len", &self.len)
            .finish()
    }
}

#[cfg(all(test, not(loom)))]
mod tests;
