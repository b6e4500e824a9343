//! TLS for connections to `eventstream serve` (`--tls-listen`).
//!
//! `rustls` (with `ring`, TLS 1.3 only) makes the handshake; the records
//! after it are sealed and opened here, in place, with the keys rustls
//! hands over (its secret extraction, the path it offers for kernel TLS).
//! That lets a connection split into a receiving and a sending half on two
//! threads (as [`crate::Producer`] does) and lets the server decrypt into
//! its input buffer without an allocation per record.
//! docs/decisions.md ("TLS") says why.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use ring::aead::{self, Aad, LessSafeKey, Nonce, UnboundKey};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
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

/// ring, the one crypto provider linked (the forwarder's async-nats uses
/// it too), with the cipher suites offered and accepted AES-128-GCM first
/// (the CPU's AES instructions make it the fastest here). rustls marks
/// ring's provider deprecated for its lack of post-quantum key exchange;
/// it is the provider this build has (docs/decisions.md, "TLS").
/// Key exchange by X25519 first: ring's default list starts with P-384,
/// several times slower per handshake here (docs/decisions.md, "TLS").
#[allow(deprecated)]
pub fn provider() -> rustls::crypto::CryptoProvider {
    use rustls::crypto::ring::{cipher_suite as cs, kx_group as kx};
    rustls::crypto::CryptoProvider {
        cipher_suites: vec![
            cs::TLS13_AES_128_GCM_SHA256,
            cs::TLS13_AES_256_GCM_SHA384,
            cs::TLS13_CHACHA20_POLY1305_SHA256,
        ],
        kx_groups: vec![kx::X25519, kx::SECP256R1, kx::SECP384R1],
        ..rustls::crypto::ring::default_provider()
    }
}

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

/// Reads every certificate in a PEM file.
pub fn read_certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, String> {
    let certs: Vec<_> = CertificateDer::pem_file_iter(path)
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cannot read certificates from {}: {e}", path.display()))?;
    if certs.is_empty() {
        return Err(format!("no certificate in {}", path.display()));
    }
    Ok(certs)
}

/// Reads the private key in a PEM file.
pub fn read_key(path: &Path) -> Result<PrivateKeyDer<'static>, String> {
    PrivateKeyDer::from_pem_file(path)
        .map_err(|e| format!("cannot read a private key from {}: {e}", path.display()))
}

/// A client's TLS set-up: the CA its server's certificate must chain to,
/// optionally a client certificate (for `--tls-client-ca` servers), and
/// the name to check (the address's IP by default).
#[derive(Clone)]
pub struct TlsClient {
    config: Arc<rustls::ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for TlsClient {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsClient")
            .field("server_name", &self.server_name)
            .finish()
    }
}

