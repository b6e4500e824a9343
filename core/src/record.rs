//! Storage log records and segment headers (PROTOCOL.md section 6): building
//! a record in a caller's buffer and checking one read back.
//!
//! Costs: no allocation; building copies each frame once into the buffer and
//! computes one CRC-32C over the record at the end.

use crate::crc32c;
use crate::event::Class;
use crate::wire::{self, Check, Frame, LEGACY_ID_BASE};

/// Bytes of a segment file's header.
pub const SEGMENT_HEADER_LEN: usize = 16;
/// A segment file's header: `ESCLOG\0\0`, version 1, reserved 0.
pub const SEGMENT_HEADER: [u8; SEGMENT_HEADER_LEN] = *b"ESCLOG\0\0\x01\0\0\0\0\0\0\0";
/// Bytes of a record before its frames.
pub const RECORD_HEADER_LEN: usize = 28;
/// Smallest valid `len` field (header after the len field, no frames).
pub const MIN_RECORD_LEN: u32 = 24;

/// `kind` byte of a record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum RecordKind {
    /// One event.
    Single = 0,
    /// The events of one (topic, partition) batch window.
    Batch = 1,
}

/// Why a record could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum BuildError {
    /// The buffer has no room for the frame.
    BufferFull,
    /// A record holds at most 65535 frames.
    TooManyFrames,
    /// `finish` on a record without frames.
    Empty,
}

/// Builds one record in a caller's buffer.
pub struct RecordBuilder<'b> {
    buf: &'b mut [u8],
    used: usize,
    count: u16,
}

impl<'b> RecordBuilder<'b> {
    /// Starts a record; the buffer must hold at least the 28-byte header.
    pub fn new(
        buf: &'b mut [u8],
        kind: RecordKind,
        class: Class,
        recv_ns: u64,
    ) -> Result<Self, BuildError> {
        let head = buf
            .get_mut(..RECORD_HEADER_LEN)
            .ok_or(BuildError::BufferFull)?;
        head.fill(0);
        head[16..24].copy_from_slice(&recv_ns.to_le_bytes());
        head[24] = kind as u8;
        head[25] = class.code();
        Ok(Self {
            buf,
            used: RECORD_HEADER_LEN,
            count: 0,
        })
    }

    /// Appends one v1 frame, verbatim.
    pub fn push(&mut self, frame: &[u8]) -> Result<(), BuildError> {
        if self.count == u16::MAX {
            return Err(BuildError::TooManyFrames);
        }
        let end = self.used + frame.len();
        let dst = self
            .buf
            .get_mut(self.used..end)
            .ok_or(BuildError::BufferFull)?;
        dst.copy_from_slice(frame);
        self.used = end;
        self.count += 1;
        Ok(())
    }

    /// Sets `recv_ns` (of the first event, for a batch whose first event is
    /// known only once it is pushed).
    pub fn set_recv_ns(&mut self, recv_ns: u64) {
        if let Some(f) = self.buf.get_mut(16..24) {
            f.copy_from_slice(&recv_ns.to_le_bytes());
        }
    }

    /// Frames so far.
    pub fn count(&self) -> u16 {
        self.count
    }

    /// Bytes so far, header included.
    pub fn len(&self) -> usize {
        self.used
    }

    /// No frame yet.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// Bytes left for frames.
    pub fn room(&self) -> usize {
        self.buf.len() - self.used
    }

    /// Completes the record for log offset `offset`: gives each legacy frame
    /// its id (`2^63 + its offset`, re-sealing it), fills in len, count,
    /// offset and crc, and returns the record's bytes.
    pub fn finish(self, offset: u64) -> Result<&'b [u8], BuildError> {
        if self.count == 0 {
            return Err(BuildError::Empty);
        }
        let Self { buf, used, count } = self;
        let record = &mut buf[..used];
        let mut at = RECORD_HEADER_LEN;
        let mut event_offset = offset;
        while at < used {
            let len = wire::declared_length(&record[at..]).unwrap_or(0) as usize;
            if len < wire::OVERHEAD || at + len > used {
                break;
            }
            if let Ok(mut f) = Frame::check(&mut record[at..at + len], Check::Layout) {
                if f.is_legacy() {
                    f.set_event_id(LEGACY_ID_BASE.wrapping_add(event_offset));
                    f.fill_crc();
                }
            }
            at += len;
            event_offset = event_offset.wrapping_add(1);
        }
        record[0..4].copy_from_slice(&((used - 4) as u32).to_le_bytes());
        record[8..16].copy_from_slice(&offset.to_le_bytes());
        record[26..28].copy_from_slice(&count.to_le_bytes());
        let crc = crc32c::checksum(&record[8..]);
        record[4..8].copy_from_slice(&crc.to_le_bytes());
        Ok(record)
    }
}

