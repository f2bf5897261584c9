//! pylon's protocol definitions (`pylon.v1`), the policy resource model and
//! the control-plane client channel, shared by the sidecar, the control plane
//! and its CLI.

#![forbid(unsafe_code)]
#![deny(rust_2018_idioms)]

pub mod client;
pub mod otlp_metrics;
pub mod policy;
pub mod spiffe;

/// The classic greeter service: the sample app of the demo and benchmarks.
pub mod helloworld {
    tonic::include_proto!("helloworld");
}

/// `pylon.v1` messages and services.
pub mod v1 {
    tonic::include_proto!("pylon.v1");
}
