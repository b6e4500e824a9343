//! The streaming decoder: one per connection, it detects the dialect and
//! reassembles frames from arbitrary chunks.

use super::frame::extent_v1;
use super::legacy::{check_legacy, extent_legacy};
use super::*;

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

/// Reads the head of the v1 frame that `input` starts with, checking only
/// its layout ([`Check::Layout`]: no CRC, no topic rules): a hint for work
/// that may start early (prefetching a frame's dedup slots while earlier
/// frames are handled), never a decision. `None` when `input` does not
/// start with a whole v1 frame of consistent lengths.
#[inline]
pub fn peek_v1(input: &[u8]) -> Option<Peeked<'_>> {
    let len = declared_length(input)? as usize;
    let f = Frame::check(input.get(..len)?, Check::Layout).ok()?;
    Some(Peeked {
        len,
        event_id: f.event_id(),
        priority: f.priority(),
        topic: f.topic_bytes(),
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
    /// Starts with `ESCR`: a read session (PROTOCOL.md section 7), which
    /// the decoder does not serve: it returns [`Decoded::Reader`] once and
    /// takes no more input.
    Read,
    /// Starts with `ESCH`: a HELLO (section 8), which the decoder does not
    /// check: it returns [`Decoded::Hello`] once and takes no more input
    /// until [`StreamDecoder::resume_after_hello`].
    Hello,
}

/// One result of the [`StreamDecoder`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Decoded<'a> {
    /// A valid v1 frame.
    Frame(Frame<&'a [u8]>),
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
    /// The connection opened a read session (`ESCR`). The stream's bytes
    /// are this slice (the first bytes, if they came in earlier chunks and
    /// were held) followed by the input from the consumed count on, all of
    /// it unread by the decoder, which takes no more input: whoever serves
    /// read sessions gets them.
    Reader(&'a [u8]),
    /// The connection starts with a HELLO (`ESCH`). Like
    /// [`Decoded::Reader`]: the stream's bytes are this slice followed by
    /// the input from the consumed count on, unread. Whoever checks the
    /// HELLO takes its bytes from there and, if it is accepted, calls
    /// [`StreamDecoder::resume_after_hello`] and feeds the rest.
    Hello(&'a [u8]),
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
    /// A HELLO was accepted: the next frame must be `ESC1` or `ESCR`.
    after_hello: bool,
    /// The legacy dialect is refused (`serve --legacy deny`).
    no_legacy: bool,
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
            after_hello: false,
            no_legacy: false,
        })
    }

    /// Refuses the legacy dialect: a connection whose first four bytes are
    /// not a magic of this protocol gets FATAL BAD_MAGIC (a byte link that
    /// starts mid-frame is closed instead of read as legacy events).
    pub fn refuse_legacy(&mut self) {
        self.no_legacy = true;
    }

    /// After a [`Decoded::Hello`] that was accepted: the stream goes on with
    /// `ESC1` frames or an `ESCR` request (section 8); anything else is
    /// FATAL BAD_MAGIC. Does nothing in any other state.
    pub fn resume_after_hello(&mut self) {
        if self.state == State::Closed(Dialect::Hello) {
            self.state = State::Detect;
            self.held = 0;
            self.after_hello = true;
        }
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
            let dialect = if self.held == 0 && input.len() >= 4 {
                detect(input)
            } else {
                pos = self.fill(input, 4);
                if self.held < 4 {
                    return (pos, None);
                }
                detect(self.stash.as_ref())
            };
            self.state = State::Open(dialect);
            let refused = self.no_legacy && dialect == Dialect::Legacy;
            if refused || (self.after_hello && !matches!(dialect, Dialect::V1 | Dialect::Read)) {
                // After a HELLO only v1 frames or a read request.
                self.state = State::Closed(Dialect::V1);
                self.held = 0;
                return (input.len(), Some(Decoded::Fatal(Reason::BadMagic)));
            }
            if matches!(dialect, Dialect::Read | Dialect::Hello) {
                self.state = State::Closed(dialect);
                let held = core::mem::take(&mut self.held);
                let first = self.stash.as_ref().get(..held).unwrap_or(&[]);
                return match dialect {
                    Dialect::Read => (pos, Some(Decoded::Reader(first))),
                    _ => (pos, Some(Decoded::Hello(first))),
                };
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
            Dialect::Read | Dialect::Hello => Extent::Fatal(Reason::BadMagic),
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
            Dialect::Legacy | Dialect::Read | Dialect::Hello => Decoded::Close,
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
    } else if first.get(..4) == Some(&super::read::READ_MAGIC[..]) {
        Dialect::Read
    } else if first.get(..4) == Some(&super::read::HELLO_MAGIC[..]) {
        Dialect::Hello
    } else {
        Dialect::Legacy
    }
}

fn classify<'a>(dialect: Dialect, limits: &Limits, frame: &'a [u8]) -> Decoded<'a> {
    match dialect {
        Dialect::V1 => match Frame::check(frame, Check::Wire(*limits)) {
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
        Dialect::Read | Dialect::Hello => Decoded::Close,
    }
}
