//! Wire formats of PROTOCOL.md: v1 event frames, acks, legacy frames, and a
//! streaming decoder that reassembles frames from arbitrary chunks.
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

/// Field offsets of a v1 frame, named after PROTOCOL.md section 2.
mod field {
    pub const LENGTH: usize = 4;
    pub const VERSION: usize = 8;
    pub const PRIORITY: usize = 9;
    pub const FLAGS: usize = 10;
    pub const TOPIC_LEN: usize = 11;
    pub const PARTITION: usize = 12;
    pub const EVENT_ID: usize = 16;
    pub const TIMESTAMP: usize = 24;
    pub const PAYLOAD_LEN: usize = 32;
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
}

impl Reason {
    /// Every reason, in code order.
    pub const ALL: [Reason; 12] = [
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
fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    if let Some(s) = b.get(at..at + 4) {
        a.copy_from_slice(s);
    }
    u32::from_le_bytes(a)
}

#[inline(always)]
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    if let Some(s) = b.get(at..at + 8) {
        a.copy_from_slice(s);
    }
    u64::from_le_bytes(a)
}

#[inline(always)]
fn byte(b: &[u8], at: usize) -> u8 {
    b.get(at).copied().unwrap_or(0)
}

#[inline(always)]
fn put(out: &mut [u8], at: usize, bytes: &[u8]) {
    if let Some(d) = out.get_mut(at..at + bytes.len()) {
        d.copy_from_slice(bytes);
    }
}

/// A v1 frame that passed every check of PROTOCOL.md section 2: a zero-copy
/// view whose accessors cannot fail.
///
/// ```
/// use eventstream_core::wire::{Frame, FrameRepr, Limits, FLAG_ACK};
/// use eventstream_core::Priority;
///
/// let repr = FrameRepr {
///     priority: Priority::High,
///     flags: FLAG_ACK,
///     partition: 3,
///     event_id: 42,
///     timestamp_ns: 1_764_253_200_000_000_000,
///     topic: b"orders/eu",
///     payload: b"hello",
/// };
/// let mut buf = [0u8; 128];
/// let n = repr.encode(&mut buf).unwrap();
/// let f = Frame::parse(&buf[..n], &Limits::DEFAULT).unwrap();
/// assert_eq!((f.event_id(), f.topic(), f.payload()), (42, "orders/eu", &b"hello"[..]));
/// assert!(f.ack_requested());
/// buf[n - 1] ^= 1; // the CRC no longer matches
/// assert!(Frame::parse(&buf[..n], &Limits::DEFAULT).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<'a> {
    bytes: &'a [u8],
    priority: Priority,
    topic_len: u8,
}

impl<'a> Frame<'a> {
    /// Validates `bytes`, which must hold exactly one frame (its length field
    /// equal to `bytes.len()`), in the protocol's order.
    pub fn parse(bytes: &'a [u8], limits: &Limits) -> Result<Frame<'a>, FrameError> {
        match extent_v1(bytes, limits) {
            Extent::Fatal(reason) => return Err(FrameError::Fatal(reason)),
            Extent::Need(_) => return Err(FrameError::Fatal(Reason::BadLength)),
            Extent::Known(n) if n != bytes.len() => {
                return Err(FrameError::Fatal(Reason::BadLength))
            }
            Extent::Known(_) => {}
        }
        check_body(bytes, limits)
    }

    /// The whole frame, magic to crc.
    #[inline]
    pub fn bytes(&self) -> &'a [u8] {
        self.bytes
    }
    /// `length`: bytes in the whole frame.
    #[inline]
    pub fn length(&self) -> u32 {
        self.bytes.len() as u32
    }
    /// `priority`.
    #[inline]
    pub fn priority(&self) -> Priority {
        self.priority
    }
    /// `flags` (only [`FLAG_ACK`] and, in stored frames, [`FLAG_LEGACY`]).
    #[inline]
    pub fn flags(&self) -> u8 {
        byte(self.bytes, field::FLAGS)
    }
    /// The producer asked for an ack.
    #[inline]
    pub fn ack_requested(&self) -> bool {
        self.flags() & FLAG_ACK != 0
    }
    /// The server stored this frame for a legacy-dialect event.
    #[inline]
    pub fn is_legacy(&self) -> bool {
        self.flags() & FLAG_LEGACY != 0
    }
    /// `partition`.
    #[inline]
    pub fn partition(&self) -> u32 {
        le_u32(self.bytes, field::PARTITION)
    }
    /// `event_id`, the dedup key.
    #[inline]
    pub fn event_id(&self) -> EventId {
        le_u64(self.bytes, field::EVENT_ID)
    }
    /// `timestamp_ns`, the producer's clock.
    #[inline]
    pub fn timestamp_ns(&self) -> u64 {
        le_u64(self.bytes, field::TIMESTAMP)
    }
    /// `topic_len`.
    #[inline]
    pub fn topic_len(&self) -> u8 {
        self.topic_len
    }
    /// `payload_len`.
    #[inline]
    pub fn payload_len(&self) -> u32 {
        le_u32(self.bytes, field::PAYLOAD_LEN)
    }
    /// The topic's bytes (valid UTF-8).
    #[inline]
    pub fn topic_bytes(&self) -> &'a [u8] {
        self.bytes
            .get(HEADER_LEN..HEADER_LEN + self.topic_len as usize)
            .unwrap_or(&[])
    }
    /// The topic.
    pub fn topic(&self) -> &'a str {
        core::str::from_utf8(self.topic_bytes()).unwrap_or("")
    }
    /// The payload.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        let start = HEADER_LEN + self.topic_len as usize;
        self.bytes
            .get(start..self.bytes.len().saturating_sub(4))
            .unwrap_or(&[])
    }
    /// `crc`.
    #[inline]
    pub fn crc(&self) -> u32 {
        le_u32(self.bytes, self.bytes.len().saturating_sub(4))
    }
}

