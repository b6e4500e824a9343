//! The sparse offset index of a segment (like Kafka's `.index`): one entry
//! (event offset, byte position) for the first record at or past every
//! [`INDEX_INTERVAL`] bytes, so a reader seeks to any offset by a binary
//! search and a walk of at most one interval of records instead of a scan
//! of the segment.
//!
//! A closed segment's index is kept beside it as `<base>.index` (written
//! the first time a reader needs it; derived data, so neither fsynced nor
//! trusted: an index whose size, checksum, covered length or first entry
//! does not match its segment is built again). The active segment's is
//! built in memory. Format, little-endian: `ESCIDX\0\0`, u32 version 1, u32
//! interval, u64 bytes of the segment covered, then 16-byte entries (u64
//! offset, u64 position), then a CRC-32C of everything before it.
//!
//! Costs: building reads the segment once in 1 MiB blocks; a lookup is a
//! binary search. Nothing here runs on the ingest or storage threads.

use std::fs::{self, File};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use eventstream_core::crc32c;
use eventstream_core::record::{Record, SEGMENT_HEADER, SEGMENT_HEADER_LEN};

use super::Segment;

/// Bytes of records between two index entries.
pub const INDEX_INTERVAL: u64 = 4096;
const MAGIC: [u8; 8] = *b"ESCIDX\0\0";
const HEADER_LEN: usize = 24;
const ENTRY_LEN: usize = 16;
/// Bytes read at a time while building.
const BLOCK: usize = 1 << 20;

/// The index file of the segment at `segment`.
pub fn index_path(segment: &Path) -> PathBuf {
    segment.with_extension("index")
}

/// A segment's sparse index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentIndex {
    /// Bytes of the segment the index covers: where its valid records end.
    pub covered: u64,
    /// The offset after the last covered record.
    pub next_offset: u64,
    /// (offset, position) of indexed records, both increasing.
    entries: Vec<(u64, u64)>,
}

