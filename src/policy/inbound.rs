//! The protection of the local app as policy configures it: who may call
//! it, then a rate limit and a cap on calls in flight (by default
//! `inbound.appMaxRequests` when no policy sets one).

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};

use arc_swap::ArcSwap;
use tokio::time::Instant;

use super::InboundPolicy;
use super::admission::{Admission, Admitted};
use super::authz::{Caller, InboundCall};
use crate::http::error::ProxyError;
use crate::resilience::bulkhead::BulkheadPermit;
use crate::telemetry::metrics::{AuthorizationMetrics, Metrics, RequestMetrics};

/// The protection of the local app: who may call it (the
/// AuthorizationPolicies), then its admission: a rate limit and a cap on
/// calls in flight (the BackendTrafficPolicy), all targeting this
/// workload's service account. State survives policy reloads; limits
/// change in place.
pub struct InboundLimits {
    policy: ArcSwap<InboundPolicy>,
    admission: Admission,
    /// The cap on calls in flight when no policy sets one (0: none).
    default_max_requests: AtomicU32,
    authorization: AuthorizationMetrics,
    pub requests: RequestMetrics,
}

const INBOUND: &str = "inbound";

impl InboundLimits {
    pub fn new(metrics: &Metrics) -> Self {
        InboundLimits {
            policy: ArcSwap::from_pointee(InboundPolicy::default()),
            admission: Admission::new(INBOUND.into(), metrics.backend(INBOUND)),
            default_max_requests: AtomicU32::new(0),
            authorization: metrics.authorization(),
            requests: metrics.inbound_requests(),
        }
    }

    /// Caps the calls in flight at `max` while no policy sets
    /// `maxParallelRequests` (`inbound.appMaxRequests`).
    pub fn set_default_max_requests(&self, max: u32) {
        self.default_max_requests.store(max, Ordering::Relaxed);
        self.configure(&self.policy.load());
    }

    /// The cap on calls in flight under `policy`.
    fn max_requests(&self, policy: &InboundPolicy) -> Option<u32> {
        let default = self.default_max_requests.load(Ordering::Relaxed);
        policy
            .max_parallel_requests
            .or((default > 0).then_some(default))
    }

    fn configure(&self, policy: &InboundPolicy) {
        self.admission
            .configure(policy.rate_limit, self.max_requests(policy), None);
    }

    /// Counts a call refused because the app's connections are all in use.
    pub fn app_connections_overflow(&self) -> prometheus_client::metrics::counter::Counter {
        self.admission.overflow_counter()
    }

    pub fn apply(&self, policy: &InboundPolicy) {
        self.configure(policy);
        self.policy.store(Arc::new(policy.clone()));
    }

    /// Whether `caller` may make `call`; `unauthorized` if not.
    pub fn authorize(&self, caller: &Caller<'_>, call: &InboundCall<'_>) -> Result<(), ProxyError> {
        let policy = self.policy.load();
        // Before the limits: a call that may not reach the app spends none
        // of their capacity.
        let authorization = &policy.authorization;
        if !authorization.allows(caller, call) {
            self.authorization.denied.inc();
            return Err(ProxyError::Unauthorized {
                caller: match caller.principal() {
                    "" => "without a mesh identity (plaintext)".to_string(),
                    id => id.to_string(),
                },
                call: call.to_string(),
            });
        }
        if authorization.enforced() {
            self.authorization.allowed.inc();
        }
        Ok(())
    }

    /// Admits one call now, or says why not. The permit (when a cap is set)
    /// must live as long as the call.
    pub fn admit(&self) -> Result<Option<BulkheadPermit>, ProxyError> {
        // No waiting room: the app's protection fails fast.
        match self.admission.try_admit(Instant::now(), false)? {
            Admitted::Now(permit) => Ok(permit),
            Admitted::Wait => Err(self.admission.overflow()),
        }
    }
}
