//! The OS glue: every libc call goes through [`syscall!`], which turns a
//! `-1` return into `io::Error::last_os_error()`, so no call site can ignore
//! an error. Also the clocks, the futex park/wake pair and the eventfd.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{fence, AtomicU32, Ordering};
use std::time::Duration;

/// Calls a libc function; a return of -1 becomes the OS error.
macro_rules! syscall {
    ($fn: ident ( $($arg: expr),* $(,)* ) ) => {{
        // SAFETY: the arguments are valid for this libc function (checked at
        // each call site); the result is checked for -1.
        #[allow(unused_unsafe)]
        let res = unsafe { libc::$fn($($arg, )*) };
        if res == -1 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(res)
        }
    }};
}
pub(crate) use syscall;

/// Asks the kernel to wake this thread's timed sleeps on time: the default
/// timer slack (50 us) would add up to that much to every short sleep.
pub fn precise_sleeps() -> io::Result<()> {
    syscall!(prctl(
        libc::PR_SET_TIMERSLACK,
        1 as libc::c_ulong,
        0 as libc::c_ulong,
        0 as libc::c_ulong,
        0 as libc::c_ulong
    ))
    .map(drop)
}

/// Offset added to CLOCK_MONOTONIC so the engine's monotonic clock is never
/// smaller than any dedup window (ids are stamped in the past at rebuild).
const MONO_EPOCH_NS: u64 = 1 << 50;

/// Monotonic nanoseconds (CLOCK_MONOTONIC plus a fixed offset).
pub fn monotonic_ns() -> u64 {
    clock(libc::CLOCK_MONOTONIC) + MONO_EPOCH_NS
}

/// Wall-clock unix nanoseconds.
pub fn wall_ns() -> u64 {
    clock(libc::CLOCK_REALTIME)
}

fn clock(id: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // clock_gettime cannot fail for these clocks with a valid pointer.
    let _ = syscall!(clock_gettime(id, &mut ts));
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

/// The engine's clock for the core traits.
#[derive(Clone, Copy, Default)]
pub struct SysClock;

impl eventstream_core::pipeline::Clock for SysClock {
    fn monotonic_ns(&self) -> u64 {
        monotonic_ns()
    }
    fn wall_ns(&self) -> u64 {
        wall_ns()
    }
}

/// Sets O_NONBLOCK on `fd`.
pub fn set_nonblocking(fd: RawFd) -> io::Result<()> {
    let flags = syscall!(fcntl(fd, libc::F_GETFL))?;
    syscall!(fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK))?;
    Ok(())
}

/// Raises the open-file soft limit to the hard limit; returns the new soft
/// limit.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    syscall!(getrlimit(libc::RLIMIT_NOFILE, &mut lim))?;
    if lim.rlim_cur < lim.rlim_max {
        lim.rlim_cur = lim.rlim_max;
        syscall!(setrlimit(libc::RLIMIT_NOFILE, &lim))?;
    }
    Ok(lim.rlim_cur)
}

/// Pins the calling thread to `cpu`.
pub fn pin_to_cpu(cpu: usize) -> io::Result<()> {
    // SAFETY: cpu_set_t is plain data; all-zero is the empty set.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: CPU_SET writes inside `set` for cpu < CPU_SETSIZE, which the
    // caller's modulo by the online CPU count guarantees.
    unsafe { libc::CPU_SET(cpu, &mut set) };
    syscall!(sched_setaffinity(
        0,
        std::mem::size_of::<libc::cpu_set_t>(),
        &set
    ))?;
    Ok(())
}

/// Number of online CPUs.
pub fn online_cpus() -> usize {
    syscall!(sysconf(libc::_SC_NPROCESSORS_ONLN)).map_or(1, |n| n.max(1) as usize)
}

