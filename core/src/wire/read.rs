//! Read sessions and HELLO (PROTOCOL.md sections 7 and 8): the read
//! request a consumer opens with, the server's session answer and chunk
//! headers, the CREDIT and COMMIT frames of a session, and HELLO. Every
//! frame ends with a CRC-32C of the bytes before it.

use super::*;

/// `ESCR`: a read request (and a read session's connection).
pub const READ_MAGIC: [u8; 4] = *b"ESCR";
/// `ESCS`: the session answer.
pub const SESSION_MAGIC: [u8; 4] = *b"ESCS";
/// `ESCD`: a chunk header.
pub const CHUNK_MAGIC: [u8; 4] = *b"ESCD";
/// `ESCC`: a CREDIT frame.
pub const CREDIT_MAGIC: [u8; 4] = *b"ESCC";
/// `ESCK`: a COMMIT frame.
pub const COMMIT_MAGIC: [u8; 4] = *b"ESCK";
/// `ESCH`: a HELLO.
pub const HELLO_MAGIC: [u8; 4] = *b"ESCH";
/// Bytes of a read request without its group and prefix.
pub const READ_REQUEST_MIN: usize = 32;
/// The longest read request.
pub const READ_REQUEST_MAX: usize = 1024;
/// Bytes of a session answer.
pub const SESSION_ANSWER_LEN: usize = 48;
/// Bytes of a chunk header.
pub const CHUNK_HEADER_LEN: usize = 32;
/// Bytes of a CREDIT frame.
pub const CREDIT_LEN: usize = 16;
/// Bytes of a COMMIT frame.
pub const COMMIT_LEN: usize = 20;
/// The longest group name.
pub const MAX_GROUP: usize = 64;
/// Bytes of a HELLO without its token.
pub const HELLO_MIN: usize = 16;
/// The longest HELLO token.
pub const MAX_TOKEN: usize = 512;
/// "No offset" in answers and chunks (an error's start, no commit).
pub const NONE_OFFSET: u64 = u64::MAX;

/// The CRC every read-session frame ends with: over all bytes before it.
fn crc_ok(frame: &[u8]) -> bool {
    let n = frame.len();
    n >= 4 && crc32c::checksum(frame.get(..n - 4).unwrap_or(&[])) == le_u32(frame, n - 4)
}

/// Writes the trailing CRC of `frame` (its last four bytes).
fn put_crc(frame: &mut [u8]) {
    let n = frame.len();
    if n < 4 {
        return;
    }
    let crc = crc32c::checksum(frame.get(..n - 4).unwrap_or(&[]));
    put(frame, n - 4, &crc.to_le_bytes());
}

/// Where a read session starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum Start {
    /// At the request's offset.
    Offset = 0,
    /// At the first retained offset.
    Earliest = 1,
    /// At the next offset to become visible.
    Latest = 2,
    /// At the group's committed offset (earliest if it has none).
    Committed = 3,
}

impl Start {
    /// The start with wire code `code`.
    pub const fn from_u8(code: u8) -> Option<Start> {
        Some(match code {
            0 => Start::Offset,
            1 => Start::Earliest,
            2 => Start::Latest,
            3 => Start::Committed,
            _ => return None,
        })
    }

    /// The protocol's name, e.g. `EARLIEST`.
    pub const fn name(self) -> &'static str {
        match self {
            Start::Offset => "OFFSET",
            Start::Earliest => "EARLIEST",
            Start::Latest => "LATEST",
            Start::Committed => "COMMITTED",
        }
    }
}

/// The classes a session reads: bit 0 realtime, 1 transactional, 2 batch;
/// the empty set on the wire means all.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ClassSet(u8);

impl ClassSet {
    /// Every class.
    pub const ALL: ClassSet = ClassSet(0);

    /// The set of the wire's bits (bits 3..7 must be zero).
    pub const fn from_bits(bits: u8) -> Option<ClassSet> {
        if bits & !0b111 != 0 {
            None
        } else {
            Some(ClassSet(bits))
        }
    }

