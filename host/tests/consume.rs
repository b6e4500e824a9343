//! Read sessions (PROTOCOL.md section 7) against a real server on
//! 127.0.0.1, through the client library's Consumer and raw frames:
//! everything stored comes back exactly as `inspect` lists it; filters,
//! range errors, malformed requests, commits across a kill -9, fencing,
//! many followers with credit, and visibility under `--fsync always`.

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use eventstream_client::{
    Class, Consumer, ConsumerOptions, Error, Event, Outcome, Priority, Producer, StartAt,
};
use eventstream_core::splitmix::SplitMix64;
use eventstream_core::wire::read::{
    ChunkHeader, ChunkKind, ReadRequest, SessionAnswer, SessionFrame, Start, CHUNK_HEADER_LEN,
    SESSION_ANSWER_LEN,
};
use eventstream_core::wire::Reason;

const PRIORITIES: [Priority; 5] = [
    Priority::Critical,
    Priority::High,
    Priority::Medium,
    Priority::Low,
    Priority::Batch,
];

/// (offset -> (event id, payload)) of every event in the log.
fn log_payloads(data: &Path) -> HashMap<u64, (u64, Vec<u8>)> {
    let mut out = HashMap::new();
    for seg in segments(data) {
        let bytes = std::fs::read(&seg).unwrap();
        let base: u64 = seg.file_stem().unwrap().to_str().unwrap().parse().unwrap();
        eventstream_host::storage::read_records(&bytes, base, |rec| {
            for (offset, f) in rec.frames() {
                out.insert(offset, (f.event_id(), f.payload().to_vec()));
            }
        })
        .unwrap();
    }
    out
}

/// Produces `n` events of every class (one in ten resends an earlier id);
/// returns how many were answered STORED.
fn produce(addr: std::net::SocketAddr, n: u64, seed: u64, topic_of: impl Fn(u64) -> String) -> u64 {
    let mut p = Producer::connect(addr).unwrap();
    let mut rng = SplitMix64(seed);
    let mut sent: Vec<(u64, Priority, String, Vec<u8>)> = Vec::new();
    let mut stored = 0;
    for i in 0..n {
        let (id, priority, topic, payload) = if i % 10 == 9 && !sent.is_empty() {
            sent[(rng.next_u64() % sent.len() as u64) as usize].clone()
        } else {
            let e = (
                rng.next_u64(),
                PRIORITIES[(i % 5) as usize],
                topic_of(i),
                format!("event {i} {}", "x".repeat((i % 200) as usize)).into_bytes(),
            );
            sent.push(e.clone());
            e
        };
        p.send(&Event {
            topic: &topic,
            partition: (i % 3) as u32,
            priority,
            id,
            payload: &payload,
        })
        .unwrap();
        for a in p.take_acked().unwrap() {
            stored += matches!(a.outcome, Outcome::Stored(_)) as u64;
        }
    }
    for a in p.flush().unwrap() {
        stored += matches!(a.outcome, Outcome::Stored(_)) as u64;
    }
    stored
}

fn opts(from: StartAt) -> ConsumerOptions {
    ConsumerOptions {
        from,
        ..ConsumerOptions::default()
    }
}

fn read_all(c: &mut Consumer) -> Vec<eventstream_client::Message> {
    let mut out = Vec::new();
    while let Some(m) = c.next().unwrap() {
        out.push(m);
    }
    out
}

#[test]
fn consuming_from_earliest_returns_exactly_what_inspect_lists() {
    let dir = TempDir::new("consume-all");
    let server = Server::start(&dir.data(), &["--batch-max-age", "5ms"]);
    let stored = produce(server.addr, 50_000, 11, |i| format!("t{}", i % 7));
    let listed = wait_for_events(&dir.data(), stored as usize);
    assert_eq!(listed.len() as u64, stored);
    let mut c = Consumer::connect(server.addr, opts(StartAt::Earliest)).unwrap();
    assert_eq!(c.info().start, 0);
    let got = read_all(&mut c);
    assert_eq!(got.len(), listed.len());
    let payloads = log_payloads(&dir.data());
    for (m, l) in got.iter().zip(&listed) {
        assert_eq!(m.offset, l.offset);
        assert_eq!(m.id, l.event_id);
        assert_eq!(String::from_utf8_lossy(&m.topic), l.topic);
        assert_eq!(format!("{:?}", m.class).to_lowercase(), l.class);
        assert_eq!(m.payload, payloads[&m.offset].1);
    }
    assert_eq!(c.position(), stored);
}
