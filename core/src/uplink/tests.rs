//! The uplink against a simulated link and server: the link drops bytes
//! while it is down and comes back as a new connection; the server reads
//! v1 frames only (legacy refused: a connection that starts mid-frame gets
//! FATAL BAD_MAGIC and is closed), stores each transactional id once and
//! acks every frame. The appliance also loses power mid-stream (a new
//! uplink over the log reopened from the same flash).

use std::collections::{HashMap, VecDeque};
use std::vec;
use std::vec::Vec;

use super::*;
use crate::flash::{FullPolicy, MemFlash};
use crate::record::{RecordBuilder, RecordKind};
use crate::wire::FrameRepr;
use crate::{Class, Priority};

const SECTOR: usize = 1024;
type Flash<'a> = MemFlash<'a, 4, SECTOR>;
type Link = Uplink<16, 4096, 512>;

/// The server's side: one connection at a time.
#[derive(Default)]
struct Server {
    /// Bytes of the current connection not yet decoded (None: no
    /// connection; bytes written are lost).
    conn: Option<Vec<u8>>,
    acks: VecDeque<u8>,
    /// Events stored: id -> times stored.
    stored: HashMap<u64, u32>,
    /// Transactional ids (stored once; later copies answered DUPLICATE).
    transactional: HashMap<u64, u64>,
    next_offset: u64,
    fatal: u32,
}

impl Server {
    fn connect(&mut self) {
        self.conn = Some(Vec::new());
    }

    fn cut(&mut self) {
        self.conn = None;
        self.acks.clear();
    }

    fn take(&mut self) {
        let Some(buf) = &mut self.conn else { return };
        loop {
            if buf.len() < 8 {
                return;
            }
            if buf[..4] != *b"ESC1" {
                // --legacy deny: not a v1 frame at a frame boundary.
                self.fatal += 1;
                self.acks.extend(Ack::fatal(Reason::BadMagic).encode());
                self.conn = None;
                return;
            }
            let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]) as usize;
            if buf.len() < len {
                return;
            }
            let frame: Vec<u8> = buf.drain(..len).collect();
            let f = Frame::check(&frame[..], wire::Check::Wire(wire::Limits::DEFAULT))
                .expect("a valid frame");
            assert!(f.ack_requested() && !f.is_legacy());
            let id = f.event_id();
            let ack = if matches!(f.priority(), Priority::Low | Priority::Medium) {
                match self.transactional.get(&id) {
                    Some(&o) => Ack {
                        status: Status::Duplicate,
                        reason: Reason::None,
                        event_id: id,
                        offset: o,
                    },
                    None => {
                        self.transactional.insert(id, self.next_offset);
                        *self.stored.entry(id).or_default() += 1;
                        self.next_offset += 1;
                        Ack::stored(id, self.next_offset - 1)
                    }
                }
            } else {
                *self.stored.entry(id).or_default() += 1;
                self.next_offset += 1;
                Ack::stored(id, self.next_offset - 1)
            };
            self.acks.extend(ack.encode());
        }
    }
}

/// The link as the appliance sees it: writes go to the server's current
/// connection (or nowhere), reads come from its acks, a few bytes at a
/// time.
struct SimLink<'s> {
    server: &'s mut Server,
    /// Bytes the link takes in this millisecond (a UART's pace): frames
    /// straddle polls, so the link can come back in the middle of one.
    budget: usize,
}

impl ByteLink for SimLink<'_> {
    fn write(&mut self, bytes: &[u8]) -> usize {
        let n = bytes.len().min(97).min(self.budget);
        self.budget -= n;
        if let Some(c) = &mut self.server.conn {
            c.extend_from_slice(&bytes[..n]);
            self.server.take();
        }
        n
    }

    fn read(&mut self, buf: &mut [u8]) -> usize {
        let n = buf.len().min(self.server.acks.len()).min(11);
        for b in buf.iter_mut().take(n) {
            *b = self.server.acks.pop_front().unwrap_or(0);
        }
        n
    }
}

fn priority(i: u64) -> Priority {
    Priority::ALL[(i % 5) as usize]
}