impl SegmentIndex {
    /// Walks the records of `file` (a segment of `len` bytes whose first
    /// event is `base`) and indexes them; stops at the end or at the first
    /// position that is not a valid record with the expected offset (a
    /// newest segment's unused or torn tail).
    pub fn build(file: &File, base: u64, len: u64) -> io::Result<SegmentIndex> {
        let mut header = [0u8; SEGMENT_HEADER_LEN];
        if len < SEGMENT_HEADER_LEN as u64
            || file.read_exact_at(&mut header, 0).is_err()
            || header != SEGMENT_HEADER
        {
            return Ok(SegmentIndex {
                covered: 0,
                next_offset: base,
                entries: Vec::new(),
            });
        }
        let mut entries = Vec::new();
        let mut buf = vec![0u8; BLOCK];
        let mut pos = SEGMENT_HEADER_LEN as u64;
        let mut next = base;
        let mut next_entry = pos;
        'blocks: while pos < len {
            let want = (len - pos).min(BLOCK as u64) as usize;
            let got = &mut buf[..want];
            file.read_exact_at(got, pos)?;
            let mut at = 0usize;
            loop {
                let Ok(rec) = Record::parse(&got[at..]) else {
                    if at == 0 {
                        // Not even one record fits: a record longer than a
                        // block, or the end of the valid records.
                        match record_at(file, pos, len)? {
                            Some((offset, size)) if offset == next => {
                                if pos >= next_entry {
                                    entries.push((next, pos));
                                    next_entry = pos + INDEX_INTERVAL;
                                }
                                next = next_offset_at(file, pos, size)?;
                                pos += size as u64;
                                continue 'blocks;
                            }
                            _ => break 'blocks,
                        }
                    }
                    break;
                };
                if rec.offset() != next {
                    pos += at as u64;
                    break 'blocks;
                }
                let here = pos + at as u64;
                if here >= next_entry {
                    entries.push((next, here));
                    next_entry = here + INDEX_INTERVAL;
                }
                next = rec.next_offset();
                at += rec.size();
                if at >= want {
                    break;
                }
            }
            pos += at as u64;
        }
        Ok(SegmentIndex {
            covered: pos,
            next_offset: next,
            entries,
        })
    }

    /// The entry with the greatest offset at or below `offset`: where a walk
    /// to the record holding `offset` starts.
    pub fn floor(&self, offset: u64) -> Option<(u64, u64)> {
        let i = self.entries.partition_point(|&(o, _)| o <= offset);
        i.checked_sub(1).and_then(|i| self.entries.get(i)).copied()
    }

    /// Entries held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether it holds no entry (no valid record).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The index file's bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(HEADER_LEN + ENTRY_LEN * self.entries.len() + 12);
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(&(INDEX_INTERVAL as u32).to_le_bytes());
        out.extend_from_slice(&self.covered.to_le_bytes());
        for &(o, p) in &self.entries {
            out.extend_from_slice(&o.to_le_bytes());
            out.extend_from_slice(&p.to_le_bytes());
        }
        out.extend_from_slice(&self.next_offset.to_le_bytes());
        let crc = crc32c::checksum(&out);
        out.extend_from_slice(&crc.to_le_bytes());
        out
    }

    /// Reads an index file's bytes; None if they are not one.
    pub fn decode(bytes: &[u8]) -> Option<SegmentIndex> {
        let n = bytes.len();
        if n < HEADER_LEN + 12 || !(n - HEADER_LEN - 12).is_multiple_of(ENTRY_LEN) {
            return None;
        }
        let u64_at = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |at: usize| u32::from_le_bytes(bytes[at..at + 4].try_into().unwrap_or([0; 4]));
        if bytes[..8] != MAGIC
            || u32_at(8) != 1
            || u64::from(u32_at(12)) != INDEX_INTERVAL
            || crc32c::checksum(&bytes[..n - 4]) != u32_at(n - 4)
        {
            return None;
        }
        let entries: Vec<(u64, u64)> = (HEADER_LEN..n - 12)
            .step_by(ENTRY_LEN)
            .map(|at| (u64_at(at), u64_at(at + 8)))
            .collect();
        let increasing = entries
            .windows(2)
            .all(|w| w[0].0 < w[1].0 && w[0].1 < w[1].1);
        increasing.then(|| SegmentIndex {
            covered: u64_at(16),
            next_offset: u64_at(n - 12),
            entries,
        })
    }

    /// The index of a closed segment: its `.index` file if that matches the
    /// segment, else built and written (best effort: a failed write is
    /// only a slower next seek).
    pub fn of_closed(seg: &Segment) -> io::Result<SegmentIndex> {
        let path = index_path(&seg.path);
        if let Some(index) = fs::read(&path).ok().and_then(|b| Self::decode(&b)) {
            let first_ok = index.entries.first().map(|e| e.1) == Some(SEGMENT_HEADER_LEN as u64)
                && index.entries.first().map(|e| e.0) == Some(seg.base);
            if index.covered == seg.size && first_ok {
                return Ok(index);
            }
        }
        let file = File::open(&seg.path)?;
        let index = Self::build(&file, seg.base, seg.size)?;
        let tmp = path.with_extension("index.tmp");
        if fs::write(&tmp, index.encode())
            .and_then(|()| fs::rename(&tmp, &path))
            .is_err()
        {
            let _ = fs::remove_file(&tmp);
        }
        Ok(index)
    }
}

/// The offset and size of the record at `pos` of `file`, if one is valid
/// there (for a record longer than a block).
fn record_at(file: &File, pos: u64, len: u64) -> io::Result<Option<(u64, usize)>> {
    let mut head = [0u8; 4];
    if pos + 4 > len {
        return Ok(None);
    }
    file.read_exact_at(&mut head, pos)?;
    let size = 4 + u32::from_le_bytes(head) as u64;
    if pos + size > len {
        return Ok(None);
    }
    let mut rec = vec![0u8; size as usize];
    file.read_exact_at(&mut rec, pos)?;
    Ok(Record::parse(&rec)
        .ok()
        .filter(|r| r.size() == rec.len())
        .map(|r| (r.offset(), r.size())))
}

