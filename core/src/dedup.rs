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
pub struct DedupTable<const N: usize> {
    header: Header,
    states: [DedupState; N],
    stamps: [DedupStamp; N],
    slots: [DedupSlot; N],
    config: DedupConfig,
}

impl<const N: usize> DedupTable<N> {
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
            states: [const { DedupState::new() }; N],
            stamps: [const { DedupStamp::new() }; N],
            slots: [const { DedupSlot::new() }; N],
            config,
        }
    }

    /// An empty table.
    #[cfg(loom)]
    pub fn new(config: DedupConfig) -> Self {
        let () = Self::CAPACITY_OK;
        Self {
            header: Header::new(),
            states: core::array::from_fn(|_| DedupState::new()),
            stamps: core::array::from_fn(|_| DedupStamp::new()),
            slots: core::array::from_fn(|_| DedupSlot::new()),
            config,
        }
    }

    /// The handle every operation goes through (`Copy`, shareable).
    pub fn table(&self) -> DedupRef<'_> {
        DedupRef {
            header: &self.header,
            states: &self.states,
            stamps: &self.stamps,
            slots: &self.slots,
            config: self.config,
        }
    }
}

/// A table over caller-provided buffers of states, stamps and slots (equal
/// lengths, a power of two).
pub struct BufferDedupTable<'b> {
    header: Header,
    states: &'b [DedupState],
    stamps: &'b [DedupStamp],
    slots: &'b [DedupSlot],
    config: DedupConfig,
}

/// Buffers whose lengths differ or are not a power of two up to 2^31.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BadCapacity;

