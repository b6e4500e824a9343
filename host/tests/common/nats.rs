//! Real `nats-server` processes with JetStream on 127.0.0.1 (the test
//! command installs Debian's package), and the stream read back with the
//! `async-nats` client.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer};
use futures_util::StreamExt;

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One `nats-server` with JetStream.
pub struct Nats {
    child: Option<Child>,
    /// Client port.
    pub port: u16,
    /// Monitoring port.
    pub monitor: u16,
    config: PathBuf,
    log: PathBuf,
}

fn nats_bin() -> &'static str {
    for p in ["/usr/sbin/nats-server", "/usr/bin/nats-server"] {
        if Path::new(p).exists() {
            return p;
        }
    }
    panic!(
        "nats-server is not installed (scripts/test-all.sh installs Debian's package nats-server)"
    );
}

impl Nats {
    /// One server with its store under `dir`, on free ports.
    pub fn start(dir: &Path) -> Nats {
        Self::start_on(dir, free_port(), None)
    }

    /// One server on `port`, member `cluster` = (name, own route port, all
    /// route ports) if given.
    pub fn start_on(dir: &Path, port: u16, cluster: Option<(&str, u16, &[u16])>) -> Nats {
        Self::start_conf(dir, port, cluster, "")
    }

    /// Like `start_on`, with `extra` appended to its configuration (a
    /// `tls { ... }` block, say).
    pub fn start_conf(
        dir: &Path,
        port: u16,
        cluster: Option<(&str, u16, &[u16])>,
        extra: &str,
    ) -> Nats {
        let monitor = free_port();
        let name = cluster.map_or("solo".to_string(), |c| c.0.to_string());
        let store = dir.join(format!("js-{name}"));
        std::fs::create_dir_all(&store).unwrap();
        let mut conf = format!(
            "server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor}\njetstream {{ store_dir: \"{}\" }}\n",
            store.display()
        );
        if let Some((_, own, all)) = cluster {
            let routes: Vec<String> = all
                .iter()
                .filter(|&&p| p != own)
                .map(|p| format!("nats-route://127.0.0.1:{p}"))
                .collect();
            conf.push_str(&format!(
                "cluster {{ name: es-test, listen: 127.0.0.1:{own}, routes: [{}] }}\n",
                routes.join(", ")
            ));
        }
        conf.push_str(extra);
        let config = dir.join(format!("{name}.conf"));
        std::fs::write(&config, conf).unwrap();
        let mut n = Nats {
            child: None,
            port,
            monitor,
            config,
            log: dir.join(format!("{name}.log")),
        };
        n.launch();
        n
    }

    fn launch(&mut self) {
        let log = std::fs::File::create(&self.log).unwrap();
        self.child = Some(
            Command::new(nats_bin())
                .arg("-c")
                .arg(&self.config)
                .stdout(Stdio::null())
                .stderr(log)
                .spawn()
                .expect("start nats-server"),
        );
    }

    /// A cluster of `n` servers with routes on loopback.
    pub fn cluster(dir: &Path, n: usize) -> Vec<Nats> {
        let routes: Vec<u16> = (0..n).map(|_| free_port()).collect();
        (0..n)
            .map(|i| {
                Nats::start_on(
                    dir,
                    free_port(),
                    Some((&format!("n{i}"), routes[i], &routes)),
                )
            })
            .collect()
    }

