//! Start-up checks of the closed segments (every segment but the newest)
//! and `--repair` of them, per PROTOCOL.md section 6: closed segments are
//! never truncated; a bad record or an offset gap stops start-up with one
//! line, unless `--repair` moves the damaged file into `damaged/`, puts the
//! records that still validate in its place (one segment file per unbroken
//! run of offsets) and appends the lost ranges to `damaged/report`. From then
//! on start-up, readers and `inspect` accept exactly the listed gaps.
//!
//! A repair is crash-safe: the new files are written under temporary names
//! (`.repair-<damaged base>-<run base>.tmp`) and fsynced, the report is
//! appended and fsynced, and only then is the damaged file moved and the
//! new ones renamed into place. A start that finds temporary files finishes
//! that last step if the damaged file is already gone, and otherwise
//! deletes them (the next `--repair` does it again).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::Path;
use std::time::{Duration, SystemTime};

use eventstream_core::record::{
    recover, salvage, segment_name, Piece, Recovery, SEGMENT_HEADER, SEGMENT_HEADER_LEN,
};

use crate::storage::Segment;

/// The folder inside the data dir that holds damaged files and the report.
pub const DAMAGED_DIR: &str = "damaged";
/// The report's name inside [`DAMAGED_DIR`].
pub const REPORT: &str = "report";
/// How much of a closed segment outside the dedup window start-up reads:
/// its header and first record (a batch record of the largest frames fits).
const HEAD_READ: u64 = 128 * 1024;

/// Offset ranges lost to a repair, as `damaged/report` lists them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Gaps(Vec<(u64, u64)>);

impl Gaps {
    /// Reads `dir/damaged/report` (none: no gaps). Lines are `lost FIRST END
    /// BYTES FILE`; `#` starts a comment.
    pub fn read(dir: &Path) -> Result<Gaps, String> {
        let path = dir.join(DAMAGED_DIR).join(REPORT);
        let text = match fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Gaps::default()),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let mut ranges = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let f: Vec<&str> = line.split_whitespace().collect();
            let parsed = match f.as_slice() {
                ["lost", first, end, bytes, _file] => first
                    .parse::<u64>()
                    .ok()
                    .zip(end.parse::<u64>().ok())
                    .filter(|(a, b)| a <= b && bytes.parse::<u64>().is_ok()),
                _ => None,
            };
            let Some(range) = parsed else {
                return Err(format!(
                    "{} line {}: not `lost FIRST END BYTES FILE`: {line:?}",
                    path.display(),
                    n + 1
                ));
            };
            if range.0 < range.1 {
                ranges.push(range);
            }
        }
        ranges.sort_unstable();
        ranges.dedup();
        Ok(Gaps(ranges))
    }

    /// Whether the listed ranges cover `first..end` exactly, end to end.
    pub fn covers(&self, first: u64, end: u64) -> bool {
        let mut at = first;
        while at < end {
            match self.0.iter().filter(|r| r.0 == at).map(|r| r.1).max() {
                Some(next) if next <= end => at = next,
                _ => return false,
            }
        }
        at == end
    }

    /// The listed ranges, in order.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.0
    }

    /// Offsets in all listed ranges (a later repair may list a range again,
    /// or a wider one: each offset counts once).
    pub fn lost_offsets(&self) -> u64 {
        let mut total = 0;
        let mut covered_to = 0;
        for &(a, b) in &self.0 {
            let from = a.max(covered_to);
            if b > from {
                total += b - from;
            }
            covered_to = covered_to.max(b);
        }
        total
    }
}

/// What start-up found wrong with one closed segment.
struct Damage {
    /// The error line without `--repair`.
    line: String,
    /// The pieces `salvage` found (runs kept and ranges lost).
    pieces: Vec<Piece>,
    /// The whole file, if it is to be moved and rewritten.
    bytes: Option<Vec<u8>>,
}

