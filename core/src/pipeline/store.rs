//! The pipeline's storage stage: each record is appended to the sink as it
//! is built, and its events are settled by the [`Answers`] state machine
//! right after (no group commit: the sink's append is the durable step).

use super::{Clock, Event, Sink, StorageFailed, Work};
use crate::answer::{AckOut, Answers, Deferred, NoGroupCommit, Owed};
use crate::batch::{Aggregate, Closed};
use crate::event::Class;
use crate::metrics::Counter;
use crate::record::{RecordBuilder, RecordKind};
use crate::wire::Ack;

/// Latency samples the pipeline's metrics hold between flushes.
const SAMPLES: usize = 32;
/// Duplicates whose original is not stored yet, held at most. On one thread
/// an original is stored in the step that accepted it, so this stays empty
/// unless another thread shares the table; when it is full, the processors
/// wait.
const DEFERRED: usize = 8;

/// The answers of a pipeline.
pub(super) type PipelineAnswers<'a, const B: usize> =
    Answers<'a, heapless::Deque<Deferred, DEFERRED>, NoGroupCommit, SAMPLES, B>;

/// The storage stage: records to the sink, acks for every outcome.
pub(super) struct Store<'a, C, S, const B: usize> {
    pub(super) record_buf: &'a mut [u8],
    pub(super) answers: PipelineAnswers<'a, B>,
    pub(super) clock: C,
    pub(super) sink: S,
}

/// The sink as the answers' ack output.
struct Acks<'s, S>(&'s mut S);

impl<S: Sink> AckOut for Acks<'_, S> {
    fn ack(&mut self, conn: u32, ack: Ack) {
        self.0.ack(conn, ack);
    }
}

impl<'p, C: Clock, S: Sink, const B: usize> Store<'_, C, S, B> {
    /// Handles one processor outcome.
    pub(super) fn work(&mut self, work: Work<'p>) {
        match work {
            Work::Store(ev) => {
                self.write(RecordKind::Single, ev.class, || core::iter::once(&ev));
            }
            Work::Answer(answer) => {
                let now = self.clock.monotonic_ns();
                if let Some(owed) = self.answers.outcome(answer, now / 1_000_000) {
                    self.answers
                        .settle(owed, true, 0, now, &mut Acks(&mut self.sink));
                }
            }
        }
    }

    /// Writes the events (one, or a batch window's, each call of `events`
    /// yielding them in order) as one record, built from the pool slots in
    /// place, and settles each of them.
    fn write<'e, I>(&mut self, kind: RecordKind, class: Class, events: impl Fn() -> I)
    where
        'p: 'e,
        I: Iterator<Item = &'e Event<'p>>,
    {
        let offset = self.sink.next_offset();
        let mut recv_ns = None;
        let mut count = 0u16;
        let mut built = 0u16;
        let record = match RecordBuilder::new(self.record_buf, kind, class, 0) {
            Ok(mut rec) => {
                for ev in events() {
                    count = count.saturating_add(1);
                    recv_ns.get_or_insert(ev.recv_wall_ns);
                    if rec.push(ev.bytes()).is_ok() {
                        built += 1;
                    }
                }
                rec.set_recv_ns(recv_ns.unwrap_or(0));
                rec.finish(offset).ok()
            }
            Err(_) => None,
        };
        let result = match record {
            Some(bytes) if built == count && count > 0 => self.sink.append(bytes, count),
            _ => Err(StorageFailed),
        };
        if kind == RecordKind::Batch {
            self.answers
                .metrics()
                .add(Counter::Batches, u64::from(result.is_ok()));
        }
        let now = self.clock.monotonic_ns();
        for (i, ev) in events().enumerate() {
            let owed = Owed::stored(ev, offset + i as u64);
            self.answers
                .settle(owed, result.is_ok(), 0, now, &mut Acks(&mut self.sink));
        }
    }

    /// Answers the deferred duplicates whose original is now stored.
    pub(super) fn retry_deferred(&mut self) -> bool {
        let now = self.clock.monotonic_ns();
        let answered =
            self.answers
                .retry_deferred(now / 1_000_000, 0, now, &mut Acks(&mut self.sink));
        answered > 0
    }
}

/// Storage of a closed batch window: one batch record, then the answers.
impl<'p, C: Clock, S: Sink, const B: usize> Aggregate<Event<'p>> for Store<'_, C, S, B> {
    fn aggregate(&mut self, window: Closed<'_, Event<'p>>) {
        // The window's events are dropped (their slots freed) after this.
        self.write(RecordKind::Batch, Class::Batch, || window.iter());
    }
}
