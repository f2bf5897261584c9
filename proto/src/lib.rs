//! pylon's protocol definitions (`pylon.v1`), the policy resource model,
//! the control-plane client channel, and the small pieces the sidecar and
//! the control plane both need (SPIFFE IDs, PEM trust roots, atomic file
//! writes, backoff, `traceparent`, the stop signal, root-CA parameters),
//! shared by the sidecar, the control plane and its CLI.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod backoff;
pub mod client;
pub mod fs;
pub mod otlp_metrics;
pub mod policy;
pub mod root_ca;
pub mod signal;
pub mod spiffe;
pub mod tls_roots;
pub mod traceparent;

/// The most worker threads a sidecar takes (`workers`, `PYLON_WORKERS`):
/// what `pylon proxy` accepts, and the most injection gives.
pub const MAX_WORKERS: usize = 1024;

/// The classic greeter service: the sample app of the demo and benchmarks.
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

/// `pylon.v1` messages and services.
pub mod v1 {
    tonic::include_proto!("pylon.v1");
}
