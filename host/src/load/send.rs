//! The sender: closed-loop batches or open-loop ticks over the connections.

use super::*;

/// One connection's sending side.
pub(super) struct Sender {
    pub(super) stream: eventstream_client::tls::Send,
    pub(super) conn: Arc<Conn>,
    pub(super) templates: [Template; 3],
    pub(super) buf: Vec<u8>,
    pub(super) rng: SplitMix64,
    pub(super) mix: [u32; 3],
    pub(super) duplicates: f64,
    pub(super) ack: bool,
    pub(super) id_base: u64,
    pub(super) total: Option<u64>,
    pub(super) deadline: Option<u64>,
    /// Open loop: ns between events of this connection, and the tick.
    pub(super) interval_ns: Option<f64>,
    pub(super) tick_ns: u64,
    pub(super) start: u64,
    pub(super) seq: u64,
    pub(super) sent: u64,
    /// The last transactional seqs sent, for --duplicates.
    pub(super) recent_tx: Vec<u64>,
    pub(super) recent_at: usize,
    /// Per write: from the planned send time of its first event (open
    /// loop; closed loop: the step's start) to the write's return.
    pub(super) send_lag: Histogram,
    pub(super) done: bool,
    pub(super) failed: Option<String>,
}

/// What one sending step did.
pub(super) enum Step {
    /// Wrote frames.
    Sent,
    /// Nothing due before this monotonic time.
    Wait(u64),
    /// Finished (count, time or a failed write).
    Done,
}

impl Sender {
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        stream: eventstream_client::tls::Send,
        args: &LoadArgs,
        conn: Arc<Conn>,
        id_base: u64,
        total: Option<u64>,
        deadline: Option<u64>,
        rate: Option<f64>,
        start: u64,
        index: u64,
    ) -> Self {
        // Open loop: the connections write in turn, one every tick (the
        // index-th at index ticks past the start, then every C ticks), as
        // independent producers' sends are spread out; so the one sending
        // thread never queues a connection's write, and its events'
        // latency, behind the other connections' writes of the same
        // instant.
        let tick = args.tick_us.max(1) * 1_000;
        let offset = if rate.is_some() { tick * index } else { 0 };
        let templates: [Template; 3] =
            [0, 1, 2].map(|c| Template::new(template(c, args.payload, args.ack)));
        let max_len = templates.iter().map(Template::len).max().unwrap_or(0);
        Self {
            stream,
            conn,
            templates,
            buf: vec![0u8; BATCH * max_len],
            rng: SplitMix64(index.wrapping_mul(0x1234_5678_9ABC_DEF1) ^ id_base),
            mix: args.mix,
            duplicates: args.duplicates,
            ack: args.ack,
            id_base,
            total,
            deadline,
            interval_ns: rate.map(|r| 1e9 / r.max(1e-9)),
            tick_ns: tick * u64::from(args.connections),
            start: start + offset,
            seq: 0,
            sent: 0,
            recent_tx: vec![u64::MAX; RECENT],
            recent_at: 0,
            send_lag: Histogram::new(),
            done: false,
            failed: None,
        }
    }

    /// Sends what is due at `now` (open loop) or one batch (closed loop).
    pub(super) fn step(&mut self, now: u64, shared: &Shared) -> Step {
        if self.done
            || self.total.is_some_and(|t| self.sent >= t)
            || self.deadline.is_some_and(|d| now >= d)
        {
            self.done = true;
            return Step::Done;
        }
        // How many to send now: open loop sends what is due.
        let mut n = BATCH;
        if let Some(iv) = self.interval_ns {
            if now < self.start {
                return Step::Wait(self.start);
            }
            // Events of ticks up to the current one are due: event i is
            // scheduled at the start of tick floor(i * iv / tick).
            let tick = self.tick_ns;
            let tick_end = ((now - self.start) / tick + 1) * tick;
            let due = (tick_end as f64 / iv).ceil() as u64;
            if due <= self.sent {
                return Step::Wait(self.start + tick_end);
            }
            n = ((due - self.sent) as usize).min(BATCH);
        }
        if let Some(t) = self.total {
            n = n.min((t - self.sent) as usize);
        }
        // Keep the in-flight window inside the slot ring.
        if self.ack
            && self
                .seq
                .saturating_sub(self.conn.acked.load(Ordering::Acquire))
                > (SLOTS / 2) as u64
        {
            return Step::Wait(now + 200_000);
        }
        let mut len = 0;
        let mut first_intended = now;
        // One clock reading per write: its events are made at one instant.
        let wall = wall_ns();
        for k in 0..n {
            let pick = self.rng.below(100);
            let class = if pick < u64::from(self.mix[0]) {
                0
            } else if pick < u64::from(self.mix[0] + self.mix[1]) {
                1
            } else {
                2
            };
            let intended = match self.interval_ns {
                Some(iv) => {
                    let at = ((self.sent + k as u64) as f64 * iv) as u64;
                    self.start + at / self.tick_ns * self.tick_ns
                }
                None => now,
            };
            if k == 0 {
                first_intended = intended;
            }
            // A duplicate resends an earlier transactional id, preferably
            // one already answered (then its slot times the new send); one
            // still in flight expects one more ack and keeps the original's
            // send time, so the duplicate's latency is counted from there.
            let mut use_seq = self.seq;
            let mut fresh = true;
            let mut in_flight = false;
            let known = self.recent_at.min(RECENT) as u64;
            if class == 1
                && known > 0
                && self.duplicates > 0.0
                && self.rng.below(1_000_000) as f64 / 1e6 < self.duplicates
            {
                for _ in 0..4 {
                    let cand = self.recent_tx[self.rng.below(known) as usize];
                    let slot = &self.conn.slots[(cand & SLOT_MASK) as usize];
                    use_seq = cand;
                    fresh = false;
                    in_flight = self.ack && slot.state.load(Ordering::Acquire) >> 2 != 0;
                    if !in_flight {
                        break;
                    }
                }
            }
            let t = &self.templates[class];
            t.write(
                &mut self.buf[len..len + t.len()],
                self.id_base | use_seq,
                wall,
            );
            len += t.len();
            if self.ack {
                let slot = &self.conn.slots[(use_seq & SLOT_MASK) as usize];
                if fresh {
                    slot.sent_ns.store(intended, Ordering::Relaxed);
                    slot.state.store((1 << 2) | class as u32, Ordering::Release);
                } else {
                    if !in_flight {
                        slot.sent_ns.store(intended, Ordering::Relaxed);
                    }
                    slot.state.fetch_add(1 << 2, Ordering::Release);
                }
            }
            if fresh {
                if class == 1 {
                    self.recent_tx[self.recent_at % RECENT] = self.seq;
                    self.recent_at += 1;
                }
                self.seq += 1;
            }
        }
        if let Err(e) = self.stream.write_all(&self.buf[..len]) {
            self.failed = Some(format!("send failed: {e}"));
            shared.errors.fetch_add(1, Ordering::Relaxed);
            self.done = true;
            return Step::Done;
        }
        self.send_lag
            .record(monotonic_ns().saturating_sub(first_intended));
        self.sent += n as u64;
        shared.sent.fetch_add(n as u64, Ordering::Relaxed);
        Step::Sent
    }

    /// Acks still expected.
    pub(super) fn missing(&self) -> u64 {
        self.conn
            .slots
            .iter()
            .map(|s| u64::from(s.state.load(Ordering::Acquire) >> 2))
            .sum()
    }
}

