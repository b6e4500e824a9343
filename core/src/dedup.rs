//! Fixed-capacity lock-free table of recently seen event ids, with expiry by
//! time window; the engine's exactly-once memory.
//!
//! Costs: no allocation, no locks; 24 bytes per slot in six 32-bit atomics.
//! Lookups never write. An insert scans at most [`NEIGHBOURHOOD`] slots from
//! the id's home slot, claims one with a CAS (retrying until it either
//! inserts or finds the id: it never gives up), and scans them once more.
//!
//! Slot-state protocol: the `state` word holds a kind and a version. A writer
//! claims a slot (CAS to `CLAIMED`, new version), writes the id words, then
//! publishes `PENDING`; readers take a snapshot only if the state word is the
//! same before and after reading the data words (a seqlock), so a
//! half-written id is never trusted. Two inserters of one id that claim
//! different slots settle it with tickets from a shared counter: after
//! publishing, each scans again and withdraws if it sees the id live, or
//! pending with a lower ticket. Exactly one wins; the others report
//! `Duplicate`. The only wait is on a slot between its claim and its
//! `PENDING` store (a few plain stores, never a wait on another slot).

use core::sync::atomic::Ordering::{Acquire, Relaxed, Release, SeqCst};

use crate::sync::{fence, spin_wait, AtomicU32};

/// Slots an insert or lookup examines from an id's home slot.
pub const NEIGHBOURHOOD: usize = 32;

const KIND_BITS: u32 = 3;
const KIND_MASK: u32 = (1 << KIND_BITS) - 1;
/// Never used: ends every scan (no id lies past it).
const EMPTY: u32 = 0;
/// Claimed by an inserter that is writing the id.
const CLAIMED: u32 = 1;
/// Id written, the inserter is checking for a concurrent twin; the offset
/// words hold its ticket.
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

const fn with_kind(state: u32, k: u32) -> u32 {
    (state & !KIND_MASK) | k
}

/// A new version of the slot, for a claim.
const fn next_version(state: u32, k: u32) -> u32 {
    (state & !KIND_MASK).wrapping_add(1 << KIND_BITS) | k
}

/// One slot of a dedup table. Public so callers can provide the buffer of a
/// [`BufferDedupTable`].
pub struct DedupSlot {
    state: AtomicU32,
    id_lo: AtomicU32,
    id_hi: AtomicU32,
    /// Insertion time, milliseconds (wrapping).
    stamp: AtomicU32,
    off_lo: AtomicU32,
    off_hi: AtomicU32,
}

impl DedupSlot {
    /// An empty slot.
    #[cfg(not(loom))]
    pub const fn new() -> Self {
        Self {
            state: AtomicU32::new(EMPTY),
            id_lo: AtomicU32::new(0),
            id_hi: AtomicU32::new(0),
            stamp: AtomicU32::new(0),
            off_lo: AtomicU32::new(0),
            off_hi: AtomicU32::new(0),
        }
    }

    /// An empty slot.
    #[cfg(loom)]
    pub fn new() -> Self {
        Self {
            state: AtomicU32::new(EMPTY),
            id_lo: AtomicU32::new(0),
            id_hi: AtomicU32::new(0),
            stamp: AtomicU32::new(0),
            off_lo: AtomicU32::new(0),
            off_hi: AtomicU32::new(0),
        }
    }

    /// A consistent copy of the slot, or `None` while it is being claimed
    /// (the caller waits and retries) or changed under us.
    #[inline]
    fn snapshot(&self) -> Option<Snapshot> {
        let s1 = self.state.load(Acquire);
        if kind(s1) == CLAIMED || kind(s1) == OFFSETTING {
            return None;
        }
        if kind(s1) == EMPTY || kind(s1) == FREE {
            return Some(Snapshot {
                state: s1,
                id: 0,
                stamp: 0,
                off: 0,
            });
        }
        let id = self.id_lo.load(Relaxed) as u64 | (self.id_hi.load(Relaxed) as u64) << 32;
        let stamp = self.stamp.load(Relaxed);
        let off = self.off_lo.load(Relaxed) as u64 | (self.off_hi.load(Relaxed) as u64) << 32;
        fence(Acquire);
        let s2 = self.state.load(Relaxed);
        (s1 == s2).then_some(Snapshot {
            state: s1,
            id,
            stamp,
            off,
        })
    }

