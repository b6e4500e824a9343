//! The forwarder's reader of the log: events in offset order from a
//! cursor, only below the durable end (PROTOCOL.md section 6, "Offsets and
//! durability": an event a power cut can take back, and whose offset a new
//! event could then take, is never forwarded).
//!
//! Segments are read with `pread` in chunks of [`CHUNK`] bytes (grown for
//! a record larger than that), and every record's CRC is checked before
//! its events go out. A read hands on whole records (a batch record's
//! events all at once), so each record is checked once.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use eventstream_core::record::{
    unused_tail, Record, RecordHead, RECORD_HEADER_LEN, SEGMENT_HEADER_LEN,
};
use eventstream_core::wire::Frame;
use eventstream_core::Class;

use crate::repair::Gaps;
use crate::storage::{seek, LogTail, Segment, SegmentEntry, SegmentIndex};

/// Bytes read per `pread`.
const CHUNK: usize = 1 << 20;

/// One stored event.
pub(super) struct Event<'a> {
    /// Its offset.
    pub offset: u64,
    /// Its record's class.
    pub class: Class,
    /// When the server received it (unix ns).
    pub recv_ns: u64,
    /// The stored frame.
    pub frame: Frame<&'a [u8]>,
}

/// What one [`LogReader::read`] found besides events.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Found {
    /// Events handed on.
    pub events: usize,
    /// Offsets retention deleted before they were read: `[from, to)`.
    pub skipped: Option<(u64, u64)>,
}

/// Whether the offsets `from..to` are lost to `--repair`: listed in its
/// report, `from` possibly inside a listed range (a cursor that had
/// forwarded part of what a later repair lost).
fn lost_to_repair(gaps: &Gaps, from: u64, to: u64) -> bool {
    gaps.covers(from, to)
        || gaps
            .ranges()
            .iter()
            .any(|&(a, b)| a < from && from < b && (b >= to || gaps.covers(b, to)))
}

struct Open {
    entry: SegmentEntry,
    file: File,
    /// Byte position of the next record to read.
    pos: u64,
}

/// Reads the log's durable events from a cursor.
pub(super) struct LogReader {
    tail: Arc<LogTail>,
    gaps: Gaps,
    seg: Option<Open>,
    /// The next offset to hand on.
    next: u64,
    buf: Vec<u8>,
    /// Segment position of `buf[0]`, and how many bytes of `buf` hold data.
    buf_pos: u64,
    buf_len: usize,
}

impl LogReader {
    /// A reader whose first event will be `next` (or the first retained
    /// one, if `next` is gone).
    pub(super) fn new(tail: Arc<LogTail>, gaps: Gaps, next: u64) -> LogReader {
        LogReader {
            tail,
            gaps,
            seg: None,
            next,
            buf: vec![0; CHUNK],
            buf_pos: 0,
            buf_len: 0,
        }
    }

    /// Reads again from `offset` (after a failed publish).
    pub(super) fn rewind(&mut self, offset: u64) {
        self.next = offset;
        self.seg = None;
        self.buf_len = 0;
    }

    /// Opens the segment holding `self.next`, at the record holding it.
    fn locate(&mut self, found: &mut Found) -> io::Result<bool> {
        let (catalog, _) = self.tail.segments();
        let Some(first) = catalog.first() else {
            return Ok(false);
        };
        if self.next < first.base {
            if lost_to_repair(&self.gaps, self.next, first.base) {
                eprintln!(
                    "eventstream: forward: offsets {}..{} were lost to --repair (listed in damaged/report); they are not forwarded",
                    self.next, first.base
                );
            } else {
                found.skipped = Some((self.next, first.base));
            }
            self.next = first.base;
        }
        let i = catalog.partition_point(|s| s.base <= self.next);
        let entry = catalog[i - 1].clone();
        let file = File::open(&entry.path)?;
        let mut pos = SEGMENT_HEADER_LEN as u64;
        if let Some(len) = entry.closed_len.filter(|_| self.next > entry.base) {
            let seg = Segment {
                base: entry.base,
                path: entry.path.clone(),
                size: len,
            };
            if let Some((p, _)) = seek(&file, &SegmentIndex::of_closed(&seg)?, self.next)? {
                pos = p;
            }
        }
        self.seg = Some(Open { entry, file, pos });
        self.buf_len = 0;
        Ok(true)
    }

    /// Moves from the finished closed segment to the next one (through a
    /// gap `--repair` listed); false if none is there yet.
    fn advance(&mut self) -> io::Result<bool> {
        let Some(done) = &self.seg else {
            return Ok(false);
        };
        let done_base = done.entry.base;
        let (catalog, _) = self.tail.segments();
        let Some(entry) = catalog.iter().find(|s| s.base > done_base).cloned() else {
            return Ok(false);
        };
        if entry.base != self.next {
            if entry.base > self.next && lost_to_repair(&self.gaps, self.next, entry.base) {
                eprintln!(
                    "eventstream: forward: offsets {}..{} were lost to --repair (listed in damaged/report); they are not forwarded",
                    self.next, entry.base
                );
                self.next = entry.base;
            } else {
                return Err(io::Error::other(format!(
                    "segment {done_base} ends at offset {} but the next begins at {}",
                    self.next, entry.base
                )));
            }
        }
        let file = File::open(&entry.path)?;
        self.seg = Some(Open {
            entry,
            file,
            pos: SEGMENT_HEADER_LEN as u64,
        });
        self.buf_len = 0;
        Ok(true)
    }

