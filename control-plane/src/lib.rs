//! `pylon-control`: where users change policy, and how it reaches every
//! sidecar.
//!
//! - [`store`]: the durable policy store (redb): resources, versions,
//!   history, bootstrap tokens.
//! - [`ca`]: the mesh CA and the control plane's own credentials.
//! - [`server`]: the admin API and the discovery stream over TLS ([`tls`]).
//! - [`cli`]: `pylon-control serve` and the kubectl-like commands.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod ca;
pub mod cli;
pub mod server;
pub mod store;
pub mod tls;
