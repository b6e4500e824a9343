//! After an insert: the log offset set on a stored id, removal of an id
//! whose write failed, the sweep of expired ids, and the table's gauges.

use super::*;

impl<'t> DedupRef<'t> {
    /// Finds the present slot of `id` (live or stored, expired or not).
    pub(super) fn find(&self, id: u64) -> Option<(usize, u32)> {
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
    pub(super) fn hinted(p: &Probe, hint: DedupHint) -> Option<usize> {
        let distance = usize::from(hint.0);
        (distance < p.len).then(|| p.at(distance))
    }

    /// The slot `hint` points at, if it holds `id` (live or stored).
    pub(super) fn at_hint(&self, id: u64, hint: DedupHint) -> Option<(usize, u32)> {
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
    pub(super) fn sweep_with(&self, now_ms: u64, reclaim: bool) -> usize {
        self.sweep_range(now_ms, reclaim, 0, self.states.len())
    }

    /// The sweep over slots `lo..hi`, backwards.
    pub(super) fn sweep_range(&self, now_ms: u64, reclaim: bool, lo: usize, hi: usize) -> usize {
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
    pub(super) fn reclaim(&self, at: usize, s: u32) {
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
