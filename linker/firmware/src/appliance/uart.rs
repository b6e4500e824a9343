//! UART0 of the mps2-an386 board (ARM CMSDK APB UART at 0x4000_4000), the
//! appliance's link to its server: polled, one byte at a time each way.

use eventstream_core::uplink::ByteLink;

const BASE: usize = 0x4000_4000;
const DATA: usize = BASE;
const STATE: usize = BASE + 0x04;
const CTRL: usize = BASE + 0x08;
const BAUDDIV: usize = BASE + 0x10;
const TX_FULL: u32 = 1 << 0;
const RX_FULL: u32 = 1 << 1;
const TX_ENABLE: u32 = 1 << 0;
const RX_ENABLE: u32 = 1 << 1;

fn read(reg: usize) -> u32 {
    // SAFETY: `reg` is one of the UART's word-aligned registers, mapped
    // on this board; a volatile read has no other effect than the
    // device's (reading DATA takes the received byte).
    unsafe { core::ptr::read_volatile(reg as *const u32) }
}

fn write(reg: usize, v: u32) {
    // SAFETY: as in `read`; the UART is owned by the one `Uart` value.
    unsafe { core::ptr::write_volatile(reg as *mut u32, v) }
}

/// The UART, owned once.
pub struct Uart {
    _private: (),
}

impl Uart {
    /// Turns the UART on (transmit and receive, no interrupts).
    pub fn take() -> Uart {
        // 25 MHz / 16: the board's fastest divider; QEMU ignores the rate.
        write(BAUDDIV, 16);
        write(CTRL, TX_ENABLE | RX_ENABLE);
        Uart { _private: () }
    }
}

impl ByteLink for Uart {
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
        while n < buf.len() && read(STATE) & RX_FULL != 0 {
            buf[n] = read(DATA) as u8;
            n += 1;
        }
        n
    }
}