impl TlsClient {
    /// Trusts the CA certificates in the PEM file `ca`; presents the
    /// certificate chain and key in `client` (two PEM files) when given.
    pub fn new(ca: &Path, client: Option<(&Path, &Path)>) -> Result<TlsClient, String> {
        let mut roots = rustls::RootCertStore::empty();
        for c in read_certs(ca)? {
            roots
                .add(c)
                .map_err(|e| format!("a bad CA certificate in {}: {e}", ca.display()))?;
        }
        let builder = rustls::ClientConfig::builder_with_provider(Arc::new(provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .map_err(|e| e.to_string())?
            .with_root_certificates(roots);
        let mut config = match client {
            Some((cert, key)) => builder
                .with_client_auth_cert(read_certs(cert)?, read_key(key)?)
                .map_err(|e| format!("a bad client certificate or key: {e}"))?,
            None => builder.with_no_client_auth(),
        };
        config.enable_secret_extraction = true;
        // No session tickets are kept: every connection makes a full
        // handshake (the server sends none).
        config.resumption = rustls::client::Resumption::disabled();
        Ok(TlsClient {
            config: Arc::new(config),
            server_name: None,
        })
    }

    /// Checks the server's certificate against `name` instead of the IP
    /// address connected to.
    pub fn with_server_name(mut self, name: &str) -> Result<TlsClient, String> {
        let n = ServerName::try_from(name.to_string())
            .map_err(|_| format!("{name:?} is not a server name"))?;
        self.server_name = Some(n);
        Ok(self)
    }

    /// Makes the handshake on `tcp` (blocking); returns the two halves.
    pub fn handshake(&self, mut tcp: TcpStream) -> io::Result<(TlsRecv, TlsSend)> {
        let name = match &self.server_name {
            Some(n) => n.clone(),
            None => ServerName::IpAddress(ip_of(&tcp)?.into()),
        };
        let mut conn = rustls::ClientConnection::new(self.config.clone(), name)
            .map_err(|e| io::Error::other(e.to_string()))?;
        while conn.is_handshaking() {
            conn.complete_io(&mut tcp)?;
        }
        // The client's Finished is written by complete_io's last round;
        // anything still queued goes now.
        while conn.wants_write() {
            conn.write_tls(&mut tcp)?;
        }
        let secrets = conn
            .dangerous_extract_secrets()
            .map_err(|e| io::Error::other(e.to_string()))?;
        let recv = TlsRecv {
            tcp: tcp.try_clone()?,
            keys: Keys::new(secrets.rx)?,
            buf: vec![0; 2 * MAX_RECORD],
            start: 0,
            end: 0,
            plain: (0, 0),
            closed: false,
        };
        let send = TlsSend {
            tcp,
            keys: Keys::new(secrets.tx)?,
            buf: Vec::with_capacity(MAX_PLAINTEXT + OVERHEAD),
        };
        Ok((recv, send))
    }
}

fn ip_of(tcp: &TcpStream) -> io::Result<IpAddr> {
    Ok(tcp.peer_addr()?.ip())
}

/// The receiving half of a client's TLS connection.
pub struct TlsRecv {
    tcp: TcpStream,
    keys: Keys,
    buf: Vec<u8>,
    /// Ciphertext not yet opened: `buf[start..end]`.
    start: usize,
    end: usize,
    /// Plaintext of the last opened record not yet read: `buf[plain.0..plain.1]`.
    plain: (usize, usize),
    closed: bool,
}

impl TlsRecv {
    /// The socket, for timeouts.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl TlsRecv {
    /// Plaintext or a whole record is waiting here: a read returns without
    /// touching the socket (poll would not report it).
    pub fn buffered(&self) -> bool {
        self.plain.0 < self.plain.1
            || matches!(record_len(&self.buf[self.start..self.end]), Ok(Some(n)) if self.end - self.start >= n)
    }
}

impl Read for TlsRecv {
    /// Returns what the records already received hold (as much as fits),
    /// reading the socket only when none is whole.
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        let mut got = 0;
        loop {
            if self.plain.0 < self.plain.1 {
                let n = (out.len() - got).min(self.plain.1 - self.plain.0);
                out[got..got + n].copy_from_slice(&self.buf[self.plain.0..self.plain.0 + n]);
                self.plain.0 += n;
                got += n;
            }
            if self.closed || got == out.len() {
                return Ok(got);
            }
            match record_len(&self.buf[self.start..self.end])? {
                Some(len) if self.end - self.start >= len => {
                    let at = self.start;
                    self.start += len;
                    let (typ, a, b) = self.keys.open(&mut self.buf[at..at + len])?;
                    match typ {
                        APPLICATION_DATA => self.plain = (at + a, at + b),
                        ALERT => {
                            // close_notify, or an error alert: either way
                            // nothing more comes.
                            self.closed = true;
                            if self.buf[at + a..at + b] != [1, 0] && got == 0 {
                                return Err(io::Error::new(
                                    io::ErrorKind::ConnectionAborted,
                                    "the server sent a TLS alert",
                                ));
                            }
                        }
                        _ => {
                            return Err(io::Error::new(
                                io::ErrorKind::InvalidData,
                                "an unexpected TLS message after the handshake",
                            ))
                        }
                    }
                }
                _ if got > 0 => return Ok(got),
                _ => {
                    if self.start > 0 {
                        self.buf.copy_within(self.start..self.end, 0);
                        self.end -= self.start;
                        self.start = 0;
                        self.plain = (0, 0);
                    }
                    let n = self.tcp.read(&mut self.buf[self.end..])?;
                    if n == 0 {
                        if self.end > 0 {
                            return Err(io::ErrorKind::UnexpectedEof.into());
                        }
                        return Ok(0);
                    }
                    self.end += n;
                }
            }
        }
    }
}

/// The sending half of a client's TLS connection.
pub struct TlsSend {
    tcp: TcpStream,
    keys: Keys,
    buf: Vec<u8>,
}

impl TlsSend {
    /// The socket, for shutting it down.
    pub fn tcp(&self) -> &TcpStream {
        &self.tcp
    }
}

impl Write for TlsSend {
    fn write(&mut self, plain: &[u8]) -> io::Result<usize> {
        let n = plain.len().min(MAX_PLAINTEXT);
        self.buf.clear();
        self.keys
            .seal(APPLICATION_DATA, &plain[..n], &mut self.buf)?;
        self.tcp.write_all(&self.buf)?;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// The receiving half of a connection, plain or TLS.
pub enum Recv {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsRecv>),
}

/// The sending half of a connection, plain or TLS.
pub enum Send {
    /// Plain TCP.
    Plain(TcpStream),
    /// TLS.
    Tls(Box<TlsSend>),
}

impl Recv {
    /// Input is waiting here already (TLS records read and not yet
    /// returned): read before polling the socket.
    pub fn buffered(&self) -> bool {
        matches!(self, Recv::Tls(t) if t.buffered())
    }

    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Recv::Plain(t) => t,
            Recv::Tls(t) => t.tcp(),
        }
    }
}

