//! What the sidecar tells operators: Prometheus metrics (`metrics`).
//!
//! Not here yet: OTLP traces and metrics, structured request logs.

pub mod metrics;