impl<'b> BufferDedupTable<'b> {
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
            states,
            stamps,
            slots,
            config,
        })
    }

    /// The handle every operation goes through (`Copy`, shareable).
    pub fn table(&self) -> DedupRef<'_> {
        DedupRef {
            header: &self.header,
            states: self.states,
            stamps: self.stamps,
            slots: self.slots,
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

impl<'t> DedupRef<'t> {
    /// Number of slots.
    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    /// The configured window.
    pub fn window_ms(&self) -> u32 {
        self.config.window()
    }

    #[inline]
    fn probe(&self, id: u64) -> Probe {
        let h = mix(id);
        let mask = self.slots.len().wrapping_sub(1);
        Probe {
            home: h as usize & mask,
            tag: (h >> 48) as u32 & TAG_MASK,
            len: match self.config.when_full {
                FullPolicy::Evict => EVICT_NEIGHBOURHOOD,
                FullPolicy::Reject => NEIGHBOURHOOD,
            }
            .min(self.slots.len()),
            mask,
        }
    }

    /// Asks the CPU to start loading the state words of `id`'s neighbourhood
    /// and the slot where its search begins, so that a `lookup`, `insert`
    /// or `set_offset` of it a few events later finds them in cache (a
    /// large table misses the cache on nearly every operation). Only a
    /// hint: it changes nothing, and it does nothing on targets without a
    /// prefetch instruction.
    #[inline]
    pub fn prefetch(&self, id: u64) {
        self.prefetch_probe(&self.probe(id));
    }

    /// [`Self::prefetch`] of the neighbourhood `p`.
    #[inline]
    fn prefetch_probe(&self, p: &Probe) {
        // Every line of the neighbourhood's state words: a scan of a full
        // table reads them all, and one miss after another costs more
        // than asking for them together.
        let mut i = 0;
        while i < p.len {
            if let Some(state) = self.states.get(p.at(i)) {
                prefetch(state as *const DedupState, false);
            }
            i += STATES_PER_LINE;
        }
        if let Some(state) = self.states.get(p.at(p.len.saturating_sub(1))) {
            prefetch(state as *const DedupState, false);
        }
        if let Some(slot) = self.slots.get(p.home) {
            prefetch(slot as *const DedupSlot, false);
        }
    }

    /// [`Self::prefetch`] for an id about to be inserted: also the stamps an
    /// insert into a full table compares to choose the entry it evicts.
    #[inline]
    pub fn prefetch_insert(&self, id: u64) {
        let p = self.probe(id);
        self.prefetch_probe(&p);
        for i in [0, p.len.min(EVICT_SCAN).saturating_sub(1)] {
            if let Some(stamp) = self.stamps.get(p.at(i)) {
                prefetch(stamp as *const DedupStamp, false);
            }
        }
    }

    #[inline]
    fn state(&self, at: usize) -> Option<&'t AtomicU32> {
        self.states.get(at).map(|s| &s.0)
    }

    /// A consistent copy of slot `at` whose state was `s1` (loaded with
    /// Acquire), or `None` if it changed meanwhile.
    #[inline]
    fn read(&self, at: usize, s1: u32) -> Option<Snapshot> {
        let d = self.slots.get(at)?;
        let id = d.id_lo.load(Relaxed) as u64 | (d.id_hi.load(Relaxed) as u64) << 32;
        let stamp = self.stamps.get(at)?.0.load(Relaxed);
        let off = d.off_lo.load(Relaxed) as u64 | (d.off_hi.load(Relaxed) as u64) << 32;
        fence(Acquire);
        let s2 = self.state(at)?.load(Relaxed);
        (s1 == s2).then_some(Snapshot {
            state: s1,
            id,
            stamp,
            off,
        })
    }

    /// The snapshot of slot `at` whose state `s` was just loaded (Acquire):
    /// read directly when it is stable, else settled.
    #[inline]
    fn snapshot(&self, at: usize, s: u32) -> Snapshot {
        match kind(s) {
            CLAIMED | OFFSETTING => self.settled(at),
            _ => match self.read(at, s) {
                Some(snap) => snap,
                None => self.settled(at),
            },
        }
    }

    /// The settled snapshot of slot `at`: waits out a claim or offset write
    /// in progress (a few stores), retries torn reads.
    #[inline]
    fn settled(&self, at: usize) -> Snapshot {
        loop {
            let s = self.state(at).map_or(EMPTY, |a| a.load(Acquire));
            match kind(s) {
                CLAIMED | OFFSETTING => {}
                EMPTY | FREE => {
                    return Snapshot {
                        state: s,
                        id: 0,
                        stamp: 0,
                        off: 0,
                    }
                }
                _ => {
                    if let Some(snap) = self.read(at, s) {
                        return snap;
                    }
                }
            }
            spin_wait();
        }
    }

    /// The settled state of slot `at` and, for an entry, its stamp: like
    /// [`Self::settled`], without reading the id and offset words (an
    /// evicting insert compares only ages).
    #[inline]
    fn settled_stamp(&self, at: usize) -> (u32, Option<u32>) {
        let (Some(state), Some(stamp)) = (self.state(at), self.stamps.get(at)) else {
            return (EMPTY, None);
        };
        loop {
            let s = state.load(Acquire);
            match kind(s) {
                CLAIMED | OFFSETTING => {}
                EMPTY | FREE => return (s, None),
                _ => {
                    let t = stamp.0.load(Relaxed);
                    fence(Acquire);
                    if state.load(Relaxed) == s {
                        return (s, Some(t));
                    }
                }
            }
            spin_wait();
        }
    }

    /// Is `id` present inside the window at `now_ms`? Never writes.
    #[inline]
    pub fn lookup(&self, id: u64, now_ms: u64) -> Lookup {
        let now = now_ms as u32;
        let window = self.config.window();
        let p = self.probe(id);
        for i in 0..p.len {
            let at = p.at(i);
            let s = self.state(at).map_or(EMPTY, |a| a.load(Acquire));
            match kind(s) {
                EMPTY => break,
                FREE => continue,
                _ if tag_of(s) != p.tag => continue,
                _ => {}
            }
            let snap = self.snapshot(at, s);
            match snap.kind() {
                EMPTY => break,
                PENDING if snap.id == id => return Lookup::Present(None),
                _ if snap.holds(id, now, window) => return Lookup::Present(snap.offset()),
                _ => {}
            }
        }
        Lookup::Absent
    }

    /// `lookup(..) != Absent`.
    pub fn contains(&self, id: u64, now_ms: u64) -> bool {
        self.lookup(id, now_ms) != Lookup::Absent
    }

    /// The first scan of an insert: the answer if the id is present, else
    /// the slot to claim, or `Full`.
    fn prescan(&self, p: &Probe, id: u64, now: u32, window: u32) -> Result<Target<'t>, Insert> {
        let mut target: Option<(usize, u32)> = None;
        for i in 0..p.len {
            let at = p.at(i);
            let s = self.state(at).map_or(EMPTY, |a| a.load(Acquire));
            match kind(s) {
                EMPTY => {
                    target.get_or_insert((at, s));
                    break;
                }
                FREE => {
                    target.get_or_insert((at, s));
                    continue;
                }
                _ if tag_of(s) != p.tag => continue,
                _ => {}
            }
            let snap = self.snapshot(at, s);
            match snap.kind() {
                EMPTY | FREE => {
                    target.get_or_insert((at, snap.state));
                }
                PENDING if snap.id == id => return Err(Insert::Duplicate(None)),
                LIVE | STORED if snap.id == id => {
                    if snap.holds(id, now, window) {
                        return Err(Insert::Duplicate(snap.offset()));
                    }
                    // Reuse the id's own expired slot, so that an id never
                    // has two copies for set_offset and remove to confuse.
                    target = Some((at, snap.state));
                }
                _ => {}
            }
        }
        let (at, seen) = match target {
            Some(t) => t,
            None => self.expired_or_oldest(p, now, window).ok_or(Insert::Full)?,
        };
        match (self.state(at), self.stamps.get(at), self.slots.get(at)) {
            (Some(state), Some(stamp), Some(slot)) => Ok(Target {
                at,
                seen,
                state,
                stamp: &stamp.0,
                slot,
            }),
            _ => Err(Insert::Full),
        }
    }

    /// Inserts `id` at time `now_ms` unless present inside the window; any
    /// number of threads may insert at once. Once an [`Inserter`] exists it
    /// is the only one that inserts, and this answers `Full`.
    pub fn insert(&self, id: u64, now_ms: u64) -> Insert {
        if self.header.single.load(Relaxed) {
            return Insert::Full;
        }
        let now = now_ms as u32;
        let window = self.config.window();
        let p = self.probe(id);
        'retry: loop {
            // 1. Is the id here already? Where could it go?
            let target = match self.prescan(&p, id, now, window) {
                Ok(t) => t,
                Err(answer) => return answer,
            };
            let (at, seen, state) = (target.at, target.seen, target.state);
            // 2. Claim it, write the id, publish PENDING.
            let claimed = claim_word(seen, p.tag);
            if state
                .compare_exchange(seen, claimed, SeqCst, Relaxed)
                .is_err()
            {
                continue 'retry;
            }
            // The claim is what makes us visible to a twin's second scan and
            // to the sweeper; the SeqCst fence orders it before our own second
            // scan (Dekker: of two claimants, one always sees the other). The
            // id follows with plain stores, published by a Release store; a
            // twin that meets our CLAIMED slot waits for those few stores, and
            // we never wait before publishing, so no two inserters wait on
            // each other here.
            fence(SeqCst);
            target.write_id(id, now);
            state.store(with_kind(claimed, PENDING), Release);
            // 3. Scan again: a twin, or a hole in front of us?
            match self.validate(&p, at, id, now, window) {
                Validation::Won => {
                    state.store(with_kind(claimed, LIVE), Release);
                    return Insert::Inserted;
                }
                Validation::Twin(offset) => {
                    state.store(with_kind(claimed, FREE), Release);
                    return Insert::Duplicate(offset);
                }
                Validation::Hole => {
                    state.store(with_kind(claimed, FREE), Release);
                    continue 'retry;
                }
            }
        }
    }

    /// The second scan of an insert whose id is PENDING at slot `mine`.
    fn validate(&self, p: &Probe, mine: usize, id: u64, now: u32, window: u32) -> Validation {
        let mut before_mine = true;
        for i in 0..p.len {
            let at = p.at(i);
            if at == mine {
                before_mine = false;
                continue;
            }
            let s = self.state(at).map_or(EMPTY, |a| a.load(SeqCst));
            match kind(s) {
                // The sweeper reclaimed a slot in front of us: a lookup
                // would stop there. Move.
                EMPTY if before_mine => return Validation::Hole,
                EMPTY => break,
                FREE => continue,
                _ if tag_of(s) != p.tag => continue,
                _ => {}
            }
            loop {
                let snap = self.settled(at);
                match snap.kind() {
                    EMPTY if before_mine => return Validation::Hole,
                    EMPTY => return Validation::Won,
                    PENDING if snap.id == id => {
                        if before_mine {
                            // A twin closer to home: it wins (or a live copy
                            // it finds does).
                            return Validation::Twin(None);
                        }
                        // A twin farther away: it will see us and withdraw,
                        // or win first. Wait for it to settle.
                        spin_wait();
                        continue;
                    }
                    _ if snap.holds(id, now, window) => return Validation::Twin(snap.offset()),
                    _ => break,
                }
            }
        }
        Validation::Won
    }

    /// With no free slot near the home: an expired entry, else (evict
    /// policy) the oldest entry, else `None`. Evict looks at the first
    /// `EVICT_SCAN` slots, its whole neighbourhood. Reject looks at all of
    /// its larger one, so it never answers full while an expired entry is
    /// there.
    fn expired_or_oldest(&self, p: &Probe, now: u32, window: u32) -> Option<(usize, u32)> {
        let mut oldest: Option<(usize, u32, u32)> = None;
        let scan = match self.config.when_full {
            FullPolicy::Evict => p.len.min(EVICT_SCAN),
            FullPolicy::Reject => p.len,
        };
        for i in 0..scan {
            let at = p.at(i);
            let (state, stamp) = self.settled_stamp(at);
            match (kind(state), stamp) {
                (EMPTY | FREE, _) => return Some((at, state)),
                (LIVE | STORED, Some(stamp)) => {
                    let age = now.wrapping_sub(stamp);
                    if age >= window {
                        return Some((at, state));
                    }
                    if oldest.is_none_or(|(_, _, a)| age > a) {
                        oldest = Some((at, state, age));
                    }
                }
                _ => {}
            }
        }
        match (oldest, self.config.when_full) {
            (Some((at, state, age)), FullPolicy::Evict) => {
                self.header.evictions.fetch_add(1, Relaxed);
                self.header.evicted_age.fetch_min(age, Relaxed);
                Some((at, state))
            }
            _ => None,
        }
    }

    /// Finds the present slot of `id` (live or stored, expired or not).
    fn find(&self, id: u64) -> Option<(usize, u32)> {
        let p = self.probe(id);
        for i in 0..p.len {
            let at = p.at(i);
            let s = self.state(at).map_or(EMPTY, |a| a.load(Acquire));
            match kind(s) {
                EMPTY => return None,
                FREE => continue,
                _ if tag_of(s) != p.tag => continue,
                _ => {}
            }
            let snap = self.settled(at);
            match snap.kind() {
                EMPTY => return None,
                LIVE | STORED if snap.id == id => return Some((at, snap.state)),
                _ => {}
            }
        }
        None
    }

    /// The slot `hint` points at in the neighbourhood `p`, if it is one.
    #[inline]
    fn hinted(p: &Probe, hint: DedupHint) -> Option<usize> {
        let distance = usize::from(hint.0);
        (distance < p.len).then(|| p.at(distance))
    }

    /// The slot `hint` points at, if it holds `id` (live or stored).
    fn at_hint(&self, id: u64, hint: DedupHint) -> Option<(usize, u32)> {
        let p = self.probe(id);
        let at = Self::hinted(&p, hint)?;
        let s = self.state(at)?.load(Acquire);
        if !matches!(kind(s), LIVE | STORED) || tag_of(s) != p.tag {
            return None;
        }
        // An id has at most one copy in the table (an insert reuses its
        // expired one), so this is the slot `find` would return. Only the
        // id words are read (a seqlock read, as in `read`): the stamp's
        // line is not needed, and a miss.
        let d = self.slots.get(at)?;
        let found = d.id_lo.load(Relaxed) as u64 | (d.id_hi.load(Relaxed) as u64) << 32;
        fence(Acquire);
        (found == id && self.state(at)?.load(Relaxed) == s).then_some((at, s))
    }

    /// [`Self::prefetch`] for a `set_offset_hinted` of `id` a few events
    /// later: with a hint, only the state word and data of that slot.
    #[inline]
    pub fn prefetch_hinted(&self, id: u64, hint: DedupHint) {
        let p = self.probe(id);
        let Some(at) = Self::hinted(&p, hint) else {
            self.prefetch_probe(&p);
            return;
        };
        if let (Some(state), Some(slot)) = (self.states.get(at), self.slots.get(at)) {
            prefetch(state as *const DedupState, false);
            prefetch(slot as *const DedupSlot, false);
        }
    }

    /// Records the log offset of the stored original of `id`, so duplicates
    /// can report it. Returns false if the id is not in the table.
    pub fn set_offset(&self, id: u64, offset: u64) -> bool {
        self.set_offset_hinted(id, offset, DedupHint::NONE)
    }

    /// [`Self::set_offset`], looking first where `hint` (from
    /// [`Inserter::insert_hinted`]) says the id went.
    pub fn set_offset_hinted(&self, id: u64, offset: u64, hint: DedupHint) -> bool {
        let mut hinted = self.at_hint(id, hint);
        loop {
            let Some((at, seen)) = hinted.take().or_else(|| self.find(id)) else {
                return false;
            };
            if kind(seen) == STORED {
                return true;
            }
            let (Some(state), Some(slot)) = (self.state(at), self.slots.get(at)) else {
                return false;
            };
            // Own the slot while writing the words, so no reuse of it can
            // interleave with them.
            if state
                .compare_exchange(seen, with_kind(seen, OFFSETTING), SeqCst, Relaxed)
                .is_err()
            {
                continue;
            }
            fence(Release);
            slot.off_lo.store(offset as u32, Relaxed);
            slot.off_hi.store((offset >> 32) as u32, Relaxed);
            // Release: a reader that sees STORED sees the offset words. A
            // CAS, because a single inserter may have reused the slot
            // meanwhile (only an expired or evicted one).
            return state
                .compare_exchange(
                    with_kind(seen, OFFSETTING),
                    with_kind(seen, STORED),
                    Release,
                    Relaxed,
                )
                .is_ok();
        }
    }

    /// Removes `id` (to undo an insert whose write failed, so that a retry
    /// is accepted). Returns false if it was not there.
    pub fn remove(&self, id: u64) -> bool {
        loop {
            let Some((at, seen)) = self.find(id) else {
                return false;
            };
            let Some(state) = self.state(at) else {
                return false;
            };
            if state
                .compare_exchange(seen, with_kind(seen, FREE), SeqCst, Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Frees every entry older than the window at `now_ms` and turns freed
    /// slots at the end of a chain back into empty ones (so scans stay
    /// short); returns how many entries it freed. Walks the table once,
    /// backwards. Run it more often than every 2^31 ms (24 days): stamps wrap.
    /// While an [`Inserter`] exists this only frees; its own `sweep` also
    /// reclaims.
    pub fn sweep(&self, now_ms: u64) -> usize {
        self.sweep_with(now_ms, false)
    }

    /// `sweep`; `reclaim` also turns tombstones back into empty slots while
    /// an [`Inserter`] exists (only that inserter may ask for it).
    fn sweep_with(&self, now_ms: u64, reclaim: bool) -> usize {
        self.sweep_range(now_ms, reclaim, 0, self.states.len())
    }

    /// The sweep over slots `lo..hi`, backwards.
    fn sweep_range(&self, now_ms: u64, reclaim: bool, lo: usize, hi: usize) -> usize {
        let now = now_ms as u32;
        let window = self.config.window();
        let mut freed = 0;
        for at in (lo..hi.min(self.states.len())).rev() {
            let Some(state) = self.state(at) else { break };
            let mut s = state.load(Acquire);
            if matches!(kind(s), LIVE | STORED) {
                let Some(snap) = self.read(at, s) else {
                    continue;
                };
                if now.wrapping_sub(snap.stamp) < window {
                    continue;
                }
                if state
                    .compare_exchange(s, with_kind(s, FREE), SeqCst, Relaxed)
                    .is_err()
                {
                    continue;
                }
                freed += 1;
                s = with_kind(s, FREE);
            }
            if kind(s) == FREE && (reclaim || !self.header.single.load(Relaxed)) {
                self.reclaim(at, s);
            }
        }
        freed
    }

    /// Turns the freed slot `at` (state `s`) back into an empty one if the
    /// slot after it is empty; undoes it if that slot got claimed meanwhile.
    fn reclaim(&self, at: usize, s: u32) {
        let next = (at + 1) & self.slots.len().wrapping_sub(1);
        let (Some(state), Some(after)) = (self.state(at), self.state(next)) else {
            return;
        };
        if next == at || kind(after.load(SeqCst)) != EMPTY {
            return;
        }
        let empty = with_kind(s, EMPTY);
        if state.compare_exchange(s, empty, SeqCst, Relaxed).is_err() {
            return;
        }
        // Dekker with an inserter claiming the next slot (see `insert`).
        fence(SeqCst);
        if kind(after.load(SeqCst)) != EMPTY {
            // An inserter claimed the next slot after passing this one:
            // put the tombstone back (it withdraws and retries anyway).
            let _ = state.compare_exchange(empty, with_kind(s, FREE), SeqCst, Relaxed);
        }
    }

    /// Entries present (live or stored), expired ones included until swept.
    /// Walks the whole table.
    pub fn occupied(&self) -> usize {
        self.states
            .iter()
            .filter(|s| matches!(kind(s.0.load(Relaxed)), LIVE | STORED))
            .count()
    }

    /// Entries evicted to make room, since the table was made.
    pub fn evictions(&self) -> u32 {
        self.header.evictions.load(Relaxed)
    }

    /// The window the table really offers: the configured one, or, when
    /// entries were evicted since the last call, the age of the youngest of
    /// them (an id older than that may have been forgotten). Resets the
    /// eviction record.
    pub fn effective_window_ms(&self) -> u32 {
        let youngest = self.header.evicted_age.swap(u32::MAX, Relaxed);
        youngest.min(self.config.window())
    }
}

impl<'t> DedupRef<'t> {
    /// The table's single inserter, for the common case of one inserting
    /// thread (the transactional processor): its inserts claim without a
    /// CAS and skip the twin scan, about half the cost of [`insert`].
    /// One per table (`None` after the first call); from then on
    /// [`DedupRef::insert`] answers `Full` and only the inserter reclaims
    /// tombstones. Lookups, `set_offset`, `remove` and `sweep` stay open to
    /// every thread. Take it before any other thread starts inserting.
    ///
    /// [`insert`]: DedupRef::insert
    pub fn inserter(&self) -> Option<Inserter<'t>> {
        if self.header.single.swap(true, Acquire) {
            return None;
        }
        Some(Inserter {
            table: *self,
            _not_sync: core::marker::PhantomData,
        })
    }
}

/// The only inserter of a table (see [`DedupRef::inserter`]). Not `Clone`,
/// not `Sync`.
pub struct Inserter<'t> {
    table: DedupRef<'t>,
    _not_sync: core::marker::PhantomData<core::cell::Cell<()>>,
}

