//! The sidecar's Prometheus metrics, served as text at `/metrics`.
//!
//! Families are registered once; each backend resolves its labelled
//! counters when it is created, so the request path only increments atomics
//! (no label lookup, no lock). Gauges that describe current state (ejected
//! endpoints) are computed when scraped. `docs/metrics.md` lists every name.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Label of per-backend metrics: `Backend/name` (`Backend/ns/name` outside
/// the default namespace), or `inbound` for the local app's protection.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct BackendLabel {
    pub backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TimeoutLabels {
    pub backend: String,
    /// `request` (the call's deadline) or `attempt` (`backendRequest`).
    pub kind: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct FaultLabels {
    pub route: String,
    /// `delay` or `abort`.
    pub fault: &'static str,
}

/// The registry and its families.
pub struct Metrics {
    registry: Registry,
    requests: Family<BackendLabel, Counter>,
    retries: Family<BackendLabel, Counter>,
    retries_exhausted: Family<BackendLabel, Counter>,
    retries_budget_denied: Family<BackendLabel, Counter>,
    ejections: Family<BackendLabel, Counter>,
    ejections_active: Family<BackendLabel, Gauge>,
    overflow: Family<BackendLabel, Counter>,
    rate_limited: Family<BackendLabel, Counter>,
    timeouts: Family<TimeoutLabels, Counter>,
    faults: Family<FaultLabels, Counter>,
    authorization: AuthorizationMetrics,
    trace: TraceMetrics,
}

/// What became of the spans the sidecar recorded.
#[derive(Debug, Clone, Default)]
pub struct TraceMetrics {
    /// Spans the collector accepted.
    pub spans_exported: Counter,
    /// Spans lost: the export queue was full, or the export failed.
    pub spans_dropped: Counter,
}

/// The decisions of inbound authorization. Unlabelled: a denied call
/// matched no rule, so no policy is to blame, and callers and paths are
/// unbounded.
#[derive(Debug, Clone, Default)]
pub struct AuthorizationMetrics {
    /// Calls that matched a rule (counted only while a policy applies).
    pub allowed: Counter,
    pub denied: Counter,
}

/// One backend's counters, resolved once.
#[derive(Debug, Clone, Default)]
pub struct BackendMetrics {
    pub requests: Counter,
    pub retries: Counter,
    pub retries_exhausted: Counter,
    pub retries_budget_denied: Counter,
    pub ejections: Counter,
    pub ejections_active: Gauge,
    pub overflow: Counter,
    pub rate_limited: Counter,
    pub request_timeouts: Counter,
    pub attempt_timeouts: Counter,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("pylon");
        let m = Metrics {
            requests: Family::default(),
            retries: Family::default(),
            retries_exhausted: Family::default(),
            retries_budget_denied: Family::default(),
            ejections: Family::default(),
            ejections_active: Family::default(),
            overflow: Family::default(),
            rate_limited: Family::default(),
            timeouts: Family::default(),
            faults: Family::default(),
            authorization: AuthorizationMetrics::default(),
            trace: TraceMetrics::default(),
            registry: Registry::default(),
        };
        registry.register(
            "backend_requests",
            "Calls sent to a backend (first attempts, not retries)",
            m.requests.clone(),
        );
        registry.register("retries", "Retry attempts sent", m.retries.clone());
        registry.register(
            "retries_exhausted",
            "Calls that failed after every attempt the retry policy allows",
            m.retries_exhausted.clone(),
        );
        registry.register(
            "retries_budget_denied",
            "Retries not sent because the backend's retry budget was spent",
            m.retries_budget_denied.clone(),
        );
        registry.register(
            "outlier_ejections",
            "Endpoint ejections by outlier detection",
            m.ejections.clone(),
        );
        registry.register(
            "outlier_ejections_active",
            "Endpoints ejected now",
            m.ejections_active.clone(),
        );
        registry.register(
            "bulkhead_overflow",
            "Calls refused because the bulkhead (circuitBreaker) was full",
            m.overflow.clone(),
        );
        registry.register(
            "rate_limited",
            "Calls refused by the rate limit",
            m.rate_limited.clone(),
        );
        registry.register(
            "timeouts",
            "Calls or attempts that ran out of time",
            m.timeouts.clone(),
        );
        registry.register(
            "faults_injected",
            "Faults injected by route faultInjection",
            m.faults.clone(),
        );
        registry.register(
            "inbound_authorization_allowed",
            "Inbound calls an AuthorizationPolicy rule allowed",
            m.authorization.allowed.clone(),
        );
        registry.register(
            "inbound_authorization_denied",
            "Inbound calls refused because no AuthorizationPolicy rule allowed them",
            m.authorization.denied.clone(),
        );
        registry.register(
            "trace_spans_exported",
            "Spans the OTLP collector accepted",
            m.trace.spans_exported.clone(),
        );
        registry.register(
            "trace_spans_dropped",
            "Spans dropped because the export queue was full or the export failed",
            m.trace.spans_dropped.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// The counters of `backend`.
    pub fn backend(&self, backend: &str) -> BackendMetrics {
        let label = BackendLabel {
            backend: backend.to_string(),
        };
        let timeout = |kind| {
            self.timeouts.get_or_create_owned(&TimeoutLabels {
                backend: backend.to_string(),
                kind,
            })
        };
        BackendMetrics {
            requests: self.requests.get_or_create_owned(&label),
            retries: self.retries.get_or_create_owned(&label),
            retries_exhausted: self.retries_exhausted.get_or_create_owned(&label),
            retries_budget_denied: self.retries_budget_denied.get_or_create_owned(&label),
            ejections: self.ejections.get_or_create_owned(&label),
            ejections_active: self.ejections_active.get_or_create_owned(&label),
            overflow: self.overflow.get_or_create_owned(&label),
            rate_limited: self.rate_limited.get_or_create_owned(&label),
            request_timeouts: timeout("request"),
            attempt_timeouts: timeout("attempt"),
        }
    }

    /// The counter of one kind of fault on one route.
    pub fn fault(&self, route: &str, fault: &'static str) -> Counter {
        self.faults.get_or_create_owned(&FaultLabels {
            route: route.to_string(),
            fault,
        })
    }

    /// The counters of inbound authorization.
    pub fn authorization(&self) -> AuthorizationMetrics {
        self.authorization.clone()
    }

    /// The counters of span export.
    pub fn trace(&self) -> TraceMetrics {
        self.trace.clone()
    }

    /// Prometheus text exposition of every metric.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backend_counters_are_shared_handles_and_encode_with_labels() {
        let m = Metrics::new();
        let a = m.backend("Backend/greeter");
        let again = m.backend("Backend/greeter");
        a.retries.inc();
        again.retries.inc();
        a.request_timeouts.inc();
        m.fault("GRPCRoute/greeter", "abort").inc();
        m.authorization().denied.inc();
        let text = m.encode();
        assert!(
            text.contains("pylon_retries_total{backend=\"Backend/greeter\"} 2"),
            "{text}"
        );
        assert!(
            text.contains("pylon_timeouts_total{backend=\"Backend/greeter\",kind=\"request\"} 1"),
            "{text}"
        );
        assert!(
            text.contains(
                "pylon_faults_injected_total{route=\"GRPCRoute/greeter\",fault=\"abort\"} 1"
            ),
            "{text}"
        );
        assert!(
            text.contains("pylon_inbound_authorization_denied_total 1"),
            "{text}"
        );
        assert!(
            text.contains("pylon_inbound_authorization_allowed_total 0"),
            "{text}"
        );
    }
}
