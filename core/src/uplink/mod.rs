//! The appliance's uplink: the flash log's events, oldest first, to an
//! `eventstream serve` over any byte stream ([`ByteLink`]: a UART, a
//! socket), as v1 frames with ACK (PROTOCOL.md sections 2 and 3).
//!
//! An event is delivered when its ack says STORED or DUPLICATE; the log
//! retires a sector once every event in it is delivered. A byte link has
//! no connect or close events, and bytes written while it is down are
//! lost, so a dead link is known by its silence: when the oldest event in
//! flight has had no ack for `ack_timeout_ms`, the uplink drops what is in
//! flight, goes quiet for `quiet_ms` (reading and dropping whatever
//! arrives, so a half-sent frame's connection is closed by the server and
//! the next one starts clean), and starts again at a frame boundary with
//! the oldest undelivered event, with the same ids. A retryable refusal
//! (OVERLOADED, SHUTTING_DOWN, STORAGE_FAILED, DEDUP_FULL), a FATAL or a
//! bad ack does the same. The server's dedup makes transactional events
//! exactly once; realtime and batch events are at least once, and their
//! repeats are counted ([`UplinkStats::resent`]). Other refusals (a frame
//! the server will never take) are counted and the event is passed.

use embedded_storage::nor_flash::NorFlash;

use crate::flash::{Cursor, FlashLog, FlashLogError};
use crate::record::RECORD_HEADER_LEN;
use crate::wire::{self, Ack, Frame, Reason, Status, ACK_LEN, FLAG_ACK};

/// A byte stream, non-blocking both ways.
pub trait ByteLink {
    /// Writes some of `bytes`; returns how many it took (0: none now).
    fn write(&mut self, bytes: &[u8]) -> usize;
    /// Reads what has arrived into `buf`; returns how many (0: none now).
    fn read(&mut self, buf: &mut [u8]) -> usize;
}

/// The uplink's timing and window.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UplinkConfig {
    /// Events sent and not yet acked at most (at most the `WINDOW`).
    pub max_in_flight: usize,
    /// Silence after which the link counts as dead.
    pub ack_timeout_ms: u64,
    /// How long it stays quiet before it starts again.
    pub quiet_ms: u64,
    /// The ids legacy events go out with: this base ORed with the
    /// event's log offset (low 40 bits), so that several appliances'
    /// legacy events do not share ids at the server (the pipeline gives
    /// them `LEGACY_ID_BASE + offset`, which every log repeats). 0: the
    /// stored id.
    pub legacy_id_base: u64,
}

/// What the uplink has done.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "defmt", derive(defmt::Format))]
pub struct UplinkStats {
    /// Frames written whole (repeats included).
    pub sent: u64,
    /// Frames written again after a restart (their event sent before).
    pub resent: u64,
    /// Bytes written.
    pub bytes: u64,
    /// Acks STORED.
    pub stored: u64,
    /// Acks DUPLICATE (a repeat the server had).
    pub duplicates: u64,
    /// Events the server refused for good (passed, not retried).
    pub refused: u64,
    /// Ack timeouts (a dead or stalled link).
    pub timeouts: u64,
    /// Starts after a quiet period (timeouts, retryable refusals, FATAL).
    pub restarts: u64,
}

#[derive(Clone, Copy)]
struct Flight {
    id: u64,
    offset: u64,
    done: bool,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Phase {
    Sending,
    Quiet { until_ms: u64 },
}

/// The uplink: `WINDOW` events in flight at most, `REC` bytes for the
/// record being sent (the largest record the log holds), `FRAME` for one
/// frame.
pub struct Uplink<const WINDOW: usize, const REC: usize, const FRAME: usize> {
    cfg: UplinkConfig,
    phase: Phase,
    cursor: Option<Cursor>,
    rec: [u8; REC],
    rec_len: usize,
    /// The next frame's position in `rec`, and its event's offset.
    rec_pos: usize,
    rec_offset: u64,
    out: [u8; FRAME],
    out_len: usize,
    out_pos: usize,
    out_flight: Option<Flight>,
    flights: heapless::Deque<Flight, WINDOW>,
    ack: [u8; ACK_LEN],
    ack_len: usize,
    /// Everything below is delivered.
    delivered: u64,
    /// Events below were sent at least once.
    high_water: u64,
    /// When the oldest event in flight was sent, or the last ack came.
    waiting_since: u64,
    stats: UplinkStats,
}

impl<const WINDOW: usize, const REC: usize, const FRAME: usize> Uplink<WINDOW, REC, FRAME> {
    /// An uplink that starts at the log's oldest undelivered event.
    pub const fn new(cfg: UplinkConfig) -> Self {
        Uplink {
            cfg,
            phase: Phase::Quiet { until_ms: 0 },
            cursor: None,
            rec: [0; REC],
            rec_len: 0,
            rec_pos: 0,
            rec_offset: 0,
            out: [0; FRAME],
            out_len: 0,
            out_pos: 0,
            out_flight: None,
            flights: heapless::Deque::new(),
            ack: [0; ACK_LEN],
            ack_len: 0,
            delivered: 0,
            high_water: 0,
            waiting_since: 0,
            stats: UplinkStats {
                sent: 0,
                resent: 0,
                bytes: 0,
                stored: 0,
                duplicates: 0,
                refused: 0,
                timeouts: 0,
                restarts: 0,
            },
        }
    }

