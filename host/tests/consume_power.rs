//! Read sessions across power cuts, simulated on the FUSE file system of
//! tests/lazyfs (writes are kept in memory until an fsync makes them
//! durable; a cut throws the rest away):
//!
//! - under `--fsync always`, every event a follower received is still in
//!   the log after the cut (a reader sees an event only once its STORED
//!   ack could have been sent, i.e. once an fsync covered it);
//! - a COMMITTED commit survives a cut under the default policy, which
//!   means the server made the log durable up to the commit itself.
//!
//! Needs root and /dev/fuse (CI runs as root); elsewhere it says so and
//! passes without running.

mod common;
mod lazyfs;

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use common::*;
use eventstream_client::{Consumer, ConsumerOptions, Event, Options, Priority, Producer, StartAt};
use lazyfs::rig::{can_mount, Rig};

/// Sends bursts of 32 transactional events, 5 ms apart, until the server
/// dies or `stop`.
fn produce(addr: std::net::SocketAddr, base: u64, stop: Arc<AtomicBool>) {
    let opts = Options {
        reconnect: false,
        ..Options::default()
    };
    let Ok(mut p) = Producer::with_options(addr, opts) else {
        return;
    };
    let mut id = base;
    while !stop.load(Ordering::Relaxed) {
        for _ in 0..32 {
            id += 1;
            let ev = Event {
                topic: "power/read",
                partition: 0,
                priority: Priority::Medium,
                id,
                payload: b"seen before the cut?",
            };
            if p.send(&ev).is_err() {
                return;
            }
        }
        if p.take_acked().is_err() {
            return;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn under_fsync_always_a_follower_sees_only_what_survives_a_power_cut() {
    if !can_mount() {
        return;
    }
    let mut rig = Rig::new("read-power");
    let flags = ["--fsync", "always", "--segment-bytes", "256KiB"];
    let mut seen: HashMap<u64, u64> = HashMap::new();
    for cut in 0..6u64 {
        let server = Server::start(&rig.data(), &flags);
        let stop = Arc::new(AtomicBool::new(false));
        let addr = server.addr;
        let follower = std::thread::spawn(move || {
            let mut got = Vec::new();
            let Ok(mut c) = Consumer::connect(
                addr,
                ConsumerOptions {
                    from: StartAt::Latest,
                    follow: true,
                    ..ConsumerOptions::default()
                },
            ) else {
                return got;
            };
            while let Ok(Some(m)) = c.next() {
                got.push((m.offset, m.id));
            }
            got
        });
        let producer = {
            let stop = stop.clone();
            std::thread::spawn(move || produce(addr, (cut + 1) << 40, stop))
        };
        std::thread::sleep(Duration::from_millis(400));
        rig.cut(server);
        stop.store(true, Ordering::Relaxed);
        producer.join().unwrap();
        let got = follower.join().unwrap();
        assert!(!got.is_empty(), "cut {cut}: the follower saw nothing");
        seen.extend(got);
    }
    let log: HashMap<u64, u64> = inspect_events(&rig.data())
        .iter()
        .map(|e| (e.offset, e.event_id))
        .collect();
    for (offset, id) in &seen {
        assert_eq!(
            log.get(offset),
            Some(id),
            "the follower saw id {id} at {offset}, which the cut took"
        );
    }
    eprintln!(
        "6 power cuts: the follower saw {} events, all still in the log",
        seen.len()
    );
}

#[test]
fn a_committed_offset_survives_a_power_cut_under_the_default_policy() {
    if !can_mount() {
        return;
    }
    let mut rig = Rig::new("commit-power");
    let server = Server::start(&rig.data(), &[]);
    let mut p = Producer::connect(server.addr).unwrap();
    for id in 1..=2000u64 {
        p.send(&Event {
            topic: "power/commit",
            partition: 0,
            priority: Priority::High,
            id,
            payload: b"x",
        })
        .unwrap();
    }
    p.flush().unwrap();
    let group = ConsumerOptions {
        from: StartAt::Committed,
        group: Some("after-the-cut".into()),
        ..ConsumerOptions::default()
    };
    let mut c = Consumer::connect(server.addr, group.clone())
        .unwrap_or_else(|e| panic!("{e}: {}", server.stderr()));
    let mut ids = Vec::new();
    for _ in 0..1500 {
        ids.push(c.next().unwrap().unwrap().id);
    }
    let at = c.position();
    c.commit(at).unwrap();
    // The cut comes right after COMMITTED, well inside the 1 s interval.
    rig.cut(server);
    let server = Server::start(&rig.data(), &[]);
    let mut c = Consumer::connect(server.addr, group).unwrap();
    assert_eq!(c.info().committed, Some(at));
    let m = c.next().unwrap().unwrap();
    assert_eq!(m.offset, at);
    // The log below the commit is there too.
    let log = inspect_events(&rig.data());
    assert!(log.len() as u64 >= at);
    assert_eq!(
        log.iter()
            .take(1500)
            .map(|e| e.event_id)
            .collect::<Vec<_>>(),
        ids
    );
}
