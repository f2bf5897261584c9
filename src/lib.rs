//! pylon: a service-mesh sidecar proxy for gRPC and HTTP.
//!
//! Start with [`sidecar::Sidecar`], which wires the modules together:
//! [`config`] (bootstrap), [`identity`] (certificates, mTLS, SPIFFE),
//! [`policy`] (snapshots and their sources), [`routing`] (request → rule →
//! backend), [`authz`] (who may call the local app), [`proxy`] (listeners,
//! inbound and outbound paths, connection pools), [`resilience`] (rate
//! limits, retry budgets, bulkheads, outlier ejection and endpoint choice),
//! [`telemetry`] (metrics, traces, request IDs, access logs) and [`admin`]
//! (health, readiness, config dump, drain).
//! [`discovery`] resolves backend hostnames and keeps their endpoints
//! current.
//!
//! [`loadgen`] (a gRPC load generator) and [`demo`] (`pylon demo`: a mesh on
//! loopback with live traffic) serve the showcase and the benchmarks; they
//! and `pylon inject` come with the default feature `full`, which the
//! sidecar image leaves out.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod admin;
pub mod config;
#[cfg(feature = "full")]
pub mod demo;
pub mod discovery;
pub mod http;
pub mod identity;
pub mod iptables;
#[cfg(feature = "full")]
pub mod loadgen;
pub mod policy;
pub mod probes;
pub mod proxy;
pub mod resilience;
pub mod sidecar;
pub mod telemetry;

#[cfg(test)]
mod layers;
