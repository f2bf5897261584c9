//! The policy resource model: the five kinds a user writes, as plain data.
//!
//! These types hold *validated* policy. They are produced by [`super::parse`]
//! (YAML → model, every error reported with its path) and written back with
//! [`super::to_yaml`]. Nothing here knows about sockets or requests; the
//! sidecar compiles a set of resources into its routing snapshot, the control
//! plane stores them.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

/// The only `apiVersion` the model accepts.
pub const API_VERSION: &str = "pylon.dev/v1";

/// The namespace a resource lives in when `metadata.namespace` is absent.
pub const DEFAULT_NAMESPACE: &str = "default";

/// The five kinds of policy resource.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Backend,
    GrpcRoute,
    HttpRoute,
    BackendTrafficPolicy,
    AuthorizationPolicy,
}

impl Kind {
    pub const ALL: [Kind; 5] = [
        Kind::Backend,
        Kind::GrpcRoute,
        Kind::HttpRoute,
        Kind::BackendTrafficPolicy,
        Kind::AuthorizationPolicy,
    ];

    /// The name as written in YAML (`kind: GRPCRoute`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Backend => "Backend",
            Kind::GrpcRoute => "GRPCRoute",
            Kind::HttpRoute => "HTTPRoute",
            Kind::BackendTrafficPolicy => "BackendTrafficPolicy",
            Kind::AuthorizationPolicy => "AuthorizationPolicy",
        }
    }

    /// Parses a kind as written in YAML, or case-insensitively as typed on a
    /// command line (`grpcroute`, `backends`).
    pub fn parse(s: &str) -> Option<Kind> {
        let lower = s.to_ascii_lowercase();
        let singular = lower.strip_suffix('s').unwrap_or(&lower);
        Kind::ALL.into_iter().find(|k| {
            k.as_str().eq_ignore_ascii_case(&lower) || k.as_str().eq_ignore_ascii_case(singular)
        })
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `metadata` of every resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    pub name: String,
    /// Always set; [`DEFAULT_NAMESPACE`] when the YAML omits it.
    pub namespace: String,
    /// Opaque version assigned by a store; `None` in files.
    pub resource_version: Option<String>,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
}

impl Metadata {
    pub fn new(name: impl Into<String>) -> Self {
        Metadata {
            name: name.into(),
            namespace: DEFAULT_NAMESPACE.to_string(),
            resource_version: None,
            labels: BTreeMap::new(),
            annotations: BTreeMap::new(),
        }
    }
}

/// One policy document.
#[derive(Debug, Clone, PartialEq)]
pub struct Resource {
    pub metadata: Metadata,
    pub spec: Spec,
}

impl Resource {
    pub fn kind(&self) -> Kind {
        match self.spec {
            Spec::Backend(_) => Kind::Backend,
            Spec::GrpcRoute(_) => Kind::GrpcRoute,
            Spec::HttpRoute(_) => Kind::HttpRoute,
            Spec::BackendTrafficPolicy(_) => Kind::BackendTrafficPolicy,
            Spec::AuthorizationPolicy(_) => Kind::AuthorizationPolicy,
        }
    }

    /// `Kind/name`, or `Kind/namespace/name` outside the default namespace:
    /// the prefix of every error about this resource.
    pub fn display_name(&self) -> String {
        display_name(self.kind(), &self.metadata.namespace, &self.metadata.name)
    }
}

/// See [`Resource::display_name`].
pub fn display_name(kind: Kind, namespace: &str, name: &str) -> String {
    if namespace == DEFAULT_NAMESPACE {
        format!("{kind}/{name}")
    } else {
        format!("{kind}/{namespace}/{name}")
    }
}

#[derive(Debug, Clone, PartialEq)]
pub enum Spec {
    Backend(BackendSpec),
    GrpcRoute(GrpcRouteSpec),
    HttpRoute(HttpRouteSpec),
    BackendTrafficPolicy(BackendTrafficPolicySpec),
    AuthorizationPolicy(AuthorizationPolicySpec),
}

// ---------------------------------------------------------------- Backend

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendSpec {
    /// `None`: speak to the backend the protocol the caller spoke.
    pub protocol: Option<Protocol>,
    pub endpoints: Endpoints,
    /// Absent in YAML means `mode: disabled`.
    pub tls: BackendTls,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    Grpc,
    Http1,
    Http2,
}