    /// The set holding `classes`.
    pub fn of(classes: &[crate::Class]) -> ClassSet {
        ClassSet(classes.iter().fold(0, |b, c| b | 1 << c.index()))
    }

    /// The wire's bits.
    pub const fn bits(self) -> u8 {
        self.0
    }

    /// Whether the set takes `class`.
    pub fn contains(self, class: crate::Class) -> bool {
        self.0 == 0 || self.0 & (1 << class.index()) != 0
    }
}

/// Whether `name` is a group name a client may use: 1..=64 bytes of
/// `A-Z a-z 0-9 . _ -`, not starting with `_` (reserved for the server).
pub fn client_group_ok(name: &[u8]) -> bool {
    server_group_ok(name) && name.first() != Some(&b'_')
}

/// Whether `name` is a group name at all (the server's own `_` names
/// included).
pub fn server_group_ok(name: &[u8]) -> bool {
    (1..=MAX_GROUP).contains(&name.len())
        && name
            .iter()
            .all(|&c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'_' | b'-'))
}

/// A read request (section 7.1), a view over its bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReadRequest<'a> {
    /// Where the session starts.
    pub start: Start,
    /// Keep reading past the visible end.
    pub follow: bool,
    /// The classes sent.
    pub classes: ClassSet,
    /// The start offset (with [`Start::Offset`], else 0).
    pub offset: u64,
    /// Record bytes the server may send before more is granted.
    pub credit: u32,
    /// The group's name (empty: no group).
    pub group: &'a [u8],
    /// The topic prefix (empty: every topic).
    pub prefix: &'a [u8],
}

/// The length a read request or HELLO starting with `head` declares, once
/// its first 8 bytes are there.
pub fn declared_frame_length(head: &[u8]) -> Option<usize> {
    (head.len() >= 8).then(|| le_u32(head, 4) as usize)
}

impl<'a> ReadRequest<'a> {
    /// Checks `bytes`, exactly one request, by section 7.1, with topic
    /// prefixes up to `max_topic` bytes; any failure is BAD_REQUEST.
    pub fn parse(bytes: &'a [u8], max_topic: u8) -> Result<Self, Reason> {
        let bad = Reason::BadRequest;
        let len = bytes.len();
        if !(READ_REQUEST_MIN..=READ_REQUEST_MAX).contains(&len)
            || bytes.get(..4) != Some(&READ_MAGIC[..])
            || le_u32(bytes, 4) as usize != len
            || !crc_ok(bytes)
            || byte(bytes, 8) != 1
        {
            return Err(bad);
        }
        let start = Start::from_u8(byte(bytes, 9)).ok_or(bad)?;
        let flags = byte(bytes, 10);
        let classes = ClassSet::from_bits(byte(bytes, 11)).ok_or(bad)?;
        let offset = le_u64(bytes, 12);
        let credit = le_u32(bytes, 20);
        let group_len = usize::from(byte(bytes, 24));
        let prefix_len = usize::from(byte(bytes, 25));
        let reserved = u16::from_le_bytes([byte(bytes, 26), byte(bytes, 27)]);
        if flags & !1 != 0
            || reserved != 0
            || READ_REQUEST_MIN + group_len + prefix_len != len
            || group_len > MAX_GROUP
            || prefix_len > usize::from(max_topic)
            || (start != Start::Offset && offset != 0)
        {
            return Err(bad);
        }
        let group = bytes.get(28..28 + group_len).ok_or(bad)?;
        let prefix = bytes
            .get(28 + group_len..28 + group_len + prefix_len)
            .ok_or(bad)?;
        if (!group.is_empty() && !client_group_ok(group))
            || (start == Start::Committed && group.is_empty())
        {
            return Err(bad);
        }
        Ok(Self {
            start,
            follow: flags & 1 != 0,
            classes,
            offset,
            credit,
            group,
            prefix,
        })
    }

