//! What pylon's tests (`tests/`) and benchmarks (`benches/`) share: child
//! processes of `pylon proxy` and `pylon-control serve` started once they log
//! their readiness line, the admin HTTP client, OTLP receivers, polling
//! until something holds ([`eventually`]), scratch directories, and policy
//! built through the model's writer.
//!
//! A dev-only crate (`publish = false`): nothing here ships in a binary.
//! Binaries are passed in by path, because only the root package's tests
//! and benches know them (`env!("CARGO_BIN_EXE_pylon")`). Helpers that only
//! the end-to-end tests use (the echo and chaos servers, network
//! namespaces, pods) live in `tests/e2e/common`.

#![allow(clippy::unwrap_used, clippy::expect_used)]
#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod control;
pub mod otlp;
pub mod policy;
pub mod process;
pub mod sidecar;

mod poll;
mod scratch;

pub use poll::{
    GaveUp, PATIENCE, POLL, Poll, eventually, eventually_blocking, eventually_every, poll_until,
};
pub use scratch::{TempDir, write_atomic, write_secret};
