//! The receiver: every connection's acks, matched to their events.

use super::*;

/// One connection's receiving side.
pub(super) struct Reader {
    pub(super) stream: eventstream_client::tls::Recv,
    pub(super) conn: Arc<Conn>,
    pub(super) id_base: u64,
    pub(super) buf: Vec<u8>,
    pub(super) held: usize,
    pub(super) open: bool,
}

impl Reader {
    pub(super) fn new(
        stream: eventstream_client::tls::Recv,
        conn: Arc<Conn>,
        id_base: u64,
    ) -> Self {
        Self {
            stream,
            conn,
            id_base,
            buf: vec![0u8; 256 * 1024],
            held: 0,
            open: true,
        }
    }

    /// Reads once and counts every whole ack; false at the end.
    pub(super) fn read(&mut self, shared: &Shared, t: &mut Tally) -> bool {
        let n = match self.stream.read(&mut self.buf[self.held..]) {
            Ok(0) => return false,
            Ok(n) => n,
            // A signal (or a freeze of the process) cut the read short.
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return true,
            Err(_) => return false,
        };
        let now = monotonic_ns();
        let end = self.held + n;
        let whole = end - end % 24;
        let mut count = 0u64;
        for chunk in self.buf[..whole].chunks_exact(24) {
            count += 1;
            let Ok(ack) = Ack::decode(chunk) else {
                t.unexpected += 1;
                continue;
            };
            match ack.status {
                Status::Stored => t.stored += 1,
                Status::Duplicate => t.duplicate += 1,
                Status::Rejected => t.rejected[ack.reason.code() as usize] += 1,
                Status::Fatal => {
                    t.fatal += 1;
                    continue;
                }
            }
            if ack.event_id & !((1 << 40) - 1) != self.id_base {
                t.unexpected += 1;
                continue;
            }
            let slot = &self.conn.slots[(ack.event_id & SLOT_MASK) as usize];
            let state = slot.state.load(Ordering::Acquire);
            if state >> 2 == 0 {
                t.unexpected += 1;
                continue;
            }
            let class = (state & 3) as usize;
            let sent = slot.sent_ns.load(Ordering::Relaxed);
            if let Some(h) = t.latency.get_mut(class) {
                h.record(now.saturating_sub(sent));
            }
            slot.state.fetch_sub(1 << 2, Ordering::Release);
        }
        t.last_ack_ns = now;
        self.conn.acked.fetch_add(count, Ordering::Release);
        shared.acked.fetch_add(count, Ordering::Relaxed);
        self.buf.copy_within(whole..end, 0);
        self.held = end - whole;
        true
    }
}

/// Reads the acks of every connection until each is closed: one `poll`
/// over all of them per wake-up.
pub(super) fn recv_all(mut readers: Vec<Reader>, shared: &Shared, t: &mut Tally) {
    let mut fds: Vec<libc::pollfd> = readers
        .iter()
        .map(|r| libc::pollfd {
            fd: r.stream.tcp().as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    while readers.iter().any(|r| r.open) {
        for (f, r) in fds.iter_mut().zip(&readers) {
            // A negative fd is skipped by poll.
            f.fd = if r.open {
                r.stream.tcp().as_raw_fd()
            } else {
                -1
            };
            f.revents = 0;
        }
        // TLS records read and not yet returned: no waiting for poll.
        let buffered = readers.iter().any(|r| r.open && r.stream.buffered());
        match crate::sys::poll(&mut fds, if buffered { 0 } else { 100 }) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => {
                eprintln!("load: poll failed: {e}");
                return;
            }
        }
        for (f, r) in fds.iter().zip(readers.iter_mut()) {
            if r.open && (f.revents != 0 || r.stream.buffered()) && !r.read(shared, t) {
                r.open = false;
            }
        }
    }
}
