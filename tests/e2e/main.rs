//! End-to-end tests: real sidecar processes, real servers and clients on
//! loopback, mTLS between the sidecars.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

mod authz;
mod control;
mod control_hardening;
mod faults;
mod gamma;
mod grpc;
mod hardening;
mod hostile;
mod http;
mod identity;
mod inject;
mod install;
mod iptables;
mod k8s_identity;
mod lifecycle;
mod metrics;
mod pod_sidecar;
mod pods;
mod policy;
mod resilience;
mod routing;
mod tls;
mod traces;
mod transparent;
