//! The segmented log of PROTOCOL.md section 6 on disk: the locked data
//! directory, start-up recovery of the newest segment, appends (one `pwrite`
//! for many records, cut back on failure so nothing half-written stays),
//! segment roll and retention. The dedup rebuild from the log is
//! start-up's (`rebuild`).
//!
//! Submodules: `recovery` (the newest segment at start, and the record
//! reader), `index` (the sparse offset index readers seek with), `prefill`
//! (segments made ahead of use), `cache` (writeback and the page cache). Closed segments are checked by `crate::repair`.
//!
//! Costs: the append path makes one syscall per buffer of records and
//! allocates nothing; opening, rolling and retention allocate and fsync.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, SystemTime};

use eventstream_core::record::{segment_name, SEGMENT_HEADER, SEGMENT_HEADER_LEN};

use crate::repair::{check_closed, Gaps};
use crate::sys::syscall;

mod cache;
mod index;
mod prefill;
mod recovery;
mod tail;

pub use cache::{drop_cached, start_writeback};
pub use index::{index_path, seek, SegmentIndex, INDEX_INTERVAL};
pub use prefill::{Prefill, PREFILL_NAME};
use recovery::recover_segment;
pub use recovery::{read_records, read_records_at};
pub use tail::{LogTail, Position, SegmentEntry};

/// Page size assumed for writeback ranges (a multiple of the real one is
/// also fine: it only keeps the kicked range off the page being appended).
const PAGE: u64 = 4096;
/// Written bytes handed to writeback at a time.
const WRITEBACK_BYTES: u64 = 1 << 20;

/// One segment file.
#[derive(Clone, Debug)]
pub struct Segment {
    /// Offset of its first event.
    pub base: u64,
    /// Its path.
    pub path: PathBuf,
    /// Its size in bytes.
    pub size: u64,
}

/// Lists the segments of `dir`, oldest first.
pub fn list_segments(dir: &Path) -> io::Result<Vec<Segment>> {
    let mut out = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        let Some(stem) = name.strip_suffix(".log") else {
            continue;
        };
        if stem.len() != 20 || !stem.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(base) = stem.parse::<u64>() else {
            continue;
        };
        out.push(Segment {
            base,
            path: entry.path(),
            size: entry.metadata()?.len(),
        });
    }
    out.sort_by_key(|s| s.base);
    Ok(out)
}

/// The open log: the active segment and what came before it.
pub struct Log {
    dir: PathBuf,
    _lock: File,
    segments: Vec<Segment>,
    active: Arc<File>,
    /// Shared with the sync thread: the active segment and what a roll or
    /// a delete left to fsync.
    sync: Arc<SyncTargets>,
    active_len: u64,
    /// The active segment file's size: `active_len`, or more for a segment
    /// made ahead of use (zeros after `active_len`).
    active_size: u64,
    /// The active segment's bytes up to here have been handed to writeback.
    kicked: u64,
    next_offset: u64,
    segment_bytes: u64,
    retention_bytes: Option<u64>,
    retention_age: Option<Duration>,
    prefill: Option<Arc<Prefill>>,
    /// What readers see of it.
    tail: Arc<LogTail>,
}

/// What start-up found and did.
#[derive(Debug, Default)]
pub struct Opened {
    /// Lines for the operator (truncations, repairs).
    pub notes: Vec<String>,
    /// Offset ranges lost to `--repair` (listed in `damaged/report`).
    pub gaps: Gaps,
}

/// Settings of [`Log::open`].
pub struct LogOptions {
    /// Roll past this size.
    pub segment_bytes: u64,
    /// Keep at most this many bytes of segments.
    pub retention_bytes: Option<u64>,
    /// Delete segments last written longer ago than this.
    pub retention_age: Option<Duration>,
    /// Repair a corrupt segment or list an offset gap instead of refusing
    /// to start.
    pub repair: bool,
    /// Closed segments last written within this long are checked record by
    /// record at start (the dedup window: the rebuild relies on them).
    pub check_window: Duration,
    /// Records are visible to readers only once durable (`--fsync always`).
    pub visible_when_durable: bool,
}

/// Creates a segment and writes its header, without fsyncs: the caller
/// makes it durable, or leaves it owed to the sync thread (a crash before
/// that leaves at worst an empty or header-only newest segment, which
/// start-up recovery rewrites as an empty one).
fn create_segment(dir: &Path, base: u64) -> io::Result<(File, PathBuf)> {
    let path = dir.join(segment_name(base).as_str());
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&path)?;
    file.write_all_at(&SEGMENT_HEADER, 0)?;
    Ok((file, path))
}

