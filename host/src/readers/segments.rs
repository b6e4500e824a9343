//! The reader thread's view of the log: open segments (a descriptor for
//! `sendfile` and a read-only mapping to walk record headers without a
//! syscall per record), where records are readable up to, the seek to an
//! offset through the sparse indexes, and the segments retention deleted
//! while a session was inside them.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::rc::Rc;

use eventstream_core::record::{RecordHead, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN};
use eventstream_core::wire::topic_range;

use crate::storage::{LogTail, Position, Segment, SegmentEntry, SegmentIndex, INDEX_INTERVAL};
use crate::sys::Mapping;

/// Room mapped past a segment's size limit: a segment always takes at least
/// one write buffer, so it may end somewhat past the limit.
const MAP_SLACK: u64 = 64 << 20;

/// One open segment.
pub(super) struct OpenSegment {
    pub(super) base: u64,
    pub(super) file: File,
    /// None where the file system cannot map files (some FUSE ones):
    /// headers are then read with `pread`.
    map: Option<Mapping>,
    /// Its size when opened; once deleted, its final length (what a
    /// session may still read of it, and the bytes it holds on disk).
    pub(super) size: std::cell::Cell<u64>,
    /// Whether retention deleted it (only sessions inside it keep it).
    pub(super) deleted: std::cell::Cell<bool>,
    /// The mapping's pages below this are unmapped (`release`).
    released: std::cell::Cell<u64>,
}

/// Mapped header pages are let go in steps of this many bytes.
const RELEASE_STEP: u64 = 256 << 10;

impl OpenSegment {
    /// Copies the segment's bytes at `pos` into `out`.
    fn copy(&self, pos: u64, out: &mut [u8]) -> bool {
        match &self.map {
            Some(m) => m.copy(pos, out),
            None => self.file.read_exact_at(out, pos).is_ok(),
        }
    }

    /// The header of the record at `pos`, if a well-formed one ends at or
    /// before `end`.
    pub(super) fn record(&self, pos: u64, end: u64) -> Option<RecordHead> {
        let mut h = [0u8; RECORD_HEADER_LEN];
        if pos + RECORD_HEADER_LEN as u64 > end || !self.copy(pos, &mut h) {
            return None;
        }
        RecordHead::peek(&h).filter(|r| pos + r.size <= end)
    }

    /// A session walked the headers below `pos`: the pages it mapped to
    /// read them are let go (in steps), so that the page cache can drop
    /// them once sent: a mapped page is never dropped, and the writer
    /// appends fastest into pages the drop policy gave back
    /// (docs/decisions.md, "Readers and the page cache"). A session still
    /// behind maps them again as it reads.
    pub(super) fn release(&self, pos: u64) {
        let from = self.released.get();
        if pos >= from + RELEASE_STEP {
            if let Some(m) = &self.map {
                m.unmap_pages(from, pos);
            }
            self.released.set(pos);
        }
    }

    /// Whether the first frame of the record at `pos` (of `size` bytes) has
    /// a topic starting with `prefix`.
    pub(super) fn topic_starts_with(&self, pos: u64, size: u64, prefix: &[u8]) -> bool {
        if prefix.is_empty() {
            return true;
        }
        let frame = pos + RECORD_HEADER_LEN as u64;
        let mut head = [0u8; 12];
        let Some(topic) = self
            .copy(frame, &mut head)
            .then(|| topic_range(&head))
            .flatten()
        else {
            return false;
        };
        let mut bytes = [0u8; 255];
        let Some(t) = bytes.get_mut(..prefix.len()) else {
            return false;
        };
        topic.len() >= prefix.len()
            && frame + (topic.start + prefix.len()) as u64 <= pos + size
            && self.copy(frame + topic.start as u64, t)
            && t == prefix
    }
}

/// Index of the records of the newest segment, built as sessions walk it.
struct ActiveIndex {
    base: u64,
    entries: Vec<(u64, u64)>,
    /// Walked up to here (byte position, next offset).
    pos: u64,
    next: u64,
}

/// What the sessions share: the segments, opened once each.
pub(super) struct Segments {
    tail: std::sync::Arc<LogTail>,
    map_len: u64,
    generation: u64,
    catalog: Vec<SegmentEntry>,
    open: HashMap<u64, Rc<OpenSegment>>,
    /// Deleted segments still held by a session.
    held: Vec<Rc<OpenSegment>>,
    indexes: HashMap<u64, Rc<SegmentIndex>>,
    active: Option<ActiveIndex>,
}