/// Checks the closed segments of `segments` (all but the last) as far as
/// start-up relies on them: record by record those last written within
/// `window` of now (and every newer one), the header and first record of
/// the older ones. With `repair`, repairs what it finds; `segments` is
/// listed again after a repair. Returns the gaps the report lists.
pub fn check_closed(
    dir: &Path,
    segments: &mut Vec<Segment>,
    window: Duration,
    repair: bool,
    notes: &mut Vec<String>,
) -> Result<Gaps, String> {
    finish_interrupted(dir, notes)?;
    let mut gaps = Gaps::read(dir)?;
    // The names a crashed run made, durable before anything new is added.
    sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    let cutoff = SystemTime::now()
        .checked_sub(window)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let closed = segments.len().saturating_sub(1);
    // From the first closed segment written inside the window on, every
    // one is read whole.
    let mut whole_from = closed;
    for (i, seg) in segments[..closed].iter().enumerate() {
        let modified = fs::metadata(&seg.path)
            .and_then(|m| m.modified())
            .map_err(|e| format!("cannot stat {}: {e}", seg.path.display()))?;
        if modified >= cutoff {
            whole_from = i;
            break;
        }
    }
    let mut repaired = false;
    for i in 0..closed {
        let (seg, end) = (&segments[i], segments[i + 1].base);
        let Some(damage) = check_one(seg, end, i >= whole_from, &gaps)? else {
            continue;
        };
        if let Some(cut) = torn_end(segments, i)? {
            cut_torn_end(dir, segments, i, cut, notes)?;
            break;
        }
        if !repair {
            return Err(damage.line);
        }
        repair_one(dir, seg, damage, notes)?;
        repaired = true;
    }
    if repaired {
        *segments = crate::storage::list_segments(dir)
            .map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        gaps = Gaps::read(dir)?;
    }
    Ok(gaps)
}

/// Checks one closed segment whose successor starts at `end`.
fn check_one(seg: &Segment, end: u64, whole: bool, gaps: &Gaps) -> Result<Option<Damage>, String> {
    let name = seg.path.display();
    if seg.base >= end {
        return Err(format!(
            "{name}: base offset {} is not below the next segment's {end}; refusing to start (move one of them away)",
            seg.base
        ));
    }
    let mut file = File::open(&seg.path).map_err(|e| format!("cannot open {name}: {e}"))?;
    let mut bytes = Vec::new();
    let limit = if whole { u64::MAX } else { HEAD_READ };
    (&mut file)
        .take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| format!("cannot read {name}: {e}"))?;
    if !whole {
        // Only the header and the first record: the rest is read whole if
        // they are bad.
        let head_ok = bytes.get(..SEGMENT_HEADER_LEN) == Some(&SEGMENT_HEADER[..]);
        let first_ok = head_ok
            && eventstream_core::record::Record::parse(&bytes[SEGMENT_HEADER_LEN..])
                .is_ok_and(|r| r.offset() == seg.base && r.next_offset() <= end)
            || bytes.len() == SEGMENT_HEADER_LEN;
        if first_ok {
            return Ok(None);
        }
        return check_one(seg, end, true, gaps);
    }
    // What a crashed run wrote may still sit in the page cache only: made
    // durable now, before this run adds anything after it (else a power
    // cut could take those bytes and keep newer ones).
    file.sync_data()
        .map_err(|e| format!("cannot fsync {name}: {e}"))?;
    let mut pieces = Vec::new();
    salvage(&bytes, seg.base, end, |p| pieces.push(p));
    for p in &pieces {
        if let Piece::Lost {
            first,
            end: lost_end,
            at,
            bytes: n,
        } = *p
        {
            if n > 0 {
                return Ok(Some(Damage {
                    line: format!(
                        "{name}: bad record at position {at} ({n} bytes damaged, offsets {first}..{lost_end} affected); refusing to start (--repair moves the file to {DAMAGED_DIR}/, keeps the records that validate and lists what is lost in {DAMAGED_DIR}/{REPORT})"
                    ),
                    pieces,
                    bytes: Some(bytes),
                }));
            }
            if !gaps.covers(first, lost_end) {
                let next = seg.path.with_file_name(segment_name(end).as_str());
                return Ok(Some(Damage {
                    line: format!(
                        "{name}: offsets {first}..{lost_end} missing before {} (offset gap); refusing to start (--repair lists the gap in {DAMAGED_DIR}/{REPORT})",
                        next.display()
                    ),
                    pieces,
                    bytes: None,
                }));
            }
        }
    }
    Ok(None)
}

