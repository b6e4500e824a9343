//! One TLS connection on the server: rustls' unbuffered handshake, then the
//! records opened in place in its input buffer and sealed into its output
//! buffer (no allocation per record or event once the handshake is done).

use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use eventstream_client::tls::{
    record_len, Keys, RecordError, ALERT, APPLICATION_DATA, HANDSHAKE, MAX_PLAINTEXT, MAX_RECORD,
    OVERHEAD,
};
use rustls::kernel::KernelConnection;
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{ConnectionState, EncodeError};

use super::{Cause, ServerTls};
use crate::sys;

/// The input buffer: 64 KiB per read, as for plaintext, besides a partial
/// record kept from the read before (smaller reads cost throughput:
/// docs/decisions.md, "TLS").
const IN_CAP: usize = 64 * 1024 + MAX_RECORD;
/// A TLS 1.3 KeyUpdate message's type.
const KEY_UPDATE: u8 = 24;
/// KeyUpdates taken in a row without application data between them at
/// most (rustls' own limit): a peer cannot keep the server deriving keys.
const KEY_UPDATES_IN_A_ROW: u8 = 32;
/// Records sealed with one key at most before the server moves to the
/// next (AES-GCM's confidentiality limit in TLS 1.3 is 2^24.5 records).
const RECORDS_PER_KEY: u64 = 1 << 24;

/// Why a TLS connection cannot go on.
#[derive(Debug)]
pub enum Failure {
    /// The handshake failed (counted by cause).
    Handshake(Cause, String),
    /// The peer sent close_notify: the end of its input.
    Closed,
    /// A bad record or alert after the handshake.
    Record(String),
}

impl From<RecordError> for Failure {
    fn from(e: RecordError) -> Failure {
        Failure::Record(e.to_string())
    }
}

enum Phase {
    Handshake(Box<UnbufferedServerConnection>),
    Open(Box<Open>),
    Failed,
}

struct Open {
    rx: Keys,
    tx: Keys,
    /// rustls' side of the connection after the hand-over (key updates).
    kernel: KernelConnection<ServerConnectionData>,
    /// KeyUpdates since the last application data.
    key_updates: u8,
    /// The peer asked for our keys to move on; our KeyUpdate goes out
    /// with the next flush (one at a time).
    update_owed: bool,
}

/// One connection's TLS state and buffers.
pub struct TlsConn {
    phase: Phase,
    /// Ciphertext received: `buf[head..len]` not yet opened. Records
    /// opened in place leave their plaintext in `buf[..head]` until the
    /// next read.
    buf: Box<[u8]>,
    head: usize,
    len: usize,
    /// Ciphertext to send: `out[out_pos..]`.
    out: Vec<u8>,
    out_pos: usize,
    server: Arc<ServerTls>,
    /// The peer sent close_notify: nothing after it is read.
    peer_closed: bool,
}

impl TlsConn {
    /// A connection about to make its handshake. Its output buffer holds
    /// one whole record (more only if its handshake needs it): sealing
    /// waits until what was sealed before is written.
    pub fn new(server: Arc<ServerTls>) -> Result<TlsConn, Failure> {
        let conn = UnbufferedServerConnection::new(server.config())
            .map_err(|e| Failure::Handshake(Cause::Protocol, e.to_string()))?;
        server.stats.open.fetch_add(1, Ordering::Relaxed);
        Ok(TlsConn {
            phase: Phase::Handshake(Box::new(conn)),
            buf: vec![0u8; IN_CAP].into_boxed_slice(),
            head: 0,
            len: 0,
            out: Vec::with_capacity(MAX_PLAINTEXT + OVERHEAD),
            out_pos: 0,
            server,
            peer_closed: false,
        })
    }

    /// The handshake is done.
    pub fn is_open(&self) -> bool {
        matches!(self.phase, Phase::Open(_))
    }

    /// Part of a record (or of the handshake) is waiting for the rest: a
    /// frame half-received, for `--frame-timeout`. Whole records waiting
    /// (decoding stopped for room or credit) are not.
    pub fn has_partial(&self) -> bool {
        let rest = &self.buf[self.head..self.len];
        !rest.is_empty()
            && (!self.is_open() || !matches!(record_len(rest), Ok(Some(n)) if rest.len() >= n))
    }

    /// A whole record is waiting to be opened (decoding stopped for room
    /// or credit).
    pub fn has_whole(&self) -> bool {
        let rest = &self.buf[self.head..self.len];
        self.is_open() && matches!(record_len(rest), Ok(Some(n)) if rest.len() >= n)
    }

    /// Ciphertext is waiting to be written.
    pub fn pending(&self) -> bool {
        self.out_pos < self.out.len()
    }

