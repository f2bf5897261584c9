//! The sidecar's metrics: one registry, served as Prometheus text at
//! `/metrics` and exported over OTLP (`telemetry::export`) from the same
//! text, so both carry the same names and values.
//!
//! Families are registered once; each backend, and each route rule for each
//! of its backends, resolves its labelled children when it is compiled, so
//! the request path only touches atomics (no label lookup, no lock; a
//! request status seen for the first time on a route resolves its counter
//! once). Gauges that describe current state (ejected endpoints, policy
//! version, certificate expiry, control-plane connection) are computed by
//! [`refresh`] before each scrape or export. `docs/metrics.md` lists every
//! name.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use prometheus_client::encoding::{EncodeLabelSet, EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::{MetricType, TypedMetric};
use prometheus_client::registry::Registry;
use pylon_proto::policy::GrpcCode;

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

/// Labels of outbound request counts.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutboundRequestLabels {
    pub route: String,
    pub backend: String,
    pub status: &'static str,
}

/// Labels of outbound request durations.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteBackendLabels {
    pub route: String,
    pub backend: String,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    pub status: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct DirectionLabel {
    /// `inbound` or `outbound`.
    pub direction: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLimitLabels {
    /// `outbound`, `inbound`, `admin` or `probe`.
    pub listener: &'static str,
    pub limit: &'static str,
}

/// A limit that cut a connection (or a caller) off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    /// The listener held its maximum of open connections: closed at accept.
    MaxConnections,
    /// Accepting failed (out of file descriptors, ...).
    AcceptError,
    /// No turn among the concurrent TLS handshakes within the handshake
    /// timeout.
    Handshakes,
    /// The TLS handshake took longer than the handshake timeout.
    HandshakeTimeout,
    /// No complete request head or HTTP/2 preface in time.
    FirstBytesTimeout,
    /// An HTTP/1 request head took longer than the header read timeout.
    HeaderReadTimeout,
    /// The HTTP/2 client reset or provoked too many streams (GOAWAY
    /// ENHANCE_YOUR_CALM).
    Http2Resets,
    /// No request in flight for the idle timeout: closed gracefully.
    IdleTimeout,
    /// Open longer than the maximum age: told to go away.
    MaxAge,
    /// A request body sent nothing for the body read timeout: the request
    /// was cut off.
    BodyReadTimeout,
    /// The peer read nothing the server wrote for the write-stall limit:
    /// the connection was cut off.
    WriteStall,
}

impl Limit {
    pub const ALL: [Limit; 11] = [
        Limit::MaxConnections,
        Limit::AcceptError,
        Limit::Handshakes,
        Limit::HandshakeTimeout,
        Limit::FirstBytesTimeout,
        Limit::HeaderReadTimeout,
        Limit::Http2Resets,
        Limit::IdleTimeout,
        Limit::MaxAge,
        Limit::BodyReadTimeout,
        Limit::WriteStall,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Limit::MaxConnections => "max_connections",
            Limit::AcceptError => "accept_error",
            Limit::Handshakes => "handshakes",
            Limit::HandshakeTimeout => "handshake_timeout",
            Limit::FirstBytesTimeout => "first_bytes_timeout",
            Limit::HeaderReadTimeout => "header_read_timeout",
            Limit::Http2Resets => "http2_resets",
            Limit::IdleTimeout => "idle_timeout",
            Limit::MaxAge => "max_age",
            Limit::BodyReadTimeout => "body_read_timeout",
            Limit::WriteStall => "write_stall",
        }
    }

    /// Whether hitting it is the ordinary life of a connection (not worth
    /// a warning).
    fn routine(self) -> bool {
        matches!(self, Limit::IdleTimeout | Limit::MaxAge)
    }
}

/// How often one listener logs one limit at most.
const LIMIT_LOG_INTERVAL: Duration = Duration::from_secs(10);

