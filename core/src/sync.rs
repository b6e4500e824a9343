//! The one place that picks real atomics or loom's model of them.
//!
//! Under `--cfg loom` every atomic and every shared cell goes through loom so
//! its model checker sees all accesses; otherwise they are the plain `core`
//! types (the `UnsafeCell` wrapper costs nothing).

#[cfg(loom)]
pub(crate) use loom::sync::atomic::{fence, AtomicBool, AtomicU32};

#[cfg(not(loom))]
pub(crate) use core::sync::atomic::{fence, AtomicBool, AtomicU32};

#[cfg(loom)]
pub(crate) use loom::cell::UnsafeCell;

/// `core::cell::UnsafeCell` with loom's closure-based access API, so that the
/// same code compiles against both.
#[cfg(not(loom))]
#[derive(Debug)]
#[repr(transparent)]
pub(crate) struct UnsafeCell<T>(core::cell::UnsafeCell<T>);

#[cfg(not(loom))]
impl<T> UnsafeCell<T> {
    #[inline(always)]
    pub(crate) const fn new(value: T) -> Self {
        Self(core::cell::UnsafeCell::new(value))
    }

    #[inline(always)]
    pub(crate) fn with<R>(&self, f: impl FnOnce(*const T) -> R) -> R {
        f(self.0.get())
    }

    #[inline(always)]
    pub(crate) fn with_mut<R>(&self, f: impl FnOnce(*mut T) -> R) -> R {
        f(self.0.get())
    }
}

/// Tells the scheduler (or loom's model) that this thread waits for another.
#[inline(always)]
pub(crate) fn spin_wait() {
    #[cfg(loom)]
    loom::hint::spin_loop();
    #[cfg(not(loom))]
    core::hint::spin_loop();
}

/// Asks the CPU to start loading the cache line at `p` (for writing when
/// `write`), so that an access a little later finds it in cache instead of
/// waiting for another core or for memory. Only a hint: it never faults,
/// whatever the address, and changes nothing; it does nothing on targets
/// without prefetch instructions and under loom and miri.
///
/// A write prefetch is `prefetchw`, which asks for the line in exclusive
/// state: a line another core holds is taken from it in one transfer, where
/// a read prefetch would share it first and the write would then have to
/// take it again. The intrinsic (`_MM_HINT_ET0`) emits `prefetchw` only when
/// the crate is built with the `prfchw` feature and a plain `prefetcht0`
/// otherwise, so it is written out: every x86-64 processor either runs it
/// or executes its opcode as a no-op.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T, write: bool) {
    #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        if write {
            // SAFETY: prefetchw is a hint: it reads no register but `p`,
            // cannot fault for any address, writes no memory, flag or
            // stack, and is a no-op where it is not implemented.
            unsafe {
                core::arch::asm!(
                    "prefetchw [{p}]",
                    p = in(reg) p,
                    options(nostack, preserves_flags, readonly)
                );
            }
        } else {
            // SAFETY: a prefetch instruction is a hint that cannot fault or
            // change memory, for any address.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p.cast()) };
        }
    }
    #[cfg(not(all(target_arch = "x86_64", not(loom), not(miri))))]
    let _ = (p, write);
}
