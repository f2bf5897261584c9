//! What the sidecar tells operators: Prometheus metrics and their OTLP
//! export (`metrics`, `export`), and process logs (`logging`).
//!
//! Not here yet: OTLP traces, request-scoped log fields, access logs.

pub mod export;
pub mod logging;
pub mod metrics;
pub mod requests;