    /// `nats://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Waits until its JetStream answers healthy (`/healthz`).
    pub fn wait_ready(&self, limit: Duration) {
        let t0 = Instant::now();
        while t0.elapsed() < limit {
            if http_get(self.monitor, "/healthz").is_some_and(|b| b.contains("ok")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "nats-server on {} not ready: {}",
            self.port,
            std::fs::read_to_string(&self.log).unwrap_or_default()
        );
    }

    /// Whether a client named `name` is connected to it (`/connz`).
    pub fn has_client(&self, name: &str) -> bool {
        http_get(self.monitor, "/connz").is_some_and(|b| b.contains(&format!("\"{name}\"")))
    }

    /// kill -9.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The body of `GET path` on the monitoring port, if it answered 200.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes())
        .ok()?;
    let mut text = String::new();
    s.read_to_string(&mut text).ok()?;
    text.lines()
        .next()
        .is_some_and(|l| l.contains(" 200 "))
        .then(|| text.split("\r\n\r\n").nth(1).unwrap_or("").to_string())
}

/// One message of the stream, with the headers the forwarder sets.
#[derive(Clone, Debug)]
pub struct StreamMsg {
    pub subject: String,
    pub msg_id: String,
    pub offset: u64,
    pub server: String,
    pub event_id: u64,
    pub class: String,
    pub legacy: bool,
    pub payload: Vec<u8>,
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Every message of `stream`, in stream order, read through `url`.
pub fn stream_messages(url: &str, stream: &str) -> Vec<StreamMsg> {
    stream_messages_with(url, stream, async_nats::ConnectOptions::new())
}

/// Like `stream_messages`, connecting with `opts` (TLS, say).
pub fn stream_messages_with(
    url: &str,
    stream: &str,
    opts: async_nats::ConnectOptions,
) -> Vec<StreamMsg> {
    runtime().block_on(async {
        let client = opts.connect(url).await.unwrap();
        let js = jetstream::new(client);
        // Retried: a cluster that just lost a node elects new leaders.
        let t0 = Instant::now();
        let (total, c) = loop {
            let made = async {
                let mut st = js.get_stream(stream).await.map_err(|e| e.to_string())?;
                let total = st.info().await.map_err(|e| e.to_string())?.state.messages;
                let c = st
                    .create_consumer(consumer::pull::Config {
                        deliver_policy: consumer::DeliverPolicy::All,
                        ack_policy: consumer::AckPolicy::None,
                        num_replicas: 1,
                        memory_storage: true,
                        ..Default::default()
                    })
                    .await
                    .map_err(|e| e.to_string())?;
                Ok::<_, String>((total as usize, c))
            }
            .await;
            match made {
                Ok(m) => break m,
                Err(e) => {
                    assert!(
                        t0.elapsed() < Duration::from_secs(60),
                        "cannot read the stream: {e}"
                    );
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        let mut out = Vec::with_capacity(total);
        let t0 = Instant::now();
        while out.len() < total {
            assert!(
                t0.elapsed() < Duration::from_secs(60),
                "stream read stalled"
            );
            let mut batch = c
                .fetch()
                .max_messages(5000)
                .expires(Duration::from_secs(1))
                .messages()
                .await
                .unwrap();
            while let Some(m) = batch.next().await {
                let m = m.unwrap();
                let h = m.headers.clone().unwrap_or_default();
                let get = |k: &str| h.get(k).map(|v| v.as_str().to_string()).unwrap_or_default();
                out.push(StreamMsg {
                    subject: m.subject.to_string(),
                    msg_id: get("Nats-Msg-Id"),
                    offset: get("Es-Offset").parse().unwrap(),
                    server: get("Es-Server"),
                    event_id: get("Es-Event-Id").parse().unwrap(),
                    class: get("Es-Class"),
                    legacy: get("Es-Legacy") == "1",
                    payload: m.payload.to_vec(),
                });
            }
        }
        out
    })
}

/// The number of messages in `stream` (None: NATS did not answer).
pub fn stream_count(url: &str, stream: &str) -> Option<u64> {
    runtime().block_on(async {
        let client = tokio::time::timeout(Duration::from_secs(3), async_nats::connect(url))
            .await
            .ok()?
            .ok()?;
        let js = jetstream::new(client);
        let mut st = js.get_stream(stream).await.ok()?;
        Some(st.info().await.ok()?.state.messages)
    })
}

/// The forwarder flags for `urls` into `stream`, made if missing.
pub fn forward_args(urls: &str, stream: &str) -> Vec<String> {
    vec![
        "--forward".into(),
        urls.into(),
        "--forward-stream".into(),
        stream.into(),
        "--forward-create-stream".into(),
    ]
}
