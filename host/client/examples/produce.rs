//! Starts `eventstream serve` on a temporary data dir (the binary from
//! `ES_BIN`, or this workspace's `target/debug/eventstream`), sends events
//! of every priority with the [`Producer`], and checks every outcome: each
//! new id stored at increasing offsets, each resent transactional id a
//! DUPLICATE at its original's offset; then reads them back with the
//! [`Consumer`] as a consumer group, commits, and checks that the group's
//! next session resumes at the commit. The test command runs it.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Command, Stdio};

use eventstream_client::{Consumer, ConsumerOptions, Event, Outcome, Priority, Producer, StartAt};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let bin = std::env::var_os("ES_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target/debug/eventstream")
        });
    let data = std::env::temp_dir().join(format!("es-client-example-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let mut server = Command::new(&bin)
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--metrics",
            "127.0.0.1:0",
            "--data",
        ])
        .arg(&data)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .map_err(|e| format!("cannot start {}: {e}", bin.display()))?;
    let mut lines = BufReader::new(server.stdout.take().ok_or("no stdout")?).lines();
    let addr = loop {
        let line = lines.next().ok_or("the server did not start")??;
        if let Some(a) = line.strip_prefix("listening on ") {
            break a.to_string();
        }
    };

    let mut p = Producer::connect(addr.as_str())?;
    let priorities = [
        Priority::Critical,
        Priority::High,
        Priority::Medium,
        Priority::Low,
        Priority::Batch,
    ];
    // Event `id` has priority `priorities[id % 5]`.
    let event = |id: u64| Event {
        topic: "example/orders",
        partition: 0,
        priority: priorities[id as usize % priorities.len()],
        id,
        payload: b"hello",
    };
    for id in 1..=1000u64 {
        p.send(&event(id))?;
    }
    let first = p.flush()?;
    assert_eq!(first.len(), 1000);
    let mut offsets = std::collections::HashMap::new();
    for a in &first {
        match a.outcome {
            Outcome::Stored(o) => {
                offsets.insert(a.id, o);
            }
            other => return Err(format!("event {}: {other:?}", a.id).into()),
        }
    }
    // Resent transactional ids are answered with their original's offset.
    for id in 1..=1000u64 {
        if matches!(event(id).priority, Priority::Medium | Priority::Low) {
            p.send(&event(id))?;
        }
    }
    for a in p.flush()? {
        assert_eq!(
            a.outcome,
            Outcome::Duplicate(offsets[&a.id]),
            "event {}",
            a.id
        );
    }
    println!("example: 1000 events stored, 400 resent transactional ids answered DUPLICATE");

    // Read them back as the group "example", from its committed offset
    // (none yet: the start of the log).
    let opts = ConsumerOptions {
        from: StartAt::Committed,
        group: Some("example".into()),
        ..ConsumerOptions::default()
    };
    let mut c = Consumer::connect(addr.as_str(), opts.clone())?;
    let mut read = 0u64;
    while let Some(ev) = c.next()? {
        assert_eq!(
            ev.offset, offsets[&ev.id],
            "event {} at its stored offset",
            ev.id
        );
        assert_eq!(ev.payload, b"hello");
        read += 1;
    }
    assert_eq!(read, 1000);
    c.commit(c.position())?;
    // The group's next session starts at the commit: nothing is left.
    let mut again = Consumer::connect(addr.as_str(), opts)?;
    assert_eq!(again.info().start, 1000);
    assert!(again.next()?.is_none());
    println!("example: 1000 events read back in order, committed; the group resumes at 1000");
    server.kill()?;
    server.wait()?;
    let _ = std::fs::remove_dir_all(&data);
    Ok(())
}
