//! A HELLO (PROTOCOL.md section 8) on a producer connection: its bytes are
//! gathered past the decoder (which pauses at `ESCH`), then checked: a
//! well-formed HELLO with a known token (any token with authentication
//! off) is answered STORED/NONE and the decoder goes on; anything else is
//! FATAL UNAUTHORIZED.

use eventstream_core::wire::read::{Hello, HELLO_ACCEPTED, HELLO_MIN, MAX_TOKEN};

use super::conns::ensure_out;
use super::*;

/// The longest HELLO.
pub(super) const HELLO_MAX: usize = HELLO_MIN + MAX_TOKEN;

impl<D: Downstream> Ingest<D> {
    /// After a reload of the `--auth` file (SIGHUP): a connection whose
    /// token is gone gets FATAL UNAUTHORIZED (after the answers of its
    /// earlier events) and is closed; the others take their new rights.
    pub(super) fn recheck_tokens(&mut self) {
        let Some(state) = &self.p.auth else {
            return;
        };
        let generation = state.generation();
        if generation == self.auth_seen {
            return;
        }
        self.auth_seen = generation;
        let auth = state.current();
        let mut revoked = Vec::new();
        for c in self.conns.iter_mut().flatten() {
            if let Access::Token(r) = &c.access {
                match auth.refresh(r) {
                    Some(now) => c.access = Access::Token(now),
                    None if c.fatal.is_none() => {
                        c.fatal = Some(Ack::fatal(Reason::Unauthorized));
                        revoked.push(c.id);
                    }
                    None => {}
                }
            }
        }
        for id in revoked {
            self.metrics.add(
                eventstream_core::metrics::Counter::Rejected(Reason::Unauthorized),
                1,
            );
            self.mark_dirty(id);
        }
    }
    /// Takes the bytes of `c`'s HELLO from the front of `input`; returns
    /// how many, and the reason to refuse it once it is whole and bad.
    /// Accepted, its answer is queued, the connection gets its token's
    /// rights and its decoder resumes.
    pub(super) fn take_hello(&mut self, c: &mut Conn, input: &[u8]) -> (usize, Option<Reason>) {
        let Some(h) = c.hello.as_mut() else {
            return (0, None);
        };
        let mut used = 0;
        loop {
            let want = match h.get(4..8) {
                None => 8,
                Some(l) => {
                    let len = u32::from_le_bytes([l[0], l[1], l[2], l[3]]) as usize;
                    if !(HELLO_MIN..=HELLO_MAX).contains(&len) {
                        return (used, Some(Reason::Unauthorized));
                    }
                    len
                }
            };
            if h.len() >= want {
                break;
            }
            let take = (want - h.len()).min(input.len() - used);
            if take == 0 {
                return (used, None);
            }
            h.extend_from_slice(&input[used..used + take]);
            used += take;
        }
        let bytes = c.hello.take().unwrap_or_default();
        let verdict = Hello::parse(&bytes).and_then(|hello| match &self.p.auth {
            None => Ok(Access::Open),
            Some(auth) => auth
                .current()
                .check(hello.token)
                .map(Access::Token)
                .ok_or(Reason::Unauthorized),
        });
        match verdict {
            Ok(access) => {
                c.access = access;
                let capacity = (self.p.ack_credit as usize + 1) * ACK_LEN;
                ensure_out(c, &mut self.spare_out, capacity);
                c.push_ack(&HELLO_ACCEPTED);
                c.dec.resume_after_hello();
                (used, None)
            }
            Err(reason) => (used, Some(reason)),
        }
    }
}
