//! `eventstream load` against a real `eventstream serve`: the counts it
//! prints agree with what `inspect` finds in the log.

mod common;

use std::collections::HashMap;

use common::*;

#[test]
fn load_with_acks_and_duplicates_agrees_with_inspect() {
    let dir = TempDir::new("load");
    let server = Server::start(&dir.data(), &[]);
    let out = std::process::Command::new(BIN)
        .args(["load", "--target", &server.addr.to_string()])
        .args(["--events", "6000", "--connections", "3", "--payload", "256"])
        .args(["--duplicates", "0.2", "--ack", "--json"])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("every event got exactly one ack"),
        "{stderr}"
    );
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let get = |k: &str| r[k].as_u64().unwrap_or_else(|| panic!("{k} in {r}"));
    assert_eq!(get("sent"), 6000);
    assert_eq!(get("missing_acks"), 0);
    assert_eq!(get("rejected") + get("fatal"), 0);
    let (stored, duplicate) = (get("stored"), get("duplicate"));
    assert_eq!(stored + duplicate, 6000);
    assert!(duplicate > 0, "no duplicates were sent");
    for class in ["realtime", "transactional", "batch"] {
        assert!(r["latency_us_by_class"][class]["p99"].as_f64().is_some());
    }
    // The log holds exactly the stored events; transactional ids once each.
    let events = wait_for_events(&dir.data(), stored as usize);
    assert_eq!(events.len() as u64, stored);
    let mut tx: HashMap<u64, u32> = HashMap::new();
    for e in events.iter().filter(|e| e.class == "transactional") {
        *tx.entry(e.event_id).or_default() += 1;
    }
    assert!(
        tx.values().all(|&n| n == 1),
        "a transactional id stored twice"
    );
    // The writer publishes its counters after the acks (within a
    // millisecond under traffic, at once when it goes idle).
    let dup_metric = settles(duplicate as f64, || {
        server
            .metrics_text()
            .lines()
            .filter(|l| l.starts_with("eventstream_duplicates_total{"))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<f64>().unwrap())
            .sum()
    });
    assert_eq!(dup_metric as u64, duplicate);
}

#[test]
fn load_rejects_bad_flags() {
    for args in [
        vec!["load", "--target", "127.0.0.1:1", "--mix", "realtime=50"],
        vec!["load", "--target", "127.0.0.1:1", "--duplicates", "2"],
        vec!["load"],
    ] {
        let out = std::process::Command::new(BIN)
            .args(&args)
            .output()
            .unwrap();
        assert!(!out.status.success(), "{args:?}");
    }
}
