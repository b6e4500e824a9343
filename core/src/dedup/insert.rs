//! Inserting ids: the shared insert (CAS claims) and the single
//! inserter's (plain claims, and the only one to reclaim slots).

use super::*;

impl<'t> DedupRef<'t> {
    /// The first scan of an insert: the answer if the id is present, else
    /// the slot to claim, or `Full`.
    pub(super) fn prescan(
        &self,
        p: &Probe,
        id: u64,
        now: u32,
        window: u32,
    ) -> Result<Target<'t>, Insert> {
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
    pub(super) fn validate(
        &self,
        p: &Probe,
        mine: usize,
        id: u64,
        now: u32,
        window: u32,
    ) -> Validation {
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
    pub(super) fn expired_or_oldest(
        &self,
        p: &Probe,
        now: u32,
        window: u32,
    ) -> Option<(usize, u32)> {
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
