//! TLS for connections to `eventstream serve` (`--tls-listen`).
//!
//! `rustls` (with `ring`, TLS 1.3 only) makes the handshake; the records
//! after it are sealed and opened here (`record`), in place, with the keys
//! rustls hands over (its secret extraction, the path it offers for kernel
//! TLS). That lets a connection split into a receiving and a sending half
//! on two threads (as [`crate::Producer`] does) and lets the server
//! decrypt into its input buffer without an allocation per record.
//! docs/decisions.md ("TLS") says why.

mod record;

pub use record::*;

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

/// ring, the one crypto provider linked (the forwarder's async-nats uses
/// it too), with the cipher suites offered and accepted AES-128-GCM first
/// (the CPU's AES instructions make it the fastest here) and key exchange
/// by X25519 first (ring's default list starts with P-384, several times
/// slower per handshake here). rustls marks ring's provider deprecated for
/// its lack of post-quantum key exchange; it is the provider this build
/// has (docs/decisions.md, "TLS").
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
