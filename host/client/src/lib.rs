//! The client library of EventStreamCore: a [`Producer`] that sends events
//! to `eventstream serve` and returns each one's outcome, matched to it by
//! its id. Standard library only; no async runtime.
//!
//! Guarantees. The producer asks for an ack of every event and keeps every
//! event until its ack came. If the connection breaks (the server restarts,
//! the network drops) it connects again and sends every unacked event once
//! more, with the same id. For **transactional** events (priority LOW or
//! MEDIUM, or a topic the server routes there) this is exactly once: the
//! server stores an id once inside its dedup window and answers a resent one
//! DUPLICATE with the original's offset. **Realtime and batch** events are
//! not deduplicated by the server on insert, so a resend after a break may
//! store them twice: at least once.
//!
//! ```no_run
//! use eventstream_client::{Event, Outcome, Producer};
//! use eventstream_core::Priority;
//!
//! let mut p = Producer::connect("127.0.0.1:7000")?;
//! for id in 1..=3 {
//!     p.send(&Event { topic: "orders/eu", partition: 0, priority: Priority::Medium, id, payload: b"hello" })?;
//! }
//! for acked in p.flush()? {
//!     match acked.outcome {
//!         Outcome::Stored(offset) | Outcome::Duplicate(offset) => println!("{} at {offset}", acked.id),
//!         Outcome::Rejected(reason) => eprintln!("{} rejected: {}", acked.id, reason.name()),
//!     }
//! }
//! # Ok::<(), eventstream_client::Error>(())
//! ```
//!
//! The [`Consumer`] reads the log back (PROTOCOL.md section 7): from an
//! offset, the start, the end, or a consumer group's committed offset;
//! optionally following new events as they become visible; filtered by
//! topic prefix and class. Every record's checksum is checked on arrival.
//! A commit returns once the server has made it (and the log up to it)
//! durable; a later session of the group resumes exactly there, and
//! fences (closes) any session of the group still open.
//!
//! ```no_run
//! use eventstream_client::{Consumer, ConsumerOptions, StartAt};
//!
//! let opts = ConsumerOptions {
//!     from: StartAt::Committed,
//!     group: Some("billing".into()),
//!     topic_prefix: "orders/".into(),
//!     follow: true,
//!     ..ConsumerOptions::default()
//! };
//! let mut c = Consumer::connect("127.0.0.1:7000", opts)?;
//! while let Some(ev) = c.next_ref()? {
//!     println!("{} {} {} bytes", ev.offset, ev.id(), ev.payload().len());
//!     if ev.offset % 1000 == 999 {
//!         let at = c.position();
//!         c.commit(at)?;
//!     }
//! }
//! # Ok::<(), eventstream_client::Error>(())
//! ```
//!
//! A runnable version of both, against a server it starts itself, is
//! `host/client/examples/produce.rs`.

#![deny(missing_docs)]

mod consumer;
pub mod tls;
pub use consumer::{Class, Consumer, ConsumerOptions, EventRef, Message, SessionInfo, StartAt};
pub use tls::TlsClient;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::io::{self, BufWriter, Read, Write};
use std::net::{Shutdown, SocketAddr, ToSocketAddrs};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, TryRecvError};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub use eventstream_core::wire::Reason;
use eventstream_core::wire::{Ack, FrameRepr, Status, ACK_LEN, FLAG_ACK};
pub use eventstream_core::Priority;

/// One event to send.
#[derive(Clone, Copy, Debug)]
pub struct Event<'a> {
    /// Its topic, 1..=255 bytes (the server's `--max-topic` may be lower).
    pub topic: &'a str,
    /// Its partition.
    pub partition: u32,
    /// Its priority (the server routes it to a class by it).
    pub priority: Priority,
    /// Its id, the dedup key: resending an id is how a producer retries.
    pub id: u64,
    /// Its payload.
    pub payload: &'a [u8],
}

/// What the server did with an event.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Stored at this log offset.
    Stored(u64),
    /// The id was stored before, at this offset.
    Duplicate(u64),
    /// Not stored, for this reason (OVERLOADED and SHUTTING_DOWN are worth
    /// a later retry).
    Rejected(Reason),
}

/// An event's id and its outcome.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Acked {
    /// The event's id.
    pub id: u64,
    /// What the server did with it.
    pub outcome: Outcome,
}