    /// Bytes of the encoded request.
    pub fn encoded_len(&self) -> usize {
        READ_REQUEST_MIN + self.group.len() + self.prefix.len()
    }

    /// Writes the request to the start of `out`; returns its length. The
    /// fields are written as they are (a client may build a request the
    /// server refuses); only lengths that do not fit a byte are errors.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        if self.group.len() > usize::from(u8::MAX) || self.prefix.len() > usize::from(u8::MAX) {
            return Err(EncodeError::Topic);
        }
        let len = self.encoded_len();
        let out = out.get_mut(..len).ok_or(EncodeError::BufferTooSmall)?;
        put(out, 0, &READ_MAGIC);
        put(out, 4, &(len as u32).to_le_bytes());
        put(
            out,
            8,
            &[
                1,
                self.start as u8,
                u8::from(self.follow),
                self.classes.bits(),
            ],
        );
        put(out, 12, &self.offset.to_le_bytes());
        put(out, 20, &self.credit.to_le_bytes());
        put(
            out,
            24,
            &[self.group.len() as u8, self.prefix.len() as u8, 0, 0],
        );
        put(out, 28, self.group);
        put(out, 28 + self.group.len(), self.prefix);
        put_crc(out);
        Ok(len)
    }
}

/// Why a server frame (answer, chunk header) is not well-formed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SessionFrameError {
    /// Fewer bytes than the frame.
    Short,
    /// Not the frame's magic.
    Magic,
    /// CRC mismatch.
    Crc,
    /// A field outside the protocol (version, status, kind, reason,
    /// reserved bits).
    Field,
}

/// The session answer (section 7.2).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct SessionAnswer {
    /// OK or not: an error's reason.
    pub reason: Option<Reason>,
    /// The resolved start offset ([`NONE_OFFSET`] on error).
    pub start: u64,
    /// The first retained offset.
    pub first: u64,
    /// The next offset to become visible.
    pub end: u64,
    /// The group's committed offset ([`NONE_OFFSET`]: none).
    pub committed: u64,
    /// The size (4 + len) of the largest record the session may meet.
    pub max_record: u32,
}

impl SessionAnswer {
    /// The 48 bytes of the answer.
    pub fn encode(&self) -> [u8; SESSION_ANSWER_LEN] {
        let mut b = [0u8; SESSION_ANSWER_LEN];
        put(&mut b, 0, &SESSION_MAGIC);
        let (status, reason) = match self.reason {
            None => (0, 0),
            Some(r) => (1, r.code()),
        };
        put(&mut b, 4, &[1, status, reason, 0]);
        put(&mut b, 8, &self.start.to_le_bytes());
        put(&mut b, 16, &self.first.to_le_bytes());
        put(&mut b, 24, &self.end.to_le_bytes());
        put(&mut b, 32, &self.committed.to_le_bytes());
        put(&mut b, 40, &self.max_record.to_le_bytes());
        put_crc(&mut b);
        b
    }

    /// Reads an answer from the first 48 bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, SessionFrameError> {
        let b = bytes
            .get(..SESSION_ANSWER_LEN)
            .ok_or(SessionFrameError::Short)?;
        if b.get(..4) != Some(&SESSION_MAGIC[..]) {
            return Err(SessionFrameError::Magic);
        }
        if !crc_ok(b) {
            return Err(SessionFrameError::Crc);
        }
        let reason = match (byte(b, 5), Reason::from_u8(byte(b, 6))) {
            (0, Some(Reason::None)) => None,
            (1, Some(r)) if r != Reason::None => Some(r),
            _ => return Err(SessionFrameError::Field),
        };
        if byte(b, 4) != 1 || byte(b, 7) != 0 {
            return Err(SessionFrameError::Field);
        }
        Ok(Self {
            reason,
            start: le_u64(b, 8),
            first: le_u64(b, 16),
            end: le_u64(b, 24),
            committed: le_u64(b, 32),
            max_record: le_u32(b, 40),
        })
    }
}