/// Why a v1 frame was not accepted.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum FrameError {
    /// Answer FATAL with this reason, then close the connection.
    Fatal(Reason),
    /// Skip the frame; the connection stays open.
    Rejected {
        /// The protocol's reason code.
        reason: Reason,
        /// `event_id` as read from the frame.
        event_id: EventId,
        /// The ACK flag as read from the frame: answer REJECTED if set.
        ack: bool,
    },
}

/// How many bytes the next frame needs, decided from its first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Extent {
    /// Cannot tell yet: wait until at least this many bytes are there.
    Need(usize),
    /// The frame is exactly this long.
    Known(usize),
    /// v1: answer FATAL and close.
    Fatal(Reason),
}

/// Magic and length range, the two checks that close a v1 connection.
#[inline]
fn extent_v1(head: &[u8], limits: &Limits) -> Extent {
    let Some(magic) = head.get(..4) else {
        return Extent::Need(4);
    };
    if magic != MAGIC {
        return Extent::Fatal(Reason::BadMagic);
    }
    if head.len() < 8 {
        return Extent::Need(8);
    }
    let length = le_u32(head, field::LENGTH);
    if length < OVERHEAD as u32 || length > limits.max_frame {
        return Extent::Fatal(Reason::BadLength);
    }
    Extent::Known(length as usize)
}

/// The per-frame checks after magic and length range; `bytes` is exactly one
/// frame whose length field is `bytes.len()`.
#[inline]
fn check_body<'a>(bytes: &'a [u8], limits: &Limits) -> Result<Frame<'a>, FrameError> {
    let len = bytes.len();
    let flags = byte(bytes, field::FLAGS);
    let reject = |reason| FrameError::Rejected {
        reason,
        event_id: le_u64(bytes, field::EVENT_ID),
        ack: flags & FLAG_ACK != 0,
    };
    let body = bytes.get(..len.saturating_sub(4)).unwrap_or(&[]);
    if crc32c::checksum(body) != le_u32(bytes, len.saturating_sub(4)) {
        return Err(reject(Reason::BadCrc));
    }
    if byte(bytes, field::VERSION) != VERSION {
        return Err(reject(Reason::BadVersion));
    }
    let topic_len = byte(bytes, field::TOPIC_LEN);
    let payload_len = le_u32(bytes, field::PAYLOAD_LEN);
    if OVERHEAD as u64 + topic_len as u64 + payload_len as u64 != len as u64 {
        return Err(reject(Reason::BadLength));
    }
    let Some(priority) = Priority::from_u8(byte(bytes, field::PRIORITY)) else {
        return Err(reject(Reason::BadPriority));
    };
    if flags & !FLAG_ACK != 0 {
        return Err(reject(Reason::BadFlags));
    }
    let topic = bytes
        .get(HEADER_LEN..HEADER_LEN + topic_len as usize)
        .unwrap_or(&[]);
    if topic_len == 0 || topic_len > limits.max_topic || core::str::from_utf8(topic).is_err() {
        return Err(reject(Reason::BadTopic));
    }
    Ok(Frame {
        bytes,
        priority,
        topic_len,
    })
}