/// Where a session goes next when a segment ends.
pub(super) enum Next {
    /// The segment holding the offset.
    Segment(Rc<OpenSegment>),
    /// The offsets `[from, to)` are listed as lost; go on at `to`.
    Gap(u64, u64),
    /// Nothing is there yet (the offset is the end of the log).
    Nothing,
    /// The offset lies below the first retained one.
    Gone,
}

impl Segments {
    pub(super) fn new(tail: std::sync::Arc<LogTail>, segment_bytes: u64) -> Segments {
        let (catalog, generation) = tail.segments();
        Segments {
            tail,
            map_len: segment_bytes + MAP_SLACK,
            generation,
            catalog,
            open: HashMap::new(),
            held: Vec::new(),
            indexes: HashMap::new(),
            active: None,
        }
    }

    pub(super) fn tail(&self) -> &LogTail {
        &self.tail
    }

    /// Takes in a roll or a retention delete; returns whether any happened.
    pub(super) fn refresh(&mut self) -> bool {
        if self.tail.generation() == self.generation {
            return false;
        }
        let (catalog, generation) = self.tail.segments();
        let old = std::mem::replace(&mut self.catalog, catalog);
        self.generation = generation;
        let bases: Vec<u64> = self.open.keys().copied().collect();
        for base in bases {
            if !self.catalog.iter().any(|s| s.base == base) {
                if let Some(seg) = self.open.remove(&base) {
                    // Only a closed segment is deleted: its length is final.
                    // (The open descriptor still tells its size.)
                    let len = old
                        .iter()
                        .find(|s| s.base == base)
                        .and_then(|s| s.closed_len)
                        .or_else(|| seg.file.metadata().ok().map(|m| m.len()));
                    if let Some(len) = len {
                        seg.size.set(len);
                    }
                    seg.deleted.set(true);
                    self.held.push(seg);
                }
                self.indexes.remove(&base);
            }
        }
        true
    }

    /// Whether any deleted segment is still open.
    pub(super) fn holds_deleted(&self) -> bool {
        !self.held.is_empty()
    }

    /// Bytes of deleted segments that sessions still hold open; the
    /// segments no session holds are let go.
    pub(super) fn held_bytes(&mut self) -> u64 {
        self.held.retain(|s| Rc::strong_count(s) > 1);
        self.held.iter().map(|s| s.size.get()).sum()
    }

    /// The first retained offset.
    pub(super) fn first_offset(&self) -> u64 {
        self.catalog.first().map_or(0, |s| s.base)
    }

    /// The visible end of the log.
    pub(super) fn visible(&self) -> Position {
        self.tail.visible()
    }

    /// How far records of the segment `base` are readable now.
    pub(super) fn readable_end(&self, seg: &OpenSegment, visible: &Position) -> u64 {
        if seg.deleted.get() {
            return seg.size.get();
        }
        if visible.base == seg.base {
            return visible.bytes;
        }
        if visible.base < seg.base {
            return SEGMENT_HEADER_LEN as u64;
        }
        self.catalog
            .iter()
            .find(|s| s.base == seg.base)
            .and_then(|s| s.closed_len)
            .unwrap_or(seg.size.get())
    }

    /// Whether the segment is closed and a newer one exists.
    pub(super) fn is_closed(&self, seg: &OpenSegment) -> bool {
        seg.deleted.get()
            || self
                .catalog
                .iter()
                .any(|s| s.base == seg.base && s.closed_len.is_some())
    }

    fn open(&mut self, entry: &SegmentEntry) -> io::Result<Rc<OpenSegment>> {
        if let Some(s) = self.open.get(&entry.base) {
            return Ok(s.clone());
        }
        let file = File::open(&entry.path)?;
        let size = file.metadata()?.len();
        let map = match Mapping::new(file.as_raw_fd(), self.map_len.max(size) as usize) {
            Ok(m) => Some(m),
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => None,
            Err(e) => return Err(e),
        };
        let seg = Rc::new(OpenSegment {
            base: entry.base,
            file,
            map,
            size: std::cell::Cell::new(size),
            deleted: std::cell::Cell::new(false),
            released: std::cell::Cell::new(0),
        });
        self.open.insert(entry.base, seg.clone());
        Ok(seg)
    }

