//! Start-up's dedup rebuild: the transactional ids the log holds inside the
//! dedup window go back into the table, with their offsets, so a resend
//! after a restart is answered DUPLICATE as before it.

use std::fs;
use std::io;
use std::time::{Duration, SystemTime};

use eventstream_core::dedup::Inserter;
use eventstream_core::record::{Record, RecordKind, SEGMENT_HEADER_LEN};
use eventstream_core::Class;

use crate::storage::Segment;

/// Puts the transactional ids stored inside the window back into the
/// dedup table, stamped with their age, with their offsets. Returns how
/// many.
pub fn rebuild_dedup(
    segments: &[Segment],
    inserter: &mut Inserter<'_>,
    window: Duration,
    wall_now_ns: u64,
    mono_now_ms: u64,
) -> io::Result<usize> {
    let window_ns = window.as_nanos().min(u128::from(u64::MAX)) as u64;
    let since = wall_now_ns.saturating_sub(window_ns);
    let cutoff = SystemTime::now()
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut n = 0;
    let table = inserter.table();
    for (i, seg) in segments.iter().enumerate() {
        // A closed segment last written before the window holds nothing
        // inside it.
        let newest = i + 1 == segments.len();
        if !newest {
            let modified = fs::metadata(&seg.path)?.modified()?;
            if modified < cutoff {
                continue;
            }
        }
        let bytes = fs::read(&seg.path)?;
        let mut pos = SEGMENT_HEADER_LEN;
        while let Some(rest) = bytes.get(pos..) {
            let Ok(rec) = Record::parse(rest) else { break };
            pos += rec.size();
            if rec.kind() != RecordKind::Single
                || rec.class() != Class::Transactional
                || rec.recv_ns() < since
            {
                continue;
            }
            for (offset, frame) in rec.frames() {
                if frame.is_legacy() {
                    continue;
                }
                let age_ms = wall_now_ns.saturating_sub(rec.recv_ns()) / 1_000_000;
                let _ = inserter.insert(frame.event_id(), mono_now_ms.saturating_sub(age_ms));
                table.set_offset(frame.event_id(), offset);
                n += 1;
            }
        }
    }
    Ok(n)
}
