//! The [`Consumer`]: reads the log over a read session (PROTOCOL.md
//! section 7) from an offset, the start, the end or a group's committed
//! offset, optionally following it live; commits a group's position.

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, ToSocketAddrs};
use std::time::Duration;

use eventstream_core::record::{Record, RECORD_HEADER_LEN};
use eventstream_core::wire::read::{
    ChunkHeader, ChunkKind, ClassSet, ReadRequest, SessionAnswer, SessionFrame, Start,
    CHUNK_HEADER_LEN, NONE_OFFSET, SESSION_ANSWER_LEN,
};
use eventstream_core::wire::FrameHead;
pub use eventstream_core::Class;
use eventstream_core::Priority;

use crate::Error;

/// Where a session starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartAt {
    /// The first retained offset.
    Earliest,
    /// The next offset to become visible (only new events).
    Latest,
    /// The group's committed offset (the first retained one if it has
    /// none); needs a group.
    Committed,
    /// This offset.
    Offset(u64),
}

/// How a [`Consumer`] reads.
#[derive(Clone)]
pub struct ConsumerOptions {
    /// Where to start.
    pub from: StartAt,
    /// The consumer group (commits and `StartAt::Committed`); 1..=64 bytes of
    /// `A-Z a-z 0-9 . _ -`, not starting with `_`.
    pub group: Option<String>,
    /// Only events whose topic starts with this (empty: all).
    pub topic_prefix: String,
    /// Only these classes (empty: all).
    pub classes: Vec<Class>,
    /// Keep reading as new events arrive; without it the session ends at
    /// the end offset of its start.
    pub follow: bool,
    /// Record bytes the server may send ahead of what was read (at least
    /// the largest record the server announces).
    pub window: u32,
    /// Give up on a server that sends nothing for this long (a follower
    /// gets a heartbeat every second). None: wait forever.
    pub read_timeout: Option<Duration>,
    /// The token for a server with authentication on (a HELLO first).
    pub token: Option<Vec<u8>>,
    /// Connect with TLS (a server's `--tls-listen` port).
    pub tls: Option<crate::TlsClient>,
}

impl std::fmt::Debug for ConsumerOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsumerOptions")
            .field("from", &self.from)
            .field("group", &self.group)
            .field("topic_prefix", &self.topic_prefix)
            .field("classes", &self.classes)
            .field("follow", &self.follow)
            .field("window", &self.window)
            .field("read_timeout", &self.read_timeout)
            // Never printed.
            .field("token", &self.token.as_ref().map(|_| "<hidden>"))
            .field("tls", &self.tls)
            .finish()
    }
}

impl Default for ConsumerOptions {
    fn default() -> Self {
        ConsumerOptions {
            from: StartAt::Earliest,
            group: None,
            topic_prefix: String::new(),
            classes: Vec::new(),
            follow: false,
            window: 4 << 20,
            read_timeout: Some(Duration::from_secs(10)),
            token: None,
            tls: None,
        }
    }
}

/// What the server said when the session opened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SessionInfo {
    /// The first offset the session delivers.
    pub start: u64,
    /// The first retained offset.
    pub first: u64,
    /// The next offset to become visible then.
    pub end: u64,
    /// The group's committed offset then (None: none, or no group).
    pub committed: Option<u64>,
    /// The largest record the session may meet.
    pub max_record: u32,
}

/// An event read from the log, borrowed from the consumer's buffer.
#[derive(Clone, Copy, Debug)]
pub struct EventRef<'a> {
    /// Its log offset.
    pub offset: u64,
    /// The class routing sent it to.
    pub class: Class,
    /// Server wall clock at ingest (of its record), unix ns.
    pub recv_ns: u64,
    /// The stored frame's fields.
    head: FrameHead,
    frame: &'a [u8],
}

