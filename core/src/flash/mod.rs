//! A log in NOR flash (`embedded-storage`'s [`NorFlash`]): records in the
//! format of PROTOCOL.md section 6, in sectors used as a ring (wear is
//! spread over all of them), each sector starting with a header.
//!
//! Sector layout (`ERASE_SIZE` bytes):
//!
//! | offset | size | field |
//! |---|---|---|
//! | 0 | 4 | magic `ESCF` |
//! | 4 | 1 | version 1 |
//! | 5 | 3 | reserved 0 |
//! | 8 | 8 | sequence number (one more for every sector opened) |
//! | 16 | 8 | base: the offset of the sector's first event |
//! | 24 | 4 | CRC-32C of bytes [0, 24) |
//! | 28 | 4 | 0xFF (unwritten) |
//! | 32 | 32 | retired mark: erased (0xFF) while the sector's events are not all delivered; programmed (to zeros) once they are |
//! | 64 | .. | records back to back, each starting at a multiple of `WRITE_SIZE` (the gap left erased) |
//!
//! Appends go to the newest sector; when it is full the next sector in the
//! ring is erased and opened. A sector whose events are all delivered is
//! retired with one word written, and erased when the ring comes back to
//! it. When the ring is full (the next sector is still undelivered) the
//! [`FullPolicy`] decides.
//!
//! Recovery ([`FlashLog::open`]) reads every header: a sector with no
//! valid header (never used, an erase or a header write cut short) is
//! free. The newest sector's records are read until the first that is not
//! valid (the same rules as the server's log: length, CRC, frames, the
//! expected offset); if anything but erased bytes follows, a write was cut
//! short there (a torn tail): the sector takes no more appends (its bytes
//! cannot be rewritten without an erase) and the next one is opened. Older
//! sectors end where their records end. A gap between one sector's end
//! and the next one's base (a sector lost to wear or a cut in an erase
//! that should not happen) is counted, not fatal: firmware has no operator
//! to ask.

mod mem;
mod read;

pub use mem::{MemFlash, MemFlashError, ERASE_STEP};
pub use read::Cursor;

use embedded_storage::nor_flash::NorFlash;

use crate::record::{Record, RecordError, RecordHead, RECORD_HEADER_LEN};
use crate::Class;

/// Sector magic.
pub const SECTOR_MAGIC: [u8; 4] = *b"ESCF";
/// Bytes before a sector's first record.
pub const SECTOR_HEADER_LEN: u32 = 64;
const RETIRE_AT: u32 = 32;
/// The largest `WRITE_SIZE` supported (the retired mark's room).
pub const MAX_WRITE_SIZE: usize = 32;

/// What an append does when every sector holds undelivered events.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FullPolicy {
    /// Refuse the append ([`FlashLogError::Full`]); the caller answers its
    /// producer (the pipeline's STORAGE_FAILED) until the uplink frees a
    /// sector.
    StopAccepting,
    /// Give up the oldest sector if it holds batch events only (counted
    /// in [`FlashStats::dropped_events`]); otherwise refuse as above.
    DropOldestBatch,
}

/// Why the flash log failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FlashLogError<E> {
    /// The flash failed (or lost power).
    Flash(E),
    /// The flash geometry does not suit the log: fewer than two sectors,
    /// a sector of at most 64 bytes, or a write size over 32 bytes.
    Geometry,
    /// The record is not one (its header), or its offset is not the log's
    /// next offset.
    BadRecord,
    /// The record does not fit in a sector.
    TooLarge,
    /// Every sector holds undelivered events (see [`FullPolicy`]).
    Full,
    /// The caller's buffer is empty.
    BufferTooSmall,
}

