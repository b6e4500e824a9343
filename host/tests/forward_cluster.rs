//! The forwarder into a three-node NATS cluster (routes on loopback ports)
//! with a stream of three replicas: one NATS node is killed in the middle
//! of forwarding, and the stream still holds each stored event exactly
//! once.

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::nats::*;
use common::*;

#[test]
fn a_nats_node_killed_mid_forward_loses_and_doubles_nothing() {
    let dir = TempDir::new("fwd-cluster");
    let mut nodes = Nats::cluster(dir.path(), 3);
    for n in &nodes {
        n.wait_ready(Duration::from_secs(30));
    }
    let urls: Vec<String> = nodes.iter().map(Nats::url).collect();
    let mut args = forward_args(&urls.join(","), "EVENTS");
    args.extend(
        ["--forward-replicas", "3", "--forward-ack-timeout", "2s"]
            .iter()
            .map(|s| s.to_string()),
    );
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let server = Server::start(&dir.data(), &args);
    let mut producer = std::process::Command::new(BIN)
        .args(["load", "--target", &server.addr.to_string()])
        .args(["--events", "60000", "--ack"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Kill the node the forwarder talks to once it has forwarded some,
    // with publishes in flight.
    let t0 = Instant::now();
    while server.metric("eventstream_forward_acked_offset") < 15_000.0 {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "{}",
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let connected = nodes
        .iter()
        .position(|n| n.has_client("eventstream-forward"))
        .expect("the forwarder's connection on a node");
    nodes[connected].kill();
    assert!(producer.wait().unwrap().success(), "every event acked");
    // Caught up on the two nodes left.
    let t0 = Instant::now();
    loop {
        let end = server.metric("eventstream_log_end_offset");
        if end == 60_000.0 && server.metric("eventstream_forward_acked_offset") == end {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "forward stuck at {}: {}",
            server.metric("eventstream_forward_acked_offset"),
            server.stderr()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let msgs = stream_messages(&urls[(connected + 1) % 3], "EVENTS");
    let offsets: HashSet<u64> = msgs.iter().map(|m| m.offset).collect();
    assert_eq!(msgs.len(), 60_000, "nothing doubled");
    assert_eq!(offsets.len(), 60_000, "nothing lost");
    assert!(offsets.iter().all(|&o| o < 60_000));
    let ids: HashSet<&str> = msgs.iter().map(|m| m.msg_id.as_str()).collect();
    assert_eq!(ids.len(), msgs.len());
    let payloads = log_events(&dir.data());
    for m in &msgs {
        assert_eq!(m.payload, payloads[&m.offset].1, "payload of {}", m.offset);
    }
    eprintln!(
        "cluster: failures {} duplicates {} published {}",
        server.metric("eventstream_forward_failures_total"),
        server.metric("eventstream_forward_duplicates_total"),
        server.metric("eventstream_forward_published_total")
    );
}