/// Checks a frame read back from the log: magic, length >= 40, crc, and the
/// field layout; the LEGACY flag is allowed there. Returns the view or `None`.
pub fn parse_stored(bytes: &[u8]) -> Option<Frame<'_>> {
    let limits = Limits {
        max_frame: MAX_FRAME_LIMIT,
        max_topic: u8::MAX,
    };
    if !matches!(extent_v1(bytes, &limits), Extent::Known(n) if n == bytes.len()) {
        return None;
    }
    let len = bytes.len();
    let body = bytes.get(..len - 4)?;
    if crc32c::checksum(body) != le_u32(bytes, len - 4) {
        return None;
    }
    let topic_len = byte(bytes, field::TOPIC_LEN);
    let payload_len = le_u32(bytes, field::PAYLOAD_LEN);
    if byte(bytes, field::VERSION) != VERSION
        || OVERHEAD as u64 + topic_len as u64 + payload_len as u64 != len as u64
        || byte(bytes, field::FLAGS) & !(FLAG_ACK | FLAG_LEGACY) != 0
        || topic_len == 0
    {
        return None;
    }
    let priority = Priority::from_u8(byte(bytes, field::PRIORITY))?;
    core::str::from_utf8(bytes.get(HEADER_LEN..HEADER_LEN + topic_len as usize)?).ok()?;
    Some(Frame {
        bytes,
        priority,
        topic_len,
    })
}

/// A view of a frame that was validated before (at ingest) and kept
/// unchanged since, e.g. in a pool slot: checks only the layout (length
/// fields, priority, topic length), not the CRC or the topic's UTF-8.
pub fn trusted_frame(bytes: &[u8]) -> Option<Frame<'_>> {
    let len = bytes.len();
    let topic_len = byte(bytes, field::TOPIC_LEN);
    if len < OVERHEAD
        || le_u32(bytes, field::LENGTH) as usize != len
        || OVERHEAD as u64 + topic_len as u64 + le_u32(bytes, field::PAYLOAD_LEN) as u64
            != len as u64
    {
        return None;
    }
    Some(Frame {
        bytes,
        priority: Priority::from_u8(byte(bytes, field::PRIORITY))?,
        topic_len,
    })
}

/// The total length a frame starting with `head` declares, if `head` holds at
/// least its first 8 bytes (for skipping over frames without validating).
pub fn declared_length(head: &[u8]) -> Option<u32> {
    (head.len() >= 8).then(|| le_u32(head, field::LENGTH))
}

/// Everything needed to build a v1 frame.
///
/// ```
/// use eventstream_core::wire::{FrameRepr, MAGIC};
/// use eventstream_core::Priority;
///
/// let repr = FrameRepr {
///     priority: Priority::Low,
///     flags: 0,
///     partition: 0,
///     event_id: 1,
///     timestamp_ns: 0,
///     topic: b"t",
///     payload: &[7; 10],
/// };
/// let mut out = vec![0u8; repr.encoded_len()];
/// assert_eq!(repr.encode(&mut out), Ok(out.len()));
/// assert_eq!(&out[..4], &MAGIC[..]);
/// // Too small a buffer is an error, not a panic.
/// assert!(repr.encode(&mut [0u8; 8]).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameRepr<'a> {
    /// `priority`.
    pub priority: Priority,
    /// `flags`: [`FLAG_ACK`] from producers; [`FLAG_LEGACY`] only in stored frames.
    pub flags: u8,
    /// `partition`.
    pub partition: u32,
    /// `event_id`.
    pub event_id: EventId,
    /// `timestamp_ns`.
    pub timestamp_ns: u64,
    /// Topic, 1..=255 bytes.
    pub topic: &'a [u8],
    /// Payload.
    pub payload: &'a [u8],
}

/// Why [`FrameRepr::encode`] could not build a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum EncodeError {
    /// The topic is empty or longer than 255 bytes.
    Topic,
    /// The frame would exceed [`MAX_FRAME_LIMIT`].
    TooLong,
    /// The output buffer is shorter than the frame.
    BufferTooSmall,
}