/// Why bytes at a position are not a valid record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum RecordError {
    /// Fewer than 4 + len bytes remain (a torn tail, or a corrupt len).
    Truncated,
    /// `len` below 24.
    BadLen,
    /// CRC mismatch.
    BadCrc,
    /// Unknown kind or class byte.
    BadKind,
    /// count is 0, or the frames do not exactly fill the record.
    BadFrames,
}

/// A record's header fields read off its first [`RECORD_HEADER_LEN`]
/// bytes, without the checks of [`Record::parse`] (no CRC, no frames): for
/// walking records that are passed on verbatim to a reader that checks
/// them (the server's read sessions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RecordHead {
    /// Bytes of the whole record, its len field included.
    pub size: u64,
    /// Offset of its first event.
    pub offset: u64,
    /// The class byte as stored.
    pub class: u8,
    /// Events in it.
    pub count: u16,
}

impl RecordHead {
    /// The header `bytes` starts with; `None` if `bytes` is shorter than a
    /// header, or its len is below the minimum, or its count is 0.
    pub fn peek(bytes: &[u8]) -> Option<RecordHead> {
        let h = bytes.get(..RECORD_HEADER_LEN)?;
        let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]);
        let count = u16::from_le_bytes([h[26], h[27]]);
        if len < MIN_RECORD_LEN || count == 0 {
            return None;
        }
        let mut offset = [0u8; 8];
        offset.copy_from_slice(&h[8..16]);
        Some(RecordHead {
            size: 4 + u64::from(len),
            offset: u64::from_le_bytes(offset),
            class: h[25],
            count,
        })
    }

    /// The offset after its last event.
    pub fn next_offset(&self) -> u64 {
        self.offset.wrapping_add(u64::from(self.count))
    }
}

/// A record that passed every check of PROTOCOL.md section 6 except the
/// offset continuity, which depends on its position in the log.
#[derive(Clone, Copy, Debug)]
pub struct Record<'a> {
    bytes: &'a [u8],
    kind: RecordKind,
    class: Class,
}