impl Send {
    /// The socket underneath.
    pub fn tcp(&self) -> &TcpStream {
        match self {
            Send::Plain(t) => t,
            Send::Tls(t) => t.tcp(),
        }
    }
}

impl Read for Recv {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Recv::Plain(t) => t.read(buf),
            Recv::Tls(t) => t.read(buf),
        }
    }
}

impl Write for Send {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Send::Plain(t) => t.write(buf),
            Send::Tls(t) => t.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Send::Plain(t) => t.flush(),
            Send::Tls(t) => t.flush(),
        }
    }
}

/// How long a TLS handshake may take before `connect` gives up.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Connects to `addrs` (TCP_NODELAY on), with TLS when `tls` is given;
/// returns the receiving and sending halves, whose reads time out after
/// `read_timeout` (None: never).
pub fn connect(
    addrs: &[std::net::SocketAddr],
    tls: Option<&TlsClient>,
    read_timeout: Option<Duration>,
) -> io::Result<(Recv, Send)> {
    let tcp = TcpStream::connect(addrs)?;
    tcp.set_nodelay(true)?;
    match tls {
        None => {
            tcp.set_read_timeout(read_timeout)?;
            Ok((Recv::Plain(tcp.try_clone()?), Send::Plain(tcp)))
        }
        Some(t) => {
            tcp.set_read_timeout(Some(HANDSHAKE_TIMEOUT))?;
            let (r, s) = t.handshake(tcp)?;
            r.tcp().set_read_timeout(read_timeout)?;
            Ok((Recv::Tls(Box::new(r)), Send::Tls(Box::new(s))))
        }
    }
}

/// Both halves as one stream (a consumer's session, a HELLO).
pub struct Duplex {
    /// Receives.
    pub recv: Recv,
    /// Sends.
    pub send: Send,
}

impl Read for Duplex {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv.read(buf)
    }
}

impl Write for Duplex {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.send.write(buf)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.send.flush()
    }
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