/// What the sync thread fsyncs: the active segment, and what the writer
/// left owed since the last fsync, so no fsync runs on the thread that
/// writes. A roll owes the segment it closed (its last bytes) and the
/// directory (the new segment's entry); a retention delete owes the
/// directory.
pub struct SyncTargets {
    active: Mutex<Arc<File>>,
    dir: File,
    owed: Mutex<Owed>,
}

#[derive(Default)]
struct Owed {
    closed: Vec<Arc<File>>,
    dir: bool,
}

/// Replaces `dir/name` with `bytes` so that a crash leaves the old file or
/// the new one, whole: written to `name.tmp`, fsynced, renamed, and the
/// directory fsynced (the data dir's small files: consumer groups, the
/// largest record size, the server id).
pub fn replace_durably(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut f = File::create(&tmp)?;
    io::Write::write_all(&mut f, bytes)?;
    f.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// `m`'s guard, also after a panic elsewhere poisoned it: what these
/// locks hold (a file handle, a to-do list) is whole between any two
/// statements.
pub(crate) fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl SyncTargets {
    /// The segment the log writes now.
    pub fn active(&self) -> Arc<File> {
        locked(&self.active).clone()
    }

    fn owe(&self, closed: Option<Arc<File>>, dir: bool) {
        let mut o = locked(&self.owed);
        o.closed.extend(closed);
        o.dir |= dir;
    }

    /// Fsyncs only what a roll or a delete owes (under `--fsync never`:
    /// the directory).
    pub fn sync_owed(&self) -> io::Result<()> {
        let owed = std::mem::take(&mut *locked(&self.owed));
        // The file size too: a roll may have cut a made segment's zeros.
        for f in &owed.closed {
            f.sync_all()?;
        }
        if owed.dir {
            self.dir.sync_all()?;
        }
        Ok(())
    }

    /// Fsyncs everything the log holds up to now: the segments closed
    /// since the last call, the directory if it changed, then the active
    /// segment. Bytes appended before the call began are durable when it
    /// returns Ok (the active file is read before the owed ones are taken,
    /// so a roll in between leaves the segment it closed in one of the
    /// two).
    pub fn sync(&self) -> io::Result<()> {
        let active = self.active();
        self.sync_owed()?;
        active.sync_data()
    }
}

impl Log {
    /// Creates (if missing), locks and recovers the data directory.
    pub fn open(dir: &Path, opts: LogOptions) -> Result<(Log, Opened), String> {
        let existed = dir.is_dir();
        fs::create_dir_all(dir)
            .map_err(|e| format!("cannot create data dir {}: {e}", dir.display()))?;
        if !existed {
            // The new directory's name is durable only once its parent is
            // synced.
            let parent = dir
                .parent()
                .filter(|p| !p.as_os_str().is_empty())
                .unwrap_or(Path::new("."));
            File::open(parent).and_then(|p| p.sync_all()).map_err(|e| {
                format!("cannot sync the parent of data dir {}: {e}", dir.display())
            })?;
        }
        let lock_path = dir.join("LOCK");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
            .map_err(|e| format!("cannot write data dir {}: {e}", dir.display()))?;
        if let Err(e) = syscall!(flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB)) {
            return Err(if e.kind() == io::ErrorKind::WouldBlock {
                format!(
                    "data dir {} is locked by another running server",
                    dir.display()
                )
            } else {
                format!("cannot lock data dir {}: {e}", dir.display())
            });
        }
        let dir_file =
            File::open(dir).map_err(|e| format!("cannot open data dir {}: {e}", dir.display()))?;
        // A segment made ahead of use by the last run: possibly partial,
        // never holding records.
        match fs::remove_file(dir.join(PREFILL_NAME)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                return Err(format!("cannot remove {PREFILL_NAME}: {e}"));
            }
            _ => {}
        }
        let mut segments =
            list_segments(dir).map_err(|e| format!("cannot list {}: {e}", dir.display()))?;
        let mut opened = Opened::default();
        opened.gaps = check_closed(
            dir,
            &mut segments,
            opts.check_window,
            opts.repair,
            &mut opened.notes,
        )?;
        let (active, active_len, next_offset) = match segments.last_mut() {
            None => {
                let (file, path) = create_segment(dir, 0)
                    .and_then(|(file, path)| {
                        file.sync_all()?;
                        dir_file.sync_all()?;
                        Ok((file, path))
                    })
                    .map_err(|e| format!("cannot create the first segment: {e}"))?;
                segments.push(Segment {
                    base: 0,
                    path,
                    size: SEGMENT_HEADER_LEN as u64,
                });
                (file, SEGMENT_HEADER_LEN as u64, 0)
            }
            Some(seg) => recover_segment(seg, opts.repair, &mut opened)?,
        };
        let active = Arc::new(active);
        let entries = segments
            .iter()
            .enumerate()
            .map(|(i, s)| SegmentEntry {
                base: s.base,
                path: s.path.clone(),
                closed_len: (i + 1 < segments.len()).then_some(s.size),
            })
            .collect();
        let end = Position {
            base: segments.last().map_or(0, |s| s.base),
            bytes: active_len,
            offset: next_offset,
        };
        let tail = LogTail::new(entries, end, opts.visible_when_durable)
            .map_err(|e| format!("eventfd: {e}"))?;
        let log = Log {
            dir: dir.to_path_buf(),
            _lock: lock,
            sync: Arc::new(SyncTargets {
                active: Mutex::new(active.clone()),
                dir: dir_file,
                owed: Mutex::new(Owed::default()),
            }),
            active,
            segments,
            active_len,
            active_size: active_len,
            kicked: active_len,
            next_offset,
            segment_bytes: opts.segment_bytes,
            retention_bytes: opts.retention_bytes,
            retention_age: opts.retention_age,
            prefill: None,
            tail: Arc::new(tail),
        };
        Ok((log, opened))
    }

    /// Has segments made ahead of use from now on (see [`Prefill`]);
    /// the returned handle is the prefill thread's.
    pub fn enable_prefill(&mut self) -> Arc<Prefill> {
        let prefill = Arc::new(Prefill::new(self.dir.clone(), self.segment_bytes));
        self.prefill = Some(prefill.clone());
        prefill
    }

    /// Cuts the zeros after the active segment's last record, if it was
    /// made ahead of use (a closed segment ends with its last record), and
    /// with `sync` fsyncs the new size; a roll leaves that fsync owed to the
    /// sync thread. After a crash, start-up recovery cuts them instead.
    /// Returns whether it cut.
    pub fn cut_tail(&mut self, sync: bool) -> io::Result<bool> {
        if self.active_size <= self.active_len {
            return Ok(false);
        }
        self.active.set_len(self.active_len)?;
        self.active_size = self.active_len;
        if sync {
            self.active.sync_all()?;
        }
        Ok(true)
    }

    /// The segments, oldest first (the newest is the active one).
    pub fn segments(&self) -> &[Segment] {
        &self.segments
    }

    /// What readers see of the log.
    pub fn tail(&self) -> Arc<LogTail> {
        self.tail.clone()
    }

    /// Publishes the end of the records written so far to readers.
    pub fn publish_written(&self) {
        self.tail.publish_written(self.written_end());
    }

    /// The end of the records written so far.
    pub fn written_end(&self) -> Position {
        Position {
            base: self.segments.last().map_or(0, |s| s.base),
            bytes: self.active_len,
            offset: self.next_offset,
        }
    }

    /// Offset of the next event.
    pub fn next_offset(&self) -> u64 {
        self.next_offset
    }

    /// What the sync thread fsyncs.
    pub fn sync_targets(&self) -> Arc<SyncTargets> {
        self.sync.clone()
    }

    /// The active segment.
    pub fn active(&self) -> &File {
        &self.active
    }

    /// Whether segments expire by age (retention must run now and then,
    /// not only at rolls).
    pub fn has_retention_age(&self) -> bool {
        self.retention_age.is_some()
    }

    /// Total bytes in all segments.
    pub fn total_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.size).sum()
    }

    /// Whether `extra` more bytes would take the active segment past its
    /// size limit (a segment always takes at least one buffer).
    pub fn needs_roll(&self, extra: usize) -> bool {
        self.active_len > SEGMENT_HEADER_LEN as u64
            && self.active_len + extra as u64 > self.segment_bytes
    }

    /// Appends `buf` (whole records holding `events` events) with one
    /// positional write; on failure the file is cut back to its previous
    /// length, so no partial record stays. Every `WRITEBACK_BYTES` it
    /// returns the active segment's byte range due for writeback, for the
    /// sync thread: it hands the range to the kernel (`start_writeback`;
    /// not under `--fsync always`, whose fsyncs write everything back) and
    /// drops the cached pages some ranges behind it (`drop_cached`).
    pub fn append(&mut self, buf: &[u8], events: u64) -> io::Result<Option<(u64, u64)>> {
        if let Err(e) = self.active.write_all_at(buf, self.active_len) {
            // Best effort: if the cut fails too, start-up recovery finds
            // the torn tail.
            match self.active.set_len(self.active_len) {
                Ok(()) => self.active_size = self.active_len,
                Err(t) => eprintln!("eventstream: cannot cut back a failed write: {t}"),
            }
            return Err(e);
        }
        self.active_len += buf.len() as u64;
        self.active_size = self.active_size.max(self.active_len);
        if let Some(seg) = self.segments.last_mut() {
            seg.size = self.active_len;
        }
        self.next_offset += events;
        if self.active_len - self.kicked >= WRITEBACK_BYTES {
            // Whole pages only: the page the next append continues must not
            // be under writeback (on devices with stable pages that append
            // would wait for it).
            let from = self.kicked;
            self.kicked = self.active_len & !(PAGE - 1);
            return Ok(Some((from, self.kicked)));
        }
        Ok(None)
    }

    /// Opens a new segment at the next offset and applies retention. The
    /// fsyncs of the closed segment (if `sync_old`) and of the directory
    /// are left to the sync thread (`SyncTargets::sync`), which makes them
    /// before it reports anything after the roll as synced.
    pub fn roll(&mut self, sync_old: bool) -> io::Result<()> {
        // The closed segment's zeros go first: on a journaling file system
        // the cut then commits no later than the new segment's name.
        let cut = self.cut_tail(false)?;
        let path = self.dir.join(segment_name(self.next_offset).as_str());
        let made = match &self.prefill {
            Some(p) => p.take(&path).unwrap_or_else(|e| {
                eprintln!(
                    "eventstream: cannot use {PREFILL_NAME}: {e}; rolling to a plain segment"
                );
                None
            }),
            None => None,
        };
        let (file, path, size) = match made {
            Some(file) => {
                let size = file.metadata()?.len();
                (file, path, size)
            }
            None => {
                let (file, path) = create_segment(&self.dir, self.next_offset)?;
                (file, path, SEGMENT_HEADER_LEN as u64)
            }
        };
        let closed_len = self.active_len;
        self.tail.rolled(
            closed_len,
            SegmentEntry {
                base: self.next_offset,
                path: path.clone(),
                closed_len: None,
            },
        );
        self.segments.push(Segment {
            base: self.next_offset,
            path,
            size: SEGMENT_HEADER_LEN as u64,
        });
        let old = std::mem::replace(&mut self.active, Arc::new(file));
        self.active_len = SEGMENT_HEADER_LEN as u64;
        self.active_size = size;
        self.kicked = self.active_len;
        // Owed before the swap and before any byte goes to the new file:
        // a sync that sees the new file sees the old one owed.
        self.sync.owe((sync_old || cut).then_some(old), true);
        *locked(&self.sync.active) = self.active.clone();
        self.apply_retention();
        Ok(())
    }

    /// Deletes the oldest closed segments while the log is over
    /// `--retention-bytes` or they are older than `--retention-age`; the
    /// directory is fsynced after a delete. Returns how many went.
    pub fn apply_retention(&mut self) -> usize {
        let mut deleted = 0;
        while self.segments.len() > 1 {
            let oldest = &self.segments[0];
            let over_bytes = self
                .retention_bytes
                .is_some_and(|max| self.total_bytes() > max);
            let too_old = self.retention_age.is_some_and(|age| {
                fs::metadata(&oldest.path)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| SystemTime::now().duration_since(t).ok())
                    .is_some_and(|d| d > age)
            });
            if !over_bytes && !too_old {
                break;
            }
            // The forwarder has not passed it: kept, until the log is past
            // twice --retention-bytes (docs/scale-out.md, "Retention").
            let hold = self.tail.forward_hold();
            let next_base = self.segments[1].base;
            if hold < next_base {
                let far_over = self
                    .retention_bytes
                    .is_some_and(|max| self.total_bytes() > max.saturating_mul(2));
                if !far_over {
                    break;
                }
                eprintln!(
                    "eventstream: retention deletes {} although the forwarder has not passed it (the log is over twice --retention-bytes): offsets {}..{next_base} will not be forwarded",
                    oldest.path.display(),
                    hold.max(oldest.base)
                );
            }
            if let Err(e) = fs::remove_file(&oldest.path) {
                eprintln!(
                    "eventstream: retention cannot delete {}: {e}",
                    oldest.path.display()
                );
                break;
            }
            // Its sparse index, if a reader made one, goes with it.
            let _ = fs::remove_file(index_path(&oldest.path));
            eprintln!(
                "eventstream: retention deleted {} ({} bytes)",
                oldest.path.display(),
                oldest.size
            );
            self.tail.deleted(oldest.base);
            self.segments.remove(0);
            deleted += 1;
        }
        if deleted > 0 {
            self.sync.owe(None, true);
        }
        deleted
    }
}