/// What a sending thread reports: events sent, acks missing at the end,
/// the first failure, and its writes' send lag.
type Driven = (u64, u64, Option<String>, Histogram);

/// Runs `senders` until each is done, sleeping until the earliest is due
/// (the last `spin_ns` of the wait spinning); then waits (at most 10 s) for
/// their acks.
pub(super) fn drive(mut senders: Vec<Sender>, shared: &Shared, spin_ns: u64) -> Driven {
    loop {
        let now = monotonic_ns();
        let mut next = u64::MAX;
        let mut busy = false;
        for s in senders.iter_mut() {
            match s.step(now, shared) {
                Step::Sent => busy = true,
                Step::Wait(at) => next = next.min(at),
                Step::Done => {}
            }
        }
        if busy {
            continue;
        }
        if next == u64::MAX {
            break;
        }
        let wait = next.saturating_sub(monotonic_ns());
        if wait > spin_ns {
            std::thread::sleep(Duration::from_nanos((wait - spin_ns).min(1_000_000)));
        } else {
            while monotonic_ns() < next {
                std::hint::spin_loop();
            }
        }
    }
    let ack = senders.iter().any(|s| s.ack);
    let wait_until = monotonic_ns() + 10_000_000_000;
    let mut missing = 0;
    if ack {
        loop {
            missing = senders.iter().map(Sender::missing).sum::<u64>();
            if missing == 0 || monotonic_ns() > wait_until {
                break;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
    let sent = senders.iter().map(|s| s.sent).sum();
    let failed = senders.iter_mut().find_map(|s| s.failed.take());
    let mut lag = Histogram::new();
    for s in &senders {
        let _ = s.stream.tcp().shutdown(std::net::Shutdown::Both);
        lag.merge(&s.send_lag);
    }
    (sent, missing, failed, lag)
}
