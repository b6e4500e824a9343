//! Segments made ahead of use under `--fsync always`.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use eventstream_core::record::{SEGMENT_HEADER, SEGMENT_HEADER_LEN};

use super::locked;
use crate::sys::syscall;

/// The segment file being made ahead of use, in the data directory.
pub const PREFILL_NAME: &str = "next-segment.prefill";
/// Zeros written at a time while a segment is made ahead of use.
const PREFILL_CHUNK: usize = 256 << 10;

/// Segments made ahead of use, for `--fsync always`: the prefill thread
/// writes a segment header and zeros up to the segment size, makes them
/// durable, and leaves the file here; a roll renames it to the new
/// segment's name. Appends to such a segment overwrite blocks that are
/// already allocated, inside the file's size, so each group-commit
/// `fdatasync` writes data only: no journal commit for new blocks or a
/// new file size. On this machine's ext4 it halved the `always` ack p99
/// at 100,000 events/s (docs/decisions.md); it costs the disk one extra write of
/// every segment. The zeros after the last record are cut off when the
/// segment closes (roll, shutdown) and by start-up recovery after a crash.
pub struct Prefill {
    dir: PathBuf,
    bytes: u64,
    /// A made segment waiting for a roll.
    ready: Mutex<Option<File>>,
    /// Set when making one failed (e.g. the disk is full): rolls go on
    /// with plain segments.
    failed: std::sync::atomic::AtomicBool,
}

impl Prefill {
    /// Segments of `bytes` made in `dir`.
    pub(super) fn new(dir: PathBuf, bytes: u64) -> Prefill {
        Prefill {
            dir,
            bytes,
            ready: Mutex::new(None),
            failed: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Whether a made segment waits for a roll (or making them failed, so
    /// none will come).
    pub fn idle(&self) -> bool {
        self.failed.load(std::sync::atomic::Ordering::Relaxed) || locked(&self.ready).is_some()
    }

    /// Makes one segment ahead of use unless one is waiting; the thread's
    /// whole job. `stop` is polled between chunks. On failure the partial
    /// file is removed, `failed` is set and the error returned.
    pub fn make_one(&self, stop: impl Fn() -> bool) -> io::Result<()> {
        if self.idle() {
            return Ok(());
        }
        let path = self.dir.join(PREFILL_NAME);
        let result = (|| {
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&path)?;
            file.write_all_at(&SEGMENT_HEADER, 0)?;
            let zeros = vec![0u8; PREFILL_CHUNK];
            let mut pos = SEGMENT_HEADER_LEN as u64;
            while pos < self.bytes {
                if stop() {
                    return Ok(None);
                }
                let n = (self.bytes - pos).min(PREFILL_CHUNK as u64) as usize;
                file.write_all_at(&zeros[..n], pos)?;
                // Written back chunk by chunk and waited for, so the log's
                // own fsyncs never queue behind more than one chunk of
                // zeros.
                syscall!(sync_file_range(
                    file.as_raw_fd(),
                    pos as libc::off64_t,
                    n as libc::off64_t,
                    libc::SYNC_FILE_RANGE_WAIT_BEFORE
                        | libc::SYNC_FILE_RANGE_WRITE
                        | libc::SYNC_FILE_RANGE_WAIT_AFTER
                ))?;
                pos += n as u64;
            }
            // The blocks and the size, durable before any append relies
            // on them.
            file.sync_all()?;
            Ok(Some(file))
        })();
        match result {
            Ok(Some(file)) => {
                *locked(&self.ready) = Some(file);
                Ok(())
            }
            Ok(None) => {
                let _ = fs::remove_file(&path);
                Ok(())
            }
            Err(e) => {
                let _ = fs::remove_file(&path);
                self.failed
                    .store(true, std::sync::atomic::Ordering::Relaxed);
                Err(e)
            }
        }
    }

    /// Removes the made segment, if one waits (at shutdown: the next
    /// start would remove it anyway).
    pub fn discard(&self) {
        let mut ready = locked(&self.ready);
        if ready.take().is_some() {
            if let Err(e) = fs::remove_file(self.dir.join(PREFILL_NAME)) {
                eprintln!("eventstream: cannot remove {PREFILL_NAME}: {e}");
            }
        }
    }

    /// Takes the made segment, if one waits, renamed to `path`, never over
    /// an existing file (the data dir is locked, and only the log's writer
    /// creates segments, so nothing can appear between the check and the
    /// rename).
    pub(super) fn take(&self, path: &Path) -> io::Result<Option<File>> {
        // The lock is held across the rename, so the prefill thread starts
        // the next file only after this one left its name.
        let mut ready = locked(&self.ready);
        let Some(file) = ready.take() else {
            return Ok(None);
        };
        // On failure the file stays under its old name (made again by the
        // next make_one, or removed at start-up).
        if fs::symlink_metadata(path).is_ok() {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!("{} exists", path.display()),
            ));
        }
        fs::rename(self.dir.join(PREFILL_NAME), path)?;
        Ok(Some(file))
    }
}
