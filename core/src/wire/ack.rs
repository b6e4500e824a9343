//! The 24-byte ack frame (PROTOCOL.md section 3).

use super::*;

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
    /// A reason code the protocol does not define (above 16).
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