/// What the log has done since it was opened, and what recovery found.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FlashStats {
    /// Records appended.
    pub appended: u64,
    /// Sectors erased.
    pub erases: u64,
    /// Sectors retired (all their events delivered).
    pub retired: u64,
    /// Events given up by [`FullPolicy::DropOldestBatch`].
    pub dropped_events: u64,
    /// Recovery: records found in undelivered sectors.
    pub recovered_records: u64,
    /// Recovery: a torn tail was found (a write cut short).
    pub torn_tail: bool,
    /// Recovery: events missing between sectors, or in damaged records
    /// (bytes that are not a record, with valid records after them).
    pub lost_events: u64,
    /// Recovery: damaged spans skipped inside sectors.
    pub damaged_spans: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    /// No valid header: erased before it is opened.
    Free,
    /// Holds undelivered events.
    Live,
    /// Every event delivered; erased when the ring comes back.
    Retired,
}

#[derive(Clone, Copy, Debug)]
struct Sector {
    state: State,
    seq: u64,
    base: u64,
    /// The offset after its last record.
    end: u64,
    /// Where its next record would go.
    write_pos: u32,
    /// Classes of its records (bit per class).
    classes: u8,
}

const FREE: Sector = Sector {
    state: State::Free,
    seq: 0,
    base: 0,
    end: 0,
    write_pos: SECTOR_HEADER_LEN,
    classes: 0,
};

/// A valid record found in flash.
pub(super) struct Found {
    /// Bytes it takes (before alignment).
    size: u32,
    /// Its offset.
    offset: u64,
    /// The offset after it.
    next: u64,
    /// Its class bit.
    class: u8,
}

/// The log; `SECTORS` bounds the sectors it uses (the flash's capacity
/// over its erase size, at most this).
pub struct FlashLog<F, const SECTORS: usize> {
    flash: F,
    count: usize,
    sectors: [Sector; SECTORS],
    /// The newest sector with a valid header.
    head: Option<usize>,
    /// The head takes appends.
    head_open: bool,
    next_offset: u64,
    next_seq: u64,
    policy: FullPolicy,
    stats: FlashStats,
}

fn align_up(n: u32, to: u32) -> u32 {
    n.div_ceil(to) * to
}

fn class_bit(c: Class) -> u8 {
    1 << (c as u8)
}

impl<F: NorFlash, const SECTORS: usize> FlashLog<F, SECTORS> {
    const SECTOR: u32 = F::ERASE_SIZE as u32;
    const WRITE: u32 = F::WRITE_SIZE as u32;

    /// Opens the log on `flash`, recovering what it holds; `buf` must hold
    /// the largest record ever appended (a record that does not fit it is
    /// read as damage: the sector's records end there). An empty `buf` is
    /// [`FlashLogError::BufferTooSmall`].
    pub fn open(
        flash: F,
        policy: FullPolicy,
        buf: &mut [u8],
    ) -> Result<Self, FlashLogError<F::Error>> {
        if F::ERASE_SIZE <= SECTOR_HEADER_LEN as usize
            || F::WRITE_SIZE == 0
            || MAX_WRITE_SIZE % F::WRITE_SIZE != 0
            || F::ERASE_SIZE % F::WRITE_SIZE != 0
            || F::ERASE_SIZE > u32::MAX as usize
        {
            return Err(FlashLogError::Geometry);
        }
        let count = (flash.capacity() / F::ERASE_SIZE).min(SECTORS);
        if count < 2 {
            return Err(FlashLogError::Geometry);
        }
        let mut log = FlashLog {
            flash,
            count,
            sectors: [FREE; SECTORS],
            head: None,
            head_open: false,
            next_offset: 0,
            next_seq: 0,
            policy,
            stats: FlashStats::default(),
        };
        for i in 0..count {
            let mut h = [0u8; SECTOR_HEADER_LEN as usize];
            log.flash
                .read(i as u32 * Self::SECTOR, &mut h)
                .map_err(FlashLogError::Flash)?;
            log.sectors[i] = parse_header(&h).unwrap_or(FREE);
            if log.sectors[i].state != State::Free {
                let s = log.sectors[i];
                if log.head.is_none_or(|hd| s.seq > log.sectors[hd].seq) {
                    log.head = Some(i);
                }
            }
        }
        let Some(head) = log.head else {
            return Ok(log);
        };
        log.next_seq = log.sectors[head].seq.wrapping_add(1);
        // Every undelivered sector, and the newest (delivered or not: its
        // end is the next offset).
        for i in 0..count {
            if log.sectors[i].state == State::Live || i == head {
                let torn = log.scan(i, buf)?;
                if i == head {
                    log.stats.torn_tail = torn;
                    log.head_open = !torn && log.sectors[i].state == State::Live;
                }
            }
        }
        log.next_offset = log.sectors[head].end;
        // Gaps between undelivered sectors, oldest first.
        let mut prev: Option<Sector> = None;
        while let Some(i) = log.next_live(prev.map(|p| p.seq)) {
            let s = log.sectors[i];
            if let Some(p) = prev {
                log.stats.lost_events = log
                    .stats
                    .lost_events
                    .saturating_add(s.base.saturating_sub(p.end));
            }
            prev = Some(s);
        }
        Ok(log)
    }

