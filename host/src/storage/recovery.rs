//! Start-up recovery of the newest segment (PROTOCOL.md section 6), and
//! the record reader `inspect` uses.

use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;

use eventstream_core::record::{
    recover, unused_tail, Record, Recovery, SEGMENT_HEADER, SEGMENT_HEADER_LEN,
};

use super::{Opened, Segment};

/// Recovers the newest segment per PROTOCOL.md section 6; returns the file
/// opened for appends, its length and the next offset.
pub(super) fn recover_segment(
    seg: &mut Segment,
    repair: bool,
    opened: &mut Opened,
) -> Result<(File, u64, u64), String> {
    let name = seg.path.display().to_string();
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&seg.path)
        .map_err(|e| format!("cannot open {name}: {e}"))?;
    let bytes = fs::read(&seg.path).map_err(|e| format!("cannot read {name}: {e}"))?;
    let rewrite_empty = |file: &File| -> Result<(), String> {
        file.set_len(0)
            .and_then(|()| file.write_all_at(&SEGMENT_HEADER, 0))
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot rewrite {name}: {e}"))
    };
    let truncate = |file: &File, to: usize| -> Result<(), String> {
        file.set_len(to as u64)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot truncate {name}: {e}"))
    };
    let (len, next) = match recover(&bytes, seg.base) {
        Recovery::Clean { next_offset } => {
            // Made durable before this run appends after it: a crashed
            // run's last writes may be in the page cache only.
            file.sync_data()
                .map_err(|e| format!("cannot fsync {name}: {e}"))?;
            (bytes.len(), next_offset)
        }
        Recovery::RewriteEmpty { next_offset } => {
            rewrite_empty(&file)?;
            opened.notes.push(format!(
                "{name}: shorter than its header ({} bytes); rewritten as an empty segment",
                bytes.len()
            ));
            (SEGMENT_HEADER_LEN, next_offset)
        }
        Recovery::BadHeader => {
            if !repair {
                return Err(format!(
                    "{name}: bad segment header; start with --repair to rewrite it as an empty segment"
                ));
            }
            rewrite_empty(&file)?;
            opened.notes.push(format!(
                "{name}: bad header; --repair rewrote it as an empty segment, dropping {} bytes",
                bytes.len()
            ));
            (SEGMENT_HEADER_LEN, seg.base)
        }
        Recovery::Truncate { to, next_offset } => {
            truncate(&file, to)?;
            let what = if bytes.get(to..).is_some_and(unused_tail) {
                "zero-filled tail (unwritten space of a segment made ahead of use, or a torn write)"
            } else {
                "torn tail"
            };
            opened.notes.push(format!(
                "{name}: {what} of {} bytes at position {to} truncated; next offset {next_offset}",
                bytes.len() - to
            ));
            (to, next_offset)
        }
        Recovery::Refuse {
            bad_at,
            valid_at,
            next_offset,
            dropped_bytes,
            dropped_offsets,
        } => {
            if !repair {
                return Err(format!(
                    "{name}: bad record at position {bad_at} followed by a valid record at {valid_at}; refusing to start (--repair truncates at {bad_at})"
                ));
            }
            truncate(&file, bad_at)?;
            opened.notes.push(format!(
                "{name}: --repair truncated at position {bad_at}: dropped {dropped_bytes} bytes, offsets {}..{}; next offset {next_offset}",
                dropped_offsets.0, dropped_offsets.1
            ));
            (bad_at, next_offset)
        }
    };
    seg.size = len as u64;
    Ok((file, len as u64, next))
}

/// Reads every record of one segment; stops at the first invalid position
/// and returns it with the reason.
pub fn read_records(
    bytes: &[u8],
    base: u64,
    each: impl FnMut(&Record<'_>),
) -> Result<u64, (usize, String)> {
    if bytes.get(..SEGMENT_HEADER_LEN) != Some(&SEGMENT_HEADER[..]) {
        return Err((0, "bad segment header".into()));
    }
    read_records_at(bytes, SEGMENT_HEADER_LEN, base, each)
}

/// Reads the records of a segment's `bytes` from position `pos`, where the
/// record of offset `next` starts; stops at the first invalid position and
/// returns it with the reason.
pub fn read_records_at(
    bytes: &[u8],
    mut pos: usize,
    mut next: u64,
    mut each: impl FnMut(&Record<'_>),
) -> Result<u64, (usize, String)> {
    while pos < bytes.len() {
        let rec = match Record::parse(&bytes[pos..]) {
            Ok(r) => r,
            Err(e) => return Err((pos, format!("invalid record: {e:?}"))),
        };
        if rec.offset() != next {
            return Err((
                pos,
                format!("record offset {} where {next} was expected", rec.offset()),
            ));
        }
        each(&rec);
        next = rec.next_offset();
        pos += rec.size();
    }
    Ok(next)
}
