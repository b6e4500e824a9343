//! What both images share: statics handed out once, and the stack
//! painting that measures how deep the stack went.

use core::cell::UnsafeCell;
use core::sync::atomic::{AtomicBool, Ordering};

/// A `static` handed out once as `&'static mut`: built in place at compile
/// time, so large buffers never pass through the stack (as a `singleton!`
/// built at run time would).
pub struct TakeOnce<T> {
    taken: AtomicBool,
    value: UnsafeCell<T>,
}

// SAFETY: the value is reachable only through the one `&mut` that `take`
// hands out, once; T moves to the taker's context, so T: Send suffices.
unsafe impl<T: Send> Sync for TakeOnce<T> {}

impl<T> TakeOnce<T> {
    pub const fn new(value: T) -> Self {
        Self {
            taken: AtomicBool::new(false),
            value: UnsafeCell::new(value),
        }
    }

    /// The value, the first time; `None` after.
    // A `&mut` out of `&self` is this type's purpose; the flag makes it
    // unique.
    #[allow(clippy::mut_from_ref)]
    pub fn take(&'static self) -> Option<&'static mut T> {
        if self.taken.swap(true, Ordering::AcqRel) {
            return None;
        }
        // SAFETY: the flag was false, so this is the first and only call
        // that gets here: no other reference to the value exists or will.
        Some(unsafe { &mut *self.value.get() })
    }
}

/// Byte written over the free stack at start; what is still there at the
/// end was never used.
const PAINT: u32 = 0xACE5_ACE5;

extern "C" {
    /// End of the statics (cortex-m-rt): the stack may grow down to it.
    static mut __euninit: u32;
    /// Where the stack starts (cortex-m-rt: the end of RAM).
    static _stack_start: u32;
}

/// Paints the free stack (below the current frame) and returns its bounds.
pub fn paint_stack() -> (usize, usize) {
    let low = core::ptr::addr_of_mut!(__euninit) as usize;
    let high = cortex_m::register::msp::read() as usize - 256;
    let mut at = low;
    while at + 4 <= high {
        // SAFETY: [low, high) lies between the end of the statics and the
        // current stack frame (less a margin for this function's own
        // frame): memory nothing else uses yet. Aligned word writes.
        unsafe { core::ptr::write_volatile(at as *mut u32, PAINT) };
        at += 4;
    }
    (low, high)
}

/// Bytes of painted stack that were written over.
pub fn stack_used((low, high): (usize, usize), top: usize) -> usize {
    let mut at = low;
    // SAFETY: the same range as `paint_stack`; aligned word reads.
    while at + 4 <= high && unsafe { core::ptr::read_volatile(at as *const u32) } == PAINT {
        at += 4;
    }
    top - at
}

/// Where the stack starts (its highest address).
pub fn stack_top() -> usize {
    core::ptr::addr_of!(_stack_start) as usize
}

#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    defmt::error!("firmware: panic");
    cortex_m_semihosting::debug::exit(cortex_m_semihosting::debug::EXIT_FAILURE);
    loop {
        cortex_m::asm::bkpt();
    }
}