/// What a chunk carries (section 7.3).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
#[repr(u8)]
pub enum ChunkKind {
    /// `bytes` of whole records follow.
    Records = 0,
    /// Nothing was sent for a second.
    Heartbeat = 1,
    /// A range lost to `--repair`.
    Gap = 2,
    /// A COMMIT is durable.
    Committed = 3,
    /// The server ends the session.
    Closing = 4,
    /// Everything below the answer's end offset was sent (no FOLLOW).
    End = 5,
}

impl ChunkKind {
    /// The kind with wire code `code`.
    pub const fn from_u8(code: u8) -> Option<ChunkKind> {
        Some(match code {
            0 => ChunkKind::Records,
            1 => ChunkKind::Heartbeat,
            2 => ChunkKind::Gap,
            3 => ChunkKind::Committed,
            4 => ChunkKind::Closing,
            5 => ChunkKind::End,
            _ => return None,
        })
    }

    /// The protocol's name, e.g. `RECORDS`.
    pub const fn name(self) -> &'static str {
        match self {
            ChunkKind::Records => "RECORDS",
            ChunkKind::Heartbeat => "HEARTBEAT",
            ChunkKind::Gap => "GAP",
            ChunkKind::Committed => "COMMITTED",
            ChunkKind::Closing => "CLOSING",
            ChunkKind::End => "END",
        }
    }
}

/// A chunk header (section 7.3); RECORDS are followed by `bytes` of
/// records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct ChunkHeader {
    /// What the chunk carries.
    pub kind: ChunkKind,
    /// CLOSING's reason; NONE otherwise.
    pub reason: Reason,
    /// Record bytes that follow (RECORDS only).
    pub bytes: u32,
    /// The kind's first offset (section 7.3).
    pub a: u64,
    /// The kind's second offset, or 0.
    pub b: u64,
}

impl ChunkHeader {
    /// The 32 bytes of the header.
    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        put(&mut h, 0, &CHUNK_MAGIC);
        put(&mut h, 4, &[self.kind as u8, self.reason.code(), 0, 0]);
        put(&mut h, 8, &self.bytes.to_le_bytes());
        put(&mut h, 12, &self.a.to_le_bytes());
        put(&mut h, 20, &self.b.to_le_bytes());
        put_crc(&mut h);
        h
    }

    /// Reads a header from the first 32 bytes of `bytes`.
    pub fn decode(bytes: &[u8]) -> Result<Self, SessionFrameError> {
        let h = bytes
            .get(..CHUNK_HEADER_LEN)
            .ok_or(SessionFrameError::Short)?;
        if h.get(..4) != Some(&CHUNK_MAGIC[..]) {
            return Err(SessionFrameError::Magic);
        }
        if !crc_ok(h) {
            return Err(SessionFrameError::Crc);
        }
        let kind = ChunkKind::from_u8(byte(h, 4)).ok_or(SessionFrameError::Field)?;
        let reason = Reason::from_u8(byte(h, 5)).ok_or(SessionFrameError::Field)?;
        let bytes = le_u32(h, 8);
        if byte(h, 6) != 0
            || byte(h, 7) != 0
            || (kind == ChunkKind::Closing) == (reason == Reason::None)
            || (kind != ChunkKind::Records && bytes != 0)
        {
            return Err(SessionFrameError::Field);
        }
        Ok(Self {
            kind,
            reason,
            bytes,
            a: le_u64(h, 12),
            b: le_u64(h, 20),
        })
    }
}

/// A client frame during a session (section 7.4).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub enum SessionFrame {
    /// More record bytes granted.
    Credit(u32),
    /// The group's next offset to read.
    Commit(u64),
}

impl SessionFrame {
    /// Bytes of the encoded frame.
    pub const fn encoded_len(&self) -> usize {
        match self {
            SessionFrame::Credit(_) => CREDIT_LEN,
            SessionFrame::Commit(_) => COMMIT_LEN,
        }
    }