impl<'a> Record<'a> {
    /// Checks the record at the start of `bytes`.
    pub fn parse(bytes: &'a [u8]) -> Result<Record<'a>, RecordError> {
        let head = bytes.get(..4).ok_or(RecordError::Truncated)?;
        let len = u32::from_le_bytes([head[0], head[1], head[2], head[3]]);
        if len < MIN_RECORD_LEN {
            return Err(RecordError::BadLen);
        }
        let total = 4usize
            .checked_add(len as usize)
            .ok_or(RecordError::Truncated)?;
        let record = bytes.get(..total).ok_or(RecordError::Truncated)?;
        let crc = u32::from_le_bytes([record[4], record[5], record[6], record[7]]);
        if crc32c::checksum(&record[8..]) != crc {
            return Err(RecordError::BadCrc);
        }
        let kind = match record[24] {
            0 => RecordKind::Single,
            1 => RecordKind::Batch,
            _ => return Err(RecordError::BadKind),
        };
        let class = Class::from_u8(record[25]).ok_or(RecordError::BadKind)?;
        let count = u16::from_le_bytes([record[26], record[27]]);
        if count == 0 {
            return Err(RecordError::BadFrames);
        }
        let mut at = RECORD_HEADER_LEN;
        for _ in 0..count {
            let len = wire::declared_length(&record[at..]).ok_or(RecordError::BadFrames)? as usize;
            let frame = record
                .get(at..at.saturating_add(len))
                .ok_or(RecordError::BadFrames)?;
            Frame::check(frame, Check::Stored).map_err(|_| RecordError::BadFrames)?;
            at += len;
        }
        if at != total {
            return Err(RecordError::BadFrames);
        }
        Ok(Record {
            bytes: record,
            kind,
            class,
        })
    }

    /// The whole record, len field included.
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// Bytes the record takes in the file.
    pub fn size(&self) -> usize {
        self.bytes.len()
    }
    /// Offset of its first event.
    pub fn offset(&self) -> u64 {
        u64::from_le_bytes(self.bytes[8..16].try_into().unwrap_or([0; 8]))
    }
    /// Server wall clock at ingest (of the first event for a batch), unix ns.
    pub fn recv_ns(&self) -> u64 {
        u64::from_le_bytes(self.bytes[16..24].try_into().unwrap_or([0; 8]))
    }
    /// Single or batch.
    pub fn kind(&self) -> RecordKind {
        self.kind
    }
    /// Where routing sent its events.
    pub fn class(&self) -> Class {
        self.class
    }
    /// Number of frames.
    pub fn count(&self) -> u16 {
        u16::from_le_bytes([self.bytes[26], self.bytes[27]])
    }
    /// Offset the record after it starts at.
    pub fn next_offset(&self) -> u64 {
        self.offset().wrapping_add(self.count() as u64)
    }
    /// Its frames in order, each with its event offset.
    pub fn frames(&self) -> impl Iterator<Item = (u64, Frame<&'a [u8]>)> + 'a {
        let bytes = self.bytes;
        let first = self.offset();
        let mut at = RECORD_HEADER_LEN;
        let mut i = 0u64;
        core::iter::from_fn(move || {
            let len = wire::declared_length(bytes.get(at..)?)? as usize;
            let frame = Frame::check(bytes.get(at..at + len)?, Check::Stored).ok()?;
            at += len;
            i += 1;
            Some((first.wrapping_add(i - 1), frame))
        })
    }
}

/// The file name of the segment whose first event has offset `base`:
/// 20 digits, `.log`.
pub fn segment_name(base: u64) -> heapless::String<24> {
    let mut digits = [b'0'; 20];
    let mut v = base;
    for d in digits.iter_mut().rev() {
        *d = b'0' + (v % 10) as u8;
        v /= 10;
    }
    let mut s = heapless::String::new();
    for d in digits {
        let _ = s.push(d as char);
    }
    let _ = s.push_str(".log");
    s
}

/// What start-up does with the newest segment (PROTOCOL.md section 6).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Recovery {
    /// Every record is valid: append after them.
    Clean {
        /// Offset of the next event.
        next_offset: u64,
    },
    /// Shorter than its header: rewrite it as an empty segment.
    RewriteEmpty {
        /// Offset of the next event (the segment's base).
        next_offset: u64,
    },
    /// A header that is not `ESCLOG` version 1: refuse to start (with
    /// `--repair`, rewrite it as an empty segment).
    BadHeader,
    /// A torn tail (nothing valid after the first bad position): truncate.
    Truncate {
        /// New length of the file.
        to: usize,
        /// Offset of the next event.
        next_offset: u64,
    },
    /// A bad record with valid records after it: refuse to start (with
    /// `--repair`, truncate at `bad_at` and log what is dropped).
    Refuse {
        /// Position of the first bad record.
        bad_at: usize,
        /// Position of the first valid record after it.
        valid_at: usize,
        /// Offset of the next event after a repair.
        next_offset: u64,
        /// Bytes a repair drops.
        dropped_bytes: usize,
        /// First and last event offsets a repair drops.
        dropped_offsets: (u64, u64),
    },
}

/// A valid record at the start of `bytes` whose offset satisfies `wanted`;
/// cheap fields are checked before the CRC, so scanning garbage byte by
/// byte stays linear in practice.
fn record_at(bytes: &[u8], wanted: impl Fn(u64) -> bool) -> Option<Record<'_>> {
    let head = bytes.get(..RECORD_HEADER_LEN + 4)?;
    let offset = u64::from_le_bytes(head[8..16].try_into().ok()?);
    if !wanted(offset)
        || head[24] > 1
        || head[25] > 2
        || head[26..28] == [0, 0]
        || head[28..32] != wire::MAGIC
    {
        return None;
    }
    Record::parse(bytes).ok()
}

/// Whether `rest` of a segment is zeros only: the unused end of a segment
/// made ahead of use (or a torn write that left zeros), where no record
/// starts. Recovery cuts it like any torn tail; readers of a newest
/// segment may take it as the end of the log.
pub fn unused_tail(rest: &[u8]) -> bool {
    rest.iter().all(|&b| b == 0)
}

/// One piece of a closed segment as [`salvage`] reads it, in offset order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Piece {
    /// Valid records back to back at bytes `at..at + len` of the segment,
    /// holding the events `first..next`.
    Run {
        /// Position of the first record.
        at: usize,
        /// Bytes of records.
        len: usize,
        /// Offset of the first event.
        first: u64,
        /// Offset after the last event.
        next: u64,
    },
    /// Events `first..end` (end exclusive) are lost; the `bytes` bytes of
    /// the segment from position `at` held what is left of them (none for
    /// offsets missing at its end).
    Lost {
        /// First lost offset.
        first: u64,
        /// Offset after the lost range.
        end: u64,
        /// Position of the damage.
        at: usize,
        /// Damaged bytes.
        bytes: usize,
    },
}

