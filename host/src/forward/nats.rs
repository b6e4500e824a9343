//! The forwarder's side of NATS: the stream looked up or made, and the
//! message of each event (subject, headers, payload; docs/scale-out.md).

use std::sync::atomic::Ordering;

use async_nats::jetstream::stream::{Config, StorageType};
use async_nats::jetstream::Context;
use async_nats::HeaderMap;
use bytes::Bytes;
use eventstream_core::Class;

use super::log::Event;
use super::ForwardConfig;

/// One message, made from an event.
pub(super) struct Message {
    pub(super) offset: u64,
    pub(super) recv_ns: u64,
    pub(super) subject: String,
    pub(super) headers: HeaderMap,
    pub(super) payload: Bytes,
}

/// Whether the stream is there (made if asked); Err(fatal) for a missing
/// stream without --forward-create-stream, Ok(false) if NATS did not
/// answer.
pub(super) async fn ensure_stream(js: &Context, cfg: &ForwardConfig) -> Result<bool, String> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;
    match js.get_stream(&cfg.stream).await {
        Ok(_) => return Ok(true),
        Err(e) => match e.kind() {
            GetStreamErrorKind::JetStream(j) if j.error_code() == ErrorCode::STREAM_NOT_FOUND => {}
            _ => {
                log_limited(&format!(
                    "forward: cannot look up stream {}: {e}",
                    cfg.stream
                ));
                return Ok(false);
            }
        },
    }
    if !cfg.create_stream {
        return Err(format!(
            "forward: NATS has no stream {:?} (create it, or give --forward-create-stream)",
            cfg.stream
        ));
    }
    let config = Config {
        name: cfg.stream.clone(),
        subjects: vec![cfg.subject.filter().to_string()],
        storage: StorageType::File,
        num_replicas: cfg.replicas,
        duplicate_window: cfg.duplicate_window,
        ..Default::default()
    };
    match js.create_stream(config).await {
        Ok(_) => {
            eprintln!(
                "eventstream: forward: created stream {} (subjects {}, {} replicas, duplicate window {:?})",
                cfg.stream,
                cfg.subject.filter(),
                cfg.replicas,
                cfg.duplicate_window
            );
            Ok(true)
        }
        Err(e) => {
            log_limited(&format!(
                "forward: cannot create stream {}: {e}",
                cfg.stream
            ));
            Ok(false)
        }
    }
}

/// One line to stderr, at most one a second (a NATS outage would print
/// one per retry otherwise).
pub(super) fn log_limited(line: &str) {
    use std::sync::atomic::AtomicU64;
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = crate::sys::monotonic_ns();
    let last = LAST.load(Ordering::Relaxed);
    if last == 0 || now.saturating_sub(last) >= 1_000_000_000 {
        LAST.store(now, Ordering::Relaxed);
        eprintln!("eventstream: {line}");
    }
}

/// Makes the message of one event.
pub(super) fn message(ev: &Event<'_>, cfg: &ForwardConfig, server_id: &str) -> Message {
    let f = &ev.frame;
    let mut subject = String::with_capacity(64);
    cfg.subject.render(
        &mut subject,
        ev.class.name(),
        f.topic_bytes(),
        f.priority().name(),
        f.partition(),
    );
    // Transactional v1 ids are the producer's: one event through two of
    // our servers is one message. The others are this log's own.
    let id = if ev.class == Class::Transactional && !f.is_legacy() {
        f.event_id().to_string()
    } else {
        format!("{server_id}-{}", ev.offset)
    };
    let mut h = HeaderMap::new();
    h.insert("Nats-Msg-Id", id);
    h.insert("Es-Offset", ev.offset.to_string());
    h.insert("Es-Server", server_id);
    h.insert("Es-Event-Id", f.event_id().to_string());
    h.insert("Es-Class", ev.class.name());
    h.insert("Es-Priority", f.priority().name());
    h.insert("Es-Partition", f.partition().to_string());
    h.insert("Es-Timestamp-Ns", f.timestamp_ns().to_string());
    h.insert("Es-Recv-Ns", ev.recv_ns.to_string());
    if f.is_legacy() {
        h.insert("Es-Legacy", "1");
    }
    Message {
        offset: ev.offset,
        recv_ns: ev.recv_ns,
        subject,
        headers: h,
        payload: Bytes::copy_from_slice(f.payload()),
    }
}