    /// Reads from `fd` into the input buffer; returns the bytes read
    /// (0: end of input) and how many it could have taken. Plaintext of
    /// records opened before is gone after it.
    pub fn read(&mut self, fd: RawFd) -> io::Result<(usize, usize)> {
        if self.head > 0 {
            self.buf.copy_within(self.head..self.len, 0);
            self.len -= self.head;
            self.head = 0;
        }
        let room = self.buf.len() - self.len;
        if room == 0 {
            // A handshake message longer than the buffer (a record is
            // never longer): refused.
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "a TLS handshake message over the input buffer",
            ));
        }
        let n = sys::read(fd, &mut self.buf[self.len..])?;
        self.len += n;
        Ok((n, room))
    }

    /// Drives the handshake over the input read so far: its answers are
    /// queued for [`TlsConn::flush`]; application data that came with the
    /// client's last flight is appended to `early`. True once done.
    pub fn handshake(&mut self, early: &mut Vec<u8>) -> Result<bool, Failure> {
        loop {
            let Phase::Handshake(conn) = &mut self.phase else {
                return Ok(self.is_open());
            };
            let status = conn.process_tls_records(&mut self.buf[self.head..self.len]);
            let discard = status.discard;
            let mut done = false;
            let mut blocked = false;
            let mut peer_closed = false;
            match status.state {
                Err(e) => {
                    self.head += discard;
                    return Err(self.fail(Cause::of(&e), e.to_string()));
                }
                Ok(ConnectionState::EncodeTlsData(mut enc)) => loop {
                    let at = self.out.len();
                    self.out.resize(self.out.capacity().max(at + 4096), 0);
                    match enc.encode(&mut self.out[at..]) {
                        Ok(n) => {
                            self.out.truncate(at + n);
                            break;
                        }
                        Err(EncodeError::InsufficientSize(s)) => {
                            self.out.truncate(at);
                            self.out.reserve(s.required_size);
                        }
                        Err(EncodeError::AlreadyEncoded) => {
                            self.out.truncate(at);
                            break;
                        }
                    }
                },
                // Queued in `out`, which goes out in order.
                Ok(ConnectionState::TransmitTlsData(t)) => t.done(),
                Ok(ConnectionState::BlockedHandshake) => blocked = true,
                Ok(ConnectionState::WriteTraffic(_)) => done = true,
                Ok(ConnectionState::ReadTraffic(mut r)) => {
                    while let Some(rec) = r.next_record() {
                        match rec {
                            Ok(rec) => early.extend_from_slice(rec.payload),
                            Err(e) => {
                                let e = e.to_string();
                                self.head += discard;
                                return Err(self.fail(Cause::Protocol, e));
                            }
                        }
                    }
                }
                Ok(ConnectionState::PeerClosed) => peer_closed = true,
                Ok(ConnectionState::Closed) => {
                    self.head += discard;
                    return Err(self.fail(Cause::Closed, "closed during the handshake".into()));
                }
                Ok(other) => {
                    let what = format!("{other:?}");
                    self.head += discard;
                    return Err(self.fail(Cause::Protocol, format!("unexpected {what}")));
                }
            }
            self.head += discard;
            if peer_closed {
                if conn.is_handshaking() {
                    return Err(self.fail(Cause::Closed, "closed during the handshake".into()));
                }
                // Finished, data and close_notify in one flight: the
                // handshake is done; the data is decoded, then EOF.
                self.peer_closed = true;
                done = true;
            }
            if blocked {
                return Ok(false);
            }
            if done {
                return self.take_over().map(|()| true);
            }
        }
    }

    /// The handshake is done: the keys come over from rustls.
    fn take_over(&mut self) -> Result<(), Failure> {
        let Phase::Handshake(conn) = std::mem::replace(&mut self.phase, Phase::Failed) else {
            return Ok(());
        };
        let (secrets, kernel) = conn
            .dangerous_into_kernel_connection()
            .map_err(|e| self.fail(Cause::Protocol, e.to_string()))?;
        let open = Open {
            rx: Keys::new(secrets.rx).map_err(|e| self.fail(Cause::Protocol, e.to_string()))?,
            tx: Keys::new(secrets.tx).map_err(|e| self.fail(Cause::Protocol, e.to_string()))?,
            kernel,
            key_updates: 0,
            update_owed: false,
        };
        self.phase = Phase::Open(Box::new(open));
        if self.peer_closed {
            self.head = self.len;
        }
        self.server.stats.handshakes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Counts a failed handshake and queues rustls' alert, if it has one
    /// (the input's processed bytes are discarded already, as rustls
    /// requires before it is called again).
    fn fail(&mut self, cause: Cause, why: String) -> Failure {
        if let Phase::Handshake(conn) = &mut self.phase {
            if let Ok(ConnectionState::EncodeTlsData(mut enc)) = conn
                .process_tls_records(&mut self.buf[self.head..self.len])
                .state
            {
                let at = self.out.len();
                self.out.resize(at + 512, 0);
                let n = enc.encode(&mut self.out[at..]).unwrap_or(0);
                self.out.truncate(at + n);
            }
        }
        self.phase = Phase::Failed;
        self.server.stats.failed(cause);
        Failure::Handshake(cause, why)
    }

    /// Counts a handshake given up for `cause` (it did not finish in
    /// time, the peer hung up, the socket failed); nothing if none is
    /// under way.
    pub fn abandoned(&mut self, cause: Cause) {
        if matches!(self.phase, Phase::Handshake(_)) {
            self.phase = Phase::Failed;
            self.server.stats.failed(cause);
        }
    }

    /// Opens the next whole record in place; its plaintext is
    /// `self.data(range)` until the next [`TlsConn::read`]. None: no whole
    /// record is waiting. Key updates are taken on the way.
    pub fn next_record(&mut self) -> Result<Option<(usize, usize)>, Failure> {
        loop {
            if self.peer_closed {
                return Err(Failure::Closed);
            }
            let Phase::Open(o) = &mut self.phase else {
                return Ok(None);
            };
            let Some(len) = record_len(&self.buf[self.head..self.len])? else {
                return Ok(None);
            };
            if self.len - self.head < len {
                return Ok(None);
            }
            let at = self.head;
            self.head += len;
            let (typ, a, b) = o.rx.open(&mut self.buf[at..at + len])?;
            let body = &self.buf[at + a..at + b];
            match typ {
                APPLICATION_DATA => {
                    o.key_updates = 0;
                    return Ok(Some((at + a, at + b)));
                }
                ALERT if body == [1, 0] => {
                    // Nothing after close_notify counts.
                    self.peer_closed = true;
                    self.head = self.len;
                    return Err(Failure::Closed);
                }
                ALERT => return Err(Failure::Record(format!("the peer sent alert {body:?}"))),
                HANDSHAKE
                    if body.len() == 5 && body[..4] == [KEY_UPDATE, 0, 0, 1] && body[4] <= 1 =>
                {
                    o.key_updates += 1;
                    if o.key_updates > KEY_UPDATES_IN_A_ROW {
                        return Err(Failure::Record("too many key updates in a row".into()));
                    }
                    let rx = o
                        .kernel
                        .update_rx_secret()
                        .map_err(|e| Failure::Record(e.to_string()))?;
                    o.rx = Keys::new(rx)?;
                    // Ours moves on with the next write (one owed at most).
                    o.update_owed |= body[4] == 1;
                }
                _ => {
                    return Err(Failure::Record(
                        "an unexpected message after the handshake".into(),
                    ))
                }
            }
        }
    }

    /// Plaintext a record left in the input buffer.
    pub fn data(&self, (a, b): (usize, usize)) -> &[u8] {
        &self.buf[a..b]
    }

    /// Seals as much of `plain` as the output buffer has room for;
    /// returns how much.
    pub fn seal(&mut self, plain: &[u8]) -> Result<usize, Failure> {
        let Phase::Open(o) = &mut self.phase else {
            return Ok(0);
        };
        if o.update_owed || o.tx.records() >= RECORDS_PER_KEY {
            // Our KeyUpdate, sealed with the old keys, then the new ones.
            o.tx.seal(HANDSHAKE, &[KEY_UPDATE, 0, 0, 1, 0], &mut self.out)?;
            let tx = o
                .kernel
                .update_tx_secret()
                .map_err(|e| Failure::Record(e.to_string()))?;
            o.tx = Keys::new(tx)?;
            o.update_owed = false;
        }
        let mut used = 0;
        while used < plain.len() {
            let room = (self.out.capacity() - self.out.len()).saturating_sub(OVERHEAD);
            let n = (plain.len() - used).min(MAX_PLAINTEXT).min(room);
            if n == 0 {
                break;
            }
            o.tx.seal(APPLICATION_DATA, &plain[used..used + n], &mut self.out)?;
            used += n;
        }
        Ok(used)
    }

    /// The most plaintext one [`TlsConn::seal`] takes into an empty
    /// output buffer.
    pub fn seal_room(&self) -> usize {
        self.out.capacity().saturating_sub(OVERHEAD)
    }

    /// Queues close_notify (an open connection that ends well).
    pub fn close_notify(&mut self) {
        if let Phase::Open(o) = &mut self.phase {
            let _ = o.tx.seal(ALERT, &[1, 0], &mut self.out);
        }
    }

    /// Writes queued ciphertext to `fd`; WouldBlock when the socket is
    /// full (what is left stays queued).
    pub fn flush(&mut self, fd: RawFd) -> io::Result<()> {
        while self.out_pos < self.out.len() {
            let n = sys::send(fd, &self.out[self.out_pos..])?;
            self.out_pos += n;
        }
        self.out.clear();
        self.out_pos = 0;
        Ok(())
    }
}

impl Drop for TlsConn {
    fn drop(&mut self) {
        self.server.stats.open.fetch_sub(1, Ordering::Relaxed);
    }
}
