//! Per-class frame templates, patched per event (id, timestamp, CRC).

use super::*;

pub(super) fn template(class: usize, payload: u32, ack: bool) -> Vec<u8> {
    let priority = [Priority::High, Priority::Medium, Priority::Batch][class];
    let topic = ["load/realtime", "load/transactional", "load/batch"][class];
    let body: Vec<u8> = (0..payload).map(|i| i as u8).collect();
    let repr = FrameRepr {
        priority,
        flags: if ack { FLAG_ACK } else { 0 },
        partition: 0,
        event_id: 0,
        timestamp_ns: 0,
        topic: topic.as_bytes(),
        payload: &body,
    };
    let mut out = vec![0u8; repr.encoded_len()];
    let _ = repr.encode(&mut out);
    out
}

/// Where a v1 frame's `event_id` and `timestamp_ns` sit (PROTOCOL.md
/// section 2): the 16 bytes a template changes per event.
pub(super) const PATCHED: std::ops::Range<usize> = 16..32;

/// A frame template whose CRC is patched with tables instead of being
/// computed over the whole frame per event. CRC-32C over messages of one
/// length is affine in their bits: crc(m ^ d) = crc(m) ^ crc(d) ^ crc(0),
/// so the CRC of the template with new id and timestamp bytes is the
/// template's CRC (id and timestamp zero) xored with one table entry per
/// changed byte. 16 lookups instead of a pass over the ~300-byte frame;
/// the generator shares the two CPUs with the server it measures.
pub(super) struct Template {
    pub(super) frame: Vec<u8>,
    /// CRC of the frame with id and timestamp zero.
    pub(super) base: u32,
    /// `[j][b]`: what byte `b` at `PATCHED.start + j` adds to the CRC.
    pub(super) table: Box<[[u32; 256]; 16]>,
    /// The template's validated head (None: not a frame, written as is).
    head: Option<FrameHead>,
}

impl Template {
    pub(super) fn new(frame: Vec<u8>) -> Self {
        let body = frame.len().saturating_sub(4);
        let mut table = Box::new([[0u32; 256]; 16]);
        let mut base = 0;
        if body >= PATCHED.end {
            let mut zero = frame[..body].to_vec();
            zero[PATCHED].fill(0);
            base = crc32c::checksum(&zero);
            let mut msg = vec![0u8; body];
            let empty = crc32c::checksum(&msg);
            for (j, row) in table.iter_mut().enumerate() {
                for (b, entry) in row.iter_mut().enumerate() {
                    msg[PATCHED.start + j] = b as u8;
                    *entry = crc32c::checksum(&msg) ^ empty;
                }
                msg[PATCHED.start + j] = 0;
            }
        }
        let head = Frame::check(&frame[..], Check::Layout)
            .ok()
            .map(|f| f.head());
        Self {
            frame,
            base,
            table,
            head,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.frame.len()
    }

    /// Writes the frame with `event_id` and `timestamp_ns` into `out`
    /// (exactly `len()` bytes), sealed.
    pub(super) fn write(&self, out: &mut [u8], event_id: u64, timestamp_ns: u64) {
        out.copy_from_slice(&self.frame);
        let Some(head) = self.head else {
            return;
        };
        let mut patch = [0u8; 16];
        patch[..8].copy_from_slice(&event_id.to_le_bytes());
        patch[8..].copy_from_slice(&timestamp_ns.to_le_bytes());
        let crc = patch
            .iter()
            .zip(self.table.iter())
            .fold(self.base, |c, (&b, row)| c ^ row[b as usize]);
        let mut f = Frame::with_head(out, head);
        f.set_event_id(event_id);
        f.set_timestamp_ns(timestamp_ns);
        f.set_crc(crc);
    }
}