/// Why the producer stopped.
#[derive(Debug)]
pub enum Error {
    /// The connection failed and could not be made again.
    Io(io::Error),
    /// The server closed the connection with FATAL: it found a frame it
    /// cannot read (a bug in the sender, not worth a retry).
    Fatal(Reason),
    /// The event cannot be encoded (an empty or too long topic, a frame
    /// over 64 KiB).
    Encode(&'static str),
    /// The server refused a read session (OUT_OF_RANGE, BAD_REQUEST, ...);
    /// `first` and `end` are the log's first retained and end offsets.
    Refused {
        /// Why.
        reason: Reason,
        /// The first retained offset.
        first: u64,
        /// The next offset to become visible.
        end: u64,
    },
    /// The server ended the read session with CLOSING and this reason
    /// (FENCED: a newer session of the group took over).
    Closed(Reason),
    /// The server sent something the protocol does not allow.
    Protocol(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Io(e) => write!(f, "connection failed: {e}"),
            Error::Fatal(r) => write!(f, "the server closed the connection: FATAL {}", r.name()),
            Error::Encode(why) => write!(f, "cannot encode the event: {why}"),
            Error::Refused { reason, first, end } => write!(
                f,
                "the server refused the read session: {} (log holds offsets {first}..{end})",
                reason.name()
            ),
            Error::Closed(r) => write!(f, "the server closed the read session: {}", r.name()),
            Error::Protocol(why) => write!(f, "protocol error: {why}"),
        }
    }
}

impl std::error::Error for Error {}

impl From<io::Error> for Error {
    fn from(e: io::Error) -> Self {
        Error::Io(e)
    }
}

/// How a [`Producer`] behaves.
#[derive(Clone)]
pub struct Options {
    /// Events sent and not yet acked at most; `send` waits for acks past
    /// it. Keep it under the server's ack credit (`--ack-buffer` / 24,
    /// 2,730 by default), which it may not pass.
    pub max_in_flight: usize,
    /// Connect again and resend the unacked events when the connection
    /// breaks.
    pub reconnect: bool,
    /// How long to keep trying to connect again before giving up.
    pub reconnect_for: Duration,
    /// The token for a server with authentication on: every connection
    /// starts with a HELLO carrying it (PROTOCOL.md section 8).
    pub token: Option<Vec<u8>>,
    /// Connect with TLS (a server's `--tls-listen` port).
    pub tls: Option<TlsClient>,
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("max_in_flight", &self.max_in_flight)
            .field("reconnect", &self.reconnect)
            .field("reconnect_for", &self.reconnect_for)
            // Never printed.
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for Options {
    fn default() -> Self {
        Self {
            max_in_flight: 1024,
            reconnect: true,
            reconnect_for: Duration::from_secs(30),
            token: None,
            tls: None,
        }
    }
}

/// What the ack reader thread reports.
enum Msg {
    Ack(Ack),
    /// The connection ended (an error, or the server closed it).
    Closed(io::Error),
}

/// One connection: the writing half here, the reading half on a thread.
struct Conn {
    out: BufWriter<tls::Send>,
    acks: Receiver<Msg>,
    reader: Option<JoinHandle<()>>,
}

/// Sends a HELLO with `token` on `stream` and waits for its answer; a
/// refused token is [`Error::Fatal`] UNAUTHORIZED.
pub fn hello<S: Read + Write>(stream: &mut S, token: &[u8]) -> Result<(), Error> {
    if !(1..=eventstream_core::wire::read::MAX_TOKEN).contains(&token.len()) {
        return Err(Error::Encode("a token of 1..=512 bytes"));
    }
    let h = eventstream_core::wire::read::Hello { token };
    let mut buf = vec![0u8; h.encoded_len()];
    h.encode(&mut buf)
        .map_err(|_| Error::Encode("a token of 1..=512 bytes"))?;
    stream.write_all(&buf)?;
    let mut a = [0u8; ACK_LEN];
    stream.read_exact(&mut a)?;
    match Ack::decode(&a) {
        Ok(ack) if ack == eventstream_core::wire::read::HELLO_ACCEPTED => Ok(()),
        Ok(ack) if ack.status == eventstream_core::wire::Status::Fatal => {
            Err(Error::Fatal(ack.reason))
        }
        _ => Err(Error::Protocol("a bad answer to HELLO")),
    }
}

impl Conn {
    fn open(
        addrs: &[SocketAddr],
        token: Option<&[u8]>,
        tls: Option<&TlsClient>,
    ) -> Result<Conn, Error> {
        let (recv, send) = tls::connect(addrs, tls, None)?;
        let mut both = tls::Duplex { recv, send };
        if let Some(t) = token {
            hello(&mut both, t)?;
        }
        let tls::Duplex {
            recv: mut read_half,
            send: stream,
        } = both;
        let (tx, acks) = mpsc::channel();
        let reader = thread::Builder::new()
            .name("es-client-acks".into())
            .spawn(move || {
                let mut buf = [0u8; ACK_LEN];
                loop {
                    let msg = match read_half.read_exact(&mut buf) {
                        Ok(()) => match Ack::decode(&buf) {
                            Ok(ack) => Msg::Ack(ack),
                            Err(e) => Msg::Closed(io::Error::new(
                                io::ErrorKind::InvalidData,
                                format!("not an ack: {e:?}"),
                            )),
                        },
                        Err(e) => Msg::Closed(e),
                    };
                    let last = matches!(msg, Msg::Closed(_));
                    if tx.send(msg).is_err() || last {
                        return;
                    }
                }
            })?;
        Ok(Conn {
            out: BufWriter::with_capacity(64 * 1024, stream),
            acks,
            reader: Some(reader),
        })
    }