/// Where the log really ends, if closed segment `i` ends in a torn tail
/// (its records are valid up to a point and nothing valid follows in it)
/// and no later segment holds a valid record: a power cut took the rest, a
/// roll having made the next segment's name durable before this one's
/// last bytes. Returns the length to cut segment `i` to. Anything else (a
/// later segment with records after the tear) is damage, not a tear.
fn torn_end(segments: &[Segment], i: usize) -> Result<Option<u64>, String> {
    let read = |seg: &Segment| {
        fs::read(&seg.path).map_err(|e| format!("cannot read {}: {e}", seg.path.display()))
    };
    let seg = &segments[i];
    let bytes = read(seg)?;
    let cut = match recover(&bytes, seg.base) {
        Recovery::Clean { next_offset } if next_offset < segments[i + 1].base => bytes.len(),
        Recovery::Truncate { to, .. } => to,
        // Not even its header is left: it becomes the newest segment,
        // rewritten empty.
        Recovery::RewriteEmpty { .. } => bytes.len(),
        _ => return Ok(None),
    };
    for later in &segments[i + 1..] {
        let mut records = false;
        salvage(&read(later)?, later.base, u64::MAX, |p| {
            records |= matches!(p, Piece::Run { .. });
        });
        if records {
            return Ok(None);
        }
    }
    Ok(Some(cut as u64))
}

/// Cuts segment `i` at `cut` and removes every later segment (none holds
/// a record): the log goes on from the end of `i`, as after a torn tail of
/// the newest segment.
fn cut_torn_end(
    dir: &Path,
    segments: &mut Vec<Segment>,
    i: usize,
    cut: u64,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let seg = &segments[i];
    let name = seg.path.display().to_string();
    let file = OpenOptions::new()
        .write(true)
        .open(&seg.path)
        .map_err(|e| format!("cannot open {name}: {e}"))?;
    if file.metadata().map(|m| m.len()).unwrap_or(cut) > cut {
        file.set_len(cut)
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("cannot truncate {name}: {e}"))?;
        let _ = fs::remove_file(crate::storage::index_path(&segments[i].path));
    }
    let mut removed = Vec::new();
    for later in segments.drain(i + 1..) {
        fs::remove_file(&later.path)
            .map_err(|e| format!("cannot remove {}: {e}", later.path.display()))?;
        let _ = fs::remove_file(crate::storage::index_path(&later.path));
        removed.push(later.path.display().to_string());
    }
    sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    segments[i].size = cut;
    notes.push(format!(
        "{name}: the log ends at position {cut} (a torn tail left by a crash: nothing valid after it, here or in a later segment); removed the later segments without records: {}",
        removed.join(", ")
    ));
    Ok(())
}

