//! A NOR flash in memory: the flash log's host tests (with a power cut at
//! any program or erase step) and images whose flash log lives in RAM a
//! debugger or emulator keeps (QEMU's file-backed memory).

use embedded_storage::nor_flash::{
    ErrorType, NorFlash, NorFlashError, NorFlashErrorKind, ReadNorFlash,
};

/// Bytes one erase step clears: a power cut in an erase leaves the sector
/// cleared up to a multiple of this, the rest as it was.
pub const ERASE_STEP: usize = 64;

/// Why a [`MemFlash`] operation failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum MemFlashError {
    /// An offset or length not a multiple of the write or erase size.
    NotAligned,
    /// Past the end of the memory.
    OutOfBounds,
    /// The power was cut (the step budget ran out): the operation stopped
    /// part way, and every later one fails until [`MemFlash::revive`].
    PowerCut,
}

impl NorFlashError for MemFlashError {
    fn kind(&self) -> NorFlashErrorKind {
        match self {
            MemFlashError::NotAligned => NorFlashErrorKind::NotAligned,
            MemFlashError::OutOfBounds => NorFlashErrorKind::OutOfBounds,
            MemFlashError::PowerCut => NorFlashErrorKind::Other,
        }
    }
}

/// NOR flash over a caller's memory: erased bytes read 0xFF, programming
/// only clears bits (a byte written twice holds the AND of both), writes
/// come in `WRITE`-byte words and erases in `ERASE`-byte sectors.
pub struct MemFlash<'a, const WRITE: usize, const ERASE: usize> {
    mem: &'a mut [u8],
    /// Steps left before the power cut (None: never).
    budget: Option<u64>,
    steps: u64,
    dead: bool,
}

impl<'a, const WRITE: usize, const ERASE: usize> MemFlash<'a, WRITE, ERASE> {
    /// A flash over `mem` as it is (all 0xFF for a new, erased one).
    pub fn new(mem: &'a mut [u8]) -> Self {
        MemFlash {
            mem,
            budget: None,
            steps: 0,
            dead: false,
        }
    }

    /// Cuts the power after `steps` more steps (a byte programmed, or
    /// [`ERASE_STEP`] bytes erased, is one step).
    pub fn cut_after(&mut self, steps: u64) {
        self.budget = Some(steps);
    }

    /// Power back: operations work again (with no cut planned).
    pub fn revive(&mut self) {
        self.dead = false;
        self.budget = None;
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// Whether the power was cut.
    pub fn is_dead(&self) -> bool {
        self.dead
    }

    /// The memory, as the flash holds it.
    pub fn memory(&self) -> &[u8] {
        self.mem
    }

    fn step(&mut self) -> Result<(), MemFlashError> {
        if self.dead {
            return Err(MemFlashError::PowerCut);
        }
        if let Some(b) = &mut self.budget {
            if *b == 0 {
                self.dead = true;
                return Err(MemFlashError::PowerCut);
            }
            *b -= 1;
        }
        self.steps += 1;
        Ok(())
    }

    fn range(&self, offset: u32, len: usize) -> Result<core::ops::Range<usize>, MemFlashError> {
        let start = offset as usize;
        let end = start.checked_add(len).ok_or(MemFlashError::OutOfBounds)?;
        if end > self.mem.len() {
            return Err(MemFlashError::OutOfBounds);
        }
        Ok(start..end)
    }
}

impl<const WRITE: usize, const ERASE: usize> ErrorType for MemFlash<'_, WRITE, ERASE> {
    type Error = MemFlashError;
}

impl<const WRITE: usize, const ERASE: usize> ReadNorFlash for MemFlash<'_, WRITE, ERASE> {
    const READ_SIZE: usize = 1;

    fn read(&mut self, offset: u32, bytes: &mut [u8]) -> Result<(), Self::Error> {
        if self.dead {
            return Err(MemFlashError::PowerCut);
        }
        let r = self.range(offset, bytes.len())?;
        bytes.copy_from_slice(&self.mem[r]);
        Ok(())
    }

    fn capacity(&self) -> usize {
        self.mem.len()
    }
}

impl<const WRITE: usize, const ERASE: usize> NorFlash for MemFlash<'_, WRITE, ERASE> {
    const WRITE_SIZE: usize = WRITE;
    const ERASE_SIZE: usize = ERASE;

    fn erase(&mut self, from: u32, to: u32) -> Result<(), Self::Error> {
        if from > to || from as usize % ERASE != 0 || to as usize % ERASE != 0 {
            return Err(MemFlashError::NotAligned);
        }
        let r = self.range(from, (to - from) as usize)?;
        let mut at = r.start;
        while at < r.end {
            self.step()?;
            let end = (at + ERASE_STEP).min(r.end);
            self.mem[at..end].fill(0xFF);
            at = end;
        }
        Ok(())
    }

    fn write(&mut self, offset: u32, bytes: &[u8]) -> Result<(), Self::Error> {
        if offset as usize % WRITE != 0 || bytes.len() % WRITE != 0 {
            return Err(MemFlashError::NotAligned);
        }
        let r = self.range(offset, bytes.len())?;
        for (i, b) in r.zip(bytes) {
            self.step()?;
            self.mem[i] &= *b;
        }
        Ok(())
    }
}
