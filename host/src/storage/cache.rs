//! The log's page cache: writeback started ahead of fsyncs, and written
//! pages dropped behind it (see docs/decisions.md).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;

use crate::sys::syscall;

/// Starts writeback of `file`'s bytes `from..to` without waiting for it, so
/// dirty pages never pile up into a long fsync or into the kernel
/// throttling the writer. The call itself can take milliseconds, so the
/// sync thread makes it, not the thread that writes. Only a hint: a range
/// past the end of the file, or of a newer segment after a roll, is
/// harmless.
pub fn start_writeback(file: &File, from: u64, to: u64) {
    if to <= from {
        return;
    }
    if let Err(e) = syscall!(sync_file_range(
        file.as_raw_fd(),
        from as libc::off64_t,
        (to - from) as libc::off64_t,
        libc::SYNC_FILE_RANGE_WRITE
    )) {
        eprintln!("eventstream: sync_file_range: {e}");
    }
}

/// Asks the kernel to drop `file`'s cached pages in `from..to` (whole pages
/// only). Only clean pages go: a page still dirty or under writeback stays
/// (the caller passes a range whose writeback started a while ago), so no
/// data is lost and the log's durability does not change. The log
/// is written once and not read back while the server runs, so keeping
/// its pages cached only makes every new page the kernel allocates for the
/// next appends a fresh one; dropped pages are reused while still warm.
pub fn drop_cached(file: &File, from: u64, to: u64) {
    if to <= from {
        return;
    }
    // SAFETY: posix_fadvise reads only its integer arguments; a descriptor
    // that is not open gives EBADF, which is reported below.
    let rc = unsafe {
        libc::posix_fadvise(
            file.as_raw_fd(),
            from as libc::off_t,
            (to - from) as libc::off_t,
            libc::POSIX_FADV_DONTNEED,
        )
    };
    if rc != 0 {
        eprintln!(
            "eventstream: posix_fadvise: {}",
            io::Error::from_raw_os_error(rc)
        );
    }
}