    /// Waits out a claim in progress and returns the snapshot.
    #[inline]
    fn settled(&self) -> Snapshot {
        loop {
            if let Some(s) = self.snapshot() {
                return s;
            }
            spin_wait();
        }
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
    /// Replace the oldest entry met; the effective window shrinks (reported
    /// by [`DedupRef::effective_window_ms`]).
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
    tickets: AtomicU32,
    evictions: AtomicU32,
    /// Age in ms of the youngest entry evicted since the last reset;
    /// `u32::MAX` when none.
    evicted_age: AtomicU32,
}

impl Header {
    #[cfg(not(loom))]
    const fn new() -> Self {
        Self {
            tickets: AtomicU32::new(0),
            evictions: AtomicU32::new(0),
            evicted_age: AtomicU32::new(u32::MAX),
        }
    }

    #[cfg(loom)]
    fn new() -> Self {
        Self {
            tickets: AtomicU32::new(0),
            evictions: AtomicU32::new(0),
            evicted_age: AtomicU32::new(u32::MAX),
        }
    }
}

/// A table of `N` slots (a power of two) stored in the value; `new` is
/// `const`, so a table can be a `static`. All operations are on [`DedupRef`].
pub struct DedupTable<const N: usize> {
    header: Header,
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
            slots: core::array::from_fn(|_| DedupSlot::new()),
            config,
        }
    }

    /// The handle every operation goes through (`Copy`, shareable).
    pub fn table(&self) -> DedupRef<'_> {
        DedupRef {
            header: &self.header,
            slots: &self.slots,
            config: self.config,
        }
    }
}

/// A table over a caller-provided buffer of slots (length a power of two).
pub struct BufferDedupTable<'b> {
    header: Header,
    slots: &'b [DedupSlot],
    config: DedupConfig,
}

/// A slot buffer whose length is not a power of two between 1 and 2^31.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BadCapacity;

impl<'b> BufferDedupTable<'b> {
    /// An empty table over `slots`; every slot is reset.
    pub fn new(slots: &'b mut [DedupSlot], config: DedupConfig) -> Result<Self, BadCapacity> {
        if !slots.len().is_power_of_two() || slots.len() > 1 << 31 {
            return Err(BadCapacity);
        }
        for s in slots.iter_mut() {
            *s = DedupSlot::new();
        }
        Ok(Self {
            header: Header::new(),
            slots,
            config,
        })
    }