/// Appends up to `n` events (singles, and batch records of 4) from id
/// `first`; returns the next id (fewer if the log was full).
fn fill(log: &mut FlashLog<Flash<'_>, 32>, first: u64, n: u64) -> u64 {
    let mut buf = vec![0u8; 4096];
    let mut id = first;
    while id < first + n {
        let batch = id % 7 == 0 && id + 4 <= first + n;
        let (kind, class, k) = if batch {
            (RecordKind::Batch, Class::Batch, 4)
        } else if matches!(priority(id), Priority::Low | Priority::Medium) {
            (RecordKind::Single, Class::Transactional, 1)
        } else {
            (RecordKind::Single, Class::Realtime, 1)
        };
        let mut b = RecordBuilder::new(&mut buf, kind, class, 1).unwrap();
        for j in 0..k {
            let p = if batch { Priority::Batch } else { priority(id) };
            let repr = FrameRepr {
                priority: p,
                flags: 0,
                partition: 0,
                event_id: id + j,
                timestamp_ns: 0,
                topic: b"appliance",
                payload: &[7u8; 60],
            };
            let mut f = vec![0u8; repr.encoded_len()];
            repr.encode(&mut f).unwrap();
            b.push(&f).unwrap();
        }
        let r = b.finish(log.next_offset()).unwrap().to_vec();
        match log.append(&r) {
            Ok(_) => id += k,
            // The ring is full until the uplink delivers: try later.
            Err(crate::flash::FlashLogError::Full) => return id,
            Err(e) => panic!("{e:?}"),
        }
    }
    id
}

const CFG: UplinkConfig = UplinkConfig {
    max_in_flight: 16,
    ack_timeout_ms: 50,
    quiet_ms: 20,
    legacy_id_base: 0,
};

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn every_event_arrives_once_or_is_counted_through_cuts_and_power_losses() {
    let mut mem = vec![0xFFu8; SECTOR * 24];
    let mut server = Server::default();
    let total = 600u64;
    let mut now = 0u64;
    let mut rng = 0x2545_f491_4f6c_dd1du64;
    let mut rand = move || {
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        rng
    };
    let mut produced = 1u64;
    let mut power_cuts = 0;
    let mut link_cuts = 0;
    let mut resent = 0u64;
    // Each "boot" runs until a power cut (or the end).
    'boot: for boot in 0..6 {
        let mut buf = vec![0u8; 4096];
        let mut log: FlashLog<Flash<'_>, 32> =
            FlashLog::open(Flash::new(&mut mem), FullPolicy::StopAccepting, &mut buf).unwrap();
        let mut up: Link = Uplink::new(CFG);
        server.connect();
        let mut down_until = 0;
        for _ in 0..20_000 {
            now += 1;
            if produced <= total && rand() % 4 == 0 {
                produced = fill(&mut log, produced, 5.min(total + 1 - produced));
            }
            let r = rand() % 1000;
            if server.conn.is_some() && r < 3 {
                // The socket goes down (QEMU reconnects later).
                server.cut();
                link_cuts += 1;
                down_until = now + 1 + rand() % 40;
            } else if server.conn.is_none() && now >= down_until {
                server.connect();
            }
            let fatal = server.fatal;
            let mut link = SimLink {
                server: &mut server,
                budget: 40,
            };
            up.poll(&mut log, &mut link, now).unwrap();
            if server.fatal > fatal {
                // Closed after its FATAL; the link comes back a little
                // later (QEMU's reconnect).
                down_until = now + 5;
            }
            if boot < 5 && r == 999 && up.stats().sent > 50 {
                power_cuts += 1;
                resent += up.stats().resent;
                continue 'boot;
            }
            if produced > total && up.delivered() == log.next_offset() {
                resent += up.stats().resent;
                break 'boot;
            }
        }
        panic!(
            "not delivered: {:?}, {} of {}",
            up.stats(),
            up.delivered(),
            log.next_offset()
        );
    }
    std::println!(
        "{link_cuts} link cuts, {power_cuts} power cuts, {} connections closed for starting mid-frame, {resent} frames sent again",
        server.fatal
    );
    assert!(
        link_cuts > 3 && power_cuts >= 1,
        "{link_cuts} link cuts, {power_cuts} power cuts"
    );
    assert!(server.fatal > 0, "no connection began mid-frame");
    // Every event arrived; transactional ones exactly once.
    for id in 1..=total {
        let n = server.stored.get(&id).copied().unwrap_or(0);
        assert!(n >= 1, "event {id} never stored");
        if server.transactional.contains_key(&id) {
            assert_eq!(n, 1, "transactional {id} stored {n} times");
        }
    }
    let repeats: u64 = server.stored.values().map(|&n| u64::from(n) - 1).sum();
    assert!(
        repeats <= resent + 16 * 6,
        "repeats {repeats}, resent {resent}"
    );
    // Delivered sectors were retired: a reopened log has nothing to send.
    let mut buf = vec![0u8; 4096];
    let mut log: FlashLog<Flash<'_>, 32> =
        FlashLog::open(Flash::new(&mut mem), FullPolicy::StopAccepting, &mut buf).unwrap();
    let mut left = 0;
    if let Some(mut c) = log.first() {
        while let Some(r) = log.next_record(&mut c, &mut buf).unwrap() {
            left += u64::from(r.count());
        }
    }
    assert!(left < 60, "{left} events left undelivered in the log");
}

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn a_refusal_for_good_is_passed_and_a_retryable_one_sends_again() {
    let mut mem = vec![0xFFu8; SECTOR * 4];
    let mut buf = vec![0u8; 4096];
    let mut log: FlashLog<Flash<'_>, 32> =
        FlashLog::open(Flash::new(&mut mem), FullPolicy::StopAccepting, &mut buf).unwrap();
    fill(&mut log, 1, 6);
    let mut up: Link = Uplink::new(CFG);
    // A link that answers by hand.
    struct Manual {
        written: Vec<u8>,
        acks: VecDeque<u8>,
    }
    impl ByteLink for Manual {
        fn write(&mut self, b: &[u8]) -> usize {
            self.written.extend_from_slice(b);
            b.len()
        }
        fn read(&mut self, buf: &mut [u8]) -> usize {
            let n = buf.len().min(self.acks.len());
            for x in buf.iter_mut().take(n) {
                *x = self.acks.pop_front().unwrap();
            }
            n
        }
    }
    let mut m = Manual {
        written: Vec::new(),
        acks: VecDeque::new(),
    };
    up.poll(&mut log, &mut m, 1).unwrap();
    assert_eq!(up.in_flight(), 6);
    // 1 refused for good (BAD_TOPIC), 2 BAD_CRC (damaged on the link:
    // retry from it, as for OVERLOADED), others stored.
    m.acks.extend(Ack::rejected(1, Reason::BadTopic).encode());
    m.acks.extend(Ack::rejected(2, Reason::BadCrc).encode());
    up.poll(&mut log, &mut m, 2).unwrap();
    assert_eq!(up.stats().refused, 1);
    // Quiet, then everything from 2 again.
    m.written.clear();
    up.poll(&mut log, &mut m, 2 + CFG.quiet_ms).unwrap();
    assert_eq!(up.stats().restarts, 1);
    let ids: Vec<u64> = {
        let mut v = Vec::new();
        let mut at = 0;
        while at < m.written.len() {
            let len = wire::declared_length(&m.written[at..]).unwrap() as usize;
            let f = Frame::check(
                &m.written[at..at + len],
                wire::Check::Wire(wire::Limits::DEFAULT),
            )
            .unwrap();
            v.push(f.event_id());
            at += len;
        }
        v
    };
    assert_eq!(ids, vec![2, 3, 4, 5, 6]);
    for id in 2..=6 {
        m.acks.extend(Ack::stored(id, id).encode());
    }
    up.poll(&mut log, &mut m, 100).unwrap();
    assert_eq!(up.delivered(), log.next_offset());
    assert_eq!(up.stats().resent, 5);
}