impl<'t> Inserter<'t> {
    /// The shared handle of the same table.
    pub fn table(&self) -> DedupRef<'t> {
        self.table
    }

    /// Inserts `id` at time `now_ms` unless present inside the window.
    ///
    /// No other thread claims slots or turns tombstones into empty slots, so
    /// the claim needs no CAS (others only ever CAS a slot from live to free
    /// or to offsetting, which a claim of an expired slot overrides and
    /// which then fails), and there is no twin to look for.
    pub fn insert(&mut self, id: u64, now_ms: u64) -> Insert {
        self.insert_hinted(id, now_ms).0
    }

    /// [`Self::insert`], also saying where the id went (for
    /// [`DedupRef::set_offset_hinted`]); [`DedupHint::NONE`] unless inserted.
    pub fn insert_hinted(&mut self, id: u64, now_ms: u64) -> (Insert, DedupHint) {
        let t = &self.table;
        let now = now_ms as u32;
        let window = t.config.window();
        let p = t.probe(id);
        let target = match t.prescan(&p, id, now, window) {
            Ok(target) => target,
            Err(answer) => return (answer, DedupHint::NONE),
        };
        // Below NEIGHBOURHOOD (64), so it fits.
        let hint = DedupHint((target.at.wrapping_sub(p.home) & p.mask) as u8);
        let (seen, state) = (target.seen, target.state);
        let claimed = claim_word(seen, p.tag);
        // Seqlock write: readers that see any new word see CLAIMED first.
        // A swap, though a store would do: a concurrent set_offset, remove
        // or sweep may CAS this word (its previous value does not matter),
        // and loom keeps a plain store out of the middle of a CAS only when
        // both are read-modify-writes (tokio-rs/loom#254), which the model
        // of that race needs. One locked instruction per insert.
        state.swap(claimed, Relaxed);
        fence(Release);
        target.write_id(id, now);
        state.store(with_kind(claimed, LIVE), Release);
        (Insert::Inserted, hint)
    }

    /// [`DedupRef::sweep`], also turning tombstones at chain ends back into
    /// empty slots (only the inserter may, in single-inserter mode).
    pub fn sweep(&mut self, now_ms: u64) -> usize {
        self.table.sweep_with(now_ms, true)
    }

    /// One slice of that sweep: at most `max_slots` slots below `*cursor`,
    /// backwards, as one `sweep` would visit them. Start a pass with
    /// `*cursor = 0`; each call moves the cursor down, and the pass is over
    /// when the call returns with `*cursor == 0` again. Returns how many
    /// entries it freed. Slices between inserts behave as one `sweep` whose
    /// slots were visited at those times; a caller that must not pause for
    /// a whole table spreads the walk this way.
    pub fn sweep_slice(&mut self, now_ms: u64, cursor: &mut usize, max_slots: usize) -> usize {
        let n = self.table.states.len();
        let hi = if *cursor == 0 || *cursor > n {
            n
        } else {
            *cursor
        };
        let lo = hi.saturating_sub(max_slots.max(1));
        *cursor = lo;
        self.table.sweep_range(now_ms, true, lo, hi)
    }
}

