//! The v1 event frame (PROTOCOL.md section 2): a view over any buffer,
//! the one validator, setters where the buffer is mutable, and the encoder.

use super::*;

/// How much of PROTOCOL.md section 2 [`Frame::check`] applies: the one
/// validator of v1 frames, at three strengths.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum Check {
    /// A frame off the wire: every rule, in the protocol's order, with
    /// these limits; ACK is the only flag a producer may set.
    Wire(Limits),
    /// A frame read back from the log: every rule at the widest limits,
    /// with the LEGACY flag allowed.
    Stored,
    /// A frame this process validated or built before and kept unchanged
    /// (a load template): the layout only (magic, length fields, priority),
    /// so the accessors read what the fields say. No CRC, no UTF-8.
    Layout,
}

/// What a valid frame's accessors need beyond its bytes: the fields a view
/// caches, kept beside a frame that travels (in a pool slot) so no later
/// stage validates it again ([`Frame::with_head`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct FrameHead {
    /// `priority`.
    pub priority: Priority,
    /// `topic_len`.
    pub topic_len: u8,
}

/// A v1 frame that passed [`Frame::check`]: a zero-copy view over a buffer
/// `T` (`&[u8]`, `&mut [u8]`, an owned array) whose accessors cannot fail.
/// Where `T` is mutable, the setters rewrite fields in place.
///
/// ```
/// use eventstream_core::wire::{Check, Frame, FrameRepr, Limits, FLAG_ACK};
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
///
/// // A mutable view rewrites fields; `fill_crc` seals the frame again.
/// let mut m = Frame::check(&mut buf[..n], Check::Layout).unwrap();
/// m.set_event_id(7);
/// m.fill_crc();
/// assert_eq!(Frame::parse(&buf[..n], &Limits::DEFAULT).unwrap().event_id(), 7);
/// buf[n - 1] ^= 1; // the CRC no longer matches
/// assert!(Frame::parse(&buf[..n], &Limits::DEFAULT).is_err());
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Frame<T> {
    buffer: T,
    head: FrameHead,
}

impl<T: AsRef<[u8]>> Frame<T> {
    /// The one validator: checks the frame that exactly fills `buffer` (its
    /// length field equal to the buffer's length) as `check` says, in the
    /// protocol's order, and returns the view.
    pub fn check(buffer: T, check: Check) -> Result<Self, FrameError> {
        let head = validate(buffer.as_ref(), check)?;
        Ok(Self { buffer, head })
    }

    /// The view of a frame whose head was taken from its validated view
    /// before ([`head`](Self::head)), without checking it again. Safe on
    /// any bytes (the accessors never read out of bounds), but only a
    /// frame that passed [`check`](Self::check) and kept its bytes reads
    /// as it says.
    pub fn with_head(buffer: T, head: FrameHead) -> Self {
        Self { buffer, head }
    }

    /// What travels with the frame so it is not validated again.
    #[inline]
    pub fn head(&self) -> FrameHead {
        self.head
    }

    /// The whole frame, magic to crc.
    #[inline]
    pub fn as_bytes(&self) -> &[u8] {
        self.buffer.as_ref()
    }
    /// `length`: bytes in the whole frame.
    #[inline]
    pub fn length(&self) -> u32 {
        self.as_bytes().len() as u32
    }
    /// `priority`.
    #[inline]
    pub fn priority(&self) -> Priority {
        self.head.priority
    }
    /// `flags` (only [`FLAG_ACK`] and, in stored frames, [`FLAG_LEGACY`]).
    #[inline]
    pub fn flags(&self) -> u8 {
        byte(self.as_bytes(), field::FLAGS)
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
        le_u32(self.as_bytes(), field::PARTITION)
    }
    /// `event_id`, the dedup key.
    #[inline]
    pub fn event_id(&self) -> EventId {
        le_u64(self.as_bytes(), field::EVENT_ID)
    }
    /// `timestamp_ns`, the producer's clock.
    #[inline]
    pub fn timestamp_ns(&self) -> u64 {
        le_u64(self.as_bytes(), field::TIMESTAMP)
    }
    /// `topic_len`.
    #[inline]
    pub fn topic_len(&self) -> u8 {
        self.head.topic_len
    }
    /// `payload_len`.
    #[inline]
    pub fn payload_len(&self) -> u32 {
        le_u32(self.as_bytes(), field::PAYLOAD_LEN)
    }
    /// `crc`.
    #[inline]
    pub fn crc(&self) -> u32 {
        let b = self.as_bytes();
        le_u32(b, b.len().saturating_sub(4))
    }
}

impl<'a> Frame<&'a [u8]> {
    /// Validates `bytes` as a frame off the wire ([`Check::Wire`]).
    pub fn parse(bytes: &'a [u8], limits: &Limits) -> Result<Self, FrameError> {
        Self::check(bytes, Check::Wire(*limits))
    }

