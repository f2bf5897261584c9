//! `pylon-control`: where users change policy, and how it reaches every
//! sidecar.
//!
//! - [`store`]: the durable policy store (redb): resources, versions,
//!   history, bootstrap tokens.
//! - [`data_dir`]: the checks on the data directory (modes, a missing CA).
//! - [`ca`]: the mesh CA (signing, rotation) and the control plane's own
//!   credentials.
//! - [`identity`]: the workload identity service (CSR issuance, the trust
//!   bundle stream) and how callers authenticate.
//! - [`server`]: the admin API and the discovery stream over TLS ([`tls`]),
//!   within the listener and message limits of [`limits`] (refusals read
//!   from the HTTP/2 frames sent, [`h2_frames`]).
//! - [`telemetry`]: metrics (Prometheus text, OTLP) and API traces.
//! - [`inject`]: sidecar injection, behind `pylon inject` and the
//!   admission webhook.
//! - [`install`]: `pylon-control install`, the mesh's Kubernetes objects.
//! - [`cli`]: `pylon-control serve` and the kubectl-like commands.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod ca;
pub mod cli;
pub mod data_dir;
pub mod h2_frames;
pub mod identity;
pub mod inject;
pub mod install;
pub mod k8s_fetch;
pub mod k8s_token;
pub mod limits;
pub mod server;
pub mod state;
pub mod store;
pub mod telemetry;
pub mod tls;
