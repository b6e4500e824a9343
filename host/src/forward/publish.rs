//! The `es-forward` thread: a current-thread runtime that runs the NATS
//! client and the publish loop (docs/scale-out.md).
//!
//! The loop keeps up to `--forward-max-pending` publishes awaiting their
//! JetStream ack and takes the acks in log order; every event below
//! `acked` is stored in the stream. A failed or timed-out publish drops
//! everything in flight and publishes again from `acked`, in order, after
//! a backoff; JetStream's duplicate window drops what had arrived (counted
//! from the acks' `duplicate` flag). The cursor (`acked`) goes to the
//! consumer groups' commit thread every [`COMMIT_EVERY`], and is saved
//! once more, synchronously, at shutdown.

use std::collections::VecDeque;
use std::sync::atomic::Ordering;
use std::sync::mpsc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::context::ContextBuilder;
use async_nats::jetstream::Context;
use std::future::IntoFuture;

use super::log::LogReader;
use super::nats::{ensure_stream, log_limited, message, Message};
use super::{ForwardParts, CURSOR_GROUP};
use crate::readers::groups::{CommitReq, FORWARD_SESSION};
use crate::shared::Phase;

/// The cursor is committed at least this often while it moves.
const COMMIT_EVERY: Duration = Duration::from_millis(100);
/// Sleep when every durable event is acked: from the first, doubling to
/// the longest while nothing new is durable (the durable end moves once per
/// fsync: each second under the default policy).
const IDLE_MIN: Duration = Duration::from_millis(1);
const IDLE_MAX: Duration = Duration::from_millis(50);
/// Written events undurable this long are made durable by the forwarder.
const STALE_SYNC: Duration = Duration::from_secs(1);
/// A wait for an ack looks at the server's phase this often.
const STOP_CHECK: Duration = Duration::from_millis(100);
/// First and longest wait before publishing again after a failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(2);
/// At shutdown, the acks in flight are awaited this long at most.
const SHUTDOWN_ACKS: Duration = Duration::from_secs(2);
/// Publishes one read may add past --forward-max-pending at most (the
/// rest of one record).
const IN_FLIGHT_ROOM: usize = u16::MAX as usize + READ_STEP;
/// The forwarder thread's nice value.
const FORWARD_NICE: i32 = 10;
/// Events read from the log per step at most.
const READ_STEP: usize = 16;

/// One publish awaiting its ack.
struct Pending {
    offset: u64,
    recv_ns: u64,
    /// The ack (it times out after --forward-ack-timeout); boxed, so a
    /// wait can stop to look at the phase and wait again.
    ack: AckFuture,
}

type AckFuture = std::pin::Pin<
    Box<
        dyn std::future::Future<
                Output = Result<
                    async_nats::jetstream::publish::PublishAck,
                    async_nats::jetstream::context::PublishError,
                >,
            > + Send,
    >,
>;

/// Awaits `fut`, or None at the stop (looked at every [`STOP_CHECK`]).
async fn until_stop<T>(
    fut: impl std::future::Future<Output = T>,
    shared: &crate::shared::Shared,
) -> Option<T> {
    let mut fut = std::pin::pin!(fut);
    // Most are ready at once (a publish into the client's queue, an ack
    // that came): no timer for those.
    let first = std::future::poll_fn(|cx| std::task::Poll::Ready(fut.as_mut().poll(cx))).await;
    if let std::task::Poll::Ready(v) = first {
        return Some(v);
    }
    loop {
        match tokio::time::timeout(STOP_CHECK, fut.as_mut()).await {
            Ok(v) => return Some(v),
            Err(_) if shared.phase() == Phase::Stop => return None,
            Err(_) => {}
        }
    }
}

/// Sleeps `d`, waking early at the stop.
async fn nap(d: Duration, shared: &crate::shared::Shared) {
    let end = Instant::now() + d;
    while shared.phase() != Phase::Stop {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        tokio::time::sleep(left.min(STOP_CHECK)).await;
    }
}

/// Runs the thread; `started` hears once whether the stream is there.
pub(super) fn run(
    p: ForwardParts,
    started: mpsc::Sender<Result<(), String>>,
) -> Result<(), String> {
    // Ingest comes first when the CPU is short: the forwarder catches up
    // later (docs/decisions.md, "Forwarding").
    if let Err(e) = super::set_thread_nice(FORWARD_NICE) {
        eprintln!("eventstream: forward: cannot lower its priority: {e}");
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("forward: cannot build its runtime: {e}"))?;
    rt.block_on(forward(p, started))
}

