//! The floor and peer of the forward benchmark (benches/forward.sh): a bare
//! `async-nats` JetStream publisher of the messages the forwarder makes
//! (256-byte payloads, a `Nats-Msg-Id` and the same `Es-*` headers), with
//! the same number awaiting acks, taken in order.
//!
//!   nats_pub URL STREAM N INFLIGHT   publish N into a new stream STREAM
//!                                    (subjects STREAM.>), print JSON, and
//!                                    delete the stream
//!   nats_pub URL STREAM --delete     delete STREAM if it is there

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use bytes::Bytes;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: nats_pub URL STREAM N INFLIGHT | nats_pub URL STREAM --delete");
        std::process::exit(2);
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    if let Err(e) = rt.block_on(run(&args[1], &args[2], &args[3..])) {
        eprintln!("nats_pub: {e}");
        std::process::exit(1);
    }
}

async fn run(url: &str, name: &str, rest: &[String]) -> Result<(), async_nats::Error> {
    let client = async_nats::connect(url).await?;
    let js = jetstream::new(client.clone());
    if rest[0] == "--delete" {
        let _ = js.delete_stream(name).await;
        return Ok(());
    }
    let n: u64 = rest[0].parse()?;
    let inflight: usize = rest.get(1).map_or(Ok(4096), |s| s.parse())?;
    let _ = js.delete_stream(name).await;
    js.create_stream(stream::Config {
        name: name.to_string(),
        subjects: vec![format!("{name}.>")],
        storage: stream::StorageType::File,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    })
    .await?;
    let js = jetstream::context::ContextBuilder::new()
        .max_ack_inflight(inflight + 1)
        .build(client);
    let server = "5f0c6a1e9b2d4c7f8a3e6b1d0c9f2a7e";
    let payload = vec![0x5au8; 256];
    let classes = ["realtime", "transactional", "batch"];
    let mut pending = VecDeque::with_capacity(inflight);
    let t0 = Instant::now();
    for i in 0..n {
        let class = classes[(i % 3) as usize];
        let mut h = HeaderMap::new();
        h.insert("Nats-Msg-Id", format!("{server}-{i}"));
        h.insert("Es-Offset", i.to_string());
        h.insert("Es-Server", server);
        h.insert("Es-Event-Id", (0x9e37_79b9_7f4a_7c15u64 ^ i).to_string());
        h.insert("Es-Class", class);
        h.insert("Es-Priority", "MEDIUM");
        h.insert("Es-Partition", (i % 4).to_string());
        h.insert(
            "Es-Timestamp-Ns",
            (1_764_253_200_000_000_000 + i).to_string(),
        );
        h.insert("Es-Recv-Ns", (1_764_253_200_000_000_000 + i).to_string());
        let subject = format!("{name}.{class}.load-{}", i % 8);
        if pending.len() >= inflight {
            let ack: jetstream::context::PublishAckFuture = pending.pop_front().unwrap();
            ack.await?;
        }
        pending.push_back(
            js.publish_with_headers(subject, h, Bytes::copy_from_slice(&payload))
                .await?,
        );
    }
    for ack in pending {
        ack.await?;
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "{{\"messages\":{n},\"secs\":{secs:.3},\"rate\":{:.0}}}",
        n as f64 / secs
    );
    let _ = js.delete_stream(name).await;
    Ok(())
}
