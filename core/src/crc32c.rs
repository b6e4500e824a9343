//! CRC-32C (Castagnoli), the checksum of v1 frames and log records.
//!
//! On x86_64 with SSE4.2 (detected once at run time through `cpuid`, or known
//! at compile time) it uses the `crc32` instruction, 8 bytes per step;
//! elsewhere (Cortex-M4 among them) the `crc` crate's slice-by-16 tables
//! (16 KiB of flash). No allocation, no state beyond one cached flag.

use crc::{Crc, Table, CRC_32_ISCSI};

static CASTAGNOLI: Crc<u32, Table<16>> = Crc::<u32, Table<16>>::new(&CRC_32_ISCSI);

/// CRC-32C of `bytes`.
#[inline]
pub fn checksum(bytes: &[u8]) -> u32 {
    #[cfg(target_arch = "x86_64")]
    if x86::has_sse42() {
        return x86::checksum(bytes);
    }
    CASTAGNOLI.checksum(bytes)
}

/// The table-driven computation, whatever the machine offers (tests compare
/// it with the hardware path).
pub fn checksum_portable(bytes: &[u8]) -> u32 {
    CASTAGNOLI.checksum(bytes)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use core::arch::x86_64::{__cpuid, _mm_crc32_u64, _mm_crc32_u8};
    use core::sync::atomic::{AtomicU32, Ordering::Relaxed};

    const UNKNOWN: u32 = 0;
    const ABSENT: u32 = 1;
    const PRESENT: u32 = 2;
    static SSE42: AtomicU32 = AtomicU32::new(UNKNOWN);

    /// The CPU has the SSE4.2 `crc32` instruction.
    #[inline]
    pub(super) fn has_sse42() -> bool {
        if cfg!(target_feature = "sse4.2") {
            return true;
        }
        match SSE42.load(Relaxed) {
            PRESENT => true,
            ABSENT => false,
            _ => detect(),
        }
    }

    #[cold]
    fn detect() -> bool {
        // Miri runs no inline assembly (cpuid); it checks the table path.
        if cfg!(miri) {
            return false;
        }
        // CPUID leaf 1, ECX bit 20: SSE4.2. Every x86_64 CPU has CPUID.
        #[allow(unused_unsafe)]
        // SAFETY: the cpuid instruction exists on every x86_64 processor and
        // leaf 1 is always valid; it reads no memory.
        let leaf = unsafe { __cpuid(1) };
        let present = leaf.ecx & (1 << 20) != 0;
        SSE42.store(if present { PRESENT } else { ABSENT }, Relaxed);
        present
    }

    #[inline]
    pub(super) fn checksum(bytes: &[u8]) -> u32 {
        // SAFETY: only called after has_sse42() returned true, so the CPU
        // supports every instruction that `update` is compiled with.
        !unsafe { update(!0, bytes) }
    }

    #[target_feature(enable = "sse4.2")]
    fn update(crc: u32, bytes: &[u8]) -> u32 {
        let mut crc = crc as u64;
        let mut words = bytes.chunks_exact(8);
        for w in &mut words {
            let mut a = [0u8; 8];
            a.copy_from_slice(w);
            crc = _mm_crc32_u64(crc, u64::from_le_bytes(a));
        }
        let mut crc = crc as u32;
        for &b in words.remainder() {
            crc = _mm_crc32_u8(crc, b);
        }
        crc
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_value() {
        assert_eq!(checksum(b"123456789"), 0xE306_9283);
        assert_eq!(checksum_portable(b"123456789"), 0xE306_9283);
    }

    #[test]
    #[cfg_attr(miri, ignore = "miri runs only the table path")]
    fn hardware_and_tables_agree_on_every_length_and_alignment() {
        let data: std::vec::Vec<u8> = (0..300u32).map(|i| (i * 7 + 3) as u8).collect();
        for start in 0..9 {
            for end in start..data.len() {
                let s = &data[start..end];
                assert_eq!(checksum(s), checksum_portable(s), "{start}..{end}");
            }
        }
    }
}