#[cfg(all(test, not(loom)))]
mod tests {
    use super::*;

    const CFG: DedupConfig = DedupConfig {
        window_ms: 1000,
        when_full: FullPolicy::Reject,
    };

    #[test]
    fn insert_then_duplicate_then_offset() {
        let t: DedupTable<64> = DedupTable::new(CFG);
        let d = t.table();
        assert_eq!(d.insert(7, 0), Insert::Inserted);
        assert_eq!(d.insert(7, 10), Insert::Duplicate(None));
        assert_eq!(d.lookup(7, 10), Lookup::Present(None));
        assert!(d.set_offset(7, 1234));
        assert_eq!(d.insert(7, 20), Insert::Duplicate(Some(1234)));
        assert_eq!(d.lookup(7, 20), Lookup::Present(Some(1234)));
        assert_eq!(d.lookup(8, 20), Lookup::Absent);
    }

    #[test]
    fn a_sweep_in_slices_frees_what_one_sweep_frees() {
        let (a, b): (DedupTable<256>, DedupTable<256>) =
            (DedupTable::new(CFG), DedupTable::new(CFG));
        let (mut ia, mut ib) = (a.table().inserter().unwrap(), b.table().inserter().unwrap());
        for id in 0..200u64 {
            let at = if id % 3 == 0 { 0 } else { 900 };
            assert_eq!(ia.insert(id * 7919, at), Insert::Inserted);
            assert_eq!(ib.insert(id * 7919, at), Insert::Inserted);
        }
        let whole = ia.sweep(1500);
        let mut cursor = 0;
        let mut sliced = ib.sweep_slice(1500, &mut cursor, 37);
        let mut calls = 1;
        while cursor != 0 {
            sliced += ib.sweep_slice(1500, &mut cursor, 37);
            calls += 1;
        }
        assert_eq!(whole, 67);
        assert_eq!(sliced, whole);
        assert_eq!(calls, 256usize.div_ceil(37));
        for id in 0..200u64 {
            assert_eq!(
                a.table().lookup(id * 7919, 1500),
                b.table().lookup(id * 7919, 1500)
            );
        }
    }

