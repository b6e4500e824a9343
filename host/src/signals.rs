//! The server's signals: SIGINT and SIGTERM start the graceful shutdown,
//! SIGHUP reloads `--auth` and the TLS certificate.

use std::sync::atomic::{AtomicI32, Ordering};
use std::sync::Arc;

use crate::server::Running;
use crate::shared::Shared;

/// The write end of the eventfd the signal handler notifies.
static SIGNAL_TARGET: AtomicI32 = AtomicI32::new(-1);
static SIGNAL_SHARED: std::sync::OnceLock<Arc<Shared>> = std::sync::OnceLock::new();

extern "C" fn on_hangup(_sig: libc::c_int) {
    // Only an atomic store: housekeeping reloads within 100 ms.
    if let Some(shared) = SIGNAL_SHARED.get() {
        shared.life.reload_requested.store(true, Ordering::Release);
    }
}

extern "C" fn on_signal(_sig: libc::c_int) {
    // Only async-signal-safe work: an atomic store and a write(2).
    if let Some(shared) = SIGNAL_SHARED.get() {
        shared
            .life
            .shutdown_requested
            .store(true, Ordering::Release);
    }
    let fd = SIGNAL_TARGET.load(Ordering::Relaxed);
    if fd >= 0 {
        let one: u64 = 1;
        // SAFETY: write(2) is async-signal-safe; fd is the server's eventfd,
        // alive for the process's life; the buffer is 8 valid bytes.
        unsafe {
            libc::write(fd, (&one as *const u64).cast(), 8);
        }
    }
}

/// Routes SIGINT and SIGTERM to `running`'s graceful shutdown.
pub fn install_signal_handlers(running: &Running) -> Result<(), String> {
    let _ = SIGNAL_SHARED.set(running.shared.clone());
    SIGNAL_TARGET.store(running.shared.wake.ingest.raw_fd(), Ordering::Relaxed);
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // The handler only does async-signal-safe work (an eventfd write).
        crate::sys::on_signal(sig, on_signal)
            .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    }
    // SIGHUP: the --auth file is read again.
    crate::sys::on_signal(libc::SIGHUP, on_hangup)
        .map_err(|e| format!("cannot install the signal handler: {e}"))?;
    Ok(())
}
