//! EventStreamCore engine core: everything that decides what happens to an
//! event, with no operating system and no allocator.
//!
//! Guarantees: `#![no_std]`, the `alloc` crate is never linked, no input bytes
//! can make any function panic, every capacity is a const generic or a
//! caller-provided buffer. Only 32-bit atomics are used, so the code that loom
//! and miri check on the host is the code the Cortex-M4 firmware runs.
//!
//! `PROTOCOL.md` beside this crate is the byte-level contract the [`wire`]
//! module implements.
#![no_std]
#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]
#![warn(clippy::missing_safety_doc)]

#[cfg(test)]
extern crate std;

pub mod answer;
pub mod batch;
pub mod crc32c;
pub mod dedup;
pub mod event;
pub mod flash;
pub mod metrics;
pub mod pipeline;
pub mod pool;
pub mod process;
pub mod record;
pub mod ring;
pub mod route;
pub mod splitmix;
mod sync;
pub mod uplink;
pub mod wire;

pub use event::{Class, EventId, Priority};