    /// What it has done.
    pub fn stats(&self) -> UplinkStats {
        self.stats
    }

    /// Every event below this offset is delivered.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// Events sent and not yet answered.
    pub fn in_flight(&self) -> usize {
        self.flights.len()
    }

    /// Does what can be done now: reads acks, writes frames, notices a
    /// silent link; `now_ms` is a monotonic clock. Retires delivered
    /// sectors in `log`. An error is the flash's.
    pub fn poll<F: NorFlash, const S: usize>(
        &mut self,
        log: &mut FlashLog<F, S>,
        link: &mut impl ByteLink,
        now_ms: u64,
    ) -> Result<(), FlashLogError<F::Error>> {
        if let Phase::Quiet { until_ms } = self.phase {
            // A frame half-written when the uplink went quiet is finished
            // (not counted in flight), so that a link that stayed up sees
            // whole frames; a dead link loses it anyway.
            while self.out_pos < self.out_len {
                let n = link
                    .write(&self.out[self.out_pos..self.out_len])
                    .min(self.out_len - self.out_pos);
                if n == 0 {
                    break;
                }
                self.out_pos += n;
                self.stats.bytes += n as u64;
            }
            // Drop whatever arrives (a bounded amount per poll); start
            // again once the time is up.
            let mut sink = [0u8; 64];
            for _ in 0..64 {
                if link.read(&mut sink) == 0 {
                    break;
                }
            }
            if now_ms < until_ms {
                return Ok(());
            }
            self.restart(log)?;
            self.phase = Phase::Sending;
            self.waiting_since = now_ms;
        }
        self.read_acks(link, now_ms);
        if self.phase != Phase::Sending {
            return Ok(());
        }
        self.advance();
        if self.flights.is_empty() && self.out_flight.is_none() && self.rec_offset > self.delivered
        {
            // Everything sent is answered (refusals passed included).
            self.delivered = self.rec_offset;
        }
        log.delivered_below(self.delivered)?;
        self.send(log, link, now_ms)?;
        let silent = now_ms.saturating_sub(self.waiting_since) >= self.cfg.ack_timeout_ms;
        if !self.flights.is_empty() && silent {
            self.stats.timeouts += 1;
            self.go_quiet(now_ms);
        }
        Ok(())
    }

    /// Back to the oldest undelivered event.
    fn restart<F: NorFlash, const S: usize>(
        &mut self,
        log: &mut FlashLog<F, S>,
    ) -> Result<(), FlashLogError<F::Error>> {
        self.flights.clear();
        self.out_len = 0;
        self.out_pos = 0;
        self.out_flight = None;
        self.ack_len = 0;
        self.rec_len = 0;
        self.rec_pos = 0;
        self.cursor = log.seek(self.delivered, &mut self.rec)?;
        self.rec_offset = self.cursor.map_or(log.next_offset(), |c| c.offset);
        if self.stats.sent > 0 {
            self.stats.restarts += 1;
        }
        Ok(())
    }

    /// Moves the delivered point past the answered events at the front.
    fn advance(&mut self) {
        while let Some(f) = self.flights.front() {
            if !f.done {
                break;
            }
            self.delivered = f.offset.saturating_add(1);
            self.flights.pop_front();
        }
    }

    fn go_quiet(&mut self, now_ms: u64) {
        self.advance();
        self.out_flight = None;
        self.phase = Phase::Quiet {
            until_ms: now_ms.saturating_add(self.cfg.quiet_ms),
        };
    }

    fn read_acks(&mut self, link: &mut impl ByteLink, now_ms: u64) {
        // At most a window's acks and a few more per poll.
        for _ in 0..(4 * WINDOW + 64) {
            let room = ACK_LEN - self.ack_len;
            let n = link.read(&mut self.ack[self.ack_len..]).min(room);
            if n == 0 {
                return;
            }
            self.ack_len += n;
            if self.ack_len < ACK_LEN {
                continue;
            }
            self.ack_len = 0;
            let Ok(ack) = Ack::decode(&self.ack) else {
                // Not an ack: the stream is out of step.
                self.go_quiet(now_ms);
                return;
            };
            if !self.take_ack(&ack, now_ms) {
                self.go_quiet(now_ms);
                return;
            }
        }
    }