/// One listener's limit counters, each logged at most once per
/// [`LIMIT_LOG_INTERVAL`] (with how many hits the log skipped). Cheap to
/// clone.
#[derive(Debug, Clone)]
pub struct ListenerLimits(Arc<ListenerLimitsInner>);

#[derive(Debug)]
struct ListenerLimitsInner {
    listener: &'static str,
    counters: [Counter; Limit::ALL.len()],
    logs: [crate::telemetry::logging::Throttle; Limit::ALL.len()],
}

impl ListenerLimits {
    /// Counts one hit of `limit`, and logs it unless it was logged lately.
    pub fn hit(&self, limit: Limit, detail: &dyn std::fmt::Display) {
        let i = Limit::ALL.iter().position(|l| *l == limit).unwrap_or(0);
        let inner = &self.0;
        inner.counters[i].inc();
        let Some(skipped) = inner.logs[i].permit(LIMIT_LOG_INTERVAL) else {
            return;
        };
        let (listener, limit) = (inner.listener, limit.as_str());
        if Limit::ALL[i].routine() {
            tracing::debug!(listener, limit, skipped, "{detail}");
        } else {
            tracing::warn!(
                listener,
                limit,
                skipped,
                "{detail} (pylon_connection_limits_total counts every time; this is logged at most every {}s)",
                LIMIT_LOG_INTERVAL.as_secs()
            );
        }
    }
}

/// The registry and its families.
pub struct Metrics {
    registry: Registry,
    outbound_requests: Family<OutboundRequestLabels, Counter>,
    outbound_duration: Family<RouteBackendLabels, DurationHistogram>,
    inbound_requests: Family<StatusLabel, Counter>,
    inbound_duration: DurationHistogram,
    connections_active: Family<DirectionLabel, Gauge>,
    connections: Family<DirectionLabel, Counter>,
    connection_limits: Family<ListenerLimitLabels, Counter>,
    otlp_export_failures: Counter,
    pub state: StateGauges,
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

/// Gauges of the sidecar's state, set before every scrape and export
/// (`policy::refresh_gauges`).
#[derive(Debug, Clone, Default)]
pub struct StateGauges {
    pub policy_version: Gauge,
    pub policy_installed: Gauge,
    pub certificate_expiry: Gauge,
    pub trust_bundle_roots: Gauge,
    pub control_plane_connected: Gauge,
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

/// The faults one route injected, by kind.
#[derive(Debug, Clone)]
pub struct FaultCounters {
    pub delays: Counter,
    pub aborts: Counter,
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
            outbound_requests: Family::default(),
            outbound_duration: Family::default(),
            inbound_requests: Family::default(),
            inbound_duration: DurationHistogram::default(),
            connections_active: Family::default(),
            connections: Family::default(),
            connection_limits: Family::default(),
            otlp_export_failures: Counter::default(),
            state: StateGauges::default(),
            registry: Registry::default(),
        };
        registry.register(
            "outbound_requests",
            "Outbound calls by route, backend and final status (gRPC status name, or HTTP status class)",
            m.outbound_requests.clone(),
        );
        registry.register(
            "outbound_request_duration_seconds",
            "Time from a call's arrival to the end of its response (or its failure), by route and backend",
            m.outbound_duration.clone(),
        );
        registry.register(
            "inbound_requests",
            "Inbound calls by final status (gRPC status name, or HTTP status class)",
            m.inbound_requests.clone(),
        );
        registry.register(
            "inbound_request_duration_seconds",
            "Time from an inbound call's arrival to the end of its response (or its failure)",
            m.inbound_duration.clone(),
        );
        registry.register(
            "connections_active",
            "Client connections open now, by listener",
            m.connections_active.clone(),
        );
        registry.register(
            "connections",
            "Client connections accepted, by listener",
            m.connections.clone(),
        );
        registry.register(
            "connection_limits",
            "Connections a limit cut off or closed, by listener and limit",
            m.connection_limits.clone(),
        );
        registry.register(
            "otlp_metrics_export_failures",
            "OTLP metric exports that failed (collector refused, unreachable or too slow)",
            m.otlp_export_failures.clone(),
        );
        registry.register(
            "policy_version",
            "The version of the policy in force when it is a number (control plane), else 0",
            m.state.policy_version.clone(),
        );
        registry.register(
            "policy_installed",
            "1 once a policy is in force",
            m.state.policy_installed.clone(),
        );
        registry.register(
            "certificate_expiry_timestamp_seconds",
            "notAfter of the workload certificate, Unix seconds",
            m.state.certificate_expiry.clone(),
        );
        registry.register(
            "trust_bundle_roots",
            "Certificates in the trust bundle",
            m.state.trust_bundle_roots.clone(),
        );
        registry.register(
            "control_plane_connected",
            "1 while the policy stream to the control plane is open, else 0",
            m.state.control_plane_connected.clone(),
        );
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