impl<'a> EventRef<'a> {
    /// The stored frame, checked.
    pub fn frame(&self) -> eventstream_core::wire::Frame<&'a [u8]> {
        eventstream_core::wire::Frame::with_head(self.frame, self.head)
    }
    /// Its topic's bytes.
    pub fn topic(&self) -> &'a [u8] {
        self.frame().topic_bytes()
    }
    /// Its payload.
    pub fn payload(&self) -> &'a [u8] {
        self.frame().payload()
    }
    /// Its id.
    pub fn id(&self) -> u64 {
        self.frame().event_id()
    }
    /// Its priority, as the producer sent it.
    pub fn priority(&self) -> Priority {
        self.frame().priority()
    }
    /// Its partition.
    pub fn partition(&self) -> u32 {
        self.frame().partition()
    }
    /// The producer's timestamp, unix ns.
    pub fn timestamp_ns(&self) -> u64 {
        self.frame().timestamp_ns()
    }
    /// Whether it came from a legacy client.
    pub fn is_legacy(&self) -> bool {
        self.frame().is_legacy()
    }
    /// The whole stored frame.
    pub fn frame_bytes(&self) -> &'a [u8] {
        self.frame
    }
    /// An owned copy.
    pub fn to_message(&self) -> Message {
        Message {
            offset: self.offset,
            class: self.class,
            recv_ns: self.recv_ns,
            topic: self.topic().to_vec(),
            partition: self.partition(),
            priority: self.priority(),
            id: self.id(),
            timestamp_ns: self.timestamp_ns(),
            payload: self.payload().to_vec(),
        }
    }
}

/// An event read from the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// Its log offset.
    pub offset: u64,
    /// The class routing sent it to.
    pub class: Class,
    /// Server wall clock at ingest (of its record), unix ns.
    pub recv_ns: u64,
    /// Its topic.
    pub topic: Vec<u8>,
    /// Its partition.
    pub partition: u32,
    /// Its priority, as the producer sent it.
    pub priority: Priority,
    /// Its id.
    pub id: u64,
    /// The producer's timestamp, unix ns.
    pub timestamp_ns: u64,
    /// Its payload.
    pub payload: Vec<u8>,
}

/// Reads events from a server; see the crate's documentation.
pub struct Consumer {
    addrs: Vec<SocketAddr>,
    opts: ConsumerOptions,
    stream: crate::tls::Duplex,
    info: SessionInfo,
    /// Chunks read ahead while waiting for a COMMITTED, in order.
    queued: VecDeque<(ChunkHeader, Vec<u8>)>,
    chunk: Vec<u8>,
    /// The next record's position in `chunk`.
    rec_at: usize,
    /// Within the current record: its end, the next frame's position and
    /// offset, its class and recv_ns.
    rec_end: usize,
    frame_at: usize,
    frame_offset: u64,
    class: Class,
    recv_ns: u64,
    /// The next offset to deliver.
    next: u64,
    /// Record bytes read since the last CREDIT.
    consumed: u64,
    committed: Option<u64>,
    gaps: Vec<(u64, u64)>,
    ended: bool,
    /// The server's end offset as last reported.
    end: u64,
}

impl Consumer {
    /// Opens a read session.
    pub fn connect(addr: impl ToSocketAddrs, opts: ConsumerOptions) -> Result<Consumer, Error> {
        let addrs: Vec<SocketAddr> = addr.to_socket_addrs()?.collect();
        let (stream, info) = open(&addrs, &opts, opts.from)?;
        Ok(Consumer {
            addrs,
            stream,
            next: info.start,
            end: info.end,
            committed: info.committed,
            info,
            opts,
            queued: VecDeque::new(),
            chunk: Vec::new(),
            rec_at: 0,
            rec_end: 0,
            frame_at: 0,
            frame_offset: 0,
            class: Class::Realtime,
            recv_ns: 0,
            consumed: 0,
            gaps: Vec::new(),
            ended: false,
        })
    }

    /// What the server answered when the session opened.
    pub fn info(&self) -> &SessionInfo {
        &self.info
    }

    /// The next offset the consumer delivers (what to commit after the
    /// events read so far).
    pub fn position(&self) -> u64 {
        self.next
    }

    /// The group's committed offset as last confirmed.
    pub fn committed(&self) -> Option<u64> {
        self.committed
    }

    /// The log's end offset as the server last reported it.
    pub fn end_offset(&self) -> u64 {
        self.end
    }

    /// Offset ranges the log lost to a repair that the session passed.
    pub fn gaps(&self) -> &[(u64, u64)] {
        &self.gaps
    }