    /// Matches an ack to its event; false if the uplink must start again.
    fn take_ack(&mut self, ack: &Ack, now_ms: u64) -> bool {
        let retry = match ack.status {
            Status::Stored => {
                self.stats.stored += 1;
                false
            }
            Status::Duplicate => {
                self.stats.duplicates += 1;
                false
            }
            // BAD_CRC: the uplink seals every frame anew, so a bad CRC is
            // damage on the link; sent again like the refusals of the
            // moment.
            Status::Rejected => matches!(
                ack.reason,
                Reason::BadCrc
                    | Reason::Overloaded
                    | Reason::ShuttingDown
                    | Reason::StorageFailed
                    | Reason::DedupFull
            ),
            Status::Fatal => return false,
        };
        if retry {
            return false;
        }
        if ack.status == Status::Rejected {
            self.stats.refused += 1;
        }
        if let Some(f) = self
            .flights
            .iter_mut()
            .find(|f| !f.done && f.id == ack.event_id)
        {
            f.done = true;
            self.waiting_since = now_ms;
        }
        true
    }

    /// Writes frames while the window and the link allow.
    fn send<F: NorFlash, const S: usize>(
        &mut self,
        log: &mut FlashLog<F, S>,
        link: &mut impl ByteLink,
        now_ms: u64,
    ) -> Result<(), FlashLogError<F::Error>> {
        loop {
            if self.out_pos < self.out_len {
                let n = link
                    .write(&self.out[self.out_pos..self.out_len])
                    .min(self.out_len - self.out_pos);
                if n == 0 {
                    return Ok(());
                }
                self.out_pos += n;
                self.stats.bytes += n as u64;
                if self.out_pos < self.out_len {
                    return Ok(());
                }
                if let Some(f) = self.out_flight.take() {
                    if self.flights.is_empty() {
                        self.waiting_since = now_ms;
                    }
                    if f.offset < self.high_water {
                        self.stats.resent += 1;
                    }
                    self.high_water = self.high_water.max(f.offset.saturating_add(1));
                    self.stats.sent += 1;
                    // Room was checked before the frame was made.
                    let _ = self.flights.push_back(f);
                }
            }
            if self.flights.len() >= self.cfg.max_in_flight.min(WINDOW) {
                return Ok(());
            }
            if !self.next_frame(log)? {
                return Ok(());
            }
        }
    }

    /// Puts the next event's frame (flags: ACK) in `out`; false if there
    /// is none yet.
    fn next_frame<F: NorFlash, const S: usize>(
        &mut self,
        log: &mut FlashLog<F, S>,
    ) -> Result<bool, FlashLogError<F::Error>> {
        loop {
            if self.rec_pos < self.rec_len {
                let at = self.rec_pos;
                let len = wire::declared_length(&self.rec[at..self.rec_len]).unwrap_or(0) as usize;
                let offset = self.rec_offset;
                self.rec_pos += len.max(1);
                self.rec_offset = self.rec_offset.saturating_add(1);
                if offset < self.delivered {
                    // Below the delivered point: a restart's cursor starts
                    // at the record that holds it.
                    continue;
                }
                let Some(src) = self.rec.get(at..at + len) else {
                    continue;
                };
                let Some(dst) = self.out.get_mut(..len) else {
                    // A frame larger than FRAME: refused for good.
                    self.stats.refused += 1;
                    continue;
                };
                dst.copy_from_slice(src);
                let Ok(head) = Frame::check(&*dst, wire::Check::Stored).map(|f| f.head()) else {
                    self.stats.refused += 1;
                    continue;
                };
                let mut f = Frame::with_head(&mut *dst, head);
                if f.is_legacy() && self.cfg.legacy_id_base != 0 {
                    f.set_event_id(self.cfg.legacy_id_base | (offset & ((1 << 40) - 1)));
                }
                f.set_flags(FLAG_ACK);
                f.fill_crc();
                let id = f.event_id();
                self.out_len = len;
                self.out_pos = 0;
                self.out_flight = Some(Flight {
                    id,
                    offset,
                    done: false,
                });
                return Ok(true);
            }
            // The next record.
            let Some(mut cur) = self.cursor.or_else(|| log.first()) else {
                return Ok(false);
            };
            let Some((size, offset)) = log
                .next_record(&mut cur, &mut self.rec)?
                .map(|r| (r.size(), r.offset()))
            else {
                self.cursor = Some(cur);
                return Ok(false);
            };
            self.cursor = Some(cur);
            self.rec_len = size;
            self.rec_pos = RECORD_HEADER_LEN;
            self.rec_offset = offset;
        }
    }
}

#[cfg(test)]
mod tests;
