//! Fixed-capacity lock-free table of recently seen event ids, with expiry by
//! time window; the engine's exactly-once memory.
//!
//! Costs: no allocation, no locks; 24 bytes per slot in six 32-bit atomics,
//! in three dense arrays: state words, insertion stamps, id and offset.
//! Lookups never write. An insert scans at most [`NEIGHBOURHOOD`] slots from
//! the id's home slot ([`EVICT_NEIGHBOURHOOD`] under [`FullPolicy::Evict`]),
//! claims one with a CAS (retrying until it either inserts or finds the id:
//! it never gives up), and scans them once more.
//!
//! Slot-state protocol: each slot has a state word (kind, a 13-bit tag of
//! the id's hash, a version) in a dense array, so scans skip other ids
//! without touching their data. A writer claims a slot (CAS to `CLAIMED`,
//! new version), writes the id words, then publishes `PENDING`; readers
//! trust the data words only if the state word is the same before and after
//! reading them (a seqlock), so a half-written id is never used.
//!
//! Twins: two inserters of one id may claim different slots. Each claim is
//! a sequentially consistent CAS and each inserter scans again after its
//! claim, so one of any two always sees the other's claim (and waits the few
//! stores until its id is published). An inserter withdraws if it sees the id
//! live, or pending closer to the home slot; it waits for a pending twin
//! farther away to settle (waits only ever point away from home, so they
//! cannot form a cycle). Exactly one wins; the others report `Duplicate`.
//!
//! Tombstones: the sweeper turns a freed slot back into `EMPTY` when the
//! slot after it is empty (the end of every chain through it), re-checking
//! after the change; an inserter that finds an `EMPTY` slot between the home
//! and its own slot withdraws and retries, so a live id never has an empty
//! slot in front of it for longer than that retry.

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use crate::sync::{fence, prefetch, spin_wait, AtomicBool, AtomicU32};

/// Slots an insert or lookup examines from an id's home slot, under
/// [`FullPolicy::Reject`].
pub const NEIGHBOURHOOD: usize = 64;

/// The same under [`FullPolicy::Evict`]: an id goes into its first 16 slots
/// (a free one, else the oldest entry's), so lookups look no further. Once
/// the table is full, which evict allows and sustained traffic soon makes
/// it, no empty slot ends a scan early: every lookup and insert reads its
/// whole neighbourhood, two cache lines of state words instead of five.
/// Full, the table forgets the same entries either way: in a
/// simulation of 16,384 slots (five seeds), the youngest entry evicted was
/// 0.41 capacity old against 0.39 with 64 slots, the median 0.99 in both.
/// While it fills, the first evictions come sooner (after 0.46 capacity
/// inserts instead of 0.70), and `effective_window_ms` reports them.
pub const EVICT_NEIGHBOURHOOD: usize = EVICT_SCAN;

/// State words in one 64-byte cache line.
const STATES_PER_LINE: usize = 64 / core::mem::size_of::<DedupState>();

/// Slots of the neighbourhood an insert into a full table looks at for the
/// entry to evict (the oldest of them).
const EVICT_SCAN: usize = 16;

// State word: kind (3 bits) | tag (13 bits) | version (16 bits).
const KIND_BITS: u32 = 3;
const KIND_MASK: u32 = (1 << KIND_BITS) - 1;
const TAG_SHIFT: u32 = KIND_BITS;
const TAG_MASK: u32 = 0x1FFF;
const VERSION_SHIFT: u32 = 16;
/// Never used: ends every scan (no id lies past it).
const EMPTY: u32 = 0;
/// Claimed by an inserter that is writing the id.
const CLAIMED: u32 = 1;
/// Id written, the inserter is checking for a concurrent twin.
const PENDING: u32 = 2;
/// Id present, original not stored yet.
const LIVE: u32 = 3;
/// Id present, offset words hold the original's log offset.
const STORED: u32 = 4;
/// Free again (expired, removed or evicted); scans continue past it.
const FREE: u32 = 5;
/// Live, and the storage side is writing the offset words.
const OFFSETTING: u32 = 6;

const fn kind(state: u32) -> u32 {
    state & KIND_MASK
}

const fn tag_of(state: u32) -> u32 {
    (state >> TAG_SHIFT) & TAG_MASK
}