    #[test]
    fn expiry_and_sweep() {
        let t: DedupTable<64> = DedupTable::new(CFG);
        let d = t.table();
        assert_eq!(d.insert(1, 0), Insert::Inserted);
        assert_eq!(d.insert(2, 500), Insert::Inserted);
        assert!(d.contains(1, 999));
        assert!(!d.contains(1, 1000));
        assert_eq!(d.insert(1, 1000), Insert::Inserted);
        assert_eq!(d.sweep(1500), 1); // id 2 expired; id 1 re-inserted at 1000
        assert_eq!(d.occupied(), 1);
    }

    #[test]
    fn remove_undoes_an_insert() {
        let t: DedupTable<64> = DedupTable::new(CFG);
        let d = t.table();
        assert_eq!(d.insert(5, 0), Insert::Inserted);
        assert!(d.remove(5));
        assert!(!d.remove(5));
        assert_eq!(d.insert(5, 1), Insert::Inserted);
    }

    #[test]
    fn reject_when_full_and_evict_when_asked() {
        let t: DedupTable<4> = DedupTable::new(CFG);
        let d = t.table();
        for id in 0..4 {
            assert_eq!(d.insert(id, id), Insert::Inserted);
        }
        assert_eq!(d.insert(99, 10), Insert::Full);
        let e: DedupTable<4> = DedupTable::new(DedupConfig {
            when_full: FullPolicy::Evict,
            ..CFG
        });
        let d = e.table();
        for id in 0..4 {
            assert_eq!(d.insert(id, id * 100), Insert::Inserted);
        }
        assert_eq!(d.insert(99, 350), Insert::Inserted);
        assert!(!d.contains(0, 350), "the oldest entry was evicted");
        assert_eq!(d.evictions(), 1);
        assert_eq!(d.effective_window_ms(), 350);
        assert_eq!(d.effective_window_ms(), 1000);
    }