/// The publish loop's state.
struct Loop {
    p: ForwardParts,
    js: Context,
    client: async_nats::Client,
    reader: LogReader,
    pending: VecDeque<Pending>,
    /// Every event below it is acked.
    acked: u64,
    /// Sent to the commit thread up to here.
    committed: u64,
    last_commit: Instant,
    backoff: Duration,
    ready: bool,
    batch: Vec<Message>,
    /// When the oldest unacked event's age was last read off the log, and
    /// what it was (cursor, receive time).
    last_peek: Option<Instant>,
    peeked: Option<(u64, u64)>,
    /// Since when the durable end has stayed at this offset below the
    /// written end.
    stale: Option<(Instant, u64)>,
}

impl Loop {
    fn stats(&self) -> &super::ForwardStats {
        &self.p.shared.forward
    }

    /// Records acks up to `next` (the offset after the last acked event).
    fn acked_to(&mut self, next: u64) {
        self.acked = next;
        self.p.tail.set_forward_hold(Some(next));
        let s = &self.p.shared.forward;
        s.acked_offset.store(next, Ordering::Relaxed);
        if let Some(q) = self.pending.front() {
            s.oldest_unacked_ns.store(q.recv_ns, Ordering::Relaxed);
        }
    }

    /// A publish failed: everything in flight goes again from `acked`.
    async fn failed(&mut self, what: &str) {
        let dropped = self.pending.len();
        self.pending.clear();
        self.reader.rewind(self.acked);
        self.stats().failures.fetch_add(1, Ordering::Relaxed);
        self.stats().up.store(false, Ordering::Relaxed);
        log_limited(&format!(
            "forward: {what}; publishing again from offset {} ({dropped} in flight) in {:?}",
            self.acked, self.backoff
        ));
        self.note_oldest();
        nap(self.backoff, &self.p.shared).await;
        self.backoff = (self.backoff * 2).min(BACKOFF_MAX);
        self.ready = false;
    }

    /// Makes the log durable itself when written events have stayed
    /// undurable for [`STALE_SYNC`] (`--fsync never`, or a long interval):
    /// only durable events are forwarded.
    fn sync_if_stale(&mut self) {
        let tail = &self.p.tail;
        let durable = tail.durable.load().offset;
        let position = tail.written.load();
        if position.offset == durable {
            self.stale = None;
            return;
        }
        match self.stale {
            Some((since, at)) if at == durable => {
                if since.elapsed() < STALE_SYNC {
                    return;
                }
                match self.p.sync.sync() {
                    Ok(()) => tail.publish_durable(position),
                    Err(e) => log_limited(&format!("forward: the log's fsync failed: {e}")),
                }
                self.stale = None;
            }
            _ => self.stale = Some((Instant::now(), durable)),
        }
    }

    /// Sets the lag's age while nothing is in flight: 0 when every written
    /// event is acked, else the receive time of the oldest not acked, read
    /// off the log (once per cursor position, at most once a second).
    fn note_oldest(&mut self) {
        let s = &self.p.shared.forward;
        if self.acked >= self.p.tail.written.load().offset {
            s.oldest_unacked_ns.store(0, Ordering::Relaxed);
            return;
        }
        if let Some((at, recv)) = self.peeked {
            if at == self.acked {
                s.oldest_unacked_ns.store(recv, Ordering::Relaxed);
                return;
            }
        }
        if self
            .last_peek
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        self.last_peek = Some(Instant::now());
        // Not durable yet: not readable, age unknown (0) until it is.
        let recv = self.reader.peek_recv_ns().ok().flatten().unwrap_or(0);
        self.stats()
            .oldest_unacked_ns
            .store(recv, Ordering::Relaxed);
        if recv != 0 {
            self.peeked = Some((self.acked, recv));
        }
    }

    /// Sends the cursor to the commit thread if it moved and is due.
    fn commit(&mut self) {
        if self.acked == self.committed || self.last_commit.elapsed() < COMMIT_EVERY {
            return;
        }
        self.p.groups.commit(CommitReq {
            session: FORWARD_SESSION,
            group: CURSOR_GROUP.to_string(),
            offset: self.acked,
        });
        self.committed = self.acked;
        self.last_commit = Instant::now();
    }

