//! The client library's Producer and `eventstream produce` against a real
//! server on 127.0.0.1: outcomes match the log, resent transactional ids
//! are answered with their original's offset, a broken connection is made
//! again with nothing lost or stored twice, and the command's exit status
//! says whether everything was stored.

mod common;

use std::collections::HashMap;

use common::*;
use eventstream_client::{Event, Options, Outcome, Priority, Producer};
use eventstream_core::splitmix::SplitMix64;

#[test]
fn outcomes_match_the_log_and_resent_transactional_ids_are_duplicates() {
    let dir = TempDir::new("produce-lib");
    let server = Server::start(&dir.data(), &["--batch-max-age", "5ms"]);
    let mut p = Producer::connect(server.addr).unwrap();
    let mut rng = SplitMix64(7);
    let mut sent: Vec<(u64, Priority, Vec<u8>)> = Vec::new();
    let mut stored: HashMap<u64, u64> = HashMap::new();
    let mut outcomes = Vec::new();
    for i in 0..15_000u64 {
        // One event in ten resends an id sent (and acked) before.
        let (id, priority, payload) = if i % 10 == 9 && !stored.is_empty() {
            let (id, pr, pl) = sent[(rng.next_u64() % sent.len() as u64) as usize].clone();
            outcomes.extend(p.flush().unwrap());
            (id, pr, pl)
        } else {
            let pr = PRIORITIES[(i % 5) as usize];
            (rng.next_u64(), pr, format!("event {i}").into_bytes())
        };
        p.send(&Event {
            topic: "orders/eu",
            partition: (i % 3) as u32,
            priority,
            id,
            payload: &payload,
        })
        .unwrap();
        sent.push((id, priority, payload));
        for a in p.take_acked().unwrap() {
            if let Outcome::Stored(o) = a.outcome {
                stored.entry(a.id).or_insert(o);
            }
            outcomes.push(a);
        }
    }
    outcomes.extend(p.flush().unwrap());
    assert_eq!(outcomes.len(), sent.len());
    let log = log_events(&dir.data());
    let mut stored_count = 0;
    for a in &outcomes {
        match a.outcome {
            Outcome::Stored(o) => {
                stored_count += 1;
                assert_eq!(log[&o].0, a.id, "offset {o}");
            }
            Outcome::Duplicate(o) => assert_eq!(log[&o].0, a.id, "duplicate of offset {o}"),
            Outcome::Rejected(r) => panic!("id {} rejected {}", a.id, r.name()),
        }
    }
    // Exactly the stored events are in the log.
    assert_eq!(stored_count, log.len());
    // A resent transactional id is always a duplicate of its first offset.
    let first: HashMap<u64, u64> = outcomes
        .iter()
        .filter_map(|a| match a.outcome {
            Outcome::Stored(o) => Some((a.id, o)),
            _ => None,
        })
        .fold(HashMap::new(), |mut m, (id, o)| {
            m.entry(id).or_insert(o);
            m
        });
    let tx_ids: std::collections::HashSet<u64> = sent
        .iter()
        .filter(|(_, pr, _)| matches!(pr, Priority::Medium | Priority::Low))
        .map(|(id, _, _)| *id)
        .collect();
    let mut dups = 0;
    let mut stored_tx: HashMap<u64, u32> = HashMap::new();
    for a in outcomes.iter().filter(|a| tx_ids.contains(&a.id)) {
        match a.outcome {
            Outcome::Duplicate(o) => {
                dups += 1;
                assert_eq!(first[&a.id], o, "id {}", a.id);
            }
            Outcome::Stored(_) => *stored_tx.entry(a.id).or_default() += 1,
            Outcome::Rejected(_) => {}
        }
    }
    assert!(dups > 200, "{dups} transactional duplicates");
    assert!(
        stored_tx.values().all(|&n| n == 1),
        "a transactional id stored twice"
    );
}

/// A free port on 127.0.0.1, for a server that must come back on it.
fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn a_broken_connection_is_made_again_and_transactional_events_are_stored_once() {
    let dir = TempDir::new("produce-reconnect");
    let listen = format!("127.0.0.1:{}", free_port());
    let server = Server::start(&dir.data(), &["--listen", &listen]);
    let mut p = Producer::with_options(
        listen.as_str(),
        Options {
            max_in_flight: 256,
            ..Options::default()
        },
    )
    .unwrap();
    let n = 20_000u64;
    let mut outcomes = Vec::new();
    let mut server = Some(server);
    for id in 1..=n {
        p.send(&Event {
            topic: "payments",
            partition: 0,
            priority: Priority::Medium,
            id,
            payload: b"x",
        })
        .unwrap();
        outcomes.extend(p.take_acked().unwrap());
        if id == n / 2 {
            // The server dies with events in flight and comes back.
            server.take().unwrap().kill();
            server = Some(Server::start(&dir.data(), &["--listen", &listen]));
        }
    }
    outcomes.extend(p.flush().unwrap());
    assert!(p.reconnects() >= 1);
    assert_eq!(outcomes.len() as u64, n);
    let log = log_events(&dir.data());
    let mut ids: Vec<u64> = log.values().map(|(id, _)| *id).collect();
    ids.sort_unstable();
    assert_eq!(
        ids,
        (1..=n).collect::<Vec<_>>(),
        "every id stored exactly once"
    );
    for a in outcomes {
        match a.outcome {
            Outcome::Stored(o) | Outcome::Duplicate(o) => assert_eq!(log[&o].0, a.id),
            Outcome::Rejected(r) => panic!("id {} rejected {}", a.id, r.name()),
        }
    }
    drop(server);
}

fn produce(addr: &str, args: &[&str], input: &[u8]) -> (bool, String) {
    let (ok, _, err) = run_bin(&[&["produce", "--target", addr][..], args].concat(), input);
    (ok, err)
}

#[test]
fn the_produce_command_stores_each_line_and_says_what_happened() {
    let dir = TempDir::new("produce-cmd");
    let server = Server::start(&dir.data(), &[]);
    let addr = server.addr.to_string();
    let mut input = Vec::new();
    for i in 0..100 {
        input.extend_from_slice(format!("line {i}\n").as_bytes());
    }
    input.extend_from_slice(b"\xff\xfe not UTF-8\n");
    let args = [
        "--topic",
        "cli/lines",
        "--id",
        "line-number",
        "--id-base",
        "500",
    ];
    let (ok, err) = produce(&addr, &args, &input);
    assert!(ok, "{err}");
    assert!(
        err.contains("101 sent: 101 stored, 0 duplicate, 0 rejected"),
        "{err}"
    );
    let log = log_events(&dir.data());
    let by_id: HashMap<u64, Vec<u8>> = log.values().cloned().collect();
    for (n, line) in input
        .split(|&b| b == b'\n')
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        assert_eq!(by_id[&(500 + n as u64 + 1)], line, "line {}", n + 1);
    }
    // The same lines and base again: every id is a duplicate, nothing new.
    let (ok, err) = produce(&addr, &args, &input);
    assert!(ok, "{err}");
    assert!(
        err.contains("101 sent: 0 stored, 101 duplicate, 0 rejected"),
        "{err}"
    );
    assert_eq!(log_events(&dir.data()).len(), 101);
    // A topic the server refuses (over its --max-topic): non-zero exit.
    let long = "t".repeat(200);
    let (ok, err) = produce(&addr, &["--topic", &long], b"a\nb\n");
    assert!(!ok, "{err}");
    assert!(err.contains("rejected: BAD_TOPIC"), "{err}");
}
