//! The mps2-an386 board's device interrupts, as a device crate gives them
//! (the board has no published one): their numbers for the NVIC, the
//! vector table's entries, and what RTIC reads off a device (`Interrupt`,
//! `interrupt`, `NVIC_PRIO_BITS`). Lines 0-5 are the CMSDK UARTs' receive
//! and transmit interrupts; the appliance takes UART0's receive line and
//! lends UART2's (unused) to RTIC as dispatchers.

/// Priority bits the board's NVIC implements.
pub const NVIC_PRIO_BITS: u8 = 3;

/// The board's first interrupt lines.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[allow(non_camel_case_types, clippy::upper_case_acronyms, dead_code)]
pub enum Interrupt {
    /// UART0 received a byte.
    UART0RX = 0,
    /// UART0 sent a byte.
    UART0TX = 1,
    /// UART1 received a byte.
    UART1RX = 2,
    /// UART1 sent a byte.
    UART1TX = 3,
    /// UART2 received a byte.
    UART2RX = 4,
    /// UART2 sent a byte.
    UART2TX = 5,
}

#[allow(unused_imports)]
pub use self::Interrupt as interrupt;

// SAFETY: each variant's value is its line on this board's NVIC.
unsafe impl cortex_m::interrupt::InterruptNumber for Interrupt {
    fn number(self) -> u16 {
        self as u16
    }
}

extern "C" {
    fn UART0RX();
    fn UART0TX();
    fn UART1RX();
    fn UART1TX();
    fn UART2RX();
    fn UART2TX();
}

/// A vector table entry.
pub union Vector {
    handler: unsafe extern "C" fn(),
    reserved: u32,
}

/// The device part of the vector table (cortex-m-rt's `device` feature):
/// the six UART lines (handlers default to cortex-m-rt's `DefaultHandler`
/// through `device.x`); the other lines are never enabled.
#[link_section = ".vector_table.interrupts"]
#[no_mangle]
pub static __INTERRUPTS: [Vector; 32] = {
    let mut v = [const { Vector { reserved: 0 } }; 32];
    v[0] = Vector { handler: UART0RX };
    v[1] = Vector { handler: UART0TX };
    v[2] = Vector { handler: UART1RX };
    v[3] = Vector { handler: UART1TX };
    v[4] = Vector { handler: UART2RX };
    v[5] = Vector { handler: UART2TX };
    v
};