    /// The fault counters of `route`. Resolved only for routes with a rule
    /// that injects faults, so other routes export no fault series.
    pub fn faults(&self, route: &str) -> FaultCounters {
        let fault = |fault| {
            self.faults.get_or_create_owned(&FaultLabels {
                route: route.to_string(),
                fault,
            })
        };
        FaultCounters {
            delays: fault("delay"),
            aborts: fault("abort"),
        }
    }

    /// The request counts and durations of calls routed by `route` to
    /// `backend`. Nothing is looked up here: each series is resolved at the
    /// first call that records into it, so a pair that never saw a call
    /// exports no series, and compiling a large policy creates none.
    pub fn outbound_requests(&self, route: Arc<str>, backend: Arc<str>) -> RequestMetrics {
        RequestMetrics::new(Series::Outbound {
            counts: self.outbound_requests.clone(),
            durations: self.outbound_duration.clone(),
            route,
            backend,
        })
    }

    /// The request counts and durations of inbound calls.
    pub fn inbound_requests(&self) -> RequestMetrics {
        RequestMetrics::new(Series::Inbound {
            counts: self.inbound_requests.clone(),
            duration: self.inbound_duration.clone(),
        })
    }

    /// The connection gauge and counter of one listener.
    pub fn connections(&self, direction: &'static str) -> ConnectionMetrics {
        let label = DirectionLabel { direction };
        ConnectionMetrics {
            active: self.connections_active.get_or_create_owned(&label),
            accepted: self.connections.get_or_create_owned(&label),
        }
    }

    /// The limit counters of one listener (`outbound`, `inbound`, `admin`,
    /// `probe`).
    pub fn listener_limits(&self, listener: &'static str) -> ListenerLimits {
        ListenerLimits(Arc::new(ListenerLimitsInner {
            listener,
            counters: Limit::ALL.map(|limit| {
                self.connection_limits
                    .get_or_create_owned(&ListenerLimitLabels {
                        listener,
                        limit: limit.as_str(),
                    })
            }),
            logs: Default::default(),
        }))
    }

    /// Counts failed OTLP metric exports.
    pub fn otlp_export_failures(&self) -> Counter {
        self.otlp_export_failures.clone()
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

/// One listener's connections.
#[derive(Debug, Clone)]
pub struct ConnectionMetrics {
    active: Gauge,
    accepted: Counter,
}

impl ConnectionMetrics {
    /// Counts a connection as open until the guard drops.
    pub fn open(&self) -> ConnectionGuard {
        self.accepted.inc();
        self.active.inc();
        ConnectionGuard(self.active.clone())
    }
}

/// An open connection, counted in `connections_active` while it lives.
#[derive(Debug)]
pub struct ConnectionGuard(Gauge);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// How a call ended, as a bounded label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestStatus {
    Grpc(GrpcCode),
    /// An HTTP status: counted by class (`2xx`, ..., `5xx`).
    Http(u16),
}

const HTTP_CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];
const STATUSES: usize = GrpcCode::ALL.len() + HTTP_CLASSES.len();

impl RequestStatus {
    fn index(self) -> usize {
        match self {
            RequestStatus::Grpc(code) => usize::from(code.as_u8()),
            RequestStatus::Http(status) => {
                GrpcCode::ALL.len() + usize::from((status / 100).clamp(1, 5) - 1)
            }
        }
    }