/// Repairs one damaged closed segment (see the module doc for the order).
fn repair_one(
    dir: &Path,
    seg: &Segment,
    damage: Damage,
    notes: &mut Vec<String>,
) -> Result<(), String> {
    let io_err = |what: &str, e: io::Error| format!("--repair: {what}: {e}");
    let damaged_dir = dir.join(DAMAGED_DIR);
    fs::create_dir_all(&damaged_dir).map_err(|e| io_err("cannot create damaged/", e))?;
    let file_name = segment_name(seg.base);
    // 1. The runs that validate, grouped by unbroken offsets, under
    // temporary names.
    let mut temps = Vec::new();
    if let Some(bytes) = &damage.bytes {
        let mut groups: Vec<(u64, Vec<u8>)> = Vec::new();
        let mut last_next = None;
        for p in &damage.pieces {
            if let Piece::Run {
                at,
                len,
                first,
                next,
            } = *p
            {
                match groups.last_mut() {
                    Some((_, body)) if last_next == Some(first) => {
                        body.extend_from_slice(&bytes[at..at + len])
                    }
                    _ => groups.push((first, bytes[at..at + len].to_vec())),
                }
                last_next = Some(next);
            }
        }
        for (first, body) in groups {
            let temp = dir.join(format!(".repair-{}-{first}.tmp", seg.base));
            let mut f = File::create(&temp).map_err(|e| io_err("cannot create a run file", e))?;
            f.write_all(&SEGMENT_HEADER)
                .and_then(|()| f.write_all(&body))
                .and_then(|()| f.sync_all())
                .map_err(|e| io_err("cannot write a run file", e))?;
            temps.push((temp, first));
        }
    }
    // 2. The report.
    let mut text = String::new();
    let mut lost = 0u64;
    for p in &damage.pieces {
        if let Piece::Lost {
            first, end, bytes, ..
        } = *p
        {
            let named = if damage.bytes.is_some() {
                file_name.as_str().to_string()
            } else {
                segment_name(first).as_str().to_string()
            };
            text.push_str(&format!("lost {first} {end} {bytes} {named}\n"));
            lost += end - first;
        }
    }
    let stamp = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let header = match &damage.bytes {
        Some(_) => format!(
            "# repair at unix time {stamp}: {} moved to {DAMAGED_DIR}/; {lost} offsets lost; transactional ids stored at them are no longer protected against duplicates\n",
            file_name.as_str()
        ),
        None => format!(
            "# repair at unix time {stamp}: offset gap listed; {lost} offsets lost; transactional ids stored at them are no longer protected against duplicates\n"
        ),
    };
    let mut report = OpenOptions::new()
        .create(true)
        .append(true)
        .open(damaged_dir.join(REPORT))
        .map_err(|e| io_err("cannot open the report", e))?;
    report
        .write_all(header.as_bytes())
        .and_then(|()| report.write_all(text.as_bytes()))
        .and_then(|()| report.sync_all())
        .map_err(|e| io_err("cannot write the report", e))?;
    // 3. Move the damaged file, put the runs in place.
    if damage.bytes.is_some() {
        let mut target = damaged_dir.join(file_name.as_str());
        let mut n = 1;
        while target.exists() {
            target = damaged_dir.join(format!("{}.{n}", file_name.as_str()));
            n += 1;
        }
        fs::rename(&seg.path, &target).map_err(|e| io_err("cannot move the damaged file", e))?;
        // Its sparse index (derived data) would describe the wrong bytes.
        let _ = fs::remove_file(crate::storage::index_path(&seg.path));
        for (temp, first) in &temps {
            fs::rename(temp, dir.join(segment_name(*first).as_str()))
                .map_err(|e| io_err("cannot put a run file in place", e))?;
        }
    }
    sync_dir(&damaged_dir)
        .and_then(|()| sync_dir(dir))
        .map_err(|e| io_err("cannot sync the data dir", e))?;
    for line in text.lines() {
        notes.push(format!(
            "--repair: {} ({})",
            line,
            if damage.bytes.is_some() {
                "damaged records"
            } else {
                "offset gap"
            }
        ));
    }
    Ok(())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Finishes or undoes a repair that a crash cut short (module doc).
fn finish_interrupted(dir: &Path, notes: &mut Vec<String>) -> Result<(), String> {
    let entries = fs::read_dir(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
    let mut any = false;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(mid) = name
            .strip_prefix(".repair-")
            .and_then(|n| n.strip_suffix(".tmp"))
        else {
            continue;
        };
        let Some((damaged, first)) = mid
            .split_once('-')
            .and_then(|(a, b)| a.parse::<u64>().ok().zip(b.parse::<u64>().ok()))
        else {
            continue;
        };
        let path = entry.path();
        // The damaged file still in place (its records do not all
        // validate): the repair stopped before the move; undo it.
        let original = dir.join(segment_name(damaged).as_str());
        let in_place = fs::read(&original).is_ok_and(|b| {
            let mut bad = false;
            salvage(&b, damaged, u64::MAX, |p| {
                bad |= matches!(p, Piece::Lost { bytes, .. } if bytes > 0);
            });
            bad
        });
        let target = dir.join(segment_name(first).as_str());
        let result = if in_place || target.exists() {
            notes.push(format!("{name}: left by an interrupted repair; removed"));
            fs::remove_file(&path)
        } else {
            notes.push(format!("{name}: an interrupted repair's run; put in place"));
            fs::rename(&path, target)
        };
        result.map_err(|e| format!("cannot finish an interrupted repair ({name}): {e}"))?;
        any = true;
    }
    if any {
        sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listed_ranges_cover_exactly_their_union() {
        let g = Gaps(vec![(3, 5), (5, 9), (20, 21)]);
        assert!(g.covers(3, 5));
        assert!(g.covers(3, 9));
        assert!(g.covers(5, 9));
        assert!(g.covers(7, 7));
        assert!(!g.covers(3, 6));
        assert!(!g.covers(4, 9));
        assert!(!g.covers(3, 10));
        assert!(!g.covers(9, 20));
        assert_eq!(g.lost_offsets(), 7);
        assert_eq!(Gaps(vec![(3, 5), (3, 6), (4, 5), (8, 9)]).lost_offsets(), 4);
    }
}
