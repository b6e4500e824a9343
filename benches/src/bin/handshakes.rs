//! Connections per second against `eventstream serve`, each one whole: a
//! connect (and, with `--tls-ca`, a TLS handshake), one event with ACK,
//! its ack, and the close. One connection at a time per thread.
//!
//!   handshakes ADDR SECS THREADS [CA_PEM | garbage]
//!
//! Prints `connections/s N` (and the failures, which must be 0). With
//! `garbage` instead of a CA: each connection sends 64 bytes that are not
//! TLS and waits for the server to close it (a flood of bad handshakes).

use std::io::{Read, Write};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use eventstream_core::wire::{FrameRepr, FLAG_ACK};
use eventstream_core::Priority;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 4 {
        eprintln!("usage: handshakes ADDR SECS THREADS [CA_PEM]");
        std::process::exit(2);
    }
    let addr: SocketAddr = args[1].parse().expect("ADDR");
    let secs: f64 = args[2].parse().expect("SECS");
    let threads: u64 = args[3].parse().expect("THREADS");
    let garbage = args.get(4).is_some_and(|a| a == "garbage");
    let tls = args.get(4).filter(|_| !garbage).map(|ca| {
        eventstream_client::TlsClient::new(Path::new(ca), None).unwrap_or_else(|e| {
            eprintln!("handshakes: {e}");
            std::process::exit(2)
        })
    });
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let until = Instant::now() + Duration::from_secs_f64(secs);
    let t0 = Instant::now();
    let workers: Vec<_> = (0..threads)
        .map(|t| {
            let (tls, done, failed) = (tls.clone(), done.clone(), failed.clone());
            std::thread::spawn(move || {
                let mut id = t << 40;
                while Instant::now() < until {
                    id += 1;
                    let r = if garbage {
                        junk(addr, id)
                    } else {
                        once(addr, tls.as_ref(), id)
                    };
                    match r {
                        Ok(()) => done.fetch_add(1, Ordering::Relaxed),
                        Err(_) => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            })
        })
        .collect();
    for w in workers {
        w.join().expect("worker");
    }
    let secs = t0.elapsed().as_secs_f64();
    println!(
        "connections/s {:.0} failures {}",
        done.load(Ordering::Relaxed) as f64 / secs,
        failed.load(Ordering::Relaxed)
    );
}

fn once(
    addr: SocketAddr,
    tls: Option<&eventstream_client::TlsClient>,
    id: u64,
) -> std::io::Result<()> {
    let (mut r, mut w) =
        eventstream_client::tls::connect(&[addr], tls, Some(Duration::from_secs(5)))?;
    let payload = [0x5au8; 256];
    let repr = FrameRepr {
        priority: Priority::High,
        flags: FLAG_ACK,
        partition: 0,
        event_id: id,
        timestamp_ns: id,
        topic: b"handshakes",
        payload: &payload,
    };
    let mut f = vec![0u8; repr.encoded_len()];
    repr.encode(&mut f)
        .map_err(|_| std::io::Error::other("encode"))?;
    w.write_all(&f)?;
    let mut ack = [0u8; 24];
    r.read_exact(&mut ack)?;
    if ack[5] != 0 {
        return Err(std::io::Error::other("not stored"));
    }
    Ok(())
}

/// One connection that sends 64 bytes of garbage and reads until closed.
fn junk(addr: SocketAddr, id: u64) -> std::io::Result<()> {
    let mut s = std::net::TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    let mut x = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let bytes: Vec<u8> = (0..64)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            if i == 0 {
                0xff
            } else {
                x as u8
            }
        })
        .collect();
    s.write_all(&bytes)?;
    let mut sink = Vec::new();
    s.read_to_end(&mut sink)?;
    Ok(())
}