    /// The segment that holds `offset` (or would, for the end of the log).
    pub(super) fn locate(&mut self, offset: u64) -> io::Result<Next> {
        let i = self.catalog.partition_point(|s| s.base <= offset);
        if i == 0 {
            return Ok(match self.catalog.first() {
                Some(_) => Next::Gone,
                None => Next::Nothing,
            });
        }
        let entry = self.catalog[i - 1].clone();
        Ok(Next::Segment(self.open(&entry)?))
    }

    /// Where a session that finished the closed segment `seg` at offset
    /// `next` goes: the next segment, or a gap listed as lost.
    pub(super) fn after(
        &mut self,
        seg: &OpenSegment,
        next: u64,
        gaps: &crate::repair::Gaps,
    ) -> io::Result<Result<Next, String>> {
        let Some(entry) = self.catalog.iter().find(|s| s.base > seg.base).cloned() else {
            return Ok(Ok(Next::Nothing));
        };
        if entry.base == next {
            return Ok(Ok(Next::Segment(self.open(&entry)?)));
        }
        if next < self.first_offset() {
            return Ok(Ok(Next::Gone));
        }
        if entry.base > next && gaps.covers(next, entry.base) {
            return Ok(Ok(Next::Gap(next, entry.base)));
        }
        Ok(Err(format!(
            "segment {} ends at offset {next} but the next begins at {} (not listed in damaged/report)",
            seg.base, entry.base
        )))
    }

    /// The byte position and first offset of the record of `seg` that
    /// holds `offset`, looking no further than `end`.
    pub(super) fn seek(
        &mut self,
        seg: &OpenSegment,
        offset: u64,
        end: u64,
    ) -> io::Result<Option<(u64, u64)>> {
        let indexed_here = self.active.as_ref().is_some_and(|a| a.base == seg.base);
        let start = if self.is_closed(seg) && !seg.deleted.get() && !indexed_here {
            let index = match self.indexes.get(&seg.base) {
                Some(i) => i.clone(),
                None => {
                    let closed = Segment {
                        base: seg.base,
                        path: self
                            .catalog
                            .iter()
                            .find(|s| s.base == seg.base)
                            .map(|s| s.path.clone())
                            .unwrap_or_default(),
                        size: end,
                    };
                    let i = Rc::new(SegmentIndex::of_closed(&closed)?);
                    self.indexes.insert(seg.base, i.clone());
                    i
                }
            };
            index
                .floor(offset)
                .map(|(o, p)| (p, o))
                .unwrap_or((SEGMENT_HEADER_LEN as u64, seg.base))
        } else {
            self.active_floor(seg, offset, end)
        };
        Ok(walk_to(seg, start, offset, end))
    }

    /// The newest segment's in-memory index: extended up to `end`, then
    /// its floor entry for `offset`.
    fn active_floor(&mut self, seg: &OpenSegment, offset: u64, end: u64) -> (u64, u64) {
        let first = (SEGMENT_HEADER_LEN as u64, seg.base);
        if seg.deleted.get() {
            return first;
        }
        let a = match &mut self.active {
            Some(a) if a.base == seg.base => a,
            _ => self.active.insert(ActiveIndex {
                base: seg.base,
                entries: Vec::new(),
                pos: first.0,
                next: first.1,
            }),
        };
        let mut next_entry = a.entries.last().map_or(0, |e| e.1 + INDEX_INTERVAL);
        while a.pos < end && a.next <= offset {
            let Some(r) = seg.record(a.pos, end) else {
                break;
            };
            if r.offset != a.next {
                break;
            }
            if a.pos >= next_entry {
                a.entries.push((a.next, a.pos));
                next_entry = a.pos + INDEX_INTERVAL;
            }
            a.pos += r.size;
            a.next = r.next_offset();
        }
        let i = a.entries.partition_point(|&(o, _)| o <= offset);
        i.checked_sub(1)
            .and_then(|i| a.entries.get(i))
            .map(|&(o, p)| (p, o))
            .unwrap_or(first)
    }
}

/// Walks the records of `seg` from `start` (a record's position and
/// offset) to the one holding `offset`.
fn walk_to(seg: &OpenSegment, start: (u64, u64), offset: u64, end: u64) -> Option<(u64, u64)> {
    let (mut pos, mut next) = start;
    while pos < end {
        let r = seg.record(pos, end)?;
        if r.offset != next {
            return None;
        }
        let after = r.next_offset();
        if after > offset {
            return Some((pos, r.offset));
        }
        pos += r.size;
        next = after;
    }
    None
}