    /// `OK`, `UNAVAILABLE`, ... or `2xx`, `5xx`, ...
    pub fn label(self) -> &'static str {
        match self {
            RequestStatus::Grpc(code) => code.as_str(),
            RequestStatus::Http(_) => HTTP_CLASSES[self.index() - GrpcCode::ALL.len()],
        }
    }
}

/// The families a [`RequestMetrics`] resolves its series from, and their
/// labels.
enum Series {
    Outbound {
        counts: Family<OutboundRequestLabels, Counter>,
        durations: Family<RouteBackendLabels, DurationHistogram>,
        route: Arc<str>,
        backend: Arc<str>,
    },
    /// The duration is one histogram, registered (and exported) as is.
    Inbound {
        counts: Family<StatusLabel, Counter>,
        duration: DurationHistogram,
    },
}

impl Series {
    fn count(&self, status: &'static str) -> Counter {
        match self {
            Series::Outbound {
                counts,
                route,
                backend,
                ..
            } => counts.get_or_create_owned(&OutboundRequestLabels {
                route: route.to_string(),
                backend: backend.to_string(),
                status,
            }),
            Series::Inbound { counts, .. } => counts.get_or_create_owned(&StatusLabel { status }),
        }
    }

    fn duration(&self) -> DurationHistogram {
        match self {
            Series::Outbound {
                durations,
                route,
                backend,
                ..
            } => durations.get_or_create_owned(&RouteBackendLabels {
                route: route.to_string(),
                backend: backend.to_string(),
            }),
            Series::Inbound { duration, .. } => duration.clone(),
        }
    }
}

/// The request counts (by status) and duration histogram of one route and
/// backend, or of the inbound side. Cheap to clone.
#[derive(Clone)]
pub struct RequestMetrics(Arc<RequestMetricsInner>);

/// Each series is resolved on its first use: the families hold every
/// status ever seen, and a status (or a route and backend) never seen
/// exports no series.
struct RequestMetricsInner {
    series: Series,
    by_status: [OnceLock<Counter>; STATUSES],
    duration: OnceLock<DurationHistogram>,
}

impl std::fmt::Debug for RequestMetrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RequestMetrics").finish_non_exhaustive()
    }
}

impl RequestMetrics {
    fn new(series: Series) -> Self {
        RequestMetrics(Arc::new(RequestMetricsInner {
            series,
            by_status: std::array::from_fn(|_| OnceLock::new()),
            duration: OnceLock::new(),
        }))
    }

    /// Counts one finished call.
    pub fn record(&self, status: RequestStatus, elapsed: Duration) {
        let inner = &self.0;
        inner.by_status[status.index()]
            .get_or_init(|| inner.series.count(status.label()))
            .inc();
        inner
            .duration
            .get_or_init(|| inner.series.duration())
            .observe(elapsed);
    }
}

/// Upper bounds (seconds) of the duration histograms: 0.5 ms to 10 s.
pub const DURATION_BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// A histogram of durations in seconds over [`DURATION_BUCKETS`], kept in
/// atomics (prometheus-client's own histogram takes a mutex per
/// observation).
#[derive(Debug, Clone, Default)]
pub struct DurationHistogram(Arc<HistogramCells>);

#[derive(Debug, Default)]
struct HistogramCells {
    /// One count per bucket, the last for +Inf (not cumulative).
    buckets: [AtomicU64; DURATION_BUCKETS.len() + 1],
    sum_nanos: AtomicU64,
    count: AtomicU64,
}

impl DurationHistogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let i = DURATION_BUCKETS
            .iter()
            .position(|upper| secs <= *upper)
            .unwrap_or(DURATION_BUCKETS.len());
        let cells = &self.0;
        cells.buckets[i].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX);
        cells.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
        cells.count.fetch_add(1, Ordering::Relaxed);
    }
}

