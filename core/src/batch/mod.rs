//! Batch windows: events of one (topic, partition) gathered until the window
//! holds `max_events` or is `max_age_ns` old, then handed to an
//! [`Aggregate`] in arrival order.
//!
//! Costs: no allocation; one linear scan of the open windows per event
//! (their number is small and fixed). Events wait in a shared arena, so the
//! memory held is bounded by the arena, not windows x max_events. When the
//! arena or the window table is full the oldest window is flushed early:
//! batching can never starve ingest of pool slots.

use crate::event::Class;
use crate::record::{BuildError, RecordBuilder, RecordKind, RECORD_HEADER_LEN};
use crate::wire::Limits;

/// What a batched item must tell about itself.
pub trait BatchItem {
    /// The topic bytes of the event.
    fn topic(&self) -> &[u8];
    /// The partition of the event.
    fn partition(&self) -> u32;
    /// The event's frame, for the processor's hook and the batch record
    /// (none by default).
    fn frame(&self) -> Option<crate::wire::Frame<&[u8]>> {
        None
    }
    /// Server wall clock at ingest, unix ns (the batch record's `recv_ns`
    /// is its first event's); 0 by default.
    fn recv_ns(&self) -> u64 {
        0
    }
}

/// Receives each closed window.
pub trait Aggregate<T> {
    /// Called once per closed window; items not taken are dropped after.
    fn aggregate(&mut self, window: Closed<'_, T>);
}

/// The default aggregate: builds the batch record of PROTOCOL.md section 6
/// (kind batch, class batch, the window's frames in arrival order, `recv_ns`
/// of the first event) in a caller's buffer, and hands it to `emit`, which
/// gives it its log offset with [`RecordBuilder::finish`] and stores it. A
/// window whose frames do not fit the buffer is split over several records,
/// never cut short.
pub struct RecordAggregate<'b, F> {
    buf: &'b mut [u8],
    emit: F,
}

impl<'b, F: FnMut(RecordBuilder<'_>)> RecordAggregate<'b, F> {
    /// Records are built in `buf`, which must hold at least the header and
    /// one frame of `limits.max_frame()` bytes (a window's frames, for one
    /// record per window).
    pub fn new(buf: &'b mut [u8], limits: &Limits, emit: F) -> Result<Self, BuildError> {
        if buf.len() < RECORD_HEADER_LEN + limits.max_frame() as usize {
            return Err(BuildError::BufferFull);
        }
        Ok(Self { buf, emit })
    }
}

impl<T: BatchItem, F: FnMut(RecordBuilder<'_>)> Aggregate<T> for RecordAggregate<'_, F> {
    fn aggregate(&mut self, window: Closed<'_, T>) {
        let mut frames = window
            .iter()
            .filter_map(|item| Some((item.frame()?, item.recv_ns())))
            .peekable();
        while let Some((_, recv_ns)) = frames.peek().copied() {
            let Ok(mut record) =
                RecordBuilder::new(self.buf, RecordKind::Batch, Class::Batch, recv_ns)
            else {
                return;
            };
            while let Some((frame, _)) = frames.peek() {
                if record.push(frame.bytes()).is_err() {
                    break;
                }
                frames.next();
            }
            if record.is_empty() {
                // Only a frame above max_frame, which the decoder never lets in.
                return;
            }
            (self.emit)(record);
        }
    }
}

/// Why a window closed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum CloseReason {
    /// It reached `max_events`.
    Full,
    /// It reached `max_age_ns`.
    Aged,
    /// Room was needed (window table or arena full, or the caller asked).
    Pressure,
    /// Everything was flushed (shutdown).
    Drain,
}

/// Bookkeeping of one window. Public so callers can provide the buffer of a
/// [`BatchWindows`] view.
#[derive(Clone, Copy, Debug)]
pub struct WindowMeta {
    open: bool,
    head: u32,
    tail: u32,
    len: u32,
    opened_ns: u64,
}

impl WindowMeta {
    /// A closed window.
    pub const fn new() -> Self {
        Self {
            open: false,
            head: NIL,
            tail: NIL,
            len: 0,
            opened_ns: 0,
        }
    }
}

impl Default for WindowMeta {
    fn default() -> Self {
        Self::new()
    }
}

const NIL: u32 = u32::MAX;

/// One arena cell: an item and the link to the next of its window (or of
/// the free list). Public so callers can provide the arena buffer.
pub struct Entry<T> {
    item: Option<T>,
    next: u32,
}

impl<T> Entry<T> {
    /// An empty cell.
    pub const fn new() -> Self {
        Self {
            item: None,
            next: NIL,
        }
    }
}

impl<T> Default for Entry<T> {
    fn default() -> Self {
        Self::new()
    }
}