const fn with_kind(state: u32, k: u32) -> u32 {
    (state & !KIND_MASK) | k
}

/// A new version of the slot, claimed for an id with tag `tag`.
const fn claim_word(state: u32, tag: u32) -> u32 {
    let version = (state >> VERSION_SHIFT).wrapping_add(1) << VERSION_SHIFT;
    version | (tag & TAG_MASK) << TAG_SHIFT | CLAIMED
}

/// The state word of one slot: kind, a 13-bit tag of the id's hash (so
/// scans skip other ids without touching their data) and a version.
/// Public so callers can provide the buffers of a [`BufferDedupTable`].
pub struct DedupState(AtomicU32);

impl DedupState {
    /// An empty slot's state.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self(AtomicU32::new(EMPTY))
    }

    /// An empty slot's state.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self(AtomicU32::new(EMPTY))
    }
}

impl Default for DedupState {
    fn default() -> Self {
        Self::new()
    }
}

/// The insertion time of one slot's id, in milliseconds (wrapping). Kept in
/// a dense array of its own, so that an insert into a full table compares
/// the ages of the entries it may evict in one or two cache lines. Public so
/// callers can provide the buffers of a [`BufferDedupTable`].
pub struct DedupStamp(AtomicU32);

impl DedupStamp {
    /// An empty slot's stamp.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self(AtomicU32::new(0))
    }

    /// An empty slot's stamp.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self(AtomicU32::new(0))
    }
}

impl Default for DedupStamp {
    fn default() -> Self {
        Self::new()
    }
}

/// The data of one slot: id and offset. Public so callers can provide the
/// buffers of a [`BufferDedupTable`].
pub struct DedupSlot {
    id_lo: AtomicU32,
    id_hi: AtomicU32,
    off_lo: AtomicU32,
    off_hi: AtomicU32,
}

impl DedupSlot {
    /// An empty slot's data.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            id_lo: AtomicU32::new(0),
            id_hi: AtomicU32::new(0),
            off_lo: AtomicU32::new(0),
            off_hi: AtomicU32::new(0),
        }
    }

    /// An empty slot's data.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            id_lo: AtomicU32::new(0),
            id_hi: AtomicU32::new(0),
            off_lo: AtomicU32::new(0),
            off_hi: AtomicU32::new(0),
        }
    }
}

/// The slot an insert will claim: where, its state word as seen, its stamp
/// and data.
struct Target<'t> {
    at: usize,
    seen: u32,
    state: &'t AtomicU32,
    stamp: &'t AtomicU32,
    slot: &'t DedupSlot,
}

impl Target<'_> {
    /// Writes the id and its stamp (the claimant owns the slot).
    #[inline]
    fn write_id(&self, id: u64, now: u32) {
        self.slot.id_lo.store(id as u32, Relaxed);
        self.slot.id_hi.store((id >> 32) as u32, Relaxed);
        self.stamp.store(now, Relaxed);
    }
}

impl Default for DedupSlot {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Clone, Copy)]
struct Snapshot {
    state: u32,
    id: u64,
    stamp: u32,
    off: u64,
}

impl Snapshot {
    fn kind(&self) -> u32 {
        kind(self.state)
    }
    /// Present (live or stored) and not expired.
    fn holds(&self, id: u64, now: u32, window: u32) -> bool {
        matches!(self.kind(), LIVE | STORED)
            && self.id == id
            && now.wrapping_sub(self.stamp) < window
    }
    fn offset(&self) -> Option<u64> {
        (self.kind() == STORED).then_some(self.off)
    }
}

/// What to do when an insert finds no free slot near the id's home.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FullPolicy {
    /// Replace the oldest entry of the id's neighbourhood (its first
    /// [`EVICT_NEIGHBOURHOOD`] slots); the effective window shrinks
    /// (reported by [`DedupRef::effective_window_ms`]).
    Evict,
    /// Answer [`Insert::Full`]: the caller rejects the event (DEDUP_FULL).
    Reject,
}

/// Result of [`DedupRef::insert`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Insert {
    /// The id was not present inside the window; it is now.
    Inserted,
    /// The id is present: the original's log offset once it is stored,
    /// `None` while the original is still on its way to the log.
    Duplicate(Option<u64>),
    /// No free slot and the policy is [`FullPolicy::Reject`].
    Full,
}