    /// An id whose first `EVICT_SCAN` probe slots do not hold `away`.
    fn id_not_meeting(d: &DedupRef<'_>, away: u64) -> u64 {
        let (slot, _) = d.find(away).unwrap();
        (1000..)
            .find(|&x| {
                let p = d.probe(x);
                (0..EVICT_SCAN).all(|i| p.at(i) != slot)
            })
            .unwrap()
    }

    #[test]
    fn evict_takes_the_oldest_of_the_first_slots_and_reject_still_finds_expired() {
        // 64 slots; under evict an id's neighbourhood is its first
        // EVICT_SCAN slots. 1,000 inserts leave every slot taken.
        let e: DedupTable<64> = DedupTable::new(DedupConfig {
            when_full: FullPolicy::Evict,
            window_ms: 10_000,
        });
        let d = e.table();
        for id in 0..1000 {
            assert_eq!(d.insert(id, id), Insert::Inserted);
        }
        assert_eq!(d.occupied(), 64);
        let before = d.evictions();
        let id_at = |at: usize| d.read(at, d.states[at].0.load(Acquire)).map(|s| s.id);
        let stamp_at = |at: usize| d.stamps[at].0.load(Relaxed);
        let x = 5000;
        let p = d.probe(x);
        let met: std::vec::Vec<usize> = (0..EVICT_SCAN).map(|i| p.at(i)).collect();
        let oldest_met = *met.iter().min_by_key(|&&at| stamp_at(at)).unwrap();
        let evicted = id_at(oldest_met).unwrap();
        let oldest_overall = (0..64).min_by_key(|&at| stamp_at(at)).unwrap();
        let kept = (!met.contains(&oldest_overall)).then(|| id_at(oldest_overall).unwrap());
        assert_eq!(d.insert(x, 2000), Insert::Inserted);
        assert_eq!(id_at(oldest_met), Some(x), "x took the oldest slot it met");
        assert!(!d.contains(evicted, 2000), "the oldest met was evicted");
        if let Some(k) = kept {
            assert!(d.contains(k, 2000), "the oldest overall was not met");
        }
        assert_eq!(d.evictions(), before + 1);

        // Reject: one expired entry, outside those first slots.
        let r: DedupTable<64> = DedupTable::new(CFG);
        let d = r.table();
        assert_eq!(d.insert(0, 0), Insert::Inserted);
        for id in 1..64 {
            assert_eq!(d.insert(id, 900), Insert::Inserted);
        }
        let x = id_not_meeting(&d, 0);
        assert_eq!(d.insert(x, 1000), Insert::Inserted);
        assert!(!d.contains(0, 1000));
        assert_eq!(d.insert(x + 1, 1000), Insert::Full);
    }

