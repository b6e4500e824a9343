//! CRC-32C (Castagnoli), the checksum of v1 frames and log records.
//!
//! Table-driven (slice-by-16 tables built at compile time, 16 KiB of flash),
//! no allocation, no state beyond the running value.

use crc::{Crc, Table, CRC_32_ISCSI};

static CASTAGNOLI: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// CRC-32C of `bytes`.
#[inline]
pub fn checksum(bytes: &[u8]) -> u32 {
    CASTAGNOLI.checksum(bytes)
}

/// Incremental CRC-32C over several pieces; `finish` equals [`checksum`] of
/// the concatenation.
pub struct Crc32c {
    digest: crc::Digest<'static, u32, Table<16>>,
}

impl Crc32c {
    /// A fresh computation.
    pub fn new() -> Self {
        Self {
            digest: CASTAGNOLI.digest(),
        }
    }

    /// Feeds the next piece.
    pub fn update(&mut self, bytes: &[u8]) {
        self.digest.update(bytes);
    }

    /// The checksum of everything fed so far.
    pub fn finish(self) -> u32 {
        self.digest.finalize()
    }
}

impl Default for Crc32c {
    fn default() -> Self {
        Self::new()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        let mut c = Crc32c::new();
        c.update(b"1234");
        c.update(b"56789");
        assert_eq!(c.finish(), 0xE306_9283);
    }
}
