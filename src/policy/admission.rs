//! Admission of calls to one destination: a Backend (outbound) or the local
//! app (inbound). One type for both: the rate limit first, then a slot
//! under the cap on calls in flight (`circuitBreaker.maxParallelRequests`
//! outbound, `maxParallelRequests` inbound), waiting for one only where the
//! policy gives a waiting line. A refusal is counted in the destination's
//! metrics and answered as the proxy's own error (`rate-limited`,
//! `overflow`). Limits change in place; permits already given stay valid.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use prometheus_client::metrics::counter::Counter;
use pylon_proto::policy::RateLimit;
use tokio::time::Instant;

use crate::http::error::ProxyError;
use crate::resilience::bulkhead::{Bulkhead, BulkheadPermit};
use crate::resilience::ratelimit::RateLimiter;
use crate::telemetry::metrics::BackendMetrics;

const UNLIMITED: RateLimit = RateLimit {
    requests_per_second: u32::MAX,
    burst: u32::MAX,
};

/// A wait for a slot, when none was free.
pub type SlotWait = Pin<Box<dyn Future<Output = Result<BulkheadPermit, ProxyError>> + Send>>;

#[derive(Debug)]
pub struct Admission {
    name: Arc<str>,
    rate: RateLimiter,
    rate_on: AtomicBool,
    bulkhead: Arc<Bulkhead>,
    metrics: BackendMetrics,
}

/// The verdict of [`Admission::try_admit`] when the call is not refused.
pub enum Admitted {
    /// A slot now (none when no cap is set and `always_slot` was false).
    Now(Option<BulkheadPermit>),
    /// No slot free: wait for one with [`Admission::wait`].
    Wait,
}

impl Admission {
    pub fn new(name: Arc<str>, metrics: BackendMetrics) -> Self {
        Admission {
            name,
            rate: RateLimiter::new(UNLIMITED),
            rate_on: AtomicBool::new(false),
            bulkhead: Arc::new(Bulkhead::new(None, None)),
            metrics,
        }
    }

    /// Sets the limits in place.
    pub fn configure(
        &self,
        rate: Option<RateLimit>,
        max_parallel: Option<u32>,
        max_pending: Option<u32>,
    ) {
        if let Some(limit) = rate {
            self.rate.set_limit(limit);
        }
        self.rate_on.store(rate.is_some(), Ordering::Relaxed);
        self.bulkhead.set_limits(max_parallel, max_pending);
    }

    /// Admits a call now, or refuses it, or says it must wait for a slot.
    /// With `always_slot` a slot is taken even when no cap is set (the
    /// in-flight count is kept); without, an uncapped call holds nothing.
    pub fn try_admit(&self, now: Instant, always_slot: bool) -> Result<Admitted, ProxyError> {
        if self.rate_on.load(Ordering::Relaxed)
            && let Err(retry_after) = self.rate.try_acquire(now)
        {
            self.metrics.rate_limited.inc();
            return Err(ProxyError::RateLimited {
                backend: self.name.clone(),
                retry_after,
            });
        }
        if !always_slot && !self.bulkhead.limited() {
            return Ok(Admitted::Now(None));
        }
        Ok(match self.bulkhead.try_acquire() {
            Some(permit) => Admitted::Now(Some(permit)),
            None => Admitted::Wait,
        })
    }

    /// Waits for a slot until `wait_until` (no longer than the waiting line
    /// allows); `overflow` otherwise.
    pub fn wait(&self, wait_until: Instant) -> SlotWait {
        let bulkhead = self.bulkhead.clone();
        let overflow = self.metrics.overflow.clone();
        let name = self.name.clone();
        Box::pin(async move {
            bulkhead
                .acquire(wait_until)
                .await
                .map_err(|_| overflow_error(&overflow, name))
        })
    }

    /// The counter of calls refused for want of a slot.
    pub fn overflow_counter(&self) -> Counter {
        self.metrics.overflow.clone()
    }

    /// A refusal for want of a slot, counted (no waiting line).
    pub fn overflow(&self) -> ProxyError {
        overflow_error(&self.metrics.overflow, self.name.clone())
    }
}

/// `overflow` of `backend`'s calls in flight, counted in `counter`.
fn overflow_error(counter: &Counter, backend: Arc<str>) -> ProxyError {
    counter.inc();
    ProxyError::Overflow {
        backend,
        what: "parallel requests",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    fn admission() -> (std::sync::Arc<Metrics>, Admission) {
        let m = Metrics::new();
        let a = Admission::new("Backend/x".into(), m.backend("Backend/x"));
        (m, a)
    }

    #[tokio::test(start_paused = true)]
    async fn the_rate_limit_comes_first_then_the_cap() {
        let (m, a) = admission();
        a.configure(
            Some(RateLimit {
                requests_per_second: 1,
                burst: 1,
            }),
            Some(1),
            None,
        );
        let now = Instant::now();
        let Ok(Admitted::Now(Some(_held))) = a.try_admit(now, false) else {
            panic!("first call admitted with a slot")
        };
        assert!(matches!(
            a.try_admit(now, false),
            Err(ProxyError::RateLimited { .. })
        ));
        let later = now + std::time::Duration::from_secs(1);
        assert!(matches!(a.try_admit(later, false), Ok(Admitted::Wait)));
        assert!(matches!(a.overflow(), ProxyError::Overflow { .. }));
        let text = m.encode();
        assert!(
            text.contains("pylon_rate_limited_total{backend=\"Backend/x\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pylon_bulkhead_overflow_total{backend=\"Backend/x\"} 1"),
            "{text}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn uncapped_calls_hold_a_slot_only_when_asked() {
        let (_m, a) = admission();
        let now = Instant::now();
        assert!(matches!(a.try_admit(now, false), Ok(Admitted::Now(None))));
        assert!(matches!(a.try_admit(now, true), Ok(Admitted::Now(Some(_)))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_wait_ends_with_a_freed_slot_or_overflow() {
        let (_m, a) = admission();
        a.configure(None, Some(1), Some(1));
        let now = Instant::now();
        let Ok(Admitted::Now(Some(held))) = a.try_admit(now, true) else {
            panic!()
        };
        let wait = a.wait(now + std::time::Duration::from_millis(10));
        drop(held);
        assert!(wait.await.is_ok());
        let Ok(Admitted::Now(Some(_held))) = a.try_admit(now, true) else {
            panic!()
        };
        let wait = a.wait(Instant::now() + std::time::Duration::from_millis(10));
        assert!(matches!(wait.await, Err(ProxyError::Overflow { .. })));
    }
}