/// A closed window: its items in arrival order.
pub struct Closed<'a, T> {
    /// Why it closed.
    pub reason: CloseReason,
    /// Monotonic time its first event arrived.
    pub opened_ns: u64,
    len: u32,
    head: u32,
    arena: &'a mut [Entry<T>],
}

impl<T> Closed<'_, T> {
    /// Events in the window.
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// The window is empty (never, for windows handed to an aggregate).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The first (oldest) item.
    pub fn first(&self) -> Option<&T> {
        self.arena.get(self.head as usize)?.item.as_ref()
    }

    /// The items, oldest first, left in place.
    pub fn iter(&self) -> impl Iterator<Item = &T> + '_ {
        let mut at = self.head;
        let arena = &*self.arena;
        core::iter::from_fn(move || {
            let e = arena.get(at as usize)?;
            at = e.next;
            e.item.as_ref()
        })
    }

    /// Takes the items out, oldest first.
    pub fn drain(&mut self) -> impl Iterator<Item = T> + '_ {
        let mut at = self.head;
        let arena = &mut *self.arena;
        core::iter::from_fn(move || {
            let e = arena.get_mut(at as usize)?;
            at = e.next;
            e.item.take()
        })
    }
}

/// Limits of a set of windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BatchConfig {
    /// Close a window at this many events (1..=65535; default 64).
    pub max_events: u32,
    /// Close a window this long after its first event (default 100 ms).
    pub max_age_ns: u64,
}

impl BatchConfig {
    /// 64 events or 100 ms.
    pub const DEFAULT: BatchConfig = BatchConfig {
        max_events: 64,
        max_age_ns: 100_000_000,
    };
}

/// Open windows over caller-provided buffers: `meta.len()` windows sharing
/// an arena of `arena.len()` events.
pub struct BatchWindows<'b, T> {
    /// Open windows are packed at the front: `meta[..open]`.
    meta: &'b mut [WindowMeta],
    arena: &'b mut [Entry<T>],
    free: u32,
    held: u32,
    open: u32,
    config: BatchConfig,
}

/// Buffers that cannot hold windows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct BadBuffers;

impl<'b, T: BatchItem> BatchWindows<'b, T> {
    /// Windows over `meta` and `arena` (both non-empty, arena below 2^32 - 1
    /// cells); every window starts closed.
    pub fn new(
        meta: &'b mut [WindowMeta],
        arena: &'b mut [Entry<T>],
        config: BatchConfig,
    ) -> Result<Self, BadBuffers> {
        if meta.is_empty()
            || arena.is_empty()
            || arena.len() >= NIL as usize
            || config.max_events == 0
            || config.max_events > u32::from(u16::MAX)
        {
            return Err(BadBuffers);
        }
        meta.iter_mut().for_each(|m| *m = WindowMeta::new());
        let n = arena.len();
        for (i, e) in arena.iter_mut().enumerate() {
            e.item = None;
            e.next = if i + 1 < n { (i + 1) as u32 } else { NIL };
        }
        Ok(Self {
            meta,
            arena,
            free: 0,
            held: 0,
            open: 0,
            config: BatchConfig {
                max_events: config.max_events.min(u16::MAX as u32),
                ..config
            },
        })
    }

    /// Events waiting in open windows.
    pub fn held(&self) -> usize {
        self.held as usize
    }

    /// Windows open now.
    pub fn open_windows(&self) -> usize {
        self.open as usize
    }

    /// The open windows (packed at the front of `meta`).
    fn open_meta(&self) -> &[WindowMeta] {
        self.meta.get(..self.open as usize).unwrap_or(&[])
    }

    /// When the oldest open window must close (monotonic ns), if any.
    pub fn next_deadline(&self) -> Option<u64> {
        self.open_meta()
            .iter()
            .map(|m| m.opened_ns.saturating_add(self.config.max_age_ns))
            .min()
    }

    fn same_key(&self, m: &WindowMeta, item: &T) -> bool {
        match self
            .arena
            .get(m.head as usize)
            .and_then(|e| e.item.as_ref())
        {
            Some(first) => first.partition() == item.partition() && first.topic() == item.topic(),
            None => false,
        }
    }

    /// Adds `item` at time `now_ns`, closing windows into `agg` as needed.
    /// Finding the item's window looks at the open windows only.
    pub fn push(&mut self, item: T, now_ns: u64, agg: &mut impl Aggregate<T>) {
        let found = self
            .open_meta()
            .iter()
            .position(|m| self.same_key(m, &item));
        let mut w = match found {
            Some(w) => w,
            None => self.open_window(now_ns, agg),
        };
        if self.free == NIL {
            // The arena is full: close the oldest other window (or this one).
            let victim = self.oldest_except(w).unwrap_or(w);
            let last = (self.open as usize).saturating_sub(1);
            self.close(victim, CloseReason::Pressure, agg);
            if victim == w {
                w = self.open_window(now_ns, agg);
            } else if w == last {
                // Closing packed the last open window into the victim's place.
                w = victim;
            }
        }
        let cell = self.free;
        let Some(e) = self.arena.get_mut(cell as usize) else {
            return;
        };
        self.free = e.next;
        e.item = Some(item);
        e.next = NIL;
        self.held += 1;
        let Some(m) = self.meta.get_mut(w) else {
            return;
        };
        if m.tail == NIL {
            m.head = cell;
        } else if let Some(t) = self.arena.get_mut(m.tail as usize) {
            t.next = cell;
        }
        m.tail = cell;
        m.len += 1;
        if m.len >= self.config.max_events {
            self.close(w, CloseReason::Full, agg);
        }
    }