impl TypedMetric for DurationHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for DurationHistogram {
    fn encode(&self, mut encoder: MetricEncoder<'_>) -> Result<(), std::fmt::Error> {
        let cells = &self.0;
        let buckets: Vec<(f64, u64)> = DURATION_BUCKETS
            .iter()
            .copied()
            .chain([f64::INFINITY])
            .zip(cells.buckets.iter().map(|c| c.load(Ordering::Relaxed)))
            .collect();
        let sum = cells.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        let count = cells.count.load(Ordering::Relaxed);
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        Self::TYPE
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_metrics_count_by_bounded_status_and_time_in_seconds() {
        let m = Metrics::new();
        let r = m.outbound_requests("GRPCRoute/greeter".into(), "Backend/greeter".into());
        r.record(RequestStatus::Grpc(GrpcCode::Ok), Duration::from_millis(3));
        r.record(RequestStatus::Grpc(GrpcCode::Ok), Duration::from_millis(30));
        r.record(
            RequestStatus::Grpc(GrpcCode::Unavailable),
            Duration::from_secs(20),
        );
        let h = m.inbound_requests();
        h.record(RequestStatus::Http(204), Duration::from_micros(100));
        h.record(RequestStatus::Http(599), Duration::from_micros(100));
        let text = m.encode();
        let labels = "route=\"GRPCRoute/greeter\",backend=\"Backend/greeter\"";
        for line in [
            format!("pylon_outbound_requests_total{{{labels},status=\"OK\"}} 2"),
            format!("pylon_outbound_requests_total{{{labels},status=\"UNAVAILABLE\"}} 1"),
            format!("pylon_outbound_request_duration_seconds_count{{{labels}}} 3"),
            format!("pylon_outbound_request_duration_seconds_bucket{{le=\"0.005\",{labels}}} 1"),
            format!("pylon_outbound_request_duration_seconds_bucket{{le=\"0.05\",{labels}}} 2"),
            format!("pylon_outbound_request_duration_seconds_bucket{{le=\"+Inf\",{labels}}} 3"),
            "pylon_inbound_requests_total{status=\"2xx\"} 1".to_string(),
            "pylon_inbound_requests_total{status=\"5xx\"} 1".to_string(),
            "pylon_inbound_request_duration_seconds_count 2".to_string(),
        ] {
            assert!(text.contains(&line), "{line}\n{text}");
        }
        assert!(!text.contains("status=\"INTERNAL\""), "{text}");
    }

    #[test]
    fn connections_are_counted_while_open() {
        let m = Metrics::new();
        let c = m.connections("outbound");
        let a = c.open();
        let _b = c.open();
        drop(a);
        let text = m.encode();
        assert!(
            text.contains("pylon_connections_active{direction=\"outbound\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("pylon_connections_total{direction=\"outbound\"} 2"),
            "{text}"
        );
    }

    #[test]
    fn listener_limits_count_every_hit() {
        let m = Metrics::new();
        let l = m.listener_limits("inbound");
        l.hit(Limit::MaxConnections, &"full");
        l.hit(Limit::MaxConnections, &"full");
        m.listener_limits("inbound")
            .hit(Limit::FirstBytesTimeout, &"slow");
        let text = m.encode();
        for line in [
            "pylon_connection_limits_total{listener=\"inbound\",limit=\"max_connections\"} 2",
            "pylon_connection_limits_total{listener=\"inbound\",limit=\"first_bytes_timeout\"} 1",
            "pylon_connection_limits_total{listener=\"inbound\",limit=\"idle_timeout\"} 0",
        ] {
            assert!(text.contains(line), "{line}\n{text}");
        }
    }

    #[test]
    fn backend_counters_are_shared_handles_and_encode_with_labels() {
        let m = Metrics::new();
        let a = m.backend("Backend/greeter");
        let again = m.backend("Backend/greeter");
        a.retries.inc();
        again.retries.inc();
        a.request_timeouts.inc();
        m.faults("GRPCRoute/greeter").aborts.inc();
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
