//! The appliance image (linker/firmware, `appliance`) under QEMU against a
//! real `eventstream serve --legacy deny` on 127.0.0.1: its UART0 is a TCP
//! client of a proxy in this test, which forwards to the server and can
//! cut the connection; its flash log lives in PSRAM backed by a file, so
//! killing QEMU and starting it again is a power cut. The server's log
//! must hold every event the appliance made: each transactional one
//! exactly once, the others at least once.
//!
//! Ignored in `cargo test`: it needs the image built for
//! thumbv7em-none-eabihf and qemu-system-arm; the test command builds the
//! image and runs it (`--ignored`).

mod common;

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;

/// Events the image makes at least over all its boots (its `TOTAL`).
const TOTAL: usize = 3000;

fn elf() -> PathBuf {
    std::env::var_os("APPLIANCE_ELF").map_or_else(
        || {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../linker/firmware/target/thumbv7em-none-eabihf/release/appliance")
        },
        PathBuf::from,
    )
}

/// A TCP proxy from QEMU's serial socket to the server; `cut` closes every
/// connection it carries (QEMU connects again after a second).
struct Proxy {
    addr: SocketAddr,
    open: Arc<Mutex<Vec<TcpStream>>>,
}

impl Proxy {
    fn start(server: SocketAddr) -> Proxy {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let open: Arc<Mutex<Vec<TcpStream>>> = Arc::default();
        let o = open.clone();
        std::thread::spawn(move || {
            for c in l.incoming() {
                let Ok(client) = c else { return };
                let Ok(up) = TcpStream::connect(server) else {
                    continue;
                };
                let _ = client.set_nodelay(true);
                let _ = up.set_nodelay(true);
                {
                    let mut g = o.lock().unwrap();
                    g.push(client.try_clone().unwrap());
                    g.push(up.try_clone().unwrap());
                }
                for (mut from, mut to) in [
                    (client.try_clone().unwrap(), up.try_clone().unwrap()),
                    (up, client),
                ] {
                    std::thread::spawn(move || {
                        let mut b = [0u8; 4096];
                        while let Ok(n) = from.read(&mut b) {
                            if n == 0 || to.write_all(&b[..n]).is_err() {
                                break;
                            }
                        }
                        let _ = to.shutdown(Shutdown::Both);
                        let _ = from.shutdown(Shutdown::Both);
                    });
                }
            }
        });
        Proxy { addr, open }
    }

    fn cut(&self) {
        for s in self.open.lock().unwrap().drain(..) {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

/// QEMU running the image, its semihosting output (the defmt log) kept
/// in `raw`.
fn qemu(elf: &Path, flash: &Path, serial: SocketAddr, raw: &Path) -> Child {
    Command::new("qemu-system-arm")
        .args([
            "-cpu",
            "cortex-m4",
            "-machine",
            "mps2-an386,memory-backend=psram",
        ])
        .args(["-nographic", "-monitor", "none"])
        .arg("-object")
        .arg(format!(
            "memory-backend-file,id=psram,size=16M,mem-path={},share=on",
            flash.display()
        ))
        .arg("-serial")
        .arg(format!("tcp:{serial},reconnect=1"))
        .args(["-semihosting-config", "enable=on,target=native", "-kernel"])
        .arg(elf)
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(raw).unwrap())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start qemu-system-arm")
}

/// The image's defmt log, decoded.
fn decoded(elf: &Path, raw: &Path) -> String {
    let out = Command::new("defmt-print")
        .arg("-e")
        .arg(elf)
        .stdin(std::fs::File::open(raw).unwrap())
        .output()
        .expect("defmt-print");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The appliance's events the server stored so far.
fn stored(data: &Path) -> Vec<Inspected> {
    inspect_events(data)
        .into_iter()
        .filter(|e| e.topic.starts_with("appliance/"))
        .collect()
}

fn wait_stored(data: &Path, n: usize, limit: Duration) {
    let t0 = Instant::now();
    while stored(data).len() < n {
        assert!(t0.elapsed() < limit, "fewer than {n} events stored");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
#[ignore = "needs the appliance image and qemu-system-arm: the test command runs it"]
fn the_appliance_delivers_every_event_through_link_cuts_and_power_cuts() {
    let elf = elf();
    assert!(elf.exists(), "build the image first: {}", elf.display());
    let dir = TempDir::new("appliance");
    let server = Server::start(&dir.data(), &["--legacy", "deny", "--batch-max-age", "5ms"]);
    let proxy = Proxy::start(server.addr);
    let flash = dir.path().join("psram.bin");
    let t0 = Instant::now();
    let raw1 = dir.path().join("boot1.defmt");
    let mut q = qemu(&elf, &flash, proxy.addr, &raw1);
    // A link cut a third of the way.
    wait_stored(&dir.data(), TOTAL / 3, Duration::from_secs(60));
    proxy.cut();
    // A power cut (QEMU killed) two thirds of the way.
    wait_stored(&dir.data(), 2 * TOTAL / 3, Duration::from_secs(60));
    q.kill().unwrap();
    q.wait().unwrap();
    let log1 = decoded(&elf, &raw1);
    let raw2 = dir.path().join("boot2.defmt");
    let mut q = qemu(&elf, &flash, proxy.addr, &raw2);
    let status =
        wait_timeout(&mut q, Duration::from_secs(120)).expect("the appliance did not finish");
    let secs = t0.elapsed().as_secs_f64();
    let log2 = decoded(&elf, &raw2);
    println!("boot 1:\n{log1}\nboot 2:\n{log2}");
    assert!(status.success(), "the appliance failed: {log2}");
    assert!(log2.contains("appliance: boot: log at offset"), "{log2}");
    assert!(log2.contains("appliance: done"), "{log2}");
    // Every event the appliance made, each transactional one once.
    let events = stored(&dir.data());
    let mut by_key: HashMap<(u64, String), u32> = HashMap::new();
    for e in &events {
        *by_key.entry((e.event_id, e.class.clone())).or_default() += 1;
    }
    let unique = by_key.len();
    let repeats = events.len() - unique;
    println!(
        "{} events stored ({unique} distinct, {repeats} repeats of realtime or batch events) in {secs:.1} s",
        events.len()
    );
    // What the appliance's log held in the end (TOTAL, or a little more:
    // events already in its pipeline when it stopped making them).
    let made: usize = log2
        .split("appliance: done: ")
        .nth(1)
        .and_then(|t| t.split(' ').next())
        .and_then(|n| n.parse().ok())
        .expect("the appliance's final count");
    assert!(made >= TOTAL, "{made}");
    assert_eq!(unique, made, "distinct events");
    for ((id, class), n) in &by_key {
        if class == "transactional" {
            assert_eq!(*n, 1, "transactional {id} stored {n} times");
        }
    }
    let legacy = events
        .iter()
        .filter(|e| e.topic == "appliance/legacy")
        .count();
    assert!(legacy > 0, "no legacy events");
}