/// Where an insert put an id: its distance from the id's home slot. Handed
/// to [`DedupRef::set_offset_hinted`] with the stored event, it goes
/// straight to the entry instead of searching the neighbourhood. Only a
/// hint: one that no longer points at the id costs the search it saves.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DedupHint(u8);

impl DedupHint {
    /// No hint: search.
    pub const NONE: DedupHint = DedupHint(u8::MAX);
}

/// Result of [`DedupRef::lookup`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Lookup {
    /// Not present inside the window.
    Absent,
    /// Present; the original's offset once stored.
    Present(Option<u64>),
}

/// Window and policy of a table.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct DedupConfig {
    /// Ids are remembered this long, in milliseconds (1 ..= 2^31 - 1).
    pub window_ms: u32,
    /// When no slot is free.
    pub when_full: FullPolicy,
}

impl DedupConfig {
    /// One hour, evicting when full (the server's defaults).
    pub const DEFAULT: DedupConfig = DedupConfig {
        window_ms: 3_600_000,
        when_full: FullPolicy::Evict,
    };

    fn window(&self) -> u32 {
        self.window_ms.clamp(1, i32::MAX as u32)
    }
}

/// Counters shared by every user of one table.
struct Header {
    /// An [`Inserter`] was handed out: only it inserts and reclaims.
    single: AtomicBool,
    evictions: AtomicU32,
    /// Age in ms of the youngest entry evicted since the last reset;
    /// `u32::MAX` when none.
    evicted_age: AtomicU32,
}

impl Header {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            single: AtomicBool::new(false),
            evictions: AtomicU32::new(0),
            evicted_age: AtomicU32::new(u32::MAX),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            single: AtomicBool::new(false),
            evictions: AtomicU32::new(0),
            evicted_age: AtomicU32::new(u32::MAX),
        }
    }
}

/// A table of `N` slots (a power of two) stored in the value; `new` is
/// `const`, so a table can be a `static`. All operations are on [`DedupRef`].
///
/// ```
/// use eventstream_core::dedup::{DedupConfig, DedupTable, Insert, Lookup};
///
/// static TABLE: DedupTable<1024> = DedupTable::new(DedupConfig::DEFAULT);
/// let t = TABLE.table();
/// let now_ms = 1_000;
/// assert_eq!(t.insert(42, now_ms), Insert::Inserted);
/// // Until the original is stored, a duplicate has no offset to answer.
/// assert_eq!(t.insert(42, now_ms), Insert::Duplicate(None));
/// assert!(t.set_offset(42, 7));
/// assert_eq!(t.lookup(42, now_ms), Lookup::Present(Some(7)));
/// // Past the window (one hour by default) the id is new again.
/// assert_eq!(t.lookup(42, now_ms + 3_600_000), Lookup::Absent);
/// ```
pub type DedupTable<const N: usize> = TableOver<InlineArrays<N>>;

/// A table over caller-provided buffers of states, stamps and slots (equal
/// lengths, a power of two).
pub type BufferDedupTable<'b> = TableOver<BorrowedArrays<'b>>;

/// Where a table's three arrays live: in the value ([`InlineArrays`]) or in
/// a caller's buffers ([`BorrowedArrays`]).
pub trait TableStorage {
    /// The states, stamps and slots (equal lengths, a power of two).
    fn arrays(&self) -> (&[DedupState], &[DedupStamp], &[DedupSlot]);
}

/// The arrays of a table of `N` slots, inline.
pub struct InlineArrays<const N: usize> {
    states: [DedupState; N],
    stamps: [DedupStamp; N],
    slots: [DedupSlot; N],
}

impl<const N: usize> TableStorage for InlineArrays<N> {
    fn arrays(&self) -> (&[DedupState], &[DedupStamp], &[DedupSlot]) {
        (&self.states, &self.stamps, &self.slots)
    }
}

/// The arrays of a table, in a caller's buffers.
pub struct BorrowedArrays<'b> {
    states: &'b [DedupState],
    stamps: &'b [DedupStamp],
    slots: &'b [DedupSlot],
}