    /// How far the open segment is durable, and whether it is closed and
    /// whole (a newer segment is durable); None: nothing durable in it yet.
    fn durable_end(&mut self) -> io::Result<Option<(u64, bool)>> {
        let Some(seg) = &mut self.seg else {
            return Ok(None);
        };
        let durable = self.tail.durable.load();
        if durable.base == seg.entry.base {
            return Ok(Some((durable.bytes, false)));
        }
        if durable.base < seg.entry.base {
            return Ok(None);
        }
        if seg.entry.closed_len.is_none() {
            // The catalog copy predates the roll: take it anew.
            let (catalog, _) = self.tail.segments();
            match catalog.iter().find(|s| s.base == seg.entry.base) {
                Some(e) => seg.entry = e.clone(),
                // Deleted by retention: its file's length is final.
                None => return Ok(Some((seg.file.metadata()?.len(), true))),
            }
        }
        // Not closed in the catalog yet: later.
        Ok(seg.entry.closed_len.map(|len| (len, true)))
    }

    /// Hands on the durable events from the cursor to `each`, whole
    /// records at a time, until `max` or more are handed on (at most one
    /// record's events past `max`).
    pub(super) fn read(
        &mut self,
        max: usize,
        mut each: impl FnMut(&Event<'_>),
    ) -> io::Result<Found> {
        let mut found = Found::default();
        while found.events < max {
            if self.seg.is_none() && !self.locate(&mut found)? {
                break;
            }
            let Some((end, closed)) = self.durable_end()? else {
                break;
            };
            let Some(seg) = &self.seg else { break };
            if seg.pos >= end {
                if closed && self.advance()? {
                    continue;
                }
                break;
            }
            let pos = seg.pos;
            let Some(head) = self.record_at(pos, end)? else {
                if closed {
                    // Zeros after the last record of a closed segment.
                    if let Some(s) = &mut self.seg {
                        s.pos = end;
                    }
                    continue;
                }
                return Err(io::Error::other(format!(
                    "no record at byte {pos} of segment {} below the durable end",
                    self.seg.as_ref().map_or(0, |s| s.entry.base)
                )));
            };
            let at = (pos - self.buf_pos) as usize;
            let bytes = &self.buf[at..at + head.size as usize];
            let rec = Record::parse(bytes).map_err(|e| {
                io::Error::other(format!(
                    "bad record at byte {pos} of segment {}: {e:?}",
                    self.seg.as_ref().map_or(0, |s| s.entry.base)
                ))
            })?;
            if rec.next_offset() > self.next && rec.offset() > self.next {
                return Err(io::Error::other(format!(
                    "the log skips from offset {} to {}",
                    self.next,
                    rec.offset()
                )));
            }
            for (offset, frame) in rec.frames() {
                if offset < self.next {
                    continue;
                }
                each(&Event {
                    offset,
                    class: rec.class(),
                    recv_ns: rec.recv_ns(),
                    frame,
                });
                self.next = offset + 1;
                found.events += 1;
            }
            if let Some(s) = &mut self.seg {
                s.pos = pos + head.size;
            }
        }
        Ok(found)
    }

    /// The receive time of the next event, if one is durable, without
    /// moving the cursor.
    pub(super) fn peek_recv_ns(&mut self) -> io::Result<Option<u64>> {
        let (next, at) = (self.next, self.seg.as_ref().map(|s| (s.entry.base, s.pos)));
        let mut recv = None;
        let found = self.read(1, |ev| {
            recv.get_or_insert(ev.recv_ns);
        });
        match (&mut self.seg, at) {
            (Some(s), Some((base, pos))) if s.entry.base == base => {
                s.pos = pos;
                self.next = next;
            }
            _ => self.rewind(next),
        }
        found?;
        Ok(recv)
    }

    /// The header of the record at `pos` with the whole record in the
    /// buffer; None where no record starts below `end` (zeros).
    fn record_at(&mut self, pos: u64, end: u64) -> io::Result<Option<RecordHead>> {
        let have = |s: &Self, n: u64| pos >= s.buf_pos && pos + n <= s.buf_pos + s.buf_len as u64;
        if !have(self, RECORD_HEADER_LEN as u64) {
            self.fill(pos, end)?;
        }
        let at = (pos - self.buf_pos) as usize;
        let Some(head) = RecordHead::peek(&self.buf[at..self.buf_len]) else {
            if unused_tail(&self.buf[at..self.buf_len]) {
                return Ok(None);
            }
            return Err(io::Error::other(format!("bad record header at byte {pos}")));
        };
        if pos + head.size > end {
            return Err(io::Error::other(format!(
                "a record at byte {pos} runs past the durable end {end}"
            )));
        }
        if !have(self, head.size) {
            if head.size as usize > self.buf.len() {
                self.buf.resize(head.size as usize, 0);
            }
            self.fill(pos, end)?;
        }
        Ok(Some(head))
    }

    /// Reads the segment from `pos` (up to `end`) into the buffer.
    fn fill(&mut self, pos: u64, end: u64) -> io::Result<()> {
        let Some(seg) = &self.seg else {
            return Ok(());
        };
        let want = (end - pos).min(self.buf.len() as u64) as usize;
        let mut got = 0;
        while got < want {
            match seg.file.read_at(&mut self.buf[got..want], pos + got as u64) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if got < RECORD_HEADER_LEN.min(want) {
            return Err(io::Error::other(format!(
                "segment {} is shorter than its durable end",
                seg.entry.base
            )));
        }
        self.buf_pos = pos;
        self.buf_len = got;
        Ok(())
    }
}
