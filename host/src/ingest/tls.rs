//! A TLS connection's turn: its handshake, then its records opened in
//! place and decoded like any plaintext read; its acks sealed and written.

use std::io;
use std::os::fd::AsRawFd;

use super::conns::Conn;
use super::*;
use crate::tls::{Cause, Failure, TlsConn};

impl<D: Downstream> Ingest<D> {
    /// One turn of a TLS connection (whose held-back plaintext, if any,
    /// is decoded already); true if it should stay ready.
    pub(super) fn serve_tls(&mut self, c: &mut Conn, now: u64, wall: u64) -> bool {
        let Some(mut t) = c.tls.take() else {
            return false;
        };
        let keep = self.tls_turn(c, &mut t, now, wall);
        c.tls = Some(t);
        keep
    }

    fn tls_turn(&mut self, c: &mut Conn, t: &mut TlsConn, now: u64, wall: u64) -> bool {
        // Whole records read before (a stop for room or credit) first.
        if let Some(keep) = self.tls_records(c, t, now, wall) {
            return keep;
        }
        if !c.readable || c.eof {
            return false;
        }
        match t.read(c.fd.as_raw_fd()) {
            Ok((0, _)) => {
                t.abandoned(Cause::Closed);
                c.eof = true;
                c.readable = false;
                return false;
            }
            Ok((n, room)) => {
                c.last_active = now;
                // As for plaintext (serve_conn): a short read emptied the
                // socket, unless the peer hung up.
                if n < room && !c.hup {
                    c.readable = false;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                c.readable = false;
                return false;
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => return true,
            Err(e) => {
                // A reset is the peer leaving; anything else (a handshake
                // message over the buffer) a protocol failure.
                let cause = match e.kind() {
                    io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe => Cause::Closed,
                    _ => Cause::Protocol,
                };
                t.abandoned(cause);
                c.eof = true;
                c.readable = false;
                c.closing = true;
                return false;
            }
        }
        if !t.is_open() {
            // Handshake only: per connection, not per event.
            let mut early = Vec::new();
            match t.handshake(&mut early) {
                Ok(false) => return c.readable,
                Ok(true) => {
                    if let Some(keep) = self.tls_plain(c, &early, now, wall) {
                        return keep;
                    }
                }
                Err(_) => {
                    // Counted by cause; rustls' alert goes out, then the
                    // connection closes (flush_dirty).
                    c.eof = true;
                    c.readable = false;
                    c.closing = true;
                    return false;
                }
            }
        }
        self.tls_records(c, t, now, wall).unwrap_or(c.readable)
    }

    /// Decodes every whole record waiting; Some(keep) when the turn ends.
    fn tls_records(&mut self, c: &mut Conn, t: &mut TlsConn, now: u64, wall: u64) -> Option<bool> {
        loop {
            match t.next_record() {
                Ok(Some(range)) => {
                    if let Some(keep) = self.tls_plain(c, t.data(range), now, wall) {
                        return Some(keep);
                    }
                }
                Ok(None) => return None,
                Err(Failure::Closed) => {
                    // close_notify: the end of its input.
                    c.eof = true;
                    c.readable = false;
                    return Some(false);
                }
                Err(e) => {
                    eprintln!("eventstream: TLS connection closed: {e:?}");
                    c.eof = true;
                    c.readable = false;
                    c.closing = true;
                    return Some(false);
                }
            }
        }
    }

    /// Decodes one record's plaintext; what is not taken (no room, no
    /// credit) is held back in the stash. Some(keep) when the turn ends.
    fn tls_plain(&mut self, c: &mut Conn, plain: &[u8], now: u64, wall: u64) -> Option<bool> {
        if plain.is_empty() {
            return None;
        }
        let (used, stop) = self.decode(c, plain, now, wall);
        if used < plain.len() {
            if c.stash.capacity() == 0 {
                c.stash = self
                    .spare_stash
                    .pop()
                    .unwrap_or_else(|| Vec::with_capacity(READ_CHUNK));
            }
            c.stash.extend_from_slice(&plain[used..]);
        }
        match stop {
            Stop::Done => None,
            Stop::Room => {
                self.waiting_room.push(c.id);
                Some(false)
            }
            Stop::Credit | Stop::Closed => Some(false),
        }
    }
}

/// Seals the connection's unsent acks and writes them with what else TLS
/// queued (handshake, alerts); false if the connection failed.
pub(super) fn write_tls(c: &mut Conn) -> bool {
    let fd = c.fd.as_raw_fd();
    let Some(t) = c.tls.as_mut() else {
        return true;
    };
    while c.writable {
        if t.pending() {
            match t.flush(fd) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
            continue;
        }
        if c.out_pos < c.out.len() && t.is_open() {
            match t.seal(&c.out[c.out_pos..]) {
                Ok(n) if n > 0 => c.out_pos += n,
                _ => return false,
            }
            continue;
        }
        break;
    }
    true
}