impl FrameRepr<'_> {
    /// Length of the encoded frame.
    pub fn encoded_len(&self) -> usize {
        OVERHEAD + self.topic.len() + self.payload.len()
    }

    /// Writes the frame to the start of `out`, CRC included; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        if self.topic.is_empty() || self.topic.len() > u8::MAX as usize {
            return Err(EncodeError::Topic);
        }
        let len = self.encoded_len();
        if len > MAX_FRAME_LIMIT as usize {
            return Err(EncodeError::TooLong);
        }
        if out.len() < len {
            return Err(EncodeError::BufferTooSmall);
        }
        put(out, 0, &MAGIC);
        put(out, field::LENGTH, &(len as u32).to_le_bytes());
        put(
            out,
            field::VERSION,
            &[
                VERSION,
                self.priority.code(),
                self.flags,
                self.topic.len() as u8,
            ],
        );
        put(out, field::PARTITION, &self.partition.to_le_bytes());
        put(out, field::EVENT_ID, &self.event_id.to_le_bytes());
        put(out, field::TIMESTAMP, &self.timestamp_ns.to_le_bytes());
        put(
            out,
            field::PAYLOAD_LEN,
            &(self.payload.len() as u32).to_le_bytes(),
        );
        put(out, HEADER_LEN, self.topic);
        put(out, HEADER_LEN + self.topic.len(), self.payload);
        seal(out.get_mut(..len).unwrap_or(&mut []));
        Ok(len)
    }
}

/// Recomputes the trailing CRC of the frame that exactly fills `frame`.
pub fn seal(frame: &mut [u8]) {
    let len = frame.len();
    if len < OVERHEAD {
        return;
    }
    let crc = crc32c::checksum(frame.get(..len - 4).unwrap_or(&[]));
    put(frame, len - 4, &crc.to_le_bytes());
}

/// Rewrites `event_id` and `timestamp_ns` of an encoded frame and re-seals it
/// (load generator templates; legacy ids assigned at storage).
pub fn patch_frame(frame: &mut [u8], event_id: EventId, timestamp_ns: u64) {
    if frame.len() < OVERHEAD {
        return;
    }
    put(frame, field::EVENT_ID, &event_id.to_le_bytes());
    put(frame, field::TIMESTAMP, &timestamp_ns.to_le_bytes());
    seal(frame);
}

/// Rewrites only `event_id` of an encoded frame and re-seals it.
pub fn patch_event_id(frame: &mut [u8], event_id: EventId) {
    if frame.len() < OVERHEAD {
        return;
    }
    put(frame, field::EVENT_ID, &event_id.to_le_bytes());
    seal(frame);
}

/// A 24-byte ack frame (PROTOCOL.md section 3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct Ack {
    /// What happened to the event.
    pub status: Status,
    /// Why, for REJECTED and FATAL; NONE otherwise.
    pub reason: Reason,
    /// The event's id (0 for FATAL).
    pub event_id: EventId,
    /// Log offset for STORED, the original's for DUPLICATE, else [`NO_OFFSET`].
    pub offset: u64,
}

/// Why bytes are not a valid ack frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum AckError {
    /// Fewer than 24 bytes.
    Short,
    /// Not `ESCA`.
    Magic,
    /// Not version 1.
    Version,
    /// Status above 3.
    Status,
    /// Reason above 11.
    Reason,
    /// Reserved byte not zero.
    Reserved,
}

impl Ack {
    /// STORED at `offset`.
    pub const fn stored(event_id: EventId, offset: u64) -> Ack {
        Ack {
            status: Status::Stored,
            reason: Reason::None,
            event_id,
            offset,
        }
    }

    /// DUPLICATE of the original stored at `original_offset`.
    pub const fn duplicate(event_id: EventId, original_offset: u64) -> Ack {
        Ack {
            status: Status::Duplicate,
            reason: Reason::None,
            event_id,
            offset: original_offset,
        }
    }

    /// REJECTED for `reason`.
    pub const fn rejected(event_id: EventId, reason: Reason) -> Ack {
        Ack {
            status: Status::Rejected,
            reason,
            event_id,
            offset: NO_OFFSET,
        }
    }

    /// FATAL for `reason`; the connection closes after it.
    pub const fn fatal(reason: Reason) -> Ack {
        Ack {
            status: Status::Fatal,
            reason,
            event_id: 0,
            offset: NO_OFFSET,
        }
    }

    /// The 24 wire bytes.
    pub fn encode(&self) -> [u8; ACK_LEN] {
        let mut out = [0u8; ACK_LEN];
        put(&mut out, 0, &ACK_MAGIC);
        put(
            &mut out,
            4,
            &[VERSION, self.status as u8, self.reason as u8, 0],
        );
        put(&mut out, 8, &self.event_id.to_le_bytes());
        put(&mut out, 16, &self.offset.to_le_bytes());
        out
    }

