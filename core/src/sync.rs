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
/// otherwise, so it is written out, and used only where CPUID reports it
/// (some early x86-64 processors lack it); elsewhere a write prefetch does
/// nothing, since a read prefetch would cost the transfer described above.
#[inline(always)]
pub(crate) fn prefetch<T>(p: *const T, write: bool) {
    #[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
    {
        use core::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        if write {
            if !has_prefetchw() {
                return;
            }
            // SAFETY: prefetchw is a hint: it reads no register but `p`,
            // cannot fault for any address, and writes no memory, flag or
            // stack; the processor has it (checked just above).
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

/// Whether this processor has `prefetchw` (CPUID leaf 0x8000_0001, ECX bit
/// 8), asked once and remembered.
#[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
#[inline(always)]
fn has_prefetchw() -> bool {
    use core::sync::atomic::{AtomicU32, Ordering::Relaxed};
    /// 0: not asked yet, 1: absent, 2: present.
    static KNOWN: AtomicU32 = AtomicU32::new(0);
    match KNOWN.load(Relaxed) {
        2 => true,
        1 => false,
        _ => ask(&KNOWN),
    }
}

/// The first call's CPUID query, out of the prefetching callers' way.
#[cfg(all(target_arch = "x86_64", not(loom), not(miri)))]
#[cold]
#[inline(never)]
fn ask(known: &core::sync::atomic::AtomicU32) -> bool {
    use core::arch::x86_64::__cpuid;
    let top = __cpuid(0x8000_0000).eax;
    let has = top >= 0x8000_0001 && __cpuid(0x8000_0001).ecx & (1 << 8) != 0;
    known.store(
        if has { 2 } else { 1 },
        core::sync::atomic::Ordering::Relaxed,
    );
    has
}

#[cfg(all(
    test,
    target_arch = "x86_64",
    target_os = "linux",
    not(loom),
    not(miri)
))]
mod tests {
    /// The CPUID answer agrees with the kernel's flags for this processor
    /// (`3dnowprefetch` is Linux's name for the bit), on the first call and
    /// from the remembered answer after it.
    #[test]
    fn prefetchw_is_used_where_the_processor_has_it() {
        let Ok(cpuinfo) = std::fs::read_to_string("/proc/cpuinfo") else {
            return;
        };
        let Some(flags) = cpuinfo.lines().find(|l| l.starts_with("flags")) else {
            return;
        };
        let listed = flags.split_whitespace().any(|f| f == "3dnowprefetch");
        assert_eq!(super::has_prefetchw(), listed);
        assert_eq!(super::has_prefetchw(), listed);
        // A write prefetch of any address is harmless.
        super::prefetch(core::ptr::null::<u8>(), true);
        super::prefetch(usize::MAX as *const u8, true);
    }
}
