//! Wire formats of PROTOCOL.md: v1 event frames, acks, legacy frames, and a
//! streaming decoder that reassembles frames from arbitrary chunks.
//!
//! Shaped like smoltcp's wire layer: the field layout lives in one place
//! (`field`), [`Frame`] is a view over any buffer with one validator
//! ([`Frame::check`], whose [`Check`] says how strict) and setters where the
//! buffer is mutable, and [`FrameRepr`] builds frames.
//!
//! Submodules: `frame` (the v1 frame), `ack`, `legacy` (the original
//! dialect), `stream` (the decoder), [`read`] (read sessions and HELLO).
//!
//! Zero-copy: a [`Frame`] is a validated view over the caller's bytes (or the
//! decoder's one-frame stash when a frame arrived split). No allocation, no
//! panics on any input (slicing is checked; this module denies indexing).
#![deny(
    clippy::indexing_slicing,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic
)]

use crate::crc32c;
use crate::event::{EventId, Priority};

/// `ESC1`: first bytes of every v1 frame, and of a v1 connection.
pub const MAGIC: [u8; 4] = *b"ESC1";
/// `ESCA`: first bytes of every ack frame.
pub const ACK_MAGIC: [u8; 4] = *b"ESCA";
/// The only frame version.
pub const VERSION: u8 = 1;
/// Bytes before the topic: magic .. payload_len.
pub const HEADER_LEN: usize = 36;
/// Bytes of a frame that are not topic or payload (header + crc).
pub const OVERHEAD: usize = 40;
/// The largest `max_frame` a server may be configured with.
pub const MAX_FRAME_LIMIT: u32 = 65_536;
/// Size of an ack frame.
pub const ACK_LEN: usize = 24;
/// Flag bit 0: the producer wants an ack.
pub const FLAG_ACK: u8 = 0x01;
/// Flag bit 1: set by the server on stored frames of legacy events.
pub const FLAG_LEGACY: u8 = 0x02;
/// Ack offset for every status other than STORED and DUPLICATE.
pub const NO_OFFSET: u64 = u64::MAX;
/// Legacy event ids are `LEGACY_ID_BASE + log offset`.
pub const LEGACY_ID_BASE: u64 = 1 << 63;
/// A legacy frame of `body_len` becomes a v1 frame of `body_len + LEGACY_GROWTH`.
pub const LEGACY_GROWTH: u64 = 37;

/// Where each field of a v1 frame lies (PROTOCOL.md section 2): the one
/// place that knows the layout.
mod field {
    use core::ops::Range;

    pub const MAGIC: Range<usize> = 0..4;
    pub const LENGTH: usize = 4;
    pub const VERSION: usize = 8;
    pub const PRIORITY: usize = 9;
    pub const FLAGS: usize = 10;
    pub const TOPIC_LEN: usize = 11;
    pub const PARTITION: usize = 12;
    pub const EVENT_ID: usize = 16;
    pub const TIMESTAMP: usize = 24;
    pub const PAYLOAD_LEN: usize = 32;

    /// The topic of a frame whose `topic_len` is `topic_len`.
    pub const fn topic(topic_len: u8) -> Range<usize> {
        super::HEADER_LEN..super::HEADER_LEN + topic_len as usize
    }

    /// The payload of a frame of `len` bytes.
    pub const fn payload(topic_len: u8, len: usize) -> Range<usize> {
        let start = super::HEADER_LEN + topic_len as usize;
        let end = len.saturating_sub(4);
        start..if end > start { end } else { start }
    }
}

