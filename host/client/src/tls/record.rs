//! The TLS 1.3 record layer after the handshake (RFC 8446 section 5):
//! records sealed and opened in place with the keys rustls hands over.

use std::fmt;
use std::io;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::ConnectionTrafficSecrets;

/// The most plaintext one record carries (RFC 8446 section 5.1).
pub const MAX_PLAINTEXT: usize = 16 * 1024;
/// A record's header: type, legacy version, length.
pub const HEADER_LEN: usize = 5;
/// The AEAD tag every supported suite adds.
pub const TAG_LEN: usize = 16;
/// The longest record a peer may send: header, plaintext, content type,
/// and up to 255 bytes of padding and tag (RFC 8446 section 5.2).
pub const MAX_RECORD: usize = HEADER_LEN + MAX_PLAINTEXT + 256;
/// What sealing adds to the plaintext: header, content type, tag.
pub const OVERHEAD: usize = HEADER_LEN + 1 + TAG_LEN;

/// Records one key may protect here (RFC 8446 section 5.5 puts AES-GCM's
/// limit at 2^24.5; the server updates its keys at 2^24).
pub const KEY_LIMIT: u64 = (1 << 24) + (1 << 16);

/// Content types (RFC 8446 section 5.1).
pub const ALERT: u8 = 21;
/// A handshake message (after the handshake: KeyUpdate, NewSessionTicket).
pub const HANDSHAKE: u8 = 22;
/// Application data.
pub const APPLICATION_DATA: u8 = 23;

/// One direction's record protection: its key, IV and sequence number.
pub struct Keys {
    key: LessSafeKey,
    iv: [u8; 12],
    seq: u64,
}

impl fmt::Debug for Keys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys").field("seq", &self.seq).finish()
    }
}

/// Why a record could not be opened or sealed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RecordError {
    /// Not a TLS 1.3 record: a bad type or length.
    Malformed,
    /// The tag did not match (tampered with, or not ours).
    Decrypt,
    /// The sequence number would wrap.
    Exhausted,
    /// A suite this code does not know.
    Suite,
}

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RecordError::Malformed => "a malformed TLS record",
            RecordError::Decrypt => "a TLS record that does not decrypt",
            RecordError::Exhausted => "TLS sequence numbers exhausted",
            RecordError::Suite => "an unsupported cipher suite",
        })
    }
}

impl From<RecordError> for io::Error {
    fn from(e: RecordError) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e.to_string())
    }
}

impl Keys {
    /// One direction of what rustls extracted: `(next sequence, secrets)`.
    pub fn new(secrets: (u64, ConnectionTrafficSecrets)) -> Result<Keys, RecordError> {
        let (seq, s) = secrets;
        let (alg, key, iv) = match &s {
            ConnectionTrafficSecrets::Aes128Gcm { key, iv } => (&aead::AES_128_GCM, key, iv),
            ConnectionTrafficSecrets::Aes256Gcm { key, iv } => (&aead::AES_256_GCM, key, iv),
            ConnectionTrafficSecrets::Chacha20Poly1305 { key, iv } => {
                (&aead::CHACHA20_POLY1305, key, iv)
            }
            _ => return Err(RecordError::Suite),
        };
        let key = UnboundKey::new(alg, key.as_ref()).map_err(|_| RecordError::Suite)?;
        let iv: [u8; 12] = iv.as_ref().try_into().map_err(|_| RecordError::Suite)?;
        Ok(Keys {
            key: LessSafeKey::new(key),
            iv,
            seq,
        })
    }

    /// Records protected with this key so far (its sequence number).
    pub fn records(&self) -> u64 {
        self.seq
    }

    fn nonce(&mut self) -> Result<Nonce, RecordError> {
        let seq = self.seq;
        if seq >= KEY_LIMIT {
            // AES-GCM's confidentiality limit: the server moves to new
            // keys before it; a client stops here and connects again.
            return Err(RecordError::Exhausted);
        }
        self.seq = seq.checked_add(1).ok_or(RecordError::Exhausted)?;
        let mut n = self.iv;
        for (b, s) in n[4..].iter_mut().zip(seq.to_be_bytes()) {
            *b ^= s;
        }
        Ok(Nonce::assume_unique_for_key(n))
    }

    /// Appends one record of `content_type` carrying `plain` (at most
    /// [`MAX_PLAINTEXT`] bytes) to `out`: `plain.len() + OVERHEAD` bytes.
    /// `out` grows only if it lacks the room.
    pub fn seal(
        &mut self,
        content_type: u8,
        plain: &[u8],
        out: &mut Vec<u8>,
    ) -> Result<(), RecordError> {
        if plain.len() > MAX_PLAINTEXT {
            return Err(RecordError::Malformed);
        }
        let nonce = self.nonce()?;
        let len = (plain.len() + 1 + TAG_LEN) as u16;
        let header = [APPLICATION_DATA, 3, 3, (len >> 8) as u8, len as u8];
        let start = out.len();
        out.extend_from_slice(&header);
        out.extend_from_slice(plain);
        out.push(content_type);
        let body = &mut out[start + HEADER_LEN..];
        let tag = self
            .key
            .seal_in_place_separate_tag(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::Exhausted)?;
        out.extend_from_slice(tag.as_ref());
        Ok(())
    }