    /// Parses the first 24 bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Ack, AckError> {
        if bytes.len() < ACK_LEN {
            return Err(AckError::Short);
        }
        if bytes.get(..4) != Some(&ACK_MAGIC[..]) {
            return Err(AckError::Magic);
        }
        if byte(bytes, 4) != VERSION {
            return Err(AckError::Version);
        }
        let status = Status::from_u8(byte(bytes, 5)).ok_or(AckError::Status)?;
        let reason = Reason::from_u8(byte(bytes, 6)).ok_or(AckError::Reason)?;
        if byte(bytes, 7) != 0 {
            return Err(AckError::Reserved);
        }
        Ok(Ack {
            status,
            reason,
            event_id: le_u64(bytes, 8),
            offset: le_u64(bytes, 16),
        })
    }
}

/// A valid legacy-dialect event (PROTOCOL.md section 4): a view over its raw
/// frame `[u32 BE body_len][u8 priority][u16 BE topic_len][topic][payload]`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LegacyEvent<'a> {
    priority: Priority,
    topic: &'a [u8],
    payload: &'a [u8],
}

impl<'a> LegacyEvent<'a> {
    /// The producer's priority.
    pub fn priority(&self) -> Priority {
        self.priority
    }
    /// The topic's bytes (valid UTF-8, 1..=max_topic long).
    pub fn topic(&self) -> &'a [u8] {
        self.topic
    }
    /// The payload.
    pub fn payload(&self) -> &'a [u8] {
        self.payload
    }

    /// The v1 frame the server stores for this event: version 1, flags
    /// LEGACY, partition 0, timestamp `recv_ns`, and `event_id` (the caller
    /// passes `LEGACY_ID_BASE + offset` once the offset is known, or patches
    /// it later with [`patch_event_id`]). Returns the frame's length.
    pub fn encode_v1(
        &self,
        event_id: EventId,
        recv_ns: u64,
        out: &mut [u8],
    ) -> Result<usize, EncodeError> {
        FrameRepr {
            priority: self.priority,
            flags: FLAG_LEGACY,
            partition: 0,
            event_id,
            timestamp_ns: recv_ns,
            topic: self.topic,
            payload: self.payload,
        }
        .encode(out)
    }

    /// Length of the v1 frame it becomes.
    pub fn v1_len(&self) -> usize {
        OVERHEAD + self.topic.len() + self.payload.len()
    }
}

/// The first failing check of a skipped legacy frame, in PROTOCOL.md order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum LegacyRule {
    /// `body_len < 3`.
    BodyTooShort,
    /// `topic_len == 0`.
    TopicEmpty,
    /// `3 + topic_len > body_len`.
    TopicPastBody,
    /// `topic_len > max_topic`.
    TopicTooLong,
    /// The topic is not UTF-8.
    TopicNotUtf8,
    /// `priority > 4`.
    BadPriority,
}

impl LegacyRule {
    /// The v1 reason code metrics file this rejection under.
    pub const fn reason(self) -> Reason {
        match self {
            LegacyRule::BodyTooShort | LegacyRule::TopicPastBody => Reason::BadLength,
            LegacyRule::TopicEmpty | LegacyRule::TopicTooLong | LegacyRule::TopicNotUtf8 => {
                Reason::BadTopic
            }
            LegacyRule::BadPriority => Reason::BadPriority,
        }
    }
}

#[inline]
fn extent_legacy(head: &[u8], limits: &Limits) -> Extent {
    let Some(b) = head.get(..4) else {
        return Extent::Need(4);
    };
    let body_len = u32::from_be_bytes([byte(b, 0), byte(b, 1), byte(b, 2), byte(b, 3)]) as u64;
    if body_len != 0 && body_len + LEGACY_GROWTH > limits.max_frame as u64 {
        return Extent::Fatal(Reason::BadLength);
    }
    Extent::Known(4 + body_len as usize)
}

/// Checks one whole raw legacy frame (length prefix included) whose body is
/// not empty and fits `limits`.
fn check_legacy<'a>(raw: &'a [u8], limits: &Limits) -> Result<LegacyEvent<'a>, LegacyRule> {
    let body = raw.get(4..).unwrap_or(&[]);
    if body.len() < 3 {
        return Err(LegacyRule::BodyTooShort);
    }
    let topic_len = u16::from_be_bytes([byte(body, 1), byte(body, 2)]) as usize;
    if topic_len == 0 {
        return Err(LegacyRule::TopicEmpty);
    }
    let Some(topic) = body.get(3..3 + topic_len) else {
        return Err(LegacyRule::TopicPastBody);
    };
    if topic_len > limits.max_topic as usize {
        return Err(LegacyRule::TopicTooLong);
    }
    if core::str::from_utf8(topic).is_err() {
        return Err(LegacyRule::TopicNotUtf8);
    }
    let priority = Priority::from_u8(byte(body, 0)).ok_or(LegacyRule::BadPriority)?;
    Ok(LegacyEvent {
        priority,
        topic,
        payload: body.get(3 + topic_len..).unwrap_or(&[]),
    })
}