    /// Reads sector `i`'s records: sets its end, write position and
    /// classes, counts them; true if bytes other than erased ones follow
    /// its last valid record (a torn tail).
    fn scan(&mut self, i: usize, buf: &mut [u8]) -> Result<bool, FlashLogError<F::Error>> {
        let start = i as u32 * Self::SECTOR;
        let mut s = self.sectors[i];
        let mut pos = SECTOR_HEADER_LEN;
        let mut expected = s.base;
        let mut damaged = false;
        while let Some((at, found)) = self.find_at(start, pos, expected, buf)? {
            if at > pos {
                // Bytes that are not a record lay between: damage, its
                // events lost (the sector takes no more appends).
                damaged = true;
                self.stats.damaged_spans = self.stats.damaged_spans.saturating_add(1);
                self.stats.lost_events = self
                    .stats
                    .lost_events
                    .saturating_add(found.offset.saturating_sub(expected));
            }
            expected = found.next;
            s.classes |= found.class;
            if s.state == State::Live {
                self.stats.recovered_records += 1;
            }
            pos = align_up(at + found.size, Self::WRITE);
        }
        s.end = expected;
        s.write_pos = pos.min(Self::SECTOR);
        self.sectors[i] = s;
        // What follows must be erased, or a write was cut short.
        let mut at = pos;
        while at < Self::SECTOR {
            let n = ((Self::SECTOR - at) as usize).min(buf.len()).min(256);
            if n == 0 {
                return Err(FlashLogError::BufferTooSmall);
            }
            self.flash
                .read(start + at, &mut buf[..n])
                .map_err(FlashLogError::Flash)?;
            if buf[..n].iter().any(|&b| b != 0xFF) {
                return Ok(true);
            }
            at += n as u32;
        }
        Ok(damaged)
    }

    /// The valid record at `pos` with the offset `expected`; failing that
    /// (damage: a bit flipped in a record, bytes overwritten), the first
    /// valid record after `pos` whose offset is at least `expected`, as
    /// the server's log recovery searches (PROTOCOL.md section 6). Its
    /// position and what it is; None if there is none in the sector.
    pub(super) fn find_at(
        &mut self,
        start: u32,
        pos: u32,
        expected: u64,
        buf: &mut [u8],
    ) -> Result<Option<(u32, Found)>, FlashLogError<F::Error>> {
        if let Some(found) = self.read_at(start, pos, expected, buf)? {
            return Ok(Some((pos, found)));
        }
        let mut at = align_up(pos + 1, Self::WRITE);
        while at + RECORD_HEADER_LEN as u32 <= Self::SECTOR {
            let mut h = [0u8; RECORD_HEADER_LEN];
            self.flash
                .read(start + at, &mut h)
                .map_err(FlashLogError::Flash)?;
            if let Some(head) = RecordHead::peek(&h).filter(|h| h.offset >= expected) {
                if let Some(found) = self.read_at(start, at, head.offset, buf)? {
                    return Ok(Some((at, found)));
                }
            }
            at += Self::WRITE;
        }
        Ok(None)
    }