#[test]
#[cfg_attr(miri, ignore = "no unsafe code; thousands of steps")]
fn a_stored_legacy_event_goes_out_as_v1_with_an_id_of_its_appliance() {
    let mut mem = vec![0xFFu8; SECTOR * 4];
    let mut buf = vec![0u8; 4096];
    let mut log: FlashLog<Flash<'_>, 32> =
        FlashLog::open(Flash::new(&mut mem), FullPolicy::StopAccepting, &mut buf).unwrap();
    fill(&mut log, 1, 3);
    // A legacy event, as the pipeline stores it (LEGACY flag, its id from
    // the offset).
    let offset = log.next_offset();
    let repr = FrameRepr {
        priority: Priority::Medium,
        flags: crate::wire::FLAG_LEGACY,
        partition: 0,
        event_id: crate::wire::LEGACY_ID_BASE + offset,
        timestamp_ns: 0,
        topic: b"legacy",
        payload: b"old",
    };
    let mut f = vec![0u8; repr.encoded_len()];
    repr.encode(&mut f).unwrap();
    let mut b = RecordBuilder::new(&mut buf, RecordKind::Single, Class::Transactional, 1).unwrap();
    b.push(&f).unwrap();
    let r = b.finish(offset).unwrap().to_vec();
    log.append(&r).unwrap();
    let base = (1u64 << 63) | (7 << 40);
    let mut up: Link = Uplink::new(UplinkConfig {
        legacy_id_base: base,
        ..CFG
    });
    let mut server = Server::default();
    server.connect();
    up.poll(
        &mut log,
        &mut SimLink {
            server: &mut server,
            budget: usize::MAX,
        },
        1,
    )
    .unwrap();
    for now in 2..10 {
        up.poll(
            &mut log,
            &mut SimLink {
                server: &mut server,
                budget: usize::MAX,
            },
            now,
        )
        .unwrap();
    }
    assert_eq!(up.delivered(), log.next_offset());
    // The server got a plain v1 frame (checked as a producer's), its id
    // the appliance's.
    assert!(
        server.transactional.contains_key(&(base | offset)),
        "{:?}",
        server.stored
    );
    assert!(!server
        .stored
        .contains_key(&(crate::wire::LEGACY_ID_BASE + offset)));
}
