//! UART0 of the mps2-an386 board (ARM CMSDK APB UART at 0x4000_4000), the
//! appliance's link to its server. Bytes received raise UART0's receive
//! interrupt, whose task moves them into a queue; the uplink task reads
//! the queue and writes the transmit register.

use eventstream_core::uplink::ByteLink;
use heapless::spsc::{Consumer, Producer};

const BASE: usize = 0x4000_4000;
const DATA: usize = BASE;
const STATE: usize = BASE + 0x04;
const CTRL: usize = BASE + 0x08;
const INTCLEAR: usize = BASE + 0x0C;
const BAUDDIV: usize = BASE + 0x10;
const TX_FULL: u32 = 1 << 0;
const RX_FULL: u32 = 1 << 1;
const TX_ENABLE: u32 = 1 << 0;
const RX_ENABLE: u32 = 1 << 1;
const RX_INTERRUPT: u32 = 1 << 3;
const RX_PENDING: u32 = 1 << 1;

fn read(reg: usize) -> u32 {
    // SAFETY: `reg` is one of the UART's word-aligned registers, mapped
    // on this board; a volatile read has no other effect than the
    // device's (reading DATA takes the received byte).
    unsafe { core::ptr::read_volatile(reg as *const u32) }
}

fn write(reg: usize, v: u32) {
    // SAFETY: as in `read`; the receive task touches only DATA (reading)
    // and INTCLEAR, the uplink task only DATA (writing) and STATE.
    unsafe { core::ptr::write_volatile(reg as *mut u32, v) }
}

/// Turns the UART on: transmit, receive, and the receive interrupt.
pub fn enable() {
    // 25 MHz / 16: the board's fastest divider; QEMU ignores the rate.
    write(BAUDDIV, 16);
    write(CTRL, TX_ENABLE | RX_ENABLE | RX_INTERRUPT);
}

/// The receive interrupt's work: every byte waiting into `into` (a full
/// queue drops it: the uplink's ack timeout then starts again).
pub fn take_received(into: &mut Producer<'static, u8>) {
    write(INTCLEAR, RX_PENDING);
    while read(STATE) & RX_FULL != 0 {
        let _ = into.enqueue(read(DATA) as u8);
    }
}

/// The uplink's side: writes go to the UART, reads come from the queue.
pub struct Link {
    /// Bytes the receive interrupt took.
    pub received: Consumer<'static, u8>,
}

impl ByteLink for Link {
    fn write(&mut self, bytes: &[u8]) -> usize {
        let mut n = 0;
        for &b in bytes {
            if read(STATE) & TX_FULL != 0 {
                break;
            }
            write(DATA, u32::from(b));
            n += 1;
        }
        n
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let mut n = 0;
        while n < buf.len() {
            match self.received.dequeue() {
                Some(b) => {
                    buf[n] = b;
                    n += 1;
                }
                None => break,
            }
        }
        n
    }
}
