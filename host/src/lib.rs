//! EventStreamCore's Linux server: the engine core run on threads joined by
//! its SPSC rings, an epoll ingest loop, the segmented storage log, the
//! Prometheus endpoint, and the log inspector.

#![deny(missing_docs)]
#![deny(clippy::undocumented_unsafe_blocks)]

pub mod auth;
pub mod config;
pub mod consume;
pub mod endpoint;
pub mod exposure;
pub mod forward;
pub mod ingest;
pub mod inspect;
pub mod load;
pub mod processors;
pub mod produce;
pub mod prometheus;
pub mod readers;
pub mod rebuild;
pub mod repair;
pub mod report;
pub mod server;
pub mod settings;
pub mod shared;
pub mod signals;
pub mod storage;
pub mod sys;
pub mod tls;
pub mod topology;
pub mod writer;