    /// Reads events and publishes them while there is room in flight.
    /// Returns false after a failure.
    async fn publish_more(&mut self) -> Result<bool, String> {
        let max = self.p.cfg.max_pending;
        while self.pending.len() < max {
            let room = (max - self.pending.len()).min(READ_STEP);
            let (cfg, id) = (&self.p.cfg, self.p.server_id.as_str());
            let batch = &mut self.batch;
            let found = self
                .reader
                .read(room, |ev| batch.push(message(ev, cfg, id)))
                .map_err(|e| format!("forward: cannot read the log: {e}"))?;
            if let Some((from, to)) = found.skipped {
                self.stats().skipped.fetch_add(to - from, Ordering::Relaxed);
                eprintln!(
                    "eventstream: forward: offsets {from}..{to} ({} events) were deleted by retention before they were forwarded",
                    to - from
                );
                if self.pending.is_empty() && self.acked < to {
                    self.acked_to(to);
                }
            }
            if self.batch.is_empty() {
                return Ok(true);
            }
            let mut batch = std::mem::take(&mut self.batch);
            let mut failed = None;
            for m in batch.drain(..) {
                // Neither the client's queue nor its ack permits are ever
                // short (sized for twice what may be in flight), so a
                // publish waits only for its turn on this thread.
                let sent = until_stop(
                    self.js
                        .publish_with_headers(m.subject, m.headers, m.payload),
                    &self.p.shared,
                )
                .await;
                let Some(sent) = sent else {
                    // The stop: what is in flight is awaited there.
                    break;
                };
                match sent {
                    Ok(ack) => {
                        if self.pending.is_empty() {
                            self.stats()
                                .oldest_unacked_ns
                                .store(m.recv_ns, Ordering::Relaxed);
                        }
                        self.pending.push_back(Pending {
                            offset: m.offset,
                            recv_ns: m.recv_ns,
                            ack: Box::pin(ack.into_future()),
                        });
                        self.stats().published.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        failed = Some(e);
                        break;
                    }
                }
            }
            batch.clear();
            // Its room is kept for the next read.
            self.batch = batch;
            if let Some(e) = failed {
                self.failed(&format!("publish failed: {e}")).await;
                return Ok(false);
            }
        }
        Ok(true)
    }

    /// Takes acks in order: at least one, then while fewer than a refill's
    /// worth of room is free (or, with `deadline`, all of them until then).
    /// Returns at the stop, or after a failure.
    async fn take_acks(&mut self, deadline: Option<Instant>) {
        let refill = (self.p.cfg.max_pending / 8).clamp(1, READ_STEP);
        while let Some(front) = self.pending.front_mut() {
            let got = match deadline {
                Some(d) => {
                    let wait = d.saturating_duration_since(Instant::now());
                    match tokio::time::timeout(wait, front.ack.as_mut()).await {
                        Ok(r) => r,
                        Err(_) => return,
                    }
                }
                None => match until_stop(front.ack.as_mut(), &self.p.shared).await {
                    Some(r) => r,
                    None => return,
                },
            };
            let Some(front) = self.pending.pop_front() else {
                return;
            };
            match got {
                Ok(ack) => {
                    let c = if ack.duplicate {
                        &self.stats().duplicates
                    } else {
                        &self.stats().acked
                    };
                    c.fetch_add(1, Ordering::Relaxed);
                    self.acked_to(front.offset + 1);
                    self.backoff = BACKOFF_MIN;
                }
                Err(e) => {
                    self.failed(&format!(
                        "publish of offset {} not acked: {e}",
                        front.offset
                    ))
                    .await;
                    return;
                }
            }
            if deadline.is_none() && self.pending.len() + refill <= self.p.cfg.max_pending {
                break;
            }
        }
    }
}