/// Reads a closed segment (PROTOCOL.md section 6: never truncated) whose
/// first event has offset `base` and whose successor starts at `end`, and
/// calls `each` with its runs of valid records and the ranges lost between
/// them, in offset order: what `--repair` keeps and reports. A bad record is
/// skipped up to the next position where a record is valid with an offset
/// past the last one kept and below `end`; zeros after the last record are
/// unused space, not damage. A clean segment gives one run (or none, when
/// empty) and no loss. Returns whether anything was lost.
pub fn salvage(segment: &[u8], base: u64, end: u64, mut each: impl FnMut(Piece)) -> bool {
    let mut lost = false;
    let header_ok = segment.get(..SEGMENT_HEADER_LEN) == Some(&SEGMENT_HEADER[..]);
    let mut pos = SEGMENT_HEADER_LEN.min(segment.len());
    let mut next = base;
    // The damaged stretch before the current run, if any.
    let mut damaged_from = (!header_ok).then_some(0usize);
    let mut run: Option<(usize, u64)> = None;
    loop {
        if damaged_from.is_none() {
            if let Some(rec) = segment
                .get(pos..)
                .and_then(|rest| record_at(rest, |off| off == next && off < end))
            {
                run.get_or_insert((pos, next));
                pos += rec.size();
                next = rec.next_offset();
                continue;
            }
        }
        if let Some((at, first)) = run.take() {
            each(Piece::Run {
                at,
                len: pos - at,
                first,
                next,
            });
        }
        let rest = segment.get(pos..).unwrap_or(&[]);
        if damaged_from.is_none() && unused_tail(rest) {
            break;
        }
        let from = damaged_from.take().unwrap_or(pos);
        // The next position where a record is valid past what is kept.
        let found = (pos + usize::from(from == pos && pos < segment.len())..segment.len())
            .find_map(|q| {
                record_at(&segment[q..], |off| off >= next && off < end).map(|r| (q, r.offset()))
            });
        match found {
            Some((q, offset)) => {
                lost = true;
                each(Piece::Lost {
                    first: next,
                    end: offset,
                    at: from,
                    bytes: q - from,
                });
                pos = q;
                next = offset;
            }
            None => {
                let bytes = segment.len() - from;
                if bytes > 0 || next < end {
                    lost = true;
                    each(Piece::Lost {
                        first: next,
                        end: end.max(next),
                        at: from,
                        bytes,
                    });
                }
                return lost;
            }
        }
    }
    if next < end {
        lost = true;
        each(Piece::Lost {
            first: next,
            end,
            at: segment.len(),
            bytes: 0,
        });
    }
    lost
}

/// Recovery of the newest segment whose first event has offset `base`:
/// valid records from the start; at the first invalid position, a search of
/// every later byte position for a valid record with an offset at or past
/// the expected next one.
pub fn recover(segment: &[u8], base: u64) -> Recovery {
    if segment.len() < SEGMENT_HEADER_LEN {
        return Recovery::RewriteEmpty { next_offset: base };
    }
    if segment.get(..SEGMENT_HEADER_LEN) != Some(&SEGMENT_HEADER[..]) {
        return Recovery::BadHeader;
    }
    let mut pos = SEGMENT_HEADER_LEN;
    let mut next = base;
    while let Some(rec) = segment
        .get(pos..)
        .and_then(|rest| record_at(rest, |off| off == next))
    {
        pos += rec.size();
        next = rec.next_offset();
    }
    if pos == segment.len() {
        return Recovery::Clean { next_offset: next };
    }
    // No record can start in zeros, so the byte-by-byte search below
    // would find none.
    if segment.get(pos..).is_some_and(unused_tail) {
        return Recovery::Truncate {
            to: pos,
            next_offset: next,
        };
    }
    let mut found: Option<(usize, u64)> = None;
    let mut q = pos;
    while q < segment.len() {
        match segment
            .get(q..)
            .and_then(|rest| record_at(rest, |off| off >= next))
        {
            Some(rec) => {
                let end = rec.next_offset();
                found = Some(match found {
                    Some((first, last)) => (first, last.max(end)),
                    None => (q, end),
                });
                q += 1;
            }
            None => q += 1,
        }
    }
    match found {
        None => Recovery::Truncate {
            to: pos,
            next_offset: next,
        },
        Some((valid_at, end)) => Recovery::Refuse {
            bad_at: pos,
            valid_at,
            next_offset: next,
            dropped_bytes: segment.len() - pos,
            dropped_offsets: (next, end.saturating_sub(1)),
        },
    }
}