impl TableStorage for BorrowedArrays<'_> {
    fn arrays(&self) -> (&[DedupState], &[DedupStamp], &[DedupSlot]) {
        (self.states, self.stamps, self.slots)
    }
}

/// A dedup table: its header and configuration over arrays stored in `S`
/// ([`DedupTable`], [`BufferDedupTable`]). All operations are on
/// [`DedupRef`], the same for both forms.
pub struct TableOver<S: TableStorage> {
    header: Header,
    arrays: S,
    config: DedupConfig,
}

impl<const N: usize> TableOver<InlineArrays<N>> {
    const CAPACITY_OK: () = assert!(
        N.is_power_of_two() && N <= 1 << 31,
        "dedup capacity must be a power of two up to 2^31"
    );

    /// An empty table.
    #[cfg(not(loom))]
    pub const fn new(config: DedupConfig) -> Self {
        let () = Self::CAPACITY_OK;
        Self {
            header: Header::new(),
            arrays: InlineArrays {
                states: [const { DedupState::new() }; N],
                stamps: [const { DedupStamp::new() }; N],
                slots: [const { DedupSlot::new() }; N],
            },
            config,
        }
    }

    /// An empty table.
    #[cfg(loom)]
    pub fn new(config: DedupConfig) -> Self {
        let () = Self::CAPACITY_OK;
        Self {
            header: Header::new(),
            arrays: InlineArrays {
                states: core::array::from_fn(|_| DedupState::new()),
                stamps: core::array::from_fn(|_| DedupStamp::new()),
                slots: core::array::from_fn(|_| DedupSlot::new()),
            },
            config,
        }
    }
}

/// Buffers whose lengths differ or are not a power of two up to 2^31.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BadCapacity;

impl<'b> TableOver<BorrowedArrays<'b>> {
    /// An empty table over `states`, `stamps` and `slots`; every slot is
    /// reset.
    pub fn new(
        states: &'b mut [DedupState],
        stamps: &'b mut [DedupStamp],
        slots: &'b mut [DedupSlot],
        config: DedupConfig,
    ) -> Result<Self, BadCapacity> {
        let n = slots.len();
        if states.len() != n || stamps.len() != n || !n.is_power_of_two() || n > 1 << 31 {
            return Err(BadCapacity);
        }
        states.iter_mut().for_each(|s| *s = DedupState::new());
        stamps.iter_mut().for_each(|s| *s = DedupStamp::new());
        slots.iter_mut().for_each(|s| *s = DedupSlot::new());
        Ok(Self {
            header: Header::new(),
            arrays: BorrowedArrays {
                states,
                stamps,
                slots,
            },
            config,
        })
    }
}

impl<S: TableStorage> TableOver<S> {
    /// The handle every operation goes through (`Copy`, shareable).
    pub fn table(&self) -> DedupRef<'_> {
        let (states, stamps, slots) = self.arrays.arrays();
        DedupRef {
            header: &self.header,
            states,
            stamps,
            slots,
            config: self.config,
        }
    }
}

/// Operations on a dedup table; safe to use from any number of threads at
/// once (inserters, readers, the sweeper, the storage thread).
#[derive(Clone, Copy)]
pub struct DedupRef<'t> {
    header: &'t Header,
    states: &'t [DedupState],
    stamps: &'t [DedupStamp],
    slots: &'t [DedupSlot],
    config: DedupConfig,
}

/// splitmix64's finaliser: producers choose ids freely (often sequential).
#[inline]
fn mix(id: u64) -> u64 {
    crate::splitmix::finalise(id)
}

/// Where an id's scans start and the tag that filters them.
#[derive(Clone, Copy)]
struct Probe {
    home: usize,
    tag: u32,
    len: usize,
    mask: usize,
}

impl Probe {
    #[inline]
    fn at(&self, i: usize) -> usize {
        (self.home + i) & self.mask
    }
}

/// Outcome of an insert's second scan.
enum Validation {
    /// No twin: the id is ours.
    Won,
    /// The id is present (or being inserted closer to home).
    Twin(Option<u64>),
    /// An empty slot in front of ours: withdraw and try again.
    Hole,
}

mod insert;
pub use insert::Inserter;
mod offset;
mod read;

#[cfg(all(test, not(loom)))]
mod tests;