/// What [`peek_v1`] read off the head of a v1 frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Peeked<'a> {
    /// Bytes from this frame's start to the next frame's.
    pub len: usize,
    /// The `event_id` field.
    pub event_id: EventId,
    /// The `priority` field.
    pub priority: Priority,
    /// The topic bytes (not checked for UTF-8).
    pub topic: &'a [u8],
}

/// Reads the head of the v1 frame that `input` starts with, without
/// checking its CRC or the rest of the validation: a hint for work that may
/// start early (prefetching a frame's dedup slots while earlier frames are
/// handled), never a decision. `None` when `input` does not start with the
/// v1 magic, the length is outside `40..=MAX_FRAME_LIMIT`, or the frame is
/// not all there.
#[inline]
pub fn peek_v1(input: &[u8]) -> Option<Peeked<'_>> {
    if input.get(..MAGIC.len())? != MAGIC {
        return None;
    }
    let len = declared_length(input)? as usize;
    if !(OVERHEAD..=MAX_FRAME_LIMIT as usize).contains(&len) || input.len() < len {
        return None;
    }
    let topic_len = usize::from(byte(input, field::TOPIC_LEN));
    Some(Peeked {
        len,
        event_id: le_u64(input, field::EVENT_ID),
        priority: Priority::from_u8(byte(input, field::PRIORITY))?,
        topic: input.get(HEADER_LEN..(HEADER_LEN + topic_len).min(len - 4))?,
    })
}

/// The dialect a connection speaks, chosen by its first four bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Dialect {
    /// Starts with `ESC1`.
    V1,
    /// Anything else: the original EventStreamCore frame format.
    Legacy,
}