    fn close(&mut self) {
        let _ = self.out.get_ref().tcp().shutdown(Shutdown::Both);
        if let Some(r) = self.reader.take() {
            let _ = r.join();
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.close();
    }
}

/// Sends events and matches their acks; see the crate's documentation for
/// what it guarantees.
pub struct Producer {
    addrs: Vec<SocketAddr>,
    opts: Options,
    conn: Option<Conn>,
    /// Unacked frames in send order (resent in this order).
    unacked: BTreeMap<u64, (u64, Vec<u8>)>,
    /// Send numbers of the unacked frames of each id, oldest first.
    by_id: HashMap<u64, VecDeque<u64>>,
    next_seq: u64,
    /// Outcomes not yet handed to the caller.
    done: VecDeque<Acked>,
    reconnects: u64,
}

impl Producer {
    /// Connects to a server with the default [`Options`].
    pub fn connect(addr: impl ToSocketAddrs) -> Result<Producer, Error> {
        Self::with_options(addr, Options::default())
    }

    /// Connects to a server.
    pub fn with_options(addr: impl ToSocketAddrs, opts: Options) -> Result<Producer, Error> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let conn = Conn::open(&addrs, opts.token.as_deref(), opts.tls.as_ref())?;
        Ok(Producer {
            addrs,
            opts: Options {
                max_in_flight: opts.max_in_flight.max(1),
                ..opts
            },
            conn: Some(conn),
            unacked: BTreeMap::new(),
            by_id: HashMap::new(),
            next_seq: 0,
            done: VecDeque::new(),
            reconnects: 0,
        })
    }

    /// Events sent and not yet acked.
    pub fn in_flight(&self) -> usize {
        self.unacked.len()
    }

    /// How many times the connection was made again.
    pub fn reconnects(&self) -> u64 {
        self.reconnects
    }