    /// The whole frame, magic to crc, for as long as the bytes live.
    #[inline]
    pub fn bytes(&self) -> &'a [u8] {
        self.buffer
    }
    /// The topic's bytes (valid UTF-8).
    #[inline]
    pub fn topic_bytes(&self) -> &'a [u8] {
        self.buffer
            .get(field::topic(self.head.topic_len))
            .unwrap_or(&[])
    }
    /// The topic.
    pub fn topic(&self) -> &'a str {
        core::str::from_utf8(self.topic_bytes()).unwrap_or("")
    }
    /// The payload.
    #[inline]
    pub fn payload(&self) -> &'a [u8] {
        self.buffer
            .get(field::payload(self.head.topic_len, self.buffer.len()))
            .unwrap_or(&[])
    }
}

impl<T: AsRef<[u8]> + AsMut<[u8]>> Frame<T> {
    /// Sets `event_id` (call [`fill_crc`](Self::fill_crc) after the last
    /// change).
    pub fn set_event_id(&mut self, event_id: EventId) {
        put(
            self.buffer.as_mut(),
            field::EVENT_ID,
            &event_id.to_le_bytes(),
        );
    }
    /// Sets `flags` (an uplink sending a stored frame on with ACK only).
    pub fn set_flags(&mut self, flags: u8) {
        put(self.buffer.as_mut(), field::FLAGS, &[flags]);
    }
    /// Sets `timestamp_ns`.
    pub fn set_timestamp_ns(&mut self, timestamp_ns: u64) {
        put(
            self.buffer.as_mut(),
            field::TIMESTAMP,
            &timestamp_ns.to_le_bytes(),
        );
    }
    /// Recomputes the trailing CRC over the frame as it is now.
    pub fn fill_crc(&mut self) {
        seal(self.buffer.as_mut());
    }
    /// Sets the trailing `crc` to a value computed elsewhere (a load
    /// generator patches it from tables).
    pub fn set_crc(&mut self, crc: u32) {
        let b = self.buffer.as_mut();
        let at = b.len().saturating_sub(4);
        put(b, at, &crc.to_le_bytes());
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

/// Magic and length range, the two checks that close a v1 connection.
#[inline]
pub(super) fn extent_v1(head: &[u8], limits: &Limits) -> Extent {
    let Some(magic) = head.get(field::MAGIC) else {
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

/// The rules of PROTOCOL.md section 2, once, at the strength `check` asks
/// for; `bytes` is one whole frame.
#[inline]
fn validate(bytes: &[u8], check: Check) -> Result<FrameHead, FrameError> {
    let limits = match check {
        Check::Wire(l) => l,
        Check::Stored | Check::Layout => Limits {
            max_frame: MAX_FRAME_LIMIT,
            max_topic: u8::MAX,
        },
    };
    match extent_v1(bytes, &limits) {
        Extent::Known(n) if n == bytes.len() => {}
        Extent::Fatal(reason) => return Err(FrameError::Fatal(reason)),
        _ => return Err(FrameError::Fatal(Reason::BadLength)),
    }
    let len = bytes.len();
    let flags = byte(bytes, field::FLAGS);
    let reject = |reason| FrameError::Rejected {
        reason,
        event_id: le_u64(bytes, field::EVENT_ID),
        ack: flags & FLAG_ACK != 0,
    };
    let full = check != Check::Layout;
    if full {
        let body = bytes.get(..len.saturating_sub(4)).unwrap_or(&[]);
        if crc32c::checksum(body) != le_u32(bytes, len.saturating_sub(4)) {
            return Err(reject(Reason::BadCrc));
        }
        if byte(bytes, field::VERSION) != VERSION {
            return Err(reject(Reason::BadVersion));
        }
    }
    let topic_len = byte(bytes, field::TOPIC_LEN);
    let payload_len = le_u32(bytes, field::PAYLOAD_LEN);
    if OVERHEAD as u64 + topic_len as u64 + payload_len as u64 != len as u64 {
        return Err(reject(Reason::BadLength));
    }
    let Some(priority) = Priority::from_u8(byte(bytes, field::PRIORITY)) else {
        return Err(reject(Reason::BadPriority));
    };
    if full {
        let allowed = match check {
            Check::Stored => FLAG_ACK | FLAG_LEGACY,
            _ => FLAG_ACK,
        };
        if flags & !allowed != 0 {
            return Err(reject(Reason::BadFlags));
        }
        let topic = bytes.get(field::topic(topic_len)).unwrap_or(&[]);
        if topic_len == 0 || topic_len > limits.max_topic || core::str::from_utf8(topic).is_err() {
            return Err(reject(Reason::BadTopic));
        }
    }
    Ok(FrameHead {
        priority,
        topic_len,
    })
}

/// The total length a frame starting with `head` declares, if `head` holds at
/// least its first 8 bytes (for skipping over frames without validating).
pub fn declared_length(head: &[u8]) -> Option<u32> {
    (head.len() >= 8).then(|| le_u32(head, field::LENGTH))
}

/// Where the topic of the v1 frame starting with `head` lies (read off its
/// `topic_len` field, unchecked), once `head` holds its first 12 bytes.
pub fn topic_range(head: &[u8]) -> Option<core::ops::Range<usize>> {
    head.get(field::TOPIC_LEN).map(|&n| field::topic(n))
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
