//! The original EventStreamCore's frames (PROTOCOL.md section 4), spoken
//! by a connection that does not start with `ESC1`.

use super::*;

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
    /// it later with [`Frame::set_event_id`]). Returns the frame's length.
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

    /// The head of the v1 frame it becomes (see [`Frame::with_head`]).
    pub fn v1_head(&self) -> FrameHead {
        FrameHead {
            priority: self.priority,
            // Checked at decode: 1..=max_topic <= 255 bytes.
            topic_len: self.topic.len().min(u8::MAX as usize) as u8,
        }
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
pub(super) fn extent_legacy(head: &[u8], limits: &Limits) -> Extent {
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
pub(super) fn check_legacy<'a>(
    raw: &'a [u8],
    limits: &Limits,
) -> Result<LegacyEvent<'a>, LegacyRule> {
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