    /// The valid record at `pos` of the sector starting at `start` with
    /// the offset `expected`, or None (erased, torn or otherwise not
    /// valid).
    fn read_at(
        &mut self,
        start: u32,
        pos: u32,
        expected: u64,
        buf: &mut [u8],
    ) -> Result<Option<Found>, FlashLogError<F::Error>> {
        if pos + RECORD_HEADER_LEN as u32 > Self::SECTOR {
            return Ok(None);
        }
        let mut h = [0u8; RECORD_HEADER_LEN];
        self.flash
            .read(start + pos, &mut h)
            .map_err(FlashLogError::Flash)?;
        let Some(head) = RecordHead::peek(&h) else {
            return Ok(None);
        };
        if head.offset != expected
            || head.size > u64::from(Self::SECTOR - pos)
            || head.offset.checked_add(u64::from(head.count)).is_none()
        {
            return Ok(None);
        }
        let size = head.size as usize;
        // Larger than any record appended (the buffer holds the largest):
        // a damaged length.
        let Some(rec) = buf.get_mut(..size) else {
            return Ok(None);
        };
        self.flash
            .read(start + pos, rec)
            .map_err(FlashLogError::Flash)?;
        match Record::parse(rec) {
            Ok(r) => Ok(Some(Found {
                size: size as u32,
                offset: expected,
                next: r.next_offset(),
                class: class_bit(r.class()),
            })),
            Err(RecordError::Truncated | RecordError::BadLen | RecordError::BadCrc)
            | Err(RecordError::BadKind | RecordError::BadFrames) => Ok(None),
        }
    }

    /// The undelivered sector after sequence number `after` (the oldest
    /// with None).
    fn next_live(&self, after: Option<u64>) -> Option<usize> {
        let mut best: Option<usize> = None;
        for i in 0..self.count {
            let s = &self.sectors[i];
            if s.state != State::Live || after.is_some_and(|a| s.seq <= a) {
                continue;
            }
            if best.is_none_or(|b| s.seq < self.sectors[b].seq) {
                best = Some(i);
            }
        }
        best
    }

    /// The offset the next appended record must have.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// What the log did and what recovery found.
    pub fn stats(&self) -> FlashStats {
        self.stats
    }

    /// Sectors in use.
    pub fn sectors(&self) -> usize {
        self.count
    }

    /// The flash, back (to power it off in a test, say).
    pub fn into_flash(self) -> F {
        self.flash
    }

    /// Appends `record` (section 6 bytes built for [`Self::next_offset`]).
    pub fn append(&mut self, record: &[u8]) -> Result<u64, FlashLogError<F::Error>> {
        let head = RecordHead::peek(record).ok_or(FlashLogError::BadRecord)?;
        if head.offset != self.next_offset || head.size != record.len() as u64 {
            return Err(FlashLogError::BadRecord);
        }
        let class = Record::parse(record)
            .map(|r| class_bit(r.class()))
            .map_err(|_| FlashLogError::BadRecord)?;
        let need = align_up(record.len() as u32, Self::WRITE);
        if need > Self::SECTOR - SECTOR_HEADER_LEN {
            return Err(FlashLogError::TooLarge);
        }
        let fits = |log: &Self| {
            log.head
                .is_some_and(|h| log.head_open && log.sectors[h].write_pos + need <= Self::SECTOR)
        };
        if !fits(self) {
            self.open_next()?;
        }
        let h = self.head.ok_or(FlashLogError::Full)?;
        let at = h as u32 * Self::SECTOR + self.sectors[h].write_pos;
        // The write's outcome is unknown if it fails: no more appends here.
        self.head_open = false;
        let whole = record.len() - record.len() % F::WRITE_SIZE;
        self.flash
            .write(at, &record[..whole])
            .map_err(FlashLogError::Flash)?;
        if whole < record.len() {
            let mut last = [0xFFu8; MAX_WRITE_SIZE];
            last[..record.len() - whole].copy_from_slice(&record[whole..]);
            self.flash
                .write(at + whole as u32, &last[..F::WRITE_SIZE])
                .map_err(FlashLogError::Flash)?;
        }
        self.head_open = true;
        let s = &mut self.sectors[h];
        s.write_pos += need;
        s.end = head.next_offset();
        s.classes |= class;
        self.next_offset = s.end;
        self.stats.appended += 1;
        Ok(head.offset)
    }

