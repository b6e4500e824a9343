//! What travels between the stages: an accepted [`Event`] (its frame in a
//! pool slot) and a processor's outcome for it ([`Work`]), which storage
//! turns into a record and an ack.

use crate::batch::BatchItem;
use crate::dedup::DedupHint;
use crate::event::Class;
use crate::pool::EventRef;
use crate::process::Outcome;
use crate::wire::{Frame, FrameHead, Reason};

/// One accepted event on its way: its v1 frame in a pool slot (legacy events
/// already converted), and where its ack goes.
pub struct Event<'p> {
    data: EventRef<'p>,
    /// The frame's head, from its validation at ingest (no later stage
    /// validates the frame again).
    head: FrameHead,
    /// Connection the event came from.
    pub conn: u32,
    /// The class routing chose.
    pub class: Class,
    /// Wall clock at ingest, unix ns.
    pub recv_wall_ns: u64,
    /// Monotonic clock at ingest, ns.
    pub recv_mono_ns: u64,
    /// Where the transactional processor put its id in the dedup table
    /// (for the offset storage records there), else `DedupHint::NONE`.
    pub dedup: DedupHint,
}

impl<'p> Event<'p> {
    /// An event whose frame bytes are in `data`, with the head of the
    /// frame's validated view ([`Frame::head`]).
    pub fn new(
        data: EventRef<'p>,
        head: FrameHead,
        conn: u32,
        class: Class,
        recv_wall_ns: u64,
        recv_mono_ns: u64,
    ) -> Self {
        Self {
            data,
            head,
            conn,
            class,
            recv_wall_ns,
            recv_mono_ns,
            dedup: DedupHint::NONE,
        }
    }

    /// The stored frame's bytes.
    pub fn bytes(&self) -> &[u8] {
        self.data.bytes()
    }

    /// Starts loading the frame's bytes into this core's cache (a hint;
    /// see [`EventRef::prefetch`]).
    #[inline]
    pub fn prefetch(&self) {
        self.data.prefetch();
    }

    /// The frame, validated at ingest (read through the head it kept).
    #[inline]
    pub fn frame(&self) -> Frame<&[u8]> {
        Frame::with_head(self.data.bytes(), self.head)
    }
}

impl BatchItem for Event<'_> {
    fn topic(&self) -> &[u8] {
        self.frame().topic_bytes()
    }
    fn partition(&self) -> u32 {
        self.frame().partition()
    }
    fn frame(&self) -> Option<Frame<&[u8]>> {
        Some(Event::frame(self))
    }
    fn recv_ns(&self) -> u64 {
        self.recv_wall_ns
    }
}

/// What the processors hand to storage.
pub enum Work<'p> {
    /// Write this event as a single record.
    Store(Event<'p>),
    /// Write nothing; only answer.
    Answer(Answer),
}

/// A processor outcome that writes nothing: storage only answers it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Answer {
    /// A duplicate: answer DUPLICATE once the original is stored.
    Duplicate {
        /// Connection to answer.
        conn: u32,
        /// The event's id.
        event_id: u64,
        /// The ACK flag.
        ack: bool,
        /// Its class.
        class: Class,
        /// The original's offset, if already known.
        offset: Option<u64>,
    },
    /// Not stored: answer REJECTED.
    Reject {
        /// Connection to answer.
        conn: u32,
        /// The event's id.
        event_id: u64,
        /// The ACK flag.
        ack: bool,
        /// Why.
        reason: Reason,
    },
}

impl<'p> Work<'p> {
    /// What storage gets for a realtime or transactional `ev`: `decide`
    /// runs its processor on its frame. A stored event keeps its frame;
    /// the others need only its id and ACK flag.
    pub fn decided(ev: Event<'p>, decide: impl FnOnce(&Frame<&[u8]>) -> Outcome) -> Work<'p> {
        Self::decided_hinted(ev, |f| (decide(f), DedupHint::NONE))
    }

    /// [`Self::decided`] with a processor that also says where the event's
    /// id went in the dedup table (`TransactionalProcessor::handle_hinted`);
    /// a stored event carries that hint to storage.
    pub fn decided_hinted(
        mut ev: Event<'p>,
        decide: impl FnOnce(&Frame<&[u8]>) -> (Outcome, DedupHint),
    ) -> Work<'p> {
        let f = ev.frame();
        let (outcome, hint) = decide(&f);
        let (event_id, ack) = (f.event_id(), f.ack_requested());
        match outcome {
            Outcome::Store | Outcome::Buffered => {
                ev.dedup = hint;
                Work::Store(ev)
            }
            Outcome::Duplicate(offset) => Work::Answer(Answer::Duplicate {
                conn: ev.conn,
                event_id,
                ack,
                class: ev.class,
                offset,
            }),
            Outcome::Rejected(reason) => Work::Answer(Answer::Reject {
                conn: ev.conn,
                event_id,
                ack,
                reason,
            }),
        }
    }
}
