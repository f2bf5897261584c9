//! Resilience state the request path consults: per-backend rate limiter,
//! retry budget and bulkheads, per-endpoint outlier ejection and load, and
//! the choice of an endpoint.
//!
//! Everything here is pure bookkeeping over atomics: no I/O, no task, no
//! allocation per request, and (but for the bulkhead's bounded wait) nothing
//! that blocks. Time is always a `tokio::time::Instant` handed in by the
//! caller, so every state machine is deterministic under paused time. Each
//! object takes new limits at run time (policy hot reload) and keeps its
//! state (counters, permits, estimates, ejections) across the change.
//!
//! What does not live here: the retry loop, backoff and deadlines, mapping a
//! response to an [`outlier::Outcome`], the periodic [`outlier::OutlierDetector::sweep`]
//! task, and answering the caller when a limit says no. Those belong to
//! the proxy, which owns one of each object per backend or endpoint.

pub mod balancer;
pub mod budget;
pub mod bulkhead;
pub mod outlier;
pub mod ratelimit;

use tokio::time::Instant;

/// Nanoseconds from `base` to `now`: zero when `now` is earlier, saturating
/// after 584 years. The atomics here store instants in this form.
fn nanos_since(base: Instant, now: Instant) -> u64 {
    u64::try_from(now.saturating_duration_since(base).as_nanos()).unwrap_or(u64::MAX)
}