    #[test]
    #[cfg_attr(
        miri,
        ignore = "12,288 inserts: slow under miri, and no unsafe code in them"
    )]
    fn a_full_evicting_table_forgets_old_entries_first() {
        // Ids one per millisecond: after two capacities' worth the table is
        // full and evicts on every insert; during the third, what it
        // evicts is old, and the newest entries are all there.
        const N: u64 = 4096;
        let t: std::boxed::Box<DedupTable<4096>> =
            std::boxed::Box::new(DedupTable::new(DedupConfig {
                when_full: FullPolicy::Evict,
                window_ms: 1 << 30,
            }));
        let d = t.table();
        let mut ins = d.inserter().unwrap();
        for id in 0..2 * N {
            assert_eq!(ins.insert(id, id), Insert::Inserted);
        }
        assert_eq!(d.occupied() as u64, N);
        let _ = d.effective_window_ms();
        for id in 2 * N..3 * N {
            assert_eq!(ins.insert(id, id), Insert::Inserted);
        }
        // A simulation of this policy (16,384 slots, five seeds) put the
        // youngest entry evicted at 0.41 capacity old, the newest 0.57
        // capacity all present; this table: 0.44 and 0.52.
        let youngest_evicted = u64::from(d.effective_window_ms());
        assert!(
            youngest_evicted >= N / 4,
            "evicted an entry {youngest_evicted} ms old"
        );
        let now = 3 * N;
        let kept = (0..3 * N)
            .rev()
            .take_while(|&id| d.contains(id, now))
            .count() as u64;
        assert!(kept >= N / 3, "only the newest {kept} of {N} all present");
    }

    #[test]
    fn buffer_table_works_like_the_static_one() {
        let mut states: std::vec::Vec<DedupState> = (0..8).map(|_| DedupState::new()).collect();
        let mut stamps: std::vec::Vec<DedupStamp> = (0..8).map(|_| DedupStamp::new()).collect();
        let mut slots: std::vec::Vec<DedupSlot> = (0..8).map(|_| DedupSlot::new()).collect();
        let t = BufferDedupTable::new(&mut states, &mut stamps, &mut slots, CFG).unwrap();
        let d = t.table();
        assert_eq!(d.insert(u64::MAX, 0), Insert::Inserted);
        assert!(d.contains(u64::MAX, 1));
        let mut bad_states: std::vec::Vec<DedupState> = (0..6).map(|_| DedupState::new()).collect();
        let mut bad_stamps: std::vec::Vec<DedupStamp> = (0..6).map(|_| DedupStamp::new()).collect();
        let mut bad: std::vec::Vec<DedupSlot> = (0..6).map(|_| DedupSlot::new()).collect();
        assert!(BufferDedupTable::new(&mut bad_states, &mut bad_stamps, &mut bad, CFG).is_err());
        // Lengths that differ.
        let mut short_stamps: std::vec::Vec<DedupStamp> =
            (0..4).map(|_| DedupStamp::new()).collect();
        assert!(BufferDedupTable::new(&mut states, &mut short_stamps, &mut slots, CFG).is_err());
    }

    #[test]
    fn a_hint_leads_set_offset_to_the_entry_and_a_wrong_one_costs_only_a_search() {
        // 8 slots: every neighbourhood is the whole table, so ids collide.
        let t: DedupTable<8> = DedupTable::new(CFG);
        let d = t.table();
        let mut ins = d.inserter().unwrap();
        let mut hints = [DedupHint::NONE; 8];
        for (id, hint) in hints.iter_mut().enumerate() {
            let (answer, h) = ins.insert_hinted(id as u64, 1);
            assert_eq!(answer, Insert::Inserted);
            assert_ne!(h, DedupHint::NONE);
            assert_eq!(
                d.at_hint(id as u64, h).map(|(at, _)| at),
                d.find(id as u64).map(|(at, _)| at)
            );
            *hint = h;
        }
        assert_eq!(
            ins.insert_hinted(3, 2),
            (Insert::Duplicate(None), DedupHint::NONE)
        );
        // Its own hint.
        assert!(d.set_offset_hinted(0, 100, hints[0]));
        assert_eq!(d.lookup(0, 2), Lookup::Present(Some(100)));
        // Another id's hint, no hint, a hint past the neighbourhood.
        assert!(d.set_offset_hinted(1, 101, hints[2]));
        assert!(d.set_offset_hinted(2, 102, DedupHint::NONE));
        assert!(d.set_offset_hinted(3, 103, DedupHint(200)));
        for id in 1..4 {
            assert_eq!(d.lookup(id, 2), Lookup::Present(Some(100 + id)));
        }
        // An id no longer there: its old hint finds nothing.
        assert!(d.remove(4));
        assert!(!d.set_offset_hinted(4, 104, hints[4]));
        assert!(!d.set_offset_hinted(99, 199, hints[5]));
    }

    #[test]
    fn the_single_inserter_takes_over_inserting() {
        let t: DedupTable<64> = DedupTable::new(CFG);
        let d = t.table();
        assert_eq!(d.insert(1, 0), Insert::Inserted);
        let mut ins = d.inserter().unwrap();
        assert!(d.inserter().is_none());
        assert_eq!(
            d.insert(2, 0),
            Insert::Full,
            "only the inserter inserts now"
        );
        assert_eq!(ins.insert(1, 5), Insert::Duplicate(None));
        assert_eq!(ins.insert(2, 5), Insert::Inserted);
        assert!(d.set_offset(2, 22));
        assert_eq!(ins.insert(2, 6), Insert::Duplicate(Some(22)));
        assert!(d.remove(2));
        assert_eq!(ins.insert(2, 7), Insert::Inserted);
        assert_eq!(d.sweep(2000), 2);
        assert_eq!(ins.sweep(2000), 0);
        assert_eq!(d.occupied(), 0);
        assert_eq!(ins.insert(1, 2000), Insert::Inserted);
        assert!(d.contains(1, 2001));
    }

    #[test]
    fn concurrent_inserters_of_the_same_ids_insert_each_once() {
        let t: DedupTable<1024> = DedupTable::new(DedupConfig {
            window_ms: 1 << 30,
            when_full: FullPolicy::Reject,
        });
        let d = t.table();
        let n = if cfg!(miri) { 40 } else { 400 };
        let wins: [std::sync::atomic::AtomicUsize; 2] = Default::default();
        std::thread::scope(|s| {
            for w in &wins {
                s.spawn(move || {
                    for id in 0..n {
                        match d.insert(id, 0) {
                            Insert::Inserted => {
                                w.fetch_add(1, Relaxed);
                            }
                            Insert::Duplicate(_) => {}
                            Insert::Full => panic!("table full"),
                        }
                    }
                });
            }
        });
        let total: usize = wins.iter().map(|w| w.load(Relaxed)).sum();
        assert_eq!(total as u64, n);
        assert_eq!(d.occupied() as u64, n);
    }
}
