//! Runs the core's streaming decoder over chunked input and records owned
//! results, so tests can compare the outcomes of different splits.

use eventstream_core::wire::{Decoded, LegacyRule, Limits, Reason, StreamDecoder};
use eventstream_core::Priority;

/// One decoder result, owned.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// A valid v1 frame's bytes.
    Frame(Vec<u8>),
    /// A rejected v1 frame.
    Rejected {
        /// Reason code.
        reason: Reason,
        /// Id as read.
        event_id: u64,
        /// ACK flag as read.
        ack: bool,
    },
    /// FATAL, connection closes.
    Fatal(Reason),
    /// A valid legacy event.
    Legacy {
        /// Priority.
        priority: Priority,
        /// Topic bytes.
        topic: Vec<u8>,
        /// Payload bytes.
        payload: Vec<u8>,
    },
    /// A skipped legacy frame.
    Skipped(LegacyRule),
    /// A legacy keep-alive.
    KeepAlive,
    /// A legacy close.
    Close,
    /// A read session: the whole stream from its start (the bytes the
    /// decoder held, then everything it left unread).
    Reader(Vec<u8>),
    /// A HELLO: the whole stream from its start, as for `Reader`.
    Hello(Vec<u8>),
}

impl Item {
    fn from_decoded(d: Decoded<'_>) -> Item {
        match d {
            Decoded::Frame(f) => Item::Frame(f.bytes().to_vec()),
            Decoded::Rejected {
                reason,
                event_id,
                ack,
            } => Item::Rejected {
                reason,
                event_id,
                ack,
            },
            Decoded::Fatal(r) => Item::Fatal(r),
            Decoded::Legacy(ev) => Item::Legacy {
                priority: ev.priority(),
                topic: ev.topic().to_vec(),
                payload: ev.payload().to_vec(),
            },
            Decoded::LegacySkipped(rule) => Item::Skipped(rule),
            Decoded::KeepAlive => Item::KeepAlive,
            Decoded::Close => Item::Close,
            Decoded::Reader(first) => Item::Reader(first.to_vec()),
            Decoded::Hello(first) => Item::Hello(first.to_vec()),
        }
    }
}

/// Feeds `chunks` in order to a fresh decoder; returns each result with the
/// number of stream bytes consumed when it was produced (`None` for FATAL and
/// close, which consume whatever they are given).
pub fn decode_chunks<'c>(
    limits: Limits,
    chunks: impl IntoIterator<Item = &'c [u8]>,
) -> Vec<(Option<usize>, Item)> {
    let mut dec =
        StreamDecoder::new(vec![0u8; limits.max_frame() as usize], limits).expect("stash");
    let mut out = Vec::new();
    let mut total = 0usize;
    // A read session's bytes: what the decoder held, then the rest of the
    // stream, which it leaves unread (the same however it is split).
    let mut handed = false;
    for chunk in chunks {
        let mut pos = 0;
        if handed {
            if let Some((_, Item::Reader(bytes) | Item::Hello(bytes))) = out.last_mut() {
                bytes.extend_from_slice(chunk);
            }
        }
        loop {
            let (used, item) = dec.next(&chunk[pos..]);
            pos += used;
            total += used;
            match item {
                None => break,
                Some(d) => {
                    let mut item = Item::from_decoded(d);
                    if let Item::Reader(bytes) | Item::Hello(bytes) = &mut item {
                        bytes.extend_from_slice(&chunk[pos..]);
                        handed = true;
                    }
                    let at = match item {
                        Item::Fatal(_) | Item::Close | Item::Reader(_) | Item::Hello(_) => None,
                        _ => Some(total),
                    };
                    out.push((at, item));
                }
            }
        }
        assert_eq!(pos, chunk.len(), "decoder must consume every chunk");
    }
    out
}

/// Decodes `stream` whole, split at every single point, and one byte at a
/// time; asserts all agree and returns the result.
pub fn decode_every_split(limits: Limits, stream: &[u8]) -> Vec<(Option<usize>, Item)> {
    let whole = decode_chunks(limits, [stream]);
    for cut in 0..=stream.len() {
        let (a, b) = stream.split_at(cut);
        assert_eq!(decode_chunks(limits, [a, b]), whole, "split at {cut}");
    }
    assert_eq!(
        decode_chunks(limits, stream.chunks(1)),
        whole,
        "one byte at a time"
    );
    whole
}