    /// Writes the frame to the start of `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        let len = self.encoded_len();
        let out = out.get_mut(..len).ok_or(EncodeError::BufferTooSmall)?;
        out.fill(0);
        match *self {
            SessionFrame::Credit(bytes) => {
                put(out, 0, &CREDIT_MAGIC);
                put(out, 4, &bytes.to_le_bytes());
            }
            SessionFrame::Commit(offset) => {
                put(out, 0, &COMMIT_MAGIC);
                put(out, 8, &offset.to_le_bytes());
            }
        }
        put_crc(out);
        Ok(len)
    }

    /// Reads the frame `input` starts with: `Ok(None)` until it is all
    /// there, else the frame and its length; a frame that is not one of
    /// the two, or not exactly as section 7.4 says, is BAD_REQUEST.
    pub fn decode(input: &[u8]) -> Result<Option<(SessionFrame, usize)>, Reason> {
        let Some(magic) = input.get(..4) else {
            return Ok(None);
        };
        let len = if magic == CREDIT_MAGIC {
            CREDIT_LEN
        } else if magic == COMMIT_MAGIC {
            COMMIT_LEN
        } else {
            return Err(Reason::BadRequest);
        };
        let Some(f) = input.get(..len) else {
            return Ok(None);
        };
        let reserved = if len == CREDIT_LEN {
            le_u32(f, 8)
        } else {
            le_u32(f, 4)
        };
        if !crc_ok(f) || reserved != 0 {
            return Err(Reason::BadRequest);
        }
        let frame = if len == CREDIT_LEN {
            SessionFrame::Credit(le_u32(f, 4))
        } else {
            SessionFrame::Commit(le_u64(f, 8))
        };
        Ok(Some((frame, len)))
    }
}

/// A HELLO (section 8).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Hello<'a> {
    /// The token, 1..=512 bytes.
    pub token: &'a [u8],
}

impl<'a> Hello<'a> {
    /// Checks `bytes`, exactly one HELLO; anything off is UNAUTHORIZED
    /// (a malformed HELLO is answered like a wrong token).
    pub fn parse(bytes: &'a [u8]) -> Result<Self, Reason> {
        let bad = Reason::Unauthorized;
        let len = bytes.len();
        let token_len = usize::from(u16::from_le_bytes([byte(bytes, 10), byte(bytes, 11)]));
        if len < HELLO_MIN
            || bytes.get(..4) != Some(&HELLO_MAGIC[..])
            || le_u32(bytes, 4) as usize != len
            || byte(bytes, 8) != 1
            || byte(bytes, 9) != 0
            || !(1..=MAX_TOKEN).contains(&token_len)
            || HELLO_MIN + token_len != len
            || !crc_ok(bytes)
        {
            return Err(bad);
        }
        Ok(Self {
            token: bytes.get(12..12 + token_len).ok_or(bad)?,
        })
    }

    /// Bytes of the encoded HELLO.
    pub fn encoded_len(&self) -> usize {
        HELLO_MIN + self.token.len()
    }

    /// Writes the HELLO to the start of `out`; returns its length.
    pub fn encode(&self, out: &mut [u8]) -> Result<usize, EncodeError> {
        if self.token.len() > usize::from(u16::MAX) {
            return Err(EncodeError::TooLong);
        }
        let len = self.encoded_len();
        let out = out.get_mut(..len).ok_or(EncodeError::BufferTooSmall)?;
        put(out, 0, &HELLO_MAGIC);
        put(out, 4, &(len as u32).to_le_bytes());
        put(out, 8, &[1, 0]);
        put(out, 10, &(self.token.len() as u16).to_le_bytes());
        put(out, 12, self.token);
        put_crc(out);
        Ok(len)
    }
}

/// HELLO's "accepted" answer: an ack with status STORED, reason NONE,
/// event_id 0 and no offset.
pub const HELLO_ACCEPTED: Ack = Ack::stored(0, NO_OFFSET);