    /// Opens a window at the end of the open ones (closing the oldest when
    /// all are open); returns its index.
    fn open_window(&mut self, now_ns: u64, agg: &mut impl Aggregate<T>) -> usize {
        if self.open as usize >= self.meta.len() {
            if let Some(oldest) = self.oldest() {
                self.close(oldest, CloseReason::Pressure, agg);
            }
        }
        let slot = self.open as usize;
        if let Some(m) = self.meta.get_mut(slot) {
            *m = WindowMeta {
                open: true,
                opened_ns: now_ns,
                ..WindowMeta::new()
            };
            self.open += 1;
        }
        slot
    }

    /// Closes the oldest window that is at least `max_age_ns` old, if any
    /// (one per call, so the caller can make room for its events first).
    pub fn poll(&mut self, now_ns: u64, agg: &mut impl Aggregate<T>) -> bool {
        let due = self
            .open_meta()
            .iter()
            .enumerate()
            .filter(|(_, m)| now_ns.saturating_sub(m.opened_ns) >= self.config.max_age_ns)
            .min_by_key(|(_, m)| m.opened_ns)
            .map(|(i, _)| i);
        match due {
            Some(w) => {
                self.close(w, CloseReason::Aged, agg);
                true
            }
            None => false,
        }
    }

    /// The limits in force.
    pub fn config(&self) -> BatchConfig {
        self.config
    }

    /// Closes the oldest open window (to free pool slots); false if none.
    pub fn flush_oldest(&mut self, agg: &mut impl Aggregate<T>) -> bool {
        match self.oldest() {
            Some(w) => {
                self.close(w, CloseReason::Pressure, agg);
                true
            }
            None => false,
        }
    }

    /// Closes every open window, oldest first.
    pub fn flush_all(&mut self, agg: &mut impl Aggregate<T>) {
        while let Some(w) = self.oldest() {
            self.close(w, CloseReason::Drain, agg);
        }
    }

    fn oldest(&self) -> Option<usize> {
        self.oldest_except(usize::MAX)
    }

    fn oldest_except(&self, skip: usize) -> Option<usize> {
        self.open_meta()
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != skip)
            .min_by_key(|(_, m)| m.opened_ns)
            .map(|(i, _)| i)
    }

    fn close(&mut self, w: usize, reason: CloseReason, agg: &mut impl Aggregate<T>) {
        let Some(m) = self.meta.get_mut(w) else {
            return;
        };
        if !m.open {
            return;
        }
        let meta = *m;
        *m = WindowMeta::new();
        if meta.len > 0 {
            agg.aggregate(Closed {
                reason,
                opened_ns: meta.opened_ns,
                len: meta.len,
                head: meta.head,
                arena: self.arena,
            });
        }
        // Return the cells (and drop items the aggregate left) to the free list.
        let mut at = meta.head;
        while let Some(e) = self.arena.get_mut(at as usize) {
            let next = e.next;
            e.item = None;
            e.next = self.free;
            self.free = at;
            at = next;
            self.held -= 1;
        }
        // Keep the open windows packed: the last open one takes this place.
        if let Some(last) = (self.open as usize).checked_sub(1) {
            self.meta.swap(w, last);
            self.open -= 1;
        }
    }
}

/// Windows whose buffers are part of the value: `W` windows, an arena of `E`
/// events. `new` is `const`, so they can be a `static` (firmware).
pub struct StaticBatchWindows<T, const W: usize, const E: usize> {
    meta: [WindowMeta; W],
    arena: [Entry<T>; E],
}

impl<T: BatchItem, const W: usize, const E: usize> StaticBatchWindows<T, W, E> {
    /// Closed windows, empty arena.
    pub const fn new() -> Self {
        Self {
            meta: [WindowMeta::new(); W],
            arena: [const { Entry::new() }; E],
        }
    }

    /// The windows, running with `config`; `None` if `W` or `E` is zero.
    pub fn windows(&mut self, config: BatchConfig) -> Option<BatchWindows<'_, T>> {
        BatchWindows::new(&mut self.meta, &mut self.arena, config).ok()
    }
}

impl<T: BatchItem, const W: usize, const E: usize> Default for StaticBatchWindows<T, W, E> {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests;