    /// The handle every operation goes through (`Copy`, shareable).
    pub fn table(&self) -> DedupRef<'_> {
        DedupRef {
            header: &self.header,
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
    slots: &'t [DedupSlot],
    config: DedupConfig,
}

/// splitmix64's finaliser: producers choose ids freely (often sequential).
#[inline]
fn mix(id: u64) -> u64 {
    let mut z = id;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// `a` was issued before `b` (tickets wrap at 2^32).
fn ticket_before(a: u32, b: u32) -> bool {
    (a.wrapping_sub(b) as i32) < 0
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

    /// Slot indices of the neighbourhood of `id`, home first.
    #[inline]
    fn probe(&self, id: u64) -> impl Iterator<Item = (usize, &'t DedupSlot)> + 't {
        let mask = self.slots.len() - 1;
        let home = mix(id) as usize & mask;
        let slots = self.slots;
        (0..NEIGHBOURHOOD.min(slots.len())).filter_map(move |i| {
            let at = (home + i) & mask;
            slots.get(at).map(|s| (at, s))
        })
    }

    /// Is `id` present inside the window at `now_ms`? Never writes.
    #[inline]
    pub fn lookup(&self, id: u64, now_ms: u64) -> Lookup {
        let now = now_ms as u32;
        let window = self.config.window();
        for (_, slot) in self.probe(id) {
            let s = slot.settled();
            match s.kind() {
                EMPTY => break,
                PENDING if s.id == id => return Lookup::Present(None),
                _ if s.holds(id, now, window) => return Lookup::Present(s.offset()),
                _ => {}
            }
        }
        Lookup::Absent
    }

    /// `lookup(..) != Absent`.
    pub fn contains(&self, id: u64, now_ms: u64) -> bool {
        self.lookup(id, now_ms) != Lookup::Absent
    }

    /// Inserts `id` at time `now_ms` unless present inside the window.
    pub fn insert(&self, id: u64, now_ms: u64) -> Insert {
        let now = now_ms as u32;
        let window = self.config.window();
        'retry: loop {
            // 1. Is the id here already? Where could it go?
            let mut target: Option<(usize, u32)> = None;
            let mut oldest: Option<(usize, u32, u32)> = None;
            for (at, slot) in self.probe(id) {
                let s = slot.settled();
                match s.kind() {
                    EMPTY => {
                        target.get_or_insert((at, s.state));
                        break;
                    }
                    FREE => {
                        target.get_or_insert((at, s.state));
                    }
                    PENDING if s.id == id => return Insert::Duplicate(None),
                    PENDING => {}
                    _ if s.holds(id, now, window) => return Insert::Duplicate(s.offset()),
                    _ => {
                        let age = now.wrapping_sub(s.stamp);
                        if age >= window && s.id == id {
                            // Reuse the id's own expired slot, so that an id
                            // never has two copies for set_offset and remove
                            // to confuse.
                            target = Some((at, s.state));
                        } else if age >= window {
                            target.get_or_insert((at, s.state));
                        } else if oldest.is_none_or(|(_, _, a)| age > a) {
                            oldest = Some((at, s.state, age));
                        }
                    }
                }
            }
            let (at, seen) = match (target, oldest, self.config.when_full) {
                (Some(t), _, _) => t,
                (None, Some((at, state, age)), FullPolicy::Evict) => {
                    self.header.evictions.fetch_add(1, Relaxed);
                    self.header.evicted_age.fetch_min(age, Relaxed);
                    (at, state)
                }
                _ => return Insert::Full,
            };
            let Some(slot) = self.slots.get(at) else {
                return Insert::Full;
            };
            // 2. Claim it, write the id, publish PENDING with a ticket.
            let claimed = next_version(seen, CLAIMED);
            if slot
                .state
                .compare_exchange(seen, claimed, SeqCst, Relaxed)
                .is_err()
            {
                continue 'retry;
            }
            fence(Release);
            let ticket = self.header.tickets.fetch_add(1, SeqCst);
            slot.id_lo.store(id as u32, Relaxed);
            slot.id_hi.store((id >> 32) as u32, Relaxed);
            slot.stamp.store(now, Relaxed);
            slot.off_lo.store(ticket, Relaxed);
            slot.off_hi.store(0, Relaxed);
            slot.state.store(with_kind(claimed, PENDING), SeqCst);
            // 3. Did a twin get in first?
            let mut lost = None;
            for (other_at, other) in self.probe(id) {
                if other_at == at {
                    continue;
                }
                let s = other.settled();
                match s.kind() {
                    EMPTY => break,
                    PENDING if s.id == id && ticket_before(s.off as u32, ticket) => {
                        lost = Some(None);
                        break;
                    }
                    _ if s.holds(id, now, window) => {
                        lost = Some(s.offset());
                        break;
                    }
                    _ => {}
                }
            }
            if let Some(offset) = lost {
                slot.state.store(with_kind(claimed, FREE), SeqCst);
                return Insert::Duplicate(offset);
            }
            slot.state.store(with_kind(claimed, LIVE), SeqCst);
            return Insert::Inserted;
        }
    }

    /// Finds the present slot of `id` (live or stored, expired or not).
    fn find(&self, id: u64) -> Option<(&'t DedupSlot, u32)> {
        for (_, slot) in self.probe(id) {
            let s = slot.settled();
            match s.kind() {
                EMPTY => return None,
                LIVE | STORED if s.id == id => return Some((slot, s.state)),
                _ => {}
            }
        }
        None
    }

    /// Records the log offset of the stored original of `id`, so duplicates
    /// can report it. Returns false if the id is not in the table.
    pub fn set_offset(&self, id: u64, offset: u64) -> bool {
        loop {
            let Some((slot, state)) = self.find(id) else {
                return false;
            };
            if kind(state) == STORED {
                return true;
            }
            // Own the slot while writing the words, so no reuse of it can
            // interleave with them.
            let writing = with_kind(state, OFFSETTING);
            if slot
                .state
                .compare_exchange(state, writing, SeqCst, Relaxed)
                .is_err()
            {
                continue;
            }
            fence(Release);
            slot.off_lo.store(offset as u32, Relaxed);
            slot.off_hi.store((offset >> 32) as u32, Relaxed);
            // Release: a reader that sees STORED sees the offset words.
            slot.state.store(with_kind(state, STORED), SeqCst);
            return true;
        }
    }

    /// Removes `id` (to undo an insert whose write failed, so that a retry
    /// is accepted). Returns false if it was not there.
    pub fn remove(&self, id: u64) -> bool {
        loop {
            let Some((slot, state)) = self.find(id) else {
                return false;
            };
            if slot
                .state
                .compare_exchange(state, with_kind(state, FREE), SeqCst, Relaxed)
                .is_ok()
            {
                return true;
            }
        }
    }

    /// Frees every entry older than the window at `now_ms`; returns how many.
    /// Run it more often than every 2^31 ms (24 days): stamps wrap.
    pub fn sweep(&self, now_ms: u64) -> usize {
        let now = now_ms as u32;
        let window = self.config.window();
        let mut freed = 0;
        for slot in self.slots {
            let Some(s) = slot.snapshot() else { continue };
            if matches!(s.kind(), LIVE | STORED)
                && now.wrapping_sub(s.stamp) >= window
                && slot
                    .state
                    .compare_exchange(s.state, with_kind(s.state, FREE), SeqCst, Relaxed)
                    .is_ok()
            {
                freed += 1;
            }
        }
        freed
    }

    /// Entries present (live or stored), expired ones included until swept.
    /// Walks the whole table.
    pub fn occupied(&self) -> usize {
        self.slots
            .iter()
            .filter(|s| matches!(kind(s.state.load(Relaxed)), LIVE | STORED))
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

    /// Puts `id` back as stored at `offset` with time `stamp_ms`, when the
    /// table is rebuilt from the log at start-up. Same as insert, then
    /// set_offset; returns the insert result.
    pub fn restore(&self, id: u64, offset: u64, stamp_ms: u64) -> Insert {
        let r = self.insert(id, stamp_ms);
        if r == Insert::Inserted {
            self.set_offset(id, offset);
        }
        r
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

    #[test]
    fn buffer_table_works_like_the_static_one() {
        let mut slots: std::vec::Vec<DedupSlot> = (0..8).map(|_| DedupSlot::new()).collect();
        let t = BufferDedupTable::new(&mut slots, CFG).unwrap();
        let d = t.table();
        assert_eq!(d.insert(u64::MAX, 0), Insert::Inserted);
        assert!(d.contains(u64::MAX, 1));
        let mut bad: std::vec::Vec<DedupSlot> = (0..6).map(|_| DedupSlot::new()).collect();
        assert!(BufferDedupTable::new(&mut bad, CFG).is_err());
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