impl Protocol {
    pub fn as_str(self) -> &'static str {
        match self {
            Protocol::Grpc => "grpc",
            Protocol::Http1 => "http1",
            Protocol::Http2 => "http2",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoints {
    /// `ip:port` socket addresses, already checked to parse as such.
    Static(Vec<std::net::SocketAddr>),
    Dns {
        hostname: String,
        port: u16,
    },
    /// A Kubernetes Service, resolved by DNS as
    /// `name.namespace.svc.<cluster domain>.`: each sidecar knows its cluster
    /// domain, so the name is completed when the sidecar compiles policy.
    Service {
        /// A DNS-1035 label, as Kubernetes requires of Service names.
        name: String,
        /// `None`: the Backend's namespace.
        namespace: Option<String>,
        /// The port on every address the name resolves to.
        port: u16,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BackendTls {
    Disabled,
    /// mTLS; the peer's SPIFFE URI SAN must equal `identity`.
    Mesh {
        identity: String,
    },
}

// ---------------------------------------------------------------- routes

/// GRPCRoute and HTTPRoute share their shape; only the matches differ.
#[derive(Debug, Clone, PartialEq)]
pub struct RouteSpec<M> {
    /// Kubernetes Services the route is attached to (`parentRefs`, kind
    /// Service: Gateway API's mesh profile, GAMMA). The route matches
    /// requests addressed to them by their cluster DNS names.
    pub parent_refs: Vec<ParentRef>,
    /// With `parent_refs` also empty: the route applies to every authority.
    pub hostnames: Vec<String>,
    pub rules: Vec<RouteRule<M>>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct RouteRule<M> {
    /// Empty: the rule matches every request of its kind (every gRPC call
    /// for a GRPCRoute, `PathPrefix /` for an HTTPRoute).
    pub matches: Vec<M>,
    pub backend_refs: Vec<BackendRef>,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<Retry>,
    pub fault_injection: Option<FaultInjection>,
}

pub type GrpcRouteSpec = RouteSpec<GrpcRouteMatch>;
pub type GrpcRouteRule = RouteRule<GrpcRouteMatch>;
pub type HttpRouteSpec = RouteSpec<HttpRouteMatch>;
pub type HttpRouteRule = RouteRule<HttpRouteMatch>;

/// A route's parent: a Kubernetes Service (`group: ""`, `kind: Service`,
/// the only parent kind).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ParentRef {
    /// A DNS-1035 label, as Kubernetes requires of Service names.
    pub name: String,
    /// `None`: the route's own namespace.
    pub namespace: Option<String>,
    /// Only requests to this port; `None`: every port.
    pub port: Option<u16>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct GrpcRouteMatch {
    pub method: Option<GrpcMethodMatch>,
    pub headers: Vec<HeaderMatch>,
}

/// `type: Exact` is the only type; at least one of service and method is set.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GrpcMethodMatch {
    pub service: Option<String>,
    pub method: Option<String>,
}

/// `type: Exact` is the only type. `name` is stored lowercase.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HeaderMatch {
    pub name: String,
    pub value: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct HttpRouteMatch {
    pub path: Option<PathMatch>,
    /// Uppercase HTTP method token (`GET`).
    pub method: Option<String>,
    pub headers: Vec<HeaderMatch>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PathMatch {
    Exact(String),
    /// Gateway API semantics: matches whole `/`-separated segments, so
    /// `/foo` matches `/foo` and `/foo/bar` but not `/foobar`.
    Prefix(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BackendRef {
    pub name: String,
    /// `None`: the route's own namespace.
    pub namespace: Option<String>,
    /// Default 1.
    pub weight: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Timeouts {
    /// The whole call, retries and backoff included.
    pub request: Option<Duration>,
    /// Each attempt, until its response starts.
    pub backend_request: Option<Duration>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Retry {
    /// Retries after the first try, ≥ 1.
    pub attempts: u32,
    pub codes: Vec<RetryOn>,
    pub backoff: Option<Backoff>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryOn {
    Grpc(GrpcCode),
    Http(u16),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub max: Duration,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultInjection {
    pub delay: Option<FaultDelay>,
    pub abort: Option<FaultAbort>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultDelay {
    pub fixed_delay: Duration,
    /// 0.0 ..= 100.0
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq)]
pub struct FaultAbort {
    pub status: AbortStatus,
    /// 0.0 ..= 100.0
    pub percent: f64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AbortStatus {
    Grpc(GrpcCode),
    Http(u16),
}

/// gRPC status codes, written by name (`UNAVAILABLE`) in policy.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum GrpcCode {
    Ok = 0,
    Cancelled = 1,
    Unknown = 2,
    InvalidArgument = 3,
    DeadlineExceeded = 4,
    NotFound = 5,
    AlreadyExists = 6,
    PermissionDenied = 7,
    ResourceExhausted = 8,
    FailedPrecondition = 9,
    Aborted = 10,
    OutOfRange = 11,
    Unimplemented = 12,
    Internal = 13,
    Unavailable = 14,
    DataLoss = 15,
    Unauthenticated = 16,
}

impl GrpcCode {
    pub const ALL: [GrpcCode; 17] = [
        GrpcCode::Ok,
        GrpcCode::Cancelled,
        GrpcCode::Unknown,
        GrpcCode::InvalidArgument,
        GrpcCode::DeadlineExceeded,
        GrpcCode::NotFound,
        GrpcCode::AlreadyExists,
        GrpcCode::PermissionDenied,
        GrpcCode::ResourceExhausted,
        GrpcCode::FailedPrecondition,
        GrpcCode::Aborted,
        GrpcCode::OutOfRange,
        GrpcCode::Unimplemented,
        GrpcCode::Internal,
        GrpcCode::Unavailable,
        GrpcCode::DataLoss,
        GrpcCode::Unauthenticated,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            GrpcCode::Ok => "OK",
            GrpcCode::Cancelled => "CANCELLED",
            GrpcCode::Unknown => "UNKNOWN",
            GrpcCode::InvalidArgument => "INVALID_ARGUMENT",
            GrpcCode::DeadlineExceeded => "DEADLINE_EXCEEDED",
            GrpcCode::NotFound => "NOT_FOUND",
            GrpcCode::AlreadyExists => "ALREADY_EXISTS",
            GrpcCode::PermissionDenied => "PERMISSION_DENIED",
            GrpcCode::ResourceExhausted => "RESOURCE_EXHAUSTED",
            GrpcCode::FailedPrecondition => "FAILED_PRECONDITION",
            GrpcCode::Aborted => "ABORTED",
            GrpcCode::OutOfRange => "OUT_OF_RANGE",
            GrpcCode::Unimplemented => "UNIMPLEMENTED",
            GrpcCode::Internal => "INTERNAL",
            GrpcCode::Unavailable => "UNAVAILABLE",
            GrpcCode::DataLoss => "DATA_LOSS",
            GrpcCode::Unauthenticated => "UNAUTHENTICATED",
        }
    }

    /// Accepts the canonical name (`UNAVAILABLE`) in any case, or the number.
    pub fn parse(s: &str) -> Option<GrpcCode> {
        if let Ok(n) = s.parse::<u8>() {
            return GrpcCode::from_u8(n);
        }
        GrpcCode::ALL
            .into_iter()
            .find(|c| c.as_str().eq_ignore_ascii_case(s))
    }

    pub fn from_u8(n: u8) -> Option<GrpcCode> {
        GrpcCode::ALL.get(usize::from(n)).copied()
    }

    pub fn as_u8(self) -> u8 {
        self as u8
    }
}

impl fmt::Display for GrpcCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

// ---------------------------------------------------------------- BackendTrafficPolicy

#[derive(Debug, Clone, PartialEq)]
pub struct BackendTrafficPolicySpec {
    /// Written as `targetRefs: [...]` or a single `targetRef: {...}`.
    pub target_refs: Vec<TargetRef>,
    pub load_balancer: Option<LoadBalancerType>,
    pub circuit_breaker: Option<CircuitBreaker>,
    pub outlier_detection: Option<OutlierDetection>,
    pub retry_budget: Option<RetryBudget>,
    pub rate_limit: Option<RateLimit>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetRef {
    pub kind: TargetKind,
    pub name: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TargetKind {
    Backend,
    ServiceAccount,
}

impl TargetKind {
    pub fn as_str(self) -> &'static str {
        match self {
            TargetKind::Backend => "Backend",
            TargetKind::ServiceAccount => "ServiceAccount",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LoadBalancerType {
    /// Power of two choices over peak-EWMA latency weighted by requests in flight.
    #[default]
    LeastRequest,
    RoundRobin,
}

impl LoadBalancerType {
    pub fn as_str(self) -> &'static str {
        match self {
            LoadBalancerType::LeastRequest => "LeastRequest",
            LoadBalancerType::RoundRobin => "RoundRobin",
        }
    }
}

/// Bulkhead limits; `None` means unlimited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct CircuitBreaker {
    pub max_connections: Option<u32>,
    pub max_parallel_requests: Option<u32>,
    pub max_pending_requests: Option<u32>,
}

/// Outlier ejection; the detectors whose threshold is `None` are off.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutlierDetection {
    pub consecutive_5xx_errors: Option<u32>,
    pub consecutive_gateway_errors: Option<u32>,
    /// Default 10s.
    pub interval: Duration,
    /// Default 30s.
    pub base_ejection_time: Duration,
    /// Default 300s.
    pub max_ejection_time: Duration,
    /// 0 ..= 100, default 10.
    pub max_ejection_percent: u32,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RetryBudget {
    /// 0.0 ..= 100.0
    pub percent: f64,
    pub min_retries_per_second: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// ≥ 1.
    pub requests_per_second: u32,
    /// ≥ 1; defaults to `requests_per_second`.
    pub burst: u32,
}

// ---------------------------------------------------------------- AuthorizationPolicy

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuthorizationPolicySpec {
    /// Written as `targetRef: {...}` or `targetRefs: [...]`; kind ServiceAccount.
    pub target_refs: Vec<TargetRef>,
    /// A request is allowed when it matches at least one rule.
    pub rules: Vec<AuthorizationRule>,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthorizationRule {
    pub from: Option<AuthorizationFrom>,
    pub to: Option<AuthorizationTo>,
}

/// Patterns: exact, `prefix*`, `*suffix` or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthorizationFrom {
    pub principals: Vec<String>,
    pub namespaces: Vec<String>,
}

/// Patterns: exact, `prefix*`, `*suffix` or `*`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AuthorizationTo {
    pub methods: Vec<String>,
    pub paths: Vec<String>,
}