    /// Opens the whole record `record` (header included) in place; returns
    /// its inner content type and where its plaintext lies in `record`.
    pub fn open(&mut self, record: &mut [u8]) -> Result<(u8, usize, usize), RecordError> {
        let header: [u8; HEADER_LEN] = record
            .get(..HEADER_LEN)
            .and_then(|h| h.try_into().ok())
            .ok_or(RecordError::Malformed)?;
        let nonce = self.nonce()?;
        let body = &mut record[HEADER_LEN..];
        let plain = self
            .key
            .open_in_place(nonce, Aad::from(header), body)
            .map_err(|_| RecordError::Decrypt)?;
        // The content type is the last non-zero byte; zeros after it are
        // padding.
        let end = plain
            .iter()
            .rposition(|&b| b != 0)
            .ok_or(RecordError::Malformed)?;
        if end > MAX_PLAINTEXT {
            return Err(RecordError::Malformed);
        }
        Ok((plain[end], HEADER_LEN, HEADER_LEN + end))
    }
}

/// The length of the record at the start of `buf` (header included) once
/// its header is there; an error if it is not a TLS 1.3 protected record.
pub fn record_len(buf: &[u8]) -> Result<Option<usize>, RecordError> {
    let Some(h) = buf.get(..HEADER_LEN) else {
        return Ok(None);
    };
    let len = usize::from(u16::from_be_bytes([h[3], h[4]]));
    if h[0] != APPLICATION_DATA || h[1] != 3 || len <= TAG_LEN || HEADER_LEN + len > MAX_RECORD {
        return Err(RecordError::Malformed);
    }
    Ok(Some(HEADER_LEN + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::crypto::cipher::{AeadKey, Iv};

    fn keys(seq: u64) -> Keys {
        let s = ConnectionTrafficSecrets::Aes256Gcm {
            key: AeadKey::from([7u8; 32]),
            iv: Iv::from([9u8; 12]),
        };
        Keys::new((seq, s)).unwrap()
    }

    #[test]
    fn sealed_records_open_in_order_and_tampering_is_caught() {
        let (mut tx, mut rx) = (keys(0), keys(0));
        let mut out = Vec::new();
        tx.seal(APPLICATION_DATA, b"first", &mut out).unwrap();
        tx.seal(APPLICATION_DATA, &[5u8; MAX_PLAINTEXT], &mut out)
            .unwrap();
        assert_eq!(out.len(), 5 + MAX_PLAINTEXT + 2 * OVERHEAD);
        let l1 = record_len(&out).unwrap().unwrap();
        assert_eq!(l1, 5 + OVERHEAD);
        let (t, a, b) = rx.open(&mut out[..l1]).unwrap();
        assert_eq!((t, &out[a..b]), (APPLICATION_DATA, &b"first"[..]));
        let mut second = out[l1..].to_vec();
        let mut bad = second.clone();
        bad[9] ^= 1;
        assert_eq!(keys(1).open(&mut bad), Err(RecordError::Decrypt));
        let (t, a, b) = rx.open(&mut second).unwrap();
        assert_eq!(t, APPLICATION_DATA);
        assert!(second[a..b].iter().all(|&x| x == 5) && b - a == MAX_PLAINTEXT);
        // A replayed first record (sequence 0 again) does not open.
        let mut again = Vec::new();
        keys(0)
            .seal(APPLICATION_DATA, b"first", &mut again)
            .unwrap();
        assert_eq!(rx.open(&mut again), Err(RecordError::Decrypt));
        // Over-long plaintext is refused, not split.
        assert_eq!(
            tx.seal(APPLICATION_DATA, &[0; MAX_PLAINTEXT + 1], &mut Vec::new()),
            Err(RecordError::Malformed)
        );
    }

    #[test]
    fn bad_headers_are_malformed() {
        assert_eq!(record_len(&[23, 3, 3]), Ok(None));
        assert_eq!(record_len(&[22, 3, 1, 0, 40]), Err(RecordError::Malformed));
        assert_eq!(
            record_len(&[23, 3, 3, 0x48, 0x20]),
            Err(RecordError::Malformed)
        );
        assert_eq!(record_len(&[23, 3, 3, 0, 16]), Err(RecordError::Malformed));
        assert_eq!(record_len(&[23, 3, 3, 0, 17]), Ok(Some(22)));
    }
}