/// One result of the [`StreamDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid v1 frame.
    Frame(Frame<'a>),
    /// An invalid v1 frame, skipped; answer REJECTED if `ack`.
    Rejected {
        /// The protocol's reason code.
        reason: Reason,
        /// `event_id` as read.
        event_id: EventId,
        /// The ACK flag as read.
        ack: bool,
    },
    /// v1: answer FATAL with this reason after the acks of earlier frames,
    /// then close. The decoder takes no more input.
    Fatal(Reason),
    /// A valid legacy event (never acked).
    Legacy(LegacyEvent<'a>),
    /// A legacy frame skipped and counted as rejected; the connection stays open.
    LegacySkipped(LegacyRule),
    /// A legacy keep-alive (`body_len == 0`).
    KeepAlive,
    /// Legacy: a frame too large to store; close without an answer. The
    /// decoder takes no more input.
    Close,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Detect,
    Open(Dialect),
    Closed(Dialect),
}

/// Why a [`StreamDecoder`] could not be built.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct StashTooSmall;

/// Reassembles frames of one connection from arbitrary chunks.
///
/// Frames that lie whole inside a chunk are returned as views of the chunk
/// (zero-copy); only a frame split across chunks is copied, once, into the
/// stash, a buffer of at least `max_frame` bytes: `[u8; N]` or a caller's
/// `&mut [u8]`. The results are identical for every way of splitting the stream.
///
/// ```
/// use eventstream_core::wire::{Decoded, FrameRepr, Limits, StreamDecoder};
/// use eventstream_core::Priority;
///
/// let mut stream = Vec::new();
/// for id in 1..=3 {
///     let repr = FrameRepr {
///         priority: Priority::Medium,
///         flags: 0,
///         partition: 0,
///         event_id: id,
///         timestamp_ns: 0,
///         topic: b"t",
///         payload: b"x",
///     };
///     let mut f = vec![0u8; repr.encoded_len()];
///     repr.encode(&mut f).unwrap();
///     stream.extend(f);
/// }
/// let mut dec = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
/// let mut ids = Vec::new();
/// // Chunks of 7 bytes: frames split across chunks come out the same.
/// for chunk in stream.chunks(7) {
///     let mut pos = 0;
///     loop {
///         let (used, item) = dec.next(&chunk[pos..]);
///         pos += used;
///         match item {
///             Some(Decoded::Frame(f)) => ids.push(f.event_id()),
///             Some(other) => panic!("{other:?}"),
///             None => break,
///         }
///     }
/// }
/// assert_eq!(ids, [1, 2, 3]);
/// ```
pub struct StreamDecoder<S> {
    stash: S,
    held: usize,
    state: State,
    limits: Limits,
}

impl<S: AsRef<[u8]> + AsMut<[u8]>> StreamDecoder<S> {
    /// A decoder for a new connection; `stash` must hold `limits.max_frame()` bytes.
    pub fn new(stash: S, limits: Limits) -> Result<Self, StashTooSmall> {
        if stash.as_ref().len() < limits.max_frame as usize {
            return Err(StashTooSmall);
        }
        Ok(Self {
            stash,
            held: 0,
            state: State::Detect,
            limits,
        })
    }

    /// The dialect, once the first four bytes have arrived.
    pub fn dialect(&self) -> Option<Dialect> {
        match self.state {
            State::Open(d) | State::Closed(d) => Some(d),
            State::Detect => None,
        }
    }

    /// A frame has started but not finished (for `--frame-timeout`).
    pub fn is_mid_frame(&self) -> bool {
        self.held > 0
    }

    /// A FATAL or a legacy close was returned; no more input is taken.
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed(_))
    }

    /// Bytes of an unfinished frame currently held.
    pub fn held(&self) -> usize {
        self.held
    }

    /// Consumes bytes from the front of `input` and returns how many, with the
    /// next result if one is complete. Call again with `&input[consumed..]`
    /// until it returns `None`; by then all of `input` is consumed (held
    /// bytes of an unfinished frame stay in the stash).
    pub fn next<'a>(&'a mut self, input: &'a [u8]) -> (usize, Option<Decoded<'a>>) {
        let mut pos = 0;
        if self.state == State::Detect {
            // Gather the first four bytes; they choose the dialect.
            if self.held == 0 && input.len() >= 4 {
                self.state = State::Open(detect(input));
            } else {
                pos = self.fill(input, 4);
                if self.held < 4 {
                    return (pos, None);
                }
                let dialect = detect(self.stash.as_ref());
                self.state = State::Open(dialect);
            }
        }
        let State::Open(dialect) = self.state else {
            return (input.len(), None);
        };
        let rest = input.get(pos..).unwrap_or(&[]);
        if self.held == 0 {
            // Fast path: the frame lies in the caller's chunk.
            match self.extent(dialect, rest) {
                Extent::Known(n) if rest.len() >= n => {
                    let frame = rest.get(..n).unwrap_or(&[]);
                    return (pos + n, Some(self.classify(dialect, frame)));
                }
                Extent::Fatal(reason) => return (input.len(), Some(self.close(dialect, reason))),
                Extent::Known(_) | Extent::Need(_) => {}
            }
        }
        // Slow path: accumulate in the stash, deciding as soon as the
        // header bytes allow (magic after 4 bytes, length after 8).
        loop {
            let target = match self
                .extent(dialect, self.stash.as_ref().get(..self.held).unwrap_or(&[]))
            {
                Extent::Fatal(reason) => return (input.len(), Some(self.close(dialect, reason))),
                Extent::Known(n) if self.held >= n => {
                    self.held = 0;
                    let limits = self.limits;
                    let frame = self.stash.as_ref().get(..n).unwrap_or(&[]);
                    return (pos, Some(classify(dialect, &limits, frame)));
                }
                Extent::Known(n) | Extent::Need(n) => n,
            };
            let took = self.fill(input.get(pos..).unwrap_or(&[]), target);
            if took == 0 {
                return (pos, None);
            }
            pos += took;
        }
    }

    fn extent(&self, dialect: Dialect, head: &[u8]) -> Extent {
        match dialect {
            Dialect::V1 => extent_v1(head, &self.limits),
            Dialect::Legacy => extent_legacy(head, &self.limits),
        }
    }

    fn classify<'a>(&self, dialect: Dialect, frame: &'a [u8]) -> Decoded<'a> {
        classify(dialect, &self.limits, frame)
    }

    fn close(&mut self, dialect: Dialect, reason: Reason) -> Decoded<'static> {
        self.state = State::Closed(dialect);
        self.held = 0;
        match dialect {
            Dialect::V1 => Decoded::Fatal(reason),
            Dialect::Legacy => Decoded::Close,
        }
    }

    /// Copies from `input` until the stash holds `target` bytes; returns the
    /// number of bytes taken.
    fn fill(&mut self, input: &[u8], target: usize) -> usize {
        let want = target.saturating_sub(self.held).min(input.len());
        let held = self.held;
        match (
            self.stash.as_mut().get_mut(held..held + want),
            input.get(..want),
        ) {
            (Some(dst), Some(src)) => {
                dst.copy_from_slice(src);
                self.held += want;
                want
            }
            _ => 0,
        }
    }
}