/// The offset after the record of `size` bytes at `pos` (already checked).
fn next_offset_at(file: &File, pos: u64, size: usize) -> io::Result<u64> {
    let mut rec = vec![0u8; size];
    file.read_exact_at(&mut rec, pos)?;
    Ok(Record::parse(&rec).map_or(0, |r| r.next_offset()))
}

/// Where the record holding `offset` starts in the segment `seg` (found
/// through `index`): its byte position and first offset; None if the
/// segment's valid records do not hold it.
pub fn seek(file: &File, index: &SegmentIndex, offset: u64) -> io::Result<Option<(u64, u64)>> {
    if offset >= index.next_offset {
        return Ok(None);
    }
    let Some((mut at_offset, mut pos)) = index.floor(offset) else {
        return Ok(None);
    };
    // Walk at most one interval of records (plus the last one's size).
    let mut buf = vec![0u8; (INDEX_INTERVAL as usize) * 2];
    loop {
        let want = (index.covered.saturating_sub(pos)).min(buf.len() as u64) as usize;
        if want == 0 {
            return Ok(None);
        }
        file.read_exact_at(&mut buf[..want], pos)?;
        let mut at = 0usize;
        while let Ok(rec) = Record::parse(&buf[at..want]) {
            if rec.offset() != at_offset {
                return Ok(None);
            }
            if rec.next_offset() > offset {
                return Ok(Some((pos + at as u64, at_offset)));
            }
            at_offset = rec.next_offset();
            at += rec.size();
        }
        if at == 0 {
            // A record longer than the buffer.
            match record_at(file, pos, index.covered)? {
                Some((o, size)) if o == at_offset => {
                    let next = next_offset_at(file, pos, size)?;
                    if next > offset {
                        return Ok(Some((pos, at_offset)));
                    }
                    at_offset = next;
                    pos += size as u64;
                }
                _ => return Ok(None),
            }
        } else {
            pos += at as u64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use eventstream_core::record::{RecordBuilder, RecordKind};
    use eventstream_core::wire::FrameRepr;
    use eventstream_core::{Class, Priority};
    use std::io::Write;

    /// A segment of records: `sizes[i]` events of `payload` bytes each in
    /// record i (1: a single record), from offset `base`. Returns the file
    /// and each record's (first offset, position).
    fn segment(dir: &Path, base: u64, records: &[(usize, usize)]) -> (Segment, Vec<(u64, u64)>) {
        let path = dir.join(eventstream_core::record::segment_name(base).as_str());
        let mut f = File::create(&path).unwrap();
        f.write_all(&SEGMENT_HEADER).unwrap();
        let mut pos = SEGMENT_HEADER_LEN as u64;
        let mut offset = base;
        let mut at = Vec::new();
        for &(events, payload) in records {
            let body = vec![7u8; payload];
            let mut frame = vec![0u8; 40 + 5 + payload];
            let mut buf = vec![0u8; 28 + events * frame.len()];
            let kind = if events > 1 {
                RecordKind::Batch
            } else {
                RecordKind::Single
            };
            let mut b = RecordBuilder::new(&mut buf, kind, Class::Batch, 0).unwrap();
            for i in 0..events {
                FrameRepr {
                    priority: Priority::Batch,
                    flags: 0,
                    partition: 0,
                    event_id: offset + i as u64,
                    timestamp_ns: 0,
                    topic: b"t/abc",
                    payload: &body,
                }
                .encode(&mut frame)
                .unwrap();
                b.push(&frame).unwrap();
            }
            let rec = b.finish(offset).unwrap();
            f.write_all(rec).unwrap();
            at.push((offset, pos));
            pos += rec.len() as u64;
            offset += events as u64;
        }
        let size = f.metadata().unwrap().len();
        (Segment { base, path, size }, at)
    }

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("es-index-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn every_offset_seeks_to_the_record_that_holds_it() {
        let dir = temp_dir("seek");
        // Singles and batches of varied sizes, and one record past a block.
        let mut records: Vec<(usize, usize)> =
            (0..3000).map(|i| (1 + i % 5, (i * 37) % 700)).collect();
        records.insert(1500, (20, 60_000));
        let (seg, at) = segment(&dir, 1000, &records);
        let file = File::open(&seg.path).unwrap();
        let index = SegmentIndex::of_closed(&seg).unwrap();
        assert_eq!(index.covered, seg.size);
        assert!(index.len() > 100, "{} entries", index.len());
        let end = at.last().unwrap().0 + records.last().unwrap().0 as u64;
        assert_eq!(index.next_offset, end);
        for (i, &(first, pos)) in at.iter().enumerate() {
            let events = records[i].0 as u64;
            for o in first..first + events {
                assert_eq!(
                    seek(&file, &index, o).unwrap(),
                    Some((pos, first)),
                    "offset {o}"
                );
            }
        }
        assert_eq!(seek(&file, &index, end).unwrap(), None);
        assert_eq!(seek(&file, &index, 999).unwrap(), None);
        // The file it wrote is read back as it is.
        let saved = fs::read(index_path(&seg.path)).unwrap();
        assert_eq!(SegmentIndex::decode(&saved), Some(index));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_stale_or_damaged_index_file_is_built_again() {
        let dir = temp_dir("stale");
        let records: Vec<(usize, usize)> = (0..400).map(|i| (1, 100 + i % 300)).collect();
        let (seg, at) = segment(&dir, 0, &records);
        let good = SegmentIndex::of_closed(&seg).unwrap();
        let path = index_path(&seg.path);
        // A flipped byte: the CRC refuses it.
        let mut bytes = fs::read(&path).unwrap();
        bytes[30] ^= 1;
        assert_eq!(SegmentIndex::decode(&bytes), None);
        fs::write(&path, &bytes).unwrap();
        assert_eq!(SegmentIndex::of_closed(&seg).unwrap(), good);
        // An index of another segment (its covered length differs).
        let other: Vec<(usize, usize)> = (0..10).map(|_| (1, 50)).collect();
        let (seg2, _) = segment(&dir, 5000, &other);
        let other_index = SegmentIndex::of_closed(&seg2).unwrap();
        fs::write(&path, other_index.encode()).unwrap();
        let rebuilt = SegmentIndex::of_closed(&seg).unwrap();
        assert_eq!(rebuilt, good);
        let file = File::open(&seg.path).unwrap();
        assert_eq!(
            seek(&file, &rebuilt, 399).unwrap(),
            Some((at[399].1, at[399].0))
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_torn_or_zero_filled_tail_ends_the_index() {
        let dir = temp_dir("tail");
        let records: Vec<(usize, usize)> = (0..50).map(|_| (2, 200)).collect();
        let (seg, at) = segment(&dir, 0, &records);
        // Zeros after the records (a segment made ahead of use), then half
        // a record.
        let mut f = fs::OpenOptions::new().append(true).open(&seg.path).unwrap();
        f.write_all(&[0u8; 5000]).unwrap();
        let len = f.metadata().unwrap().len();
        let file = File::open(&seg.path).unwrap();
        let index = SegmentIndex::build(&file, 0, len).unwrap();
        assert_eq!(index.covered, seg.size);
        assert_eq!(index.next_offset, 100);
        assert_eq!(seek(&file, &index, 99).unwrap(), Some((at[49].1, at[49].0)));
        assert_eq!(seek(&file, &index, 100).unwrap(), None);
        let truncated = seg.size - 10;
        let index = SegmentIndex::build(&file, 0, truncated).unwrap();
        assert_eq!(index.next_offset, 98);
        fs::remove_dir_all(&dir).unwrap();
    }
}