    /// The next event, borrowed; `None` once a session without `follow`
    /// has delivered everything up to its end offset.
    pub fn next_ref(&mut self) -> Result<Option<EventRef<'_>>, Error> {
        loop {
            if self.frame_at < self.rec_end {
                let at = self.frame_at;
                let len = eventstream_core::wire::declared_length(&self.chunk[at..])
                    .map(|l| l as usize)
                    .filter(|&l| at + l <= self.rec_end)
                    .ok_or(Error::Protocol("a record's frames do not fill it"))?;
                let offset = self.frame_offset;
                self.frame_at += len;
                self.frame_offset += 1;
                if offset < self.next {
                    continue;
                }
                self.next = offset + 1;
                let frame = &self.chunk[at..at + len];
                let f = eventstream_core::wire::Frame::check(
                    frame,
                    eventstream_core::wire::Check::Layout,
                )
                .map_err(|_| Error::Protocol("a stored frame is malformed"))?;
                return Ok(Some(EventRef {
                    offset,
                    class: self.class,
                    recv_ns: self.recv_ns,
                    head: f.head(),
                    frame,
                }));
            }
            if self.rec_at < self.chunk.len() {
                let rec = Record::parse(&self.chunk[self.rec_at..])
                    .map_err(|_| Error::Protocol("a record fails its checksum or layout"))?;
                self.rec_end = self.rec_at + rec.size();
                self.frame_at = self.rec_at + RECORD_HEADER_LEN;
                self.frame_offset = rec.offset();
                self.class = rec.class();
                self.recv_ns = rec.recv_ns();
                self.rec_at = self.rec_end;
                continue;
            }
            if self.ended {
                return Ok(None);
            }
            self.fill()?;
        }
    }

    /// The next event; `None` once a session without `follow` has
    /// delivered everything up to its end offset.
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> Result<Option<Message>, Error> {
        Ok(self.next_ref()?.map(|e| e.to_message()))
    }

    /// Commits `offset` (the next offset the group should read, usually
    /// [`Consumer::position`]) and waits until the server confirms it is
    /// durable.
    pub fn commit(&mut self, offset: u64) -> Result<(), Error> {
        let mut b = [0u8; 20];
        SessionFrame::Commit(offset)
            .encode(&mut b)
            .map_err(|_| Error::Encode("commit"))?;
        self.stream.write_all(&b)?;
        loop {
            // The chunk being read stays: read into a new buffer.
            let (h, body) = self.read_chunk(false)?;
            match h.kind {
                ChunkKind::Committed if h.a == offset => {
                    self.committed = Some(offset);
                    return Ok(());
                }
                ChunkKind::Closing => return Err(Error::Closed(h.reason)),
                _ => self.queued.push_back((h, body)),
            }
        }
    }

    /// Starts over from `from` (a new session of the same group).
    pub fn seek(&mut self, from: StartAt) -> Result<(), Error> {
        let (stream, info) = open(&self.addrs, &self.opts, from)?;
        self.stream = stream;
        self.info = info;
        self.next = info.start;
        self.end = info.end;
        self.committed = info.committed;
        self.queued.clear();
        self.chunk.clear();
        self.rec_at = 0;
        self.rec_end = 0;
        self.frame_at = 0;
        self.consumed = 0;
        self.ended = false;
        Ok(())
    }

    /// Takes the next chunk of records into `chunk`.
    fn fill(&mut self) -> Result<(), Error> {
        self.chunk.clear();
        self.rec_at = 0;
        self.rec_end = 0;
        self.frame_at = 0;
        loop {
            let (h, body) = match self.queued.pop_front() {
                Some(queued) => queued,
                None => self.read_chunk(true)?,
            };
            if h.kind == ChunkKind::Records {
                self.chunk = body;
                if self.next < h.a {
                    // Records skipped by the filters.
                    self.next = h.a;
                }
                return Ok(());
            }
            self.control(&h)?;
            if self.ended {
                return Ok(());
            }
        }
    }

    fn control(&mut self, h: &ChunkHeader) -> Result<(), Error> {
        match h.kind {
            ChunkKind::Heartbeat => {
                self.end = h.a;
                self.next = self.next.max(h.b);
            }
            ChunkKind::Gap => {
                self.gaps.push((h.a, h.b));
                self.next = self.next.max(h.b);
            }
            ChunkKind::Committed => self.committed = Some(h.a),
            ChunkKind::End => {
                self.end = h.a;
                self.next = self.next.max(h.a);
                self.ended = true;
            }
            ChunkKind::Closing => return Err(Error::Closed(h.reason)),
            ChunkKind::Records => {}
        }
        Ok(())
    }

    /// Reads one chunk (header and records), granting credit as records
    /// are taken.
    fn read_chunk(&mut self, reuse: bool) -> Result<(ChunkHeader, Vec<u8>), Error> {
        let mut head = [0u8; CHUNK_HEADER_LEN];
        self.stream.read_exact(&mut head)?;
        let h = ChunkHeader::decode(&head).map_err(|_| Error::Protocol("a bad chunk header"))?;
        let mut body = Vec::new();
        if h.kind == ChunkKind::Records {
            if reuse {
                body = std::mem::take(&mut self.chunk);
            }
            body.clear();
            body.resize(h.bytes as usize, 0);
            self.stream.read_exact(&mut body)?;
            self.consumed += u64::from(h.bytes);
            let window = u64::from(self.opts.window.max(self.info.max_record));
            if self.consumed >= window / 2 {
                let mut b = [0u8; 16];
                SessionFrame::Credit(self.consumed.min(u64::from(u32::MAX)) as u32)
                    .encode(&mut b)
                    .map_err(|_| Error::Encode("credit"))?;
                self.stream.write_all(&b)?;
                self.consumed = 0;
            }
        }
        Ok((h, body))
    }
}

