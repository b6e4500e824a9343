//! Reading the flash log back: a cursor over its undelivered records, and
//! the dedup table rebuilt from them at boot.

use embedded_storage::nor_flash::NorFlash;

use super::{align_up, FlashLog, FlashLogError, State, SECTOR_HEADER_LEN};
use crate::dedup::DedupRef;
use crate::record::Record;
use crate::Class;

/// A position in the log: the next record to read.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Cursor {
    pub(super) sector: usize,
    pub(super) seq: u64,
    pub(super) pos: u32,
    /// The offset of the next record.
    pub offset: u64,
}

impl<F: NorFlash, const SECTORS: usize> FlashLog<F, SECTORS> {
    /// Where reading starts: the oldest undelivered record.
    pub fn first(&self) -> Option<Cursor> {
        let i = self.next_live(None)?;
        let s = self.sectors[i];
        Some(Cursor {
            sector: i,
            seq: s.seq,
            pos: SECTOR_HEADER_LEN,
            offset: s.base,
        })
    }

    /// The first undelivered record at or after `offset`'s record (a
    /// cursor to read from there), or None if none is left.
    pub fn seek(
        &mut self,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<Option<Cursor>, FlashLogError<F::Error>> {
        let Some(mut c) = self.first() else {
            return Ok(None);
        };
        loop {
            let before = c;
            match self.next_record(&mut c, buf)? {
                None => return Ok(None),
                Some(r) if r.next_offset() > offset => return Ok(Some(before)),
                Some(_) => {}
            }
        }
    }

    /// The record at `cur` (read into `buf`), moving `cur` past it; None
    /// at the end of what the log holds.
    pub fn next_record<'b>(
        &mut self,
        cur: &mut Cursor,
        buf: &'b mut [u8],
    ) -> Result<Option<Record<'b>>, FlashLogError<F::Error>> {
        loop {
            let Some(&s) = self.sectors.get(cur.sector) else {
                return Ok(None);
            };
            if s.state == State::Free || s.seq != cur.seq {
                // Its sector was given up under the cursor: go on from the
                // oldest left.
                match self.first() {
                    Some(f) if f.offset >= cur.offset || f.seq > cur.seq => *cur = f,
                    _ => return Ok(None),
                }
                continue;
            }
            if cur.offset < s.end && cur.pos < s.write_pos {
                let start = cur.sector as u32 * Self::SECTOR;
                // Past damage (recovery counted it) to the next valid record.
                if let Some((at, found)) = self.find_at(start, cur.pos, cur.offset, buf)? {
                    cur.pos = align_up(at + found.size, Self::WRITE);
                    cur.offset = found.next;
                    let rec = Record::parse(&buf[..found.size as usize]).ok();
                    return Ok(rec);
                }
            }
            // The end of this sector: the next undelivered one.
            match self.next_live(Some(s.seq)) {
                Some(n) => {
                    let ns = self.sectors[n];
                    *cur = Cursor {
                        sector: n,
                        seq: ns.seq,
                        pos: SECTOR_HEADER_LEN,
                        offset: ns.base,
                    };
                }
                None => return Ok(None),
            }
        }
    }

    /// Puts the transactional ids stored inside the dedup window back into
    /// the table (as the server does at start): single-event records of
    /// the transactional class whose recv_ns is at most `window_ms` before
    /// `now_wall_ns`, legacy frames left out; `now_ms` is the table's
    /// clock. Call it before the table's single inserter is taken (a
    /// pipeline takes it). Returns the ids put back.
    pub fn rebuild_dedup(
        &mut self,
        table: DedupRef<'_>,
        window_ms: u64,
        now_wall_ns: u64,
        now_ms: u64,
        buf: &mut [u8],
    ) -> Result<u64, FlashLogError<F::Error>> {
        let since = now_wall_ns.saturating_sub(window_ms.saturating_mul(1_000_000));
        let Some(mut cur) = self.first() else {
            return Ok(0);
        };
        let mut n = 0;
        while let Some(r) = self.next_record(&mut cur, buf)? {
            if r.class() != Class::Transactional
                || r.kind() != crate::record::RecordKind::Single
                || r.recv_ns() < since
            {
                continue;
            }
            let age_ms = now_wall_ns.saturating_sub(r.recv_ns()) / 1_000_000;
            for (offset, frame) in r.frames() {
                if frame.is_legacy() {
                    continue;
                }
                let _ = table.insert(frame.event_id(), now_ms.saturating_sub(age_ms));
                table.set_offset(frame.event_id(), offset);
                n += 1;
            }
        }
        Ok(n)
    }
}