    /// Sends `ev` (buffered; at most `max_in_flight` wait for their acks,
    /// so this may wait for some). Its outcome comes from
    /// [`take_acked`](Self::take_acked) or [`flush`](Self::flush).
    pub fn send(&mut self, ev: &Event<'_>) -> Result<(), Error> {
        let frame = encode(ev)?;
        while self.unacked.len() >= self.opts.max_in_flight {
            self.wait_ack()?;
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        self.by_id.entry(ev.id).or_default().push_back(seq);
        self.unacked.insert(seq, (ev.id, frame));
        let frame = &self.unacked[&seq].1;
        let written = match &mut self.conn {
            Some(c) => c.out.write_all(frame),
            None => Err(io::Error::from(io::ErrorKind::NotConnected)),
        };
        if let Err(e) = written {
            // Resent with every other unacked event once connected again.
            self.broken(e)?;
        }
        self.collect()
    }

    /// The outcomes that came since the last call, without waiting.
    pub fn take_acked(&mut self) -> Result<Vec<Acked>, Error> {
        self.collect()?;
        Ok(self.done.drain(..).collect())
    }

    /// Sends everything buffered and waits until every event sent has its
    /// outcome; returns the outcomes not taken before.
    pub fn flush(&mut self) -> Result<Vec<Acked>, Error> {
        self.flush_writes()?;
        while !self.unacked.is_empty() {
            self.wait_ack()?;
        }
        Ok(self.done.drain(..).collect())
    }

    fn flush_writes(&mut self) -> Result<(), Error> {
        let flushed = match &mut self.conn {
            Some(c) => c.out.flush(),
            None => Ok(()),
        };
        match flushed {
            Ok(()) => Ok(()),
            Err(e) => self.broken(e),
        }
    }

    /// Takes the acks already received.
    fn collect(&mut self) -> Result<(), Error> {
        loop {
            let msg = match &self.conn {
                Some(c) => match c.acks.try_recv() {
                    Ok(m) => m,
                    Err(TryRecvError::Empty) => return Ok(()),
                    Err(TryRecvError::Disconnected) => {
                        Msg::Closed(io::Error::from(io::ErrorKind::ConnectionAborted))
                    }
                },
                None => return Ok(()),
            };
            self.handle(msg)?;
        }
    }

    /// Waits for one message about the connection (an ack, or its end).
    fn wait_ack(&mut self) -> Result<(), Error> {
        self.flush_writes()?;
        let msg = match &self.conn {
            Some(c) => match c.acks.recv_timeout(Duration::from_secs(1)) {
                Ok(m) => m,
                Err(RecvTimeoutError::Timeout) => return Ok(()),
                Err(RecvTimeoutError::Disconnected) => {
                    Msg::Closed(io::Error::from(io::ErrorKind::ConnectionAborted))
                }
            },
            None if self.opts.reconnect => return self.reconnect(),
            None => return Err(Error::Io(io::Error::from(io::ErrorKind::NotConnected))),
        };
        self.handle(msg)
    }

    fn handle(&mut self, msg: Msg) -> Result<(), Error> {
        match msg {
            Msg::Ack(a) => self.settle(a),
            Msg::Closed(e) => self.broken(e),
        }
    }

    /// Matches an ack to its event.
    fn settle(&mut self, ack: Ack) -> Result<(), Error> {
        let outcome = match ack.status {
            Status::Stored => Outcome::Stored(ack.offset),
            Status::Duplicate => Outcome::Duplicate(ack.offset),
            Status::Rejected => Outcome::Rejected(ack.reason),
            Status::Fatal => {
                self.conn = None;
                return Err(Error::Fatal(ack.reason));
            }
        };
        let seq = self
            .by_id
            .get_mut(&ack.event_id)
            .and_then(|q| q.pop_front());
        if let Some(seq) = seq {
            if self.by_id.get(&ack.event_id).is_some_and(|q| q.is_empty()) {
                self.by_id.remove(&ack.event_id);
            }
            self.unacked.remove(&seq);
            self.done.push_back(Acked {
                id: ack.event_id,
                outcome,
            });
        }
        Ok(())
    }

    /// The connection broke: connect again and resend, or give up.
    fn broken(&mut self, e: io::Error) -> Result<(), Error> {
        if let Some(mut c) = self.conn.take() {
            c.close();
            // Acks that came before the break count: their events are not
            // resent.
            while let Ok(msg) = c.acks.try_recv() {
                if let Msg::Ack(ack) = msg {
                    self.settle(ack)?;
                }
            }
        }
        if !self.opts.reconnect {
            return Err(Error::Io(e));
        }
        self.reconnect()
    }

    /// Connects again (trying for `reconnect_for`) and resends every
    /// unacked event in its send order.
    fn reconnect(&mut self) -> Result<(), Error> {
        let until = Instant::now() + self.opts.reconnect_for;
        let mut pause = Duration::from_millis(10);
        loop {
            match Conn::open(
                &self.addrs,
                self.opts.token.as_deref(),
                self.opts.tls.as_ref(),
            ) {
                // A refused token is not worth another try.
                Err(e @ Error::Fatal(_)) => return Err(e),
                Ok(mut c) => {
                    let resent = self
                        .unacked
                        .values()
                        .try_for_each(|(_, frame)| c.out.write_all(frame))
                        .and_then(|()| c.out.flush());
                    match resent {
                        Ok(()) => {
                            self.conn = Some(c);
                            self.reconnects += 1;
                            return Ok(());
                        }
                        Err(e) if Instant::now() >= until => return Err(Error::Io(e)),
                        Err(_) => {}
                    }
                }
                Err(e) if Instant::now() >= until => return Err(e),
                Err(_) => {}
            }
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}

/// The frame of `ev`, asking for an ack, stamped with the wall clock.
fn encode(ev: &Event<'_>) -> Result<Vec<u8>, Error> {
    let repr = FrameRepr {
        priority: ev.priority,
        flags: FLAG_ACK,
        partition: ev.partition,
        event_id: ev.id,
        timestamp_ns: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64),
        topic: ev.topic.as_bytes(),
        payload: ev.payload,
    };
    let mut frame = vec![0u8; repr.encoded_len()];
    repr.encode(&mut frame).map_err(|e| {
        Error::Encode(match e {
            eventstream_core::wire::EncodeError::Topic => "the topic is empty or over 255 bytes",
            eventstream_core::wire::EncodeError::TooLong => "the frame is over 64 KiB",
            eventstream_core::wire::EncodeError::BufferTooSmall => "no room for the frame",
        })
    })?;
    Ok(frame)
}