fn open(
    addrs: &[SocketAddr],
    opts: &ConsumerOptions,
    from: StartAt,
) -> Result<(crate::tls::Duplex, SessionInfo), Error> {
    let (start, offset) = match from {
        StartAt::Earliest => (Start::Earliest, 0),
        StartAt::Latest => (Start::Latest, 0),
        StartAt::Committed => (Start::Committed, 0),
        StartAt::Offset(o) => (Start::Offset, o),
    };
    let group = opts.group.as_deref().unwrap_or("").as_bytes();
    let req = ReadRequest {
        start,
        follow: opts.follow,
        classes: ClassSet::of(&opts.classes),
        offset,
        credit: opts.window,
        group,
        prefix: opts.topic_prefix.as_bytes(),
    };
    let mut buf = vec![0u8; req.encoded_len()];
    req.encode(&mut buf)
        .map_err(|_| Error::Encode("a group or topic prefix over 255 bytes"))?;
    let (recv, send) = crate::tls::connect(addrs, opts.tls.as_ref(), opts.read_timeout)?;
    let mut stream = crate::tls::Duplex { recv, send };
    if let Some(t) = &opts.token {
        crate::hello(&mut stream, t)?;
    }
    stream.write_all(&buf)?;
    let mut a = [0u8; SESSION_ANSWER_LEN];
    stream.read_exact(&mut a)?;
    let answer = SessionAnswer::decode(&a).map_err(|_| Error::Protocol("a bad session answer"))?;
    let info = SessionInfo {
        start: answer.start,
        first: answer.first,
        end: answer.end,
        committed: (answer.committed != NONE_OFFSET).then_some(answer.committed),
        max_record: answer.max_record,
    };
    if let Some(reason) = answer.reason {
        return Err(Error::Refused {
            reason,
            first: info.first,
            end: info.end,
        });
    }
    if answer.max_record > opts.window {
        // Keep at least one largest record open.
        let mut b = [0u8; 16];
        SessionFrame::Credit(answer.max_record - opts.window)
            .encode(&mut b)
            .map_err(|_| Error::Encode("credit"))?;
        stream.write_all(&b)?;
    }
    Ok((stream, info))
}

impl StartAt {
    /// Parses `earliest`, `latest`, `committed` or an offset.
    pub fn parse(s: &str) -> Option<StartAt> {
        match s {
            "earliest" => Some(StartAt::Earliest),
            "latest" => Some(StartAt::Latest),
            "committed" => Some(StartAt::Committed),
            n => n.parse().ok().map(StartAt::Offset),
        }
    }
}
