//! Discovery: where a backend's endpoints are. Static endpoints need none;
//! DNS names are resolved and kept current here ([`dns`]); endpoints from
//! the control plane will join later.
//!
//! Not here: choosing among the endpoints (the balancer), their health
//! (outlier detection), or attaching a watch to a backend (the proxy owns
//! the task and decides what a change means for its pool).

pub mod dns;
pub mod testing;

pub use dns::{Dns, DnsError, Resolved, watch};