    /// Erases the next sector of the ring and opens it.
    fn open_next(&mut self) -> Result<(), FlashLogError<F::Error>> {
        let i = self.head.map_or(0, |h| (h + 1) % self.count);
        if self.sectors[i].state == State::Live {
            let oldest = self.next_live(None) == Some(i);
            let batch_only = self.sectors[i].classes & !class_bit(Class::Batch) == 0;
            if self.policy == FullPolicy::DropOldestBatch && oldest && batch_only {
                let s = self.sectors[i];
                self.stats.dropped_events = self
                    .stats
                    .dropped_events
                    .saturating_add(s.end.saturating_sub(s.base));
                self.retire_sector(i)?;
            } else {
                return Err(FlashLogError::Full);
            }
        }
        let start = i as u32 * Self::SECTOR;
        // A cut from here on leaves the sector without a valid header.
        self.sectors[i] = FREE;
        self.head_open = false;
        self.flash
            .erase(start, start + Self::SECTOR)
            .map_err(FlashLogError::Flash)?;
        self.stats.erases += 1;
        let mut h = [0xFFu8; 32];
        h[..4].copy_from_slice(&SECTOR_MAGIC);
        h[4..8].copy_from_slice(&[1, 0, 0, 0]);
        h[8..16].copy_from_slice(&self.next_seq.to_le_bytes());
        h[16..24].copy_from_slice(&self.next_offset.to_le_bytes());
        let crc = crate::crc32c::checksum(&h[..24]);
        h[24..28].copy_from_slice(&crc.to_le_bytes());
        self.flash.write(start, &h).map_err(FlashLogError::Flash)?;
        self.sectors[i] = Sector {
            state: State::Live,
            seq: self.next_seq,
            base: self.next_offset,
            end: self.next_offset,
            write_pos: SECTOR_HEADER_LEN,
            classes: 0,
        };
        self.next_seq = self.next_seq.wrapping_add(1);
        self.head = Some(i);
        self.head_open = true;
        Ok(())
    }

    fn retire_sector(&mut self, i: usize) -> Result<(), FlashLogError<F::Error>> {
        let zeros = [0u8; MAX_WRITE_SIZE];
        self.flash
            .write(i as u32 * Self::SECTOR + RETIRE_AT, &zeros[..F::WRITE_SIZE])
            .map_err(FlashLogError::Flash)?;
        self.sectors[i].state = State::Retired;
        self.stats.retired += 1;
        Ok(())
    }

    /// Every event below `offset` is delivered: retires each sector that
    /// holds only such events and takes no more appends (every one but the
    /// sector being appended to; that one once it is closed by a torn
    /// tail). Delivered events of a sector still open are sent again
    /// after a reboot: the progress kept across power cuts is per sector.
    pub fn delivered_below(&mut self, offset: u64) -> Result<(), FlashLogError<F::Error>> {
        while let Some(i) = self.next_live(None) {
            let s = self.sectors[i];
            let is_head = self.head == Some(i);
            if s.end > offset || (is_head && self.head_open) || s.end == s.base && is_head {
                break;
            }
            self.retire_sector(i)?;
        }
        Ok(())
    }
}

/// A sector's state from its header bytes; None if it has no valid one.
fn parse_header(h: &[u8; SECTOR_HEADER_LEN as usize]) -> Option<Sector> {
    if h[..4] != SECTOR_MAGIC || h[4] != 1 {
        return None;
    }
    let crc = u32::from_le_bytes([h[24], h[25], h[26], h[27]]);
    if crate::crc32c::checksum(&h[..24]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(h[8..16].try_into().ok()?);
    if seq == u64::MAX {
        // No next sequence number: not a header this log writes.
        return None;
    }
    let base = u64::from_le_bytes(h[16..24].try_into().ok()?);
    let retired = h[RETIRE_AT as usize..RETIRE_AT as usize + 4]
        .iter()
        .any(|&b| b != 0xFF);
    Some(Sector {
        state: if retired { State::Retired } else { State::Live },
        seq,
        base,
        end: base,
        write_pos: SECTOR_HEADER_LEN,
        classes: 0,
    })
}

#[cfg(test)]
mod tests;
