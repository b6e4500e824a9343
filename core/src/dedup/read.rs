//! Reading the table: probes, prefetches, consistent snapshots of a
//! slot, and lookups.

use super::*;

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
    pub(super) fn probe(&self, id: u64) -> Probe {
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
    pub(super) fn prefetch_probe(&self, p: &Probe) {
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
    pub(super) fn state(&self, at: usize) -> Option<&'t AtomicU32> {
        self.states.get(at).map(|s| &s.0)
    }

    /// A consistent copy of slot `at` whose state was `s1` (loaded with
    /// Acquire), or `None` if it changed meanwhile.
    #[inline]
    pub(super) fn read(&self, at: usize, s1: u32) -> Option<Snapshot> {
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
    pub(super) fn snapshot(&self, at: usize, s: u32) -> Snapshot {
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
    pub(super) fn settled(&self, at: usize) -> Snapshot {
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
    pub(super) fn settled_stamp(&self, at: usize) -> (u32, Option<u32>) {
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
}
