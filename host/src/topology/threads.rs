//! The threaded layout: a class ring to each processor thread.

use std::sync::Arc;

use eventstream_core::pipeline::Event;
use eventstream_core::ring::Producer;
use eventstream_core::Class;

use super::Downstream;
use crate::shared::Shared;

/// Ingest's side of the processor threads: their class rings.
pub struct Threads {
    tx: [Producer<'static, Event<'static>>; 3],
    /// Rings pushed to since the last step (their thread is woken then).
    pushed: [bool; 3],
    shared: Arc<Shared>,
}

impl Threads {
    /// Over the three class rings (realtime, transactional, batch).
    pub fn new(tx: [Producer<'static, Event<'static>>; 3], shared: Arc<Shared>) -> Self {
        Self {
            tx,
            pushed: [false; 3],
            shared,
        }
    }
}

impl Downstream for Threads {
    fn room(&mut self) -> bool {
        self.tx.iter_mut().all(|tx| tx.has_room(1))
    }

    fn push(&mut self, class: Class, ev: Event<'static>, _now: u64) -> bool {
        let Some(tx) = self.tx.get_mut(class.index()) else {
            return false;
        };
        // Room was checked before decoding.
        let taken = tx.push(ev).is_ok();
        self.pushed[class.index()] |= taken;
        taken
    }

    fn starved(&mut self) {
        self.shared.wake.batch.wake();
    }

    fn step(&mut self, _now: u64) -> bool {
        for (c, pushed) in self.pushed.iter_mut().enumerate() {
            if std::mem::take(pushed) {
                match c {
                    0 => self.shared.wake.realtime.wake(),
                    1 => self.shared.wake.transactional.wake(),
                    _ => self.shared.wake.batch.wake(),
                }
            }
        }
        false
    }

    fn next_deadline(&mut self, _now: u64) -> Option<u64> {
        None
    }

    fn has_work(&mut self) -> bool {
        false
    }
}