fn detect(first: &[u8]) -> Dialect {
    if first.get(..4) == Some(&MAGIC[..]) {
        Dialect::V1
    } else {
        Dialect::Legacy
    }
}

fn classify<'a>(dialect: Dialect, limits: &Limits, frame: &'a [u8]) -> Decoded<'a> {
    match dialect {
        Dialect::V1 => match check_body(frame, limits) {
            Ok(f) => Decoded::Frame(f),
            Err(FrameError::Rejected {
                reason,
                event_id,
                ack,
            }) => Decoded::Rejected {
                reason,
                event_id,
                ack,
            },
            Err(FrameError::Fatal(reason)) => Decoded::Fatal(reason),
        },
        Dialect::Legacy if frame.len() == 4 => Decoded::KeepAlive,
        Dialect::Legacy => match check_legacy(frame, limits) {
            Ok(ev) => Decoded::Legacy(ev),
            Err(rule) => Decoded::LegacySkipped(rule),
        },
    }
}

#[cfg(test)]
#[allow(clippy::indexing_slicing, clippy::unwrap_used, clippy::panic)]
mod tests {
    use super::*;

    fn frame(buf: &mut [u8], id: u64, priority: Priority) -> usize {
        FrameRepr {
            priority,
            flags: FLAG_ACK,
            partition: 7,
            event_id: id,
            timestamp_ns: 99,
            topic: b"orders",
            payload: &[0xAB; 20],
        }
        .encode(buf)
        .unwrap()
    }

    #[test]
    fn encode_then_parse_round_trips() {
        let mut buf = [0u8; 128];
        let n = frame(&mut buf, 42, Priority::High);
        let f = Frame::parse(&buf[..n], &Limits::DEFAULT).unwrap();
        assert_eq!(f.event_id(), 42);
        assert_eq!(f.priority(), Priority::High);
        assert_eq!(f.partition(), 7);
        assert_eq!(f.topic(), "orders");
        assert_eq!(f.payload(), &[0xAB; 20]);
        assert!(f.ack_requested());
        assert_eq!(f.length() as usize, n);
        assert_eq!(parse_stored(&buf[..n]), Some(f));
    }

    #[test]
    fn v1_stream_yields_frames_then_fatal() {
        let mut stream = [0u8; 256];
        let a = frame(&mut stream, 1, Priority::Low);
        let b = frame(&mut stream[a..], 2, Priority::Batch);
        stream[a + b..a + b + 4].copy_from_slice(b"XXXX");
        let mut d = StreamDecoder::new([0u8; 512], Limits::DEFAULT).unwrap();
        let input = &stream[..a + b + 8];
        let mut pos = 0;
        let mut ids = [0u64; 2];
        let mut n = 0;
        let mut fatal = None;
        loop {
            let (used, item) = d.next(&input[pos..]);
            pos += used;
            match item {
                Some(Decoded::Frame(f)) => {
                    ids[n] = f.event_id();
                    n += 1;
                }
                Some(Decoded::Fatal(r)) => fatal = Some(r),
                Some(other) => panic!("unexpected {other:?}"),
                None => break,
            }
        }
        assert_eq!(ids, [1, 2]);
        assert_eq!(fatal, Some(Reason::BadMagic));
        assert!(d.is_closed());
    }

    #[test]
    fn patched_templates_stay_valid() {
        let mut buf = [0u8; 128];
        let n = frame(&mut buf, 1, Priority::Medium);
        patch_frame(&mut buf[..n], 0xDEAD_BEEF, 12345);
        let f = Frame::parse(&buf[..n], &Limits::DEFAULT).unwrap();
        assert_eq!((f.event_id(), f.timestamp_ns()), (0xDEAD_BEEF, 12345));
        patch_event_id(&mut buf[..n], 7);
        assert_eq!(
            Frame::parse(&buf[..n], &Limits::DEFAULT)
                .unwrap()
                .event_id(),
            7
        );
        // Too short to be a frame: left alone.
        let mut tiny = [1u8; 10];
        patch_frame(&mut tiny, 5, 5);
        assert_eq!(tiny, [1u8; 10]);
    }

    #[test]
    fn limits_are_checked() {
        assert_eq!(Limits::new(40, 64), Err(LimitsError::MaxFrame));
        assert_eq!(Limits::new(65_537, 64), Err(LimitsError::MaxFrame));
        assert_eq!(Limits::new(512, 0), Err(LimitsError::MaxTopic));
        assert!(StreamDecoder::new([0u8; 100], Limits::DEFAULT).is_err());
    }
}
