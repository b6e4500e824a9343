//! A scraper as fast as one client can be: GET /metrics over one kept-alive
//! connection, each request sent once the previous answer is read whole.
//!
//!   scrape_flood ADDR SECONDS
//!
//! Prints one JSON object: scrapes answered, seconds, and the median and
//! largest answer time in microseconds.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn fail(what: &str, e: impl std::fmt::Display) -> ! {
    eprintln!("scrape_flood: {what}: {e}");
    std::process::exit(1);
}

/// Reads one answer; returns the bytes of `buf` it took.
fn read_answer(s: &mut TcpStream, buf: &mut Vec<u8>) -> usize {
    let mut chunk = [0u8; 65536];
    loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..i]).to_ascii_lowercase();
            if !head.starts_with("http/1.1 200") {
                fail("answer", head.lines().next().unwrap_or(""));
            }
            let len: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or_else(|| fail("answer", "no Content-Length"));
            if buf.len() >= i + 4 + len {
                return i + 4 + len;
            }
        }
        match s.read(&mut chunk) {
            Ok(0) => fail("read", "the server closed the connection"),
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) => fail("read", e),
        }
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 3 {
        eprintln!("usage: scrape_flood ADDR SECONDS");
        std::process::exit(2);
    }
    let secs: f64 = args[2].parse().unwrap_or_else(|e| fail("SECONDS", e));
    let mut s = TcpStream::connect(&args[1]).unwrap_or_else(|e| fail("connect", e));
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap_or_else(|e| fail("set_read_timeout", e));
    let req = b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n";
    let mut buf = Vec::new();
    let mut times = Vec::new();
    let t0 = Instant::now();
    let end = t0 + Duration::from_secs_f64(secs);
    while Instant::now() < end {
        let start = Instant::now();
        s.write_all(req).unwrap_or_else(|e| fail("write", e));
        let used = read_answer(&mut s, &mut buf);
        buf.drain(..used);
        times.push(start.elapsed().as_micros() as u64);
    }
    let took = t0.elapsed().as_secs_f64();
    times.sort_unstable();
    let median = times.get(times.len() / 2).copied().unwrap_or(0);
    let max = times.last().copied().unwrap_or(0);
    println!(
        "{{\"scrapes\": {}, \"seconds\": {took:.3}, \"answer_us_p50\": {median}, \"answer_us_max\": {max}}}",
        times.len()
    );
}