/// CPUs this process may use: its affinity mask and cgroup quota, which
/// `taskset` or a container set (what the thread layout is chosen by).
pub fn usable_cpus() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Ignores a signal (SIGPIPE: writes get EPIPE instead; SIGXFSZ: writes past
/// RLIMIT_FSIZE get EFBIG instead of killing the process).
pub fn ignore_signal(sig: libc::c_int) -> io::Result<()> {
    // SAFETY: SIG_IGN is a valid disposition for these signals.
    let prev = unsafe { libc::signal(sig, libc::SIG_IGN) };
    if prev == libc::SIG_ERR {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Runs `handler` on signal `sig` (restarting interrupted calls). The
/// handler may only do async-signal-safe work.
pub fn on_signal(sig: libc::c_int, handler: extern "C" fn(libc::c_int)) -> io::Result<()> {
    // SAFETY: sigaction is plain data; all-zero is a valid start.
    let mut sa: libc::sigaction = unsafe { std::mem::zeroed() };
    sa.sa_sigaction = handler as *const () as usize;
    sa.sa_flags = libc::SA_RESTART;
    syscall!(sigaction(sig, &sa, std::ptr::null_mut()))?;
    Ok(())
}

/// An epoll instance. Registrations name a descriptor by a `u64` token,
/// which [`Epoll::wait`] hands back with the ready flags.
pub struct Epoll(OwnedFd);

impl Epoll {
    /// A new epoll instance (close-on-exec).
    pub fn new() -> io::Result<Self> {
        let fd = syscall!(epoll_create1(libc::EPOLL_CLOEXEC))?;
        // SAFETY: epoll_create1 returned a fresh descriptor that nothing
        // else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Watches `fd` for `events` (`libc::EPOLL*` flags), reported as
    /// `token`.
    pub fn add(&self, fd: RawFd, token: u64, events: u32) -> io::Result<()> {
        let mut ev = libc::epoll_event { events, u64: token };
        syscall!(epoll_ctl(self.raw(), libc::EPOLL_CTL_ADD, fd, &mut ev))?;
        Ok(())
    }

    /// Stops watching `fd` (closing it does so too, once no other
    /// descriptor refers to the same file).
    pub fn delete(&self, fd: RawFd) -> io::Result<()> {
        let mut ev = libc::epoll_event { events: 0, u64: 0 };
        syscall!(epoll_ctl(self.raw(), libc::EPOLL_CTL_DEL, fd, &mut ev))?;
        Ok(())
    }

    /// Waits up to `timeout_ms` (-1: without end) for ready descriptors and
    /// fills `events` with them; returns how many. A signal that cuts the
    /// wait short returns 0.
    pub fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> io::Result<usize> {
        let max = events.len().min(libc::c_int::MAX as usize) as libc::c_int;
        match syscall!(epoll_wait(self.raw(), events.as_mut_ptr(), max, timeout_ms)) {
            Ok(n) => Ok(n as usize),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => Ok(0),
            Err(e) => Err(e),
        }
    }

    /// The descriptor.
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// `read(2)` into `buf`; returns the bytes read (0 at end of stream).
pub fn read(fd: RawFd, buf: &mut [u8]) -> io::Result<usize> {
    syscall!(read(fd, buf.as_mut_ptr().cast(), buf.len())).map(|n| n as usize)
}

/// `send(2)` of `buf` without SIGPIPE; returns the bytes sent.
pub fn send(fd: RawFd, buf: &[u8]) -> io::Result<usize> {
    syscall!(send(fd, buf.as_ptr().cast(), buf.len(), libc::MSG_NOSIGNAL)).map(|n| n as usize)
}

/// Sends up to `len` bytes of `file` from `*pos` to the socket `fd`
/// (`sendfile(2)`: page cache to socket, no copy through user space);
/// `*pos` advances by what was sent.
pub fn sendfile(fd: RawFd, file: RawFd, pos: &mut u64, len: usize) -> io::Result<usize> {
    let mut off = *pos as libc::off_t;
    let n = syscall!(sendfile(fd, file, &mut off, len))? as usize;
    *pos = off as u64;
    Ok(n)
}

/// A read-only shared mapping of a file (`mmap(2)`), unmapped on drop.
pub struct Mapping {
    ptr: *mut libc::c_void,
    len: usize,
}

impl Mapping {
    /// Maps `len` bytes of `fd` from its start. The mapping may reach past
    /// the file's end (address space only); bytes there must not be read.
    pub fn new(fd: RawFd, len: usize) -> io::Result<Mapping> {
        // SAFETY: a fresh read-only mapping chosen by the kernel (null
        // hint); the result is checked against MAP_FAILED below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(Mapping { ptr, len })
    }

    /// Copies the mapped bytes `[pos, pos + out.len())` into `out`; false
    /// (nothing copied) if they lie outside the mapping. The caller keeps
    /// to bytes that exist in the file and are no longer written (records
    /// below a published end).
    pub fn copy(&self, pos: u64, out: &mut [u8]) -> bool {
        let Some(end) = (pos as usize).checked_add(out.len()) else {
            return false;
        };
        if end > self.len {
            return false;
        }
        // The bytes are finished records of the file (the caller's
        // contract), which no one writes while they are read.
        // SAFETY: [pos, end) lies inside the live mapping (checked above);
        // `out` is a distinct, valid buffer of that length.
        unsafe {
            std::ptr::copy_nonoverlapping(
                self.ptr.cast::<u8>().add(pos as usize),
                out.as_mut_ptr(),
                out.len(),
            );
        }
        true
    }
}

impl Mapping {
    /// Unmaps the pages of `[from, to)` from this process (`madvise
    /// MADV_DONTNEED`; `from` and `to` rounded to pages inside the range).
    /// The file's pages stay in the page cache, no longer mapped, so the
    /// page-drop policy can drop them; a later read maps them again.
    pub fn unmap_pages(&self, from: u64, to: u64) {
        let page = 4096u64;
        let from = from.div_ceil(page) * page;
        let to = (to / page * page).min(self.len as u64);
        if to <= from {
            return;
        }
        // MADV_DONTNEED on a shared read-only file mapping only drops this
        // process's page-table entries: the next access maps the same file
        // page again, and no reference into the range is held (reads copy).
        // SAFETY: [from, to) is page-aligned and inside the live mapping.
        let r = unsafe {
            libc::madvise(
                self.ptr.cast::<u8>().add(from as usize).cast(),
                (to - from) as usize,
                libc::MADV_DONTNEED,
            )
        };
        if r != 0 {
            eprintln!(
                "eventstream: madvise failed: {}",
                io::Error::last_os_error()
            );
        }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: ptr and len are exactly what mmap returned and took; the
        // mapping is unmapped only here, once.
        if unsafe { libc::munmap(self.ptr, self.len) } != 0 {
            eprintln!("eventstream: munmap failed: {}", io::Error::last_os_error());
        }
    }
}

/// Accepts a pending connection of `listener`, non-blocking and
/// close-on-exec (`accept4(2)`), without its peer address.
pub fn accept(listener: RawFd) -> io::Result<OwnedFd> {
    let fd = syscall!(accept4(
        listener,
        std::ptr::null_mut(),
        std::ptr::null_mut(),
        libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC
    ))?;
    // SAFETY: accept4 returned a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Turns Nagle's algorithm off on a TCP socket.
pub fn set_nodelay(fd: RawFd) -> io::Result<()> {
    let one: libc::c_int = 1;
    syscall!(setsockopt(
        fd,
        libc::IPPROTO_TCP,
        libc::TCP_NODELAY,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>() as libc::socklen_t
    ))?;
    Ok(())
}

/// `poll(2)` over `fds` for up to `timeout_ms`; returns how many are ready.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    syscall!(poll(
        fds.as_mut_ptr(),
        fds.len() as libc::nfds_t,
        timeout_ms
    ))
    .map(|n| n as usize)
}

/// A non-blocking eventfd: a counter one thread adds to and another waits on
/// in epoll.
pub struct EventFd(OwnedFd);

impl EventFd {
    /// A new eventfd.
    pub fn new() -> io::Result<Self> {
        let fd = syscall!(eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC))?;
        // SAFETY: eventfd returned a fresh descriptor that nothing else owns.
        Ok(Self(unsafe { OwnedFd::from_raw_fd(fd) }))
    }

    /// Adds one (wakes a waiter). EAGAIN means the counter is already
    /// non-zero, which wakes it just as well.
    pub fn notify(&self) {
        let one: u64 = 1;
        let r = syscall!(write(self.0.as_raw_fd(), (&one as *const u64).cast(), 8));
        if let Err(e) = r {
            if e.kind() != io::ErrorKind::WouldBlock {
                eprintln!("eventstream: eventfd write failed: {e}");
            }
        }
    }

    /// Resets the counter.
    pub fn drain(&self) {
        let mut v: u64 = 0;
        // EAGAIN (already zero) is the expected outcome when nothing was
        // notified.
        let _ = syscall!(read(self.0.as_raw_fd(), (&mut v as *mut u64).cast(), 8));
    }

    /// The descriptor (for epoll).
    pub fn raw(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// A thread's parking spot: the thread sleeps on a futex when it has no
/// work, and whoever gives it work wakes it.
///
/// The wake-up protocol (Dekker's handshake): the parking thread stores
/// PARKED, issues a SeqCst fence, then checks its inputs once more before it
/// sleeps; a producer publishes its item (a Release store in the ring),
/// issues a SeqCst fence, then loads the state. One of the two always sees
/// the other's store, so an item is never left behind a sleeping consumer.
/// A producer pays one fence and one load per wake-up call, and a syscall
/// only when the consumer really sleeps.
pub struct Parker {
    state: AtomicU32,
}

const AWAKE: u32 = 0;
const PARKED: u32 = 1;

impl Parker {
    /// An awake parker.
    pub const fn new() -> Self {
        Self {
            state: AtomicU32::new(AWAKE),
        }
    }

    /// Sleeps until woken or `timeout` passes, unless `has_work` (checked
    /// after announcing the park) says there is something to do.
    pub fn park(&self, timeout: Option<Duration>, has_work: impl FnOnce() -> bool) {
        self.state.store(PARKED, Ordering::Relaxed);
        fence(Ordering::SeqCst);
        if has_work() {
            self.state.store(AWAKE, Ordering::Relaxed);
            return;
        }
        let ts = timeout.map(|d| libc::timespec {
            tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
            tv_nsec: d.subsec_nanos() as libc::c_long,
        });
        let ts_ptr = ts
            .as_ref()
            .map_or(std::ptr::null(), |t| t as *const libc::timespec);
        // EINTR, EAGAIN (already woken) and ETIMEDOUT all mean "look
        // again", so the result is not an error for us.
        // SAFETY: the futex word is a live AtomicU32; FUTEX_WAIT only reads
        // it and sleeps while it equals PARKED.
        unsafe {
            libc::syscall(
                libc::SYS_futex,
                self.state.as_ptr(),
                libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
                PARKED,
                ts_ptr,
            );
        }
        self.state.store(AWAKE, Ordering::Relaxed);
    }

    /// Whether the thread sleeps (or is about to).
    pub fn is_parked(&self) -> bool {
        self.state.load(Ordering::Relaxed) == PARKED
    }

    /// Wakes the thread if it is parked (call after publishing work).
    pub fn wake(&self) {
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) == PARKED
            && self.state.swap(AWAKE, Ordering::Relaxed) == PARKED
        {
            // SAFETY: FUTEX_WAKE on a live AtomicU32; it cannot fault and
            // its count is only informative.
            unsafe {
                libc::syscall(
                    libc::SYS_futex,
                    self.state.as_ptr(),
                    libc::FUTEX_WAKE | libc::FUTEX_PRIVATE_FLAG,
                    1,
                );
            }
        }
    }
}

impl Default for Parker {
    fn default() -> Self {
        Self::new()
    }
}

/// Ingest's parking spot: it sleeps in `epoll_wait` with an eventfd
/// registered, so a wake is an eventfd write. It parks for acks always, and
/// also for room when a connection waits for pool or ring space; storage
/// wakes it for acks, processors and storage for freed room.
pub struct IngestWaker {
    state: AtomicU32,
    fd: EventFd,
}

/// Ingest sleeps, and wants acks.
const WANT_ACKS: u32 = 1;
/// Ingest sleeps, and wants acks or room.
const WANT_ROOM: u32 = 2;

impl IngestWaker {
    /// An awake waker with its eventfd.
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            state: AtomicU32::new(AWAKE),
            fd: EventFd::new()?,
        })
    }

    /// The eventfd to register in epoll.
    pub fn raw_fd(&self) -> RawFd {
        self.fd.raw()
    }

    /// Announces that ingest is about to sleep; then it must check its
    /// inputs once more (the ack ring, and room if `want_room`).
    pub fn prepare_park(&self, want_room: bool) {
        let s = if want_room { WANT_ROOM } else { WANT_ACKS };
        self.state.store(s, Ordering::Relaxed);
        fence(Ordering::SeqCst);
    }

    /// Ingest is awake again.
    pub fn unpark(&self) {
        self.state.store(AWAKE, Ordering::Relaxed);
    }

    /// Clears the eventfd, once epoll has reported it (it is registered
    /// level-triggered, so it is reported until cleared; a wake-up that
    /// found ingest running costs no read).
    pub fn clear(&self) {
        self.fd.drain();
    }

    /// Acks were pushed: wake ingest if it sleeps.
    pub fn wake_for_acks(&self) {
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) != AWAKE
            && self.state.swap(AWAKE, Ordering::Relaxed) != AWAKE
        {
            self.fd.notify();
        }
    }

    /// Room was freed in a ring or the pool: wake ingest if it sleeps
    /// waiting for room.
    pub fn wake_for_room(&self) {
        fence(Ordering::SeqCst);
        if self.state.load(Ordering::Relaxed) == WANT_ROOM
            && self.state.swap(AWAKE, Ordering::Relaxed) != AWAKE
        {
            self.fd.notify();
        }
    }

    /// Wakes ingest whatever it waits for (signals, shutdown).
    pub fn wake_always(&self) {
        self.state.store(AWAKE, Ordering::Relaxed);
        self.fd.notify();
    }
}

