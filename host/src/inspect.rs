//! `eventstream inspect`: reads a data directory's segments (it takes no
//! lock, so it works beside a running server) and prints a summary, one
//! JSON object per event, or a verification of every record.

use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::FileExt;

use eventstream_core::record::{unused_tail, Record};
use eventstream_core::wire::Frame;
use eventstream_core::Class;

use crate::config::InspectArgs;
use crate::repair::{Gaps, DAMAGED_DIR, REPORT};
use crate::storage::{list_segments, read_records, read_records_at, seek, SegmentIndex};

/// A JSON string literal of `s`.
pub fn json_str(out: &mut String, s: &str) {
    out.push('"');
    for ch in s.chars() {
        match ch {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if (c as u32) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", c as u32);
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

/// One event's fields as `inspect --json` and `consume --json` print them.
pub struct EventFields<'a> {
    /// Its offset.
    pub offset: u64,
    /// Its record's class.
    pub class: Class,
    /// Its record's recv_ns.
    pub recv_ns: u64,
    /// The stored frame.
    pub frame: &'a Frame<&'a [u8]>,
}

impl EventFields<'_> {
    /// The JSON object's members, without the closing brace.
    pub fn json_open(&self) -> String {
        let f = self.frame;
        let mut o = String::with_capacity(256);
        let _ = write!(
            o,
            "{{\"offset\":{},\"event_id\":{},\"class\":\"{}\",\"priority\":\"{}\",\"topic\":",
            self.offset,
            f.event_id(),
            self.class.name(),
            f.priority().name()
        );
        json_str(&mut o, &String::from_utf8_lossy(f.topic_bytes()));
        let _ = write!(
            o,
            ",\"partition\":{},\"timestamp_ns\":{},\"recv_ns\":{},\"payload_len\":{},\"legacy\":{}",
            f.partition(),
            f.timestamp_ns(),
            self.recv_ns,
            f.payload_len(),
            f.is_legacy()
        );
        o
    }
}

/// The `inspect --json` object of one event (PROTOCOL.md field names).
pub fn event_json(rec: &Record<'_>, offset: u64, frame: &Frame<&[u8]>) -> String {
    let mut o = EventFields {
        offset,
        class: rec.class(),
        recv_ns: rec.recv_ns(),
        frame,
    }
    .json_open();
    o.push('}');
    o
}

#[derive(Default)]
struct Totals {
    records: u64,
    batches: u64,
    per_class: [u64; 3],
    first: Option<u64>,
    next: u64,
    min_recv: Option<u64>,
    max_recv: u64,
    bytes: u64,
}

/// Runs `inspect`; an error is one line (for `--verify`, the first bad
/// position).
pub fn run(args: &InspectArgs) -> Result<(), String> {
    let dir = &args.data_dir;
    let segments =
        list_segments(dir).map_err(|e| format!("cannot read data dir {}: {e}", dir.display()))?;
    let stdout = io::stdout();
    let mut out = BufWriter::new(stdout.lock());
    let mut totals = Totals::default();
    let from = args.from.unwrap_or(0);
    let mut printed = 0u64;
    let limit = args.limit.unwrap_or(u64::MAX);
    let mut expected: Option<u64> = None;
    let mut write_err: Option<io::Error> = None;
    // Gaps a repair listed are accepted (and reported); any other is not.
    let listed = Gaps::read(dir)?;
    let mut gaps: Vec<(u64, u64)> = Vec::new();
    for (i, seg) in segments.iter().enumerate() {
        let newest = i + 1 == segments.len();
        if args.json && printed >= limit {
            break;
        }
        // Skip whole segments before --from (the next one starts later).
        if args.json && !args.verify {
            if let Some(next) = segments.get(i + 1) {
                if next.base <= from {
                    continue;
                }
            }
        }
        // A closed segment that holds --from is read from the record that
        // holds it, found through the segment's sparse index.
        let sought = if args.json && !args.verify && !newest && from > seg.base {
            SegmentIndex::of_closed(seg)
                .ok()
                .and_then(|ix| File::open(&seg.path).ok().map(|f| (ix, f)))
                .and_then(|(ix, f)| seek(&f, &ix, from).ok().flatten())
        } else {
            None
        };
        let (bytes, start) = match sought {
            Some((pos, first)) => {
                // Only the bytes from `pos` are read.
                let mut tail = vec![0u8; seg.size.saturating_sub(pos) as usize];
                File::open(&seg.path)
                    .and_then(|f| f.read_exact_at(&mut tail, pos))
                    .map_err(|e| format!("cannot read {}: {e}", seg.path.display()))?;
                (tail, Some((pos, first)))
            }
            None => (
                std::fs::read(&seg.path)
                    .map_err(|e| format!("cannot read {}: {e}", seg.path.display()))?,
                None,
            ),
        };
        totals.bytes += bytes.len() as u64;
        if let Some(exp) = expected.filter(|&exp| exp != seg.base) {
            if exp < seg.base && listed.covers(exp, seg.base) {
                gaps.push((exp, seg.base));
                if args.json {
                    eprintln!(
                        "inspect: gap {exp}..{} (lost to --repair, listed in {DAMAGED_DIR}/{REPORT})",
                        seg.base
                    );
                }
            } else if args.verify {
                return Err(format!(
                    "{}: segment base {} where offset {exp} was expected (offset gap not listed in {DAMAGED_DIR}/{REPORT})",
                    seg.path.display(),
                    seg.base
                ));
            }
        }
        let each = |rec: &eventstream_core::record::Record<'_>| {
            totals.records += 1;
            if rec.count() > 1 || rec.kind() == eventstream_core::record::RecordKind::Batch {
                totals.batches += 1;
            }
            totals.per_class[rec.class().index()] += u64::from(rec.count());
            totals.first.get_or_insert(rec.offset());
            totals.next = rec.next_offset();
            totals.min_recv = Some(
                totals
                    .min_recv
                    .map_or(rec.recv_ns(), |m| m.min(rec.recv_ns())),
            );
            totals.max_recv = totals.max_recv.max(rec.recv_ns());
            if args.json && rec.next_offset() > from && printed < limit && write_err.is_none() {
                for (offset, frame) in rec.frames() {
                    if offset < from || printed >= limit {
                        continue;
                    }
                    if let Err(e) = writeln!(out, "{}", event_json(rec, offset, &frame)) {
                        write_err = Some(e);
                        break;
                    }
                    printed += 1;
                }
            }
        };
        let result = match start {
            Some((_, first)) => read_records_at(&bytes, 0, first, each),
            None => read_records(&bytes, seg.base, each),
        };
        // Positions in the file, where only a tail was read.
        let skipped = start.map_or(0, |(pos, _)| pos as usize);
        let result = result.map_err(|(pos, why)| (pos + skipped, why));
        if let Some(e) = write_err.take() {
            if e.kind() == io::ErrorKind::BrokenPipe {
                return Ok(());
            }
            return Err(format!("cannot write: {e}"));
        }
        match result {
            Ok(next) => expected = Some(next),
            // The unused end of a newest segment made ahead of use (the
            // server cuts it when the segment closes): the log ends there.
            Err((pos, _)) if newest && bytes.get(pos..).is_some_and(unused_tail) => {
                if !args.json {
                    let _ = writeln!(
                        out,
                        "note: {} ends in {} zero bytes from position {pos} (space made ahead of use)",
                        seg.path.display(),
                        bytes.len() - pos
                    );
                }
                totals.bytes -= (bytes.len() - pos) as u64;
            }
            Err((pos, why)) => {
                if args.verify || !newest {
                    return Err(format!("{}: position {pos}: {why}", seg.path.display()));
                }
                // The newest segment may end in a torn tail the server
                // truncates at start; say so in the summary.
                if !args.json {
                    let _ = writeln!(
                        out,
                        "note: {} has {} unreadable bytes from position {pos} ({why})",
                        seg.path.display(),
                        bytes.len() - pos
                    );
                }
                expected = None;
            }
        }
    }
    if args.json {
        return out.flush().map_err(|e| format!("cannot write: {e}"));
    }
    let events: u64 = totals.per_class.iter().sum();
    let mut s = String::new();
    for (a, b) in &gaps {
        let _ = writeln!(
            s,
            "gap:       {a}..{b} ({} offsets lost to --repair, listed in {DAMAGED_DIR}/{REPORT})",
            b - a
        );
    }
    if args.verify {
        let _ = writeln!(
            s,
            "ok: {} segments, {} records, {} events, every crc and offset checks{}",
            segments.len(),
            totals.records,
            events,
            if gaps.is_empty() {
                String::new()
            } else {
                format!(" but for {} listed gaps", gaps.len())
            }
        );
    } else {
        let _ = writeln!(s, "data dir:  {}", dir.display());
        let _ = writeln!(s, "segments:  {} ({} bytes)", segments.len(), totals.bytes);
        let _ = writeln!(
            s,
            "records:   {} ({} batch records)",
            totals.records, totals.batches
        );
        let _ = writeln!(s, "events:    {events}");
        for c in Class::ALL {
            let _ = writeln!(s, "  {:<14} {}", c.name(), totals.per_class[c.index()]);
        }
        match totals.first {
            Some(first) => {
                let _ = writeln!(s, "offsets:   {first}..{}", totals.next.saturating_sub(1));
                let _ = writeln!(
                    s,
                    "recv time: {}..{} (unix ns)",
                    totals.min_recv.unwrap_or(0),
                    totals.max_recv
                );
            }
            None => {
                let _ = writeln!(s, "offsets:   none");
            }
        }
    }
    out.write_all(s.as_bytes())
        .and_then(|()| out.flush())
        .map_err(|e| format!("cannot write: {e}"))
}
