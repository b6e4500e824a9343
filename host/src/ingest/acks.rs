//! Acks on their way back: from the ack ring into each connection's
//! buffer, then one write per connection.

use std::io;
use std::os::fd::AsRawFd;

use super::conns::{ensure_out, give_back};
use super::*;
use crate::shared::RingGauge;
use crate::sys;

impl<D: Downstream> Ingest<D> {
    /// Moves acks from storage into their connections' buffers.
    pub(super) fn deliver_acks(&mut self) {
        let mut got = 0usize;
        let capacity = self.out_capacity();
        while let Some((id, ack)) = self.p.ack_rx.pop() {
            got += 1;
            let Some(c) = self.conns[(id & SLOT_MASK) as usize]
                .as_mut()
                .filter(|c| c.id == id)
            else {
                continue;
            };
            ensure_out(c, &mut self.spare_out, capacity);
            c.inflight = c.inflight.saturating_sub(1);
            c.push_ack(&ack);
            self.mark_dirty(id);
        }
        if got > 0 {
            self.p.shared.gauges.set_depth(RingGauge::Acks, 0);
        }
    }

    /// Writes every connection's queued acks (one write each).
    pub(super) fn flush_dirty(&mut self) {
        let capacity = self.out_capacity();
        while let Some(id) = self.dirty.pop() {
            let Some(c) = self.conns[(id & SLOT_MASK) as usize]
                .as_mut()
                .filter(|c| c.id == id)
            else {
                continue;
            };
            c.in_dirty = false;
            if c.fatal.is_some() && c.inflight == 0 {
                if let Some(f) = c.fatal.take() {
                    ensure_out(c, &mut self.spare_out, capacity);
                    c.push_ack(&f);
                    c.closing = true;
                }
            }
            let mut close = c.tls.is_some() && !super::tls::write_tls(c);
            while c.tls.is_none() && c.writable && c.out_pos < c.out.len() {
                let rest = &c.out[c.out_pos..];
                match sys::send(c.fd.as_raw_fd(), rest) {
                    Ok(n) => c.out_pos += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => c.writable = false,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                    Err(_) => {
                        close = true;
                        break;
                    }
                }
            }
            if c.out_pos == c.out.len() {
                c.out.clear();
                c.out_pos = 0;
                if c.inflight == 0 {
                    // Quiet: the buffer goes back until acks come again.
                    give_back(&mut self.spare_out, std::mem::take(&mut c.out));
                }
            }
            let idle = c.inflight == 0 && !c.unsent();
            if close || (idle && (c.closing || c.eof)) {
                self.close(id);
                continue;
            }
            // Credit came back: decode what is held, read again.
            let input = c.readable
                || c.stash_pos < c.stash.len()
                || c.tls.as_ref().is_some_and(|t| t.has_whole());
            if input && !c.queued && !c.closing && c.fatal.is_none() {
                c.queued = true;
                self.ready.push_back(id);
            }
        }
    }
}