/// Reason code of an ack (PROTOCOL.md section 3). Every rejection the engine
/// makes carries one of these.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Reason {
    /// 0: no error.
    None = 0,
    /// 1: a frame did not start with `ESC1` (fatal).
    BadMagic = 1,
    /// 2: length out of range (fatal) or disagreeing with its fields.
    BadLength = 2,
    /// 3: CRC-32C mismatch.
    BadCrc = 3,
    /// 4: version other than 1.
    BadVersion = 4,
    /// 5: priority above 4.
    BadPriority = 5,
    /// 6: unknown or server-only flag bits set.
    BadFlags = 6,
    /// 7: topic length out of range or topic not UTF-8.
    BadTopic = 7,
    /// 8: dedup table full under `--dedup-full reject`.
    DedupFull = 8,
    /// 9: a ring or the pool is full under reject-when-full.
    Overloaded = 9,
    /// 10: read after a graceful shutdown began.
    ShuttingDown = 10,
    /// 11: the log could not be written.
    StorageFailed = 11,
    /// 12: no valid token (HELLO, section 8).
    Unauthorized = 12,
    /// 13: the token gives no right to this topic.
    Forbidden = 13,
    /// 14: a read start or commit outside the retained, visible log.
    OutOfRange = 14,
    /// 15: a malformed read request or session frame.
    BadRequest = 15,
    /// 16: a newer session of the group took over.
    Fenced = 16,
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 17] = [
        Reason::None,
        Reason::BadMagic,
        Reason::BadLength,
        Reason::BadCrc,
        Reason::BadVersion,
        Reason::BadPriority,
        Reason::BadFlags,
        Reason::BadTopic,
        Reason::DedupFull,
        Reason::Overloaded,
        Reason::ShuttingDown,
        Reason::StorageFailed,
        Reason::Unauthorized,
        Reason::Forbidden,
        Reason::OutOfRange,
        Reason::BadRequest,
        Reason::Fenced,
    ];

    /// Every reason a frame or event can be refused for (all but NONE).
    pub fn errors() -> &'static [Reason] {
        Self::ALL.get(1..).unwrap_or(&[])
    }

    /// The reason with wire code `code`.
    pub const fn from_u8(code: u8) -> Option<Reason> {
        Some(match code {
            0 => Reason::None,
            1 => Reason::BadMagic,
            2 => Reason::BadLength,
            3 => Reason::BadCrc,
            4 => Reason::BadVersion,
            5 => Reason::BadPriority,
            6 => Reason::BadFlags,
            7 => Reason::BadTopic,
            8 => Reason::DedupFull,
            9 => Reason::Overloaded,
            10 => Reason::ShuttingDown,
            11 => Reason::StorageFailed,
            12 => Reason::Unauthorized,
            13 => Reason::Forbidden,
            14 => Reason::OutOfRange,
            15 => Reason::BadRequest,
            16 => Reason::Fenced,
            _ => return None,
        })
    }

    /// The wire code.
    pub const fn code(self) -> u8 {
        self as u8
    }

    /// The protocol's name, e.g. `BAD_CRC`.
    pub const fn name(self) -> &'static str {
        match self {
            Reason::None => "NONE",
            Reason::BadMagic => "BAD_MAGIC",
            Reason::BadLength => "BAD_LENGTH",
            Reason::BadCrc => "BAD_CRC",
            Reason::BadVersion => "BAD_VERSION",
            Reason::BadPriority => "BAD_PRIORITY",
            Reason::BadFlags => "BAD_FLAGS",
            Reason::BadTopic => "BAD_TOPIC",
            Reason::DedupFull => "DEDUP_FULL",
            Reason::Overloaded => "OVERLOADED",
            Reason::ShuttingDown => "SHUTTING_DOWN",
            Reason::StorageFailed => "STORAGE_FAILED",
            Reason::Unauthorized => "UNAUTHORIZED",
            Reason::Forbidden => "FORBIDDEN",
            Reason::OutOfRange => "OUT_OF_RANGE",
            Reason::BadRequest => "BAD_REQUEST",
            Reason::Fenced => "FENCED",
        }
    }
}

/// Status of an ack (PROTOCOL.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Status {
    /// 0: written to the log; the offset is the event's.
    Stored = 0,
    /// 1: the id was already stored; the offset is the original's.
    Duplicate = 1,
    /// 2: not stored; the reason says why; the connection stays open.
    Rejected = 2,
    /// 3: the connection is closed after this ack.
    Fatal = 3,
}

impl Status {
    /// The status with wire code `code`.
    pub const fn from_u8(code: u8) -> Option<Status> {
        match code {
            0 => Some(Status::Stored),
            1 => Some(Status::Duplicate),
            2 => Some(Status::Rejected),
            3 => Some(Status::Fatal),
            _ => None,
        }
    }

    /// The protocol's name, e.g. `STORED`.
    pub const fn name(self) -> &'static str {
        match self {
            Status::Stored => "STORED",
            Status::Duplicate => "DUPLICATE",
            Status::Rejected => "REJECTED",
            Status::Fatal => "FATAL",
        }
    }
}

/// Per-connection limits of the decoder (`--max-frame`, `--max-topic`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Limits {
    max_frame: u32,
    max_topic: u8,
}

/// A [`Limits`] value outside what the protocol allows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LimitsError {
    /// `max_frame` must be in `41..=65536` (room for a one-byte topic).
    MaxFrame,
    /// `max_topic` must be at least 1.
    MaxTopic,
}

impl Limits {
    /// The protocol's defaults: frames up to 512 bytes, topics up to 64.
    pub const DEFAULT: Limits = Limits {
        max_frame: 512,
        max_topic: 64,
    };

    /// Limits with the given maxima, checked against the protocol's bounds.
    pub const fn new(max_frame: u32, max_topic: u8) -> Result<Limits, LimitsError> {
        if max_frame < OVERHEAD as u32 + 1 || max_frame > MAX_FRAME_LIMIT {
            return Err(LimitsError::MaxFrame);
        }
        if max_topic == 0 {
            return Err(LimitsError::MaxTopic);
        }
        Ok(Limits {
            max_frame,
            max_topic,
        })
    }

    /// Largest accepted frame, in bytes.
    pub const fn max_frame(&self) -> u32 {
        self.max_frame
    }

    /// Largest accepted topic, in bytes.
    pub const fn max_topic(&self) -> u8 {
        self.max_topic
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self::DEFAULT
    }
}

#[inline(always)]
pub(super) fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

#[inline(always)]
pub(super) fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

#[inline(always)]
pub(super) fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

#[inline(always)]
pub(super) fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = out.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

/// How many bytes the next frame needs, decided from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Extent {
    /// Cannot tell yet: wait until at least this many bytes are there.
    Need(usize),
    /// The frame is exactly this long.
    Known(usize),
    /// v1: answer FATAL and close.
    Fatal(Reason),
}

mod ack;
mod frame;
mod legacy;
pub mod read;
mod stream;
#[cfg(test)]
mod tests;

pub use ack::{Ack, AckError};
pub use frame::{
    declared_length, seal, topic_range, Check, EncodeError, Frame, FrameError, FrameHead, FrameRepr,
};
pub use legacy::{LegacyEvent, LegacyRule};
pub use stream::{peek_v1, Decoded, Dialect, Peeked, StashTooSmall, StreamDecoder};