async fn forward(p: ForwardParts, started: mpsc::Sender<Result<(), String>>) -> Result<(), String> {
    let start = p.start;
    eprintln!(
        "eventstream: forward: to stream {} at {} from offset {start} (server id {})",
        p.cfg.stream,
        p.cfg.servers.join(","),
        p.server_id
    );
    // Twice what may be in flight (one record of up to 65,535 events past
    // --forward-max-pending): a dropped ack (after a failure) keeps its
    // permit until its own timeout, and nothing waits for room.
    let room = 2 * (IN_FLIGHT_ROOM + p.cfg.max_pending);
    let mut opts = async_nats::ConnectOptions::new()
        .name("eventstream-forward")
        .retry_on_initial_connect()
        .connection_timeout(Duration::from_secs(2))
        .reconnect_delay_callback(|n| Duration::from_millis((n as u64 * 100).min(1000)))
        // Room for every publish in flight: a publish never waits for the
        // client's queue.
        .client_capacity(room);
    if let Some(t) = &p.cfg.token {
        opts = opts.token(t.clone());
    }
    if let Some(ca) = &p.cfg.tls_ca {
        opts = opts.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let Some((cert, key)) = &p.cfg.tls_cert {
        opts = opts.add_client_certificate(cert.clone(), key.clone());
    }
    let client = async_nats::connect_with_options(p.cfg.servers.clone(), opts)
        .await
        .map_err(|e| format!("forward: cannot start the NATS client: {e}"))?;
    let js = ContextBuilder::new()
        .timeout(p.cfg.ack_timeout)
        .ack_timeout(p.cfg.ack_timeout)
        .backpressure_on_inflight(false)
        .max_ack_inflight(room)
        .build(client.clone());
    let reader = LogReader::new(p.tail.clone(), p.gaps.clone(), start);
    let mut l = Loop {
        p,
        js,
        client,
        reader,
        pending: VecDeque::new(),
        acked: start,
        committed: start,
        last_commit: Instant::now(),
        backoff: BACKOFF_MIN,
        ready: false,
        batch: Vec::with_capacity(READ_STEP),
        last_peek: None,
        peeked: None,
        stale: None,
    };
    let mut idle = IDLE_MIN;
    let mut started = Some(started);
    loop {
        if l.p.shared.phase() == Phase::Stop {
            break;
        }
        if !l.ready {
            l.note_oldest();
            if l.client.connection_state() != State::Connected {
                nap(Duration::from_millis(20), &l.p.shared).await;
                continue;
            }
            let Some(found) = until_stop(ensure_stream(&l.js, &l.p.cfg), &l.p.shared).await else {
                continue;
            };
            match found {
                Ok(true) => {
                    l.ready = true;
                    l.stats().up.store(true, Ordering::Relaxed);
                    if let Some(tx) = started.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
                Ok(false) => nap(l.backoff, &l.p.shared).await,
                Err(e) => {
                    if let Some(tx) = started.take() {
                        let _ = tx.send(Err(e));
                        return Ok(());
                    }
                    log_limited(&e);
                    nap(BACKOFF_MAX, &l.p.shared).await;
                }
            }
            continue;
        }
        if l.client.connection_state() != State::Connected {
            // Lost: what is in flight goes again once a server is back
            // (JetStream drops what had arrived).
            if l.pending.is_empty() {
                l.stats().up.store(false, Ordering::Relaxed);
                l.ready = false;
                log_limited("forward: the connection to NATS is lost; waiting for a server");
            } else {
                l.failed("the connection to NATS is lost").await;
            }
            continue;
        }
        match l.publish_more().await {
            Ok(true) => {}
            Ok(false) => continue,
            // A read error (a segment retention deleted under the reader,
            // say) is retried from the cursor like a failed publish.
            Err(e) => {
                l.failed(&e).await;
                continue;
            }
        }
        if l.pending.is_empty() {
            l.note_oldest();
            l.commit();
            l.sync_if_stale();
            nap(idle, &l.p.shared).await;
            idle = (idle * 2).min(IDLE_MAX);
            continue;
        }
        idle = IDLE_MIN;
        l.take_acks(None).await;
        l.commit();
    }
    // Shutdown: the acks in flight, then the cursor, saved here (the
    // commit thread may be gone).
    if l.ready && !l.pending.is_empty() {
        let deadline = Instant::now() + SHUTDOWN_ACKS;
        l.take_acks(Some(deadline)).await;
    }
    if let Err(e) = l.p.groups.commit_now(CURSOR_GROUP, l.acked) {
        eprintln!("eventstream: forward: cannot save its cursor: {e}");
    }
    Ok(())
}