/// Spin for a while, then park: the idle strategy of every engine thread
/// (`--idle-spin`).
///
/// The default is to park at once. On this kind of machine (2 vCPUs, seven
/// engine threads, the producers beside them) a spinning thread keeps a
/// vCPU busy that a thread with work could use: at 100,000 events/s offered
/// (`eventstream load --rate 100000 --connections 2 --ack`, two runs each),
/// the ack p50 was 96-100 us parking at once, 184-217 us spinning 20 us and
/// 540-672 us spinning 100 us; closed-loop throughput did not gain either.
/// With cores to spare, a spin of some microseconds saves futex wake-ups.
pub struct Backoff {
    spin_ns: u64,
    since: Option<u64>,
}

impl Backoff {
    /// Spins up to `spin_ns` after the last work before parking.
    pub const fn new(spin_ns: u64) -> Self {
        Self {
            spin_ns,
            since: None,
        }
    }

    /// Work was found: start over.
    pub fn reset(&mut self) {
        self.since = None;
    }

    /// No work: spins and returns false, or returns true when it is time
    /// to park.
    pub fn idle(&mut self) -> bool {
        if self.spin_ns == 0 {
            return true;
        }
        let now = monotonic_ns();
        let since = *self.since.get_or_insert(now);
        if now - since < self.spin_ns {
            std::hint::spin_loop();
            return false;
        }
        true
    }
}

impl Default for Backoff {
    fn default() -> Self {
        Self::new(0)
    }
}
