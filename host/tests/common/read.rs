//! Helpers of the read-session tests: producing a mix of events through
//! the client library, Consumer options, and raw read sessions.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use eventstream_client::{
    Consumer, ConsumerOptions, Event, Message, Outcome, Priority, Producer, StartAt,
};
use eventstream_core::splitmix::SplitMix64;
use eventstream_core::wire::read::{
    ChunkHeader, ChunkKind, ClassSet, ReadRequest, SessionAnswer, SessionFrame, Start,
    CHUNK_HEADER_LEN, SESSION_ANSWER_LEN,
};
use eventstream_core::wire::Reason;

use super::PRIORITIES;

/// Produces `n` events of every class (one in ten resends an earlier id);
/// returns how many were answered STORED.
pub fn produce(addr: SocketAddr, n: u64, seed: u64, topic_of: impl Fn(u64) -> String) -> u64 {
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

pub fn opts(from: StartAt) -> ConsumerOptions {
    ConsumerOptions {
        from,
        ..ConsumerOptions::default()
    }
}

pub fn read_all(c: &mut Consumer) -> Vec<Message> {
    let mut out = Vec::new();
    while let Some(m) = c.next().unwrap() {
        out.push(m);
    }
    out
}

/// A raw read session: the request's bytes sent, the answer read.
pub fn raw_session(addr: SocketAddr, req: &[u8]) -> (TcpStream, SessionAnswer) {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(req).unwrap();
    let mut a = [0u8; SESSION_ANSWER_LEN];
    s.read_exact(&mut a).unwrap();
    (s, SessionAnswer::decode(&a).unwrap())
}

pub fn request(r: &ReadRequest<'_>) -> Vec<u8> {
    let mut b = vec![0u8; r.encoded_len()];
    r.encode(&mut b).unwrap();
    b
}

/// A following session from the earliest offset, granted no credit yet.
pub fn follower_without_credit(addr: SocketAddr) -> (TcpStream, SessionAnswer) {
    raw_session(
        addr,
        &request(&ReadRequest {
            follow: true,
            credit: 0,
            ..base_request()
        }),
    )
}

pub fn base_request() -> ReadRequest<'static> {
    ReadRequest {
        start: Start::Earliest,
        follow: false,
        classes: ClassSet::ALL,
        offset: 0,
        credit: 1 << 20,
        group: b"",
        prefix: b"",
    }
}

/// Reads chunks until CLOSING; returns the record chunks' (a, b) and the
/// CLOSING's reason, granting `grant` bytes first.
pub fn read_until_closing(s: &mut TcpStream, grant: u32) -> (Vec<(u64, u64)>, Reason) {
    if grant > 0 {
        let mut b = [0u8; 16];
        SessionFrame::Credit(grant).encode(&mut b).unwrap();
        s.write_all(&b).unwrap();
    }
    let mut runs = Vec::new();
    loop {
        let mut h = [0u8; CHUNK_HEADER_LEN];
        s.read_exact(&mut h).unwrap();
        let h = ChunkHeader::decode(&h).unwrap();
        match h.kind {
            ChunkKind::Records => {
                let mut body = vec![0u8; h.bytes as usize];
                s.read_exact(&mut body).unwrap();
                runs.push((h.a, h.b));
            }
            ChunkKind::Closing => return (runs, h.reason),
            _ => {}
        }
    }
}

/// Waits until retention moved the first retained offset past `n`;
/// returns it.
pub fn log_start_past(server: &super::Server, n: u64) -> u64 {
    let past = super::settles(1.0, || {
        (server.metric("eventstream_log_start_offset") > n as f64) as u8 as f64
    });
    assert_eq!(
        past, 1.0,
        "retention did not delete segments past offset {n}"
    );
    server.metric("eventstream_log_start_offset") as u64
}
