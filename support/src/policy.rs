//! Policy documents for tests, built as the model's [`Resource`]s and
//! written by its writer ([`pylon_proto::policy::to_yaml`]), so a test
//! states what it routes, not how YAML spells it. Tests that are about YAML
//! text (parsing, validation errors) keep theirs.

use std::net::SocketAddr;
use std::time::Duration;

pub use pylon_proto::policy::{
    AbortStatus, AuthorizationFrom, AuthorizationPolicySpec, AuthorizationRule, AuthorizationTo,
    BackendRef, BackendSpec, BackendTls, BackendTrafficPolicySpec, Backoff, CircuitBreaker,
    Endpoints, FaultAbort, FaultDelay, FaultInjection, GrpcCode, GrpcMethodMatch, GrpcRouteMatch,
    GrpcRouteRule, HeaderMatch, HttpRouteMatch, HttpRouteRule, Kind, LoadBalancerType, Metadata,
    OutlierDetection, ParentRef, PathMatch, Protocol, RateLimit, Resource, Retry, RetryBudget,
    RetryOn, RouteRule, RouteSpec, Spec, TargetKind, TargetRef, Timeouts, to_yaml,
};

/// A Backend with static endpoints; mTLS to peers proving `identity` when
/// one is given, plaintext otherwise.
pub fn backend(name: &str, endpoints: &[SocketAddr], identity: Option<&str>) -> Resource {
    Resource {
        metadata: Metadata::new(name),
        spec: Spec::Backend(BackendSpec {
            protocol: None,
            endpoints: Endpoints::Static(endpoints.to_vec()),
            tls: identity.map_or(BackendTls::Disabled, |id| BackendTls::Mesh {
                identity: id.to_string(),
            }),
        }),
    }
}

/// A route of `kind` (GRPCRoute or HTTPRoute) sending `hostname` to
/// weighted backends, in one rule.
pub fn route(kind: Kind, name: &str, hostname: &str, backends: &[(&str, u32)]) -> Resource {
    fn spec<M>(hostname: &str, backends: &[(&str, u32)]) -> RouteSpec<M> {
        RouteSpec {
            parent_refs: Vec::new(),
            hostnames: vec![hostname.to_string()],
            rules: vec![rule(Vec::new(), backends)],
        }
    }
    let spec = match kind {
        Kind::GrpcRoute => Spec::GrpcRoute(spec(hostname, backends)),
        Kind::HttpRoute => Spec::HttpRoute(spec(hostname, backends)),
        other => panic!("{other} is not a route kind"),
    };
    Resource {
        metadata: Metadata::new(name),
        spec,
    }
}

/// `resources` as policy YAML, ending in a document separator so that
/// such strings concatenate into one policy.
pub fn yaml(resources: &[Resource]) -> String {
    to_yaml(resources) + "---\n"
}

/// [`backend`] as YAML; `endpoints` are `ip:port` strings.
pub fn backend_yaml(name: &str, endpoints: &[String], identity: Option<&str>) -> String {
    let endpoints: Vec<SocketAddr> = endpoints
        .iter()
        .map(|e| {
            e.parse()
                .unwrap_or_else(|_| panic!("endpoint {e:?} is not ip:port"))
        })
        .collect();
    yaml(&[backend(name, &endpoints, identity)])
}

/// [`route`] as YAML; `kind` is `GRPCRoute` or `HTTPRoute`.
pub fn route_yaml(kind: &str, name: &str, hostname: &str, backends: &[(&str, u32)]) -> String {
    let kind = Kind::parse(kind).unwrap_or_else(|| panic!("unknown kind {kind}"));
    yaml(&[route(kind, name, hostname, backends)])
}

/// A route rule sending requests that match one of `matches` (every
/// request when empty) to weighted backends.
pub fn rule<M>(matches: Vec<M>, backends: &[(&str, u32)]) -> RouteRule<M> {
    RouteRule {
        matches,
        backend_refs: backends
            .iter()
            .map(|&(name, weight)| BackendRef {
                name: name.to_string(),
                namespace: None,
                weight,
            })
            .collect(),
        timeouts: None,
        retry: None,
        fault_injection: None,
    }
}

/// A retry of up to `attempts` more tries on `codes`, with jittered
/// backoff between `base` and `max`.
pub fn retry(attempts: u32, codes: &[RetryOn], base: Duration, max: Duration) -> Retry {
    Retry {
        attempts,
        codes: codes.to_vec(),
        backoff: Some(Backoff { base, max }),
    }
}

/// Route timeouts: the whole call and each attempt.
pub fn timeouts(request: Option<Duration>, backend_request: Option<Duration>) -> Timeouts {
    Timeouts {
        request,
        backend_request,
    }
}

/// Fault injection that aborts `percent` of calls with `status`.
pub fn abort(status: AbortStatus, percent: f64) -> FaultInjection {
    FaultInjection {
        delay: None,
        abort: Some(FaultAbort { status, percent }),
    }
}

/// Fault injection that delays `percent` of calls by `fixed_delay`.
pub fn delay(fixed_delay: Duration, percent: f64) -> FaultInjection {
    FaultInjection {
        delay: Some(FaultDelay {
            fixed_delay,
            percent,
        }),
        abort: None,
    }
}

/// Outlier detection ejecting after `consecutive_5xx` failures in a row,
/// the other settings at their documented defaults (max ejection time 300s).
pub fn outlier_detection(
    consecutive_5xx: u32,
    interval: Duration,
    base_ejection_time: Duration,
    max_ejection_percent: u32,
) -> OutlierDetection {
    OutlierDetection {
        consecutive_5xx_errors: Some(consecutive_5xx),
        consecutive_gateway_errors: None,
        interval,
        base_ejection_time,
        max_ejection_time: Duration::from_secs(300),
        max_ejection_percent,
    }
}

/// A Service as a route's parent (GAMMA).
pub fn service_parent(name: &str, namespace: Option<&str>, port: Option<u16>) -> ParentRef {
    ParentRef {
        name: name.to_string(),
        namespace: namespace.map(str::to_string),
        port,
    }
}

/// A `targetRef` of kind `kind`.
pub fn target(kind: TargetKind, name: &str) -> TargetRef {
    TargetRef {
        kind,
        name: name.to_string(),
    }
}

/// A BackendTrafficPolicy for `target` that sets nothing yet; see
/// [`Build`] for its settings.
pub fn traffic_policy(name: &str, target: TargetRef) -> Resource {
    Resource {
        metadata: Metadata::new(name),
        spec: Spec::BackendTrafficPolicy(BackendTrafficPolicySpec {
            target_refs: vec![target],
            load_balancer: None,
            circuit_breaker: None,
            outlier_detection: None,
            retry_budget: None,
            rate_limit: None,
        }),
    }
}

/// An AuthorizationPolicy for service account `service_account`, allowing
/// what one of `rules` matches.
pub fn authorization(name: &str, service_account: &str, rules: Vec<AuthorizationRule>) -> Resource {
    Resource {
        metadata: Metadata::new(name),
        spec: Spec::AuthorizationPolicy(AuthorizationPolicySpec {
            target_refs: vec![target(TargetKind::ServiceAccount, service_account)],
            rules,
        }),
    }
}

/// An authorization rule: callers among `principals` (any when empty)
/// calling one of `methods` on one of `paths` (any when empty).
pub fn allow(principals: &[&str], methods: &[&str], paths: &[&str]) -> AuthorizationRule {
    let strings = |s: &[&str]| s.iter().map(|s| (*s).to_string()).collect::<Vec<_>>();
    AuthorizationRule {
        from: (!principals.is_empty()).then(|| AuthorizationFrom {
            principals: strings(principals),
            namespaces: Vec::new(),
        }),
        to: (!methods.is_empty() || !paths.is_empty()).then(|| AuthorizationTo {
            methods: strings(methods),
            paths: strings(paths),
        }),
    }
}

/// Settings on a built [`Resource`], each for the kinds it names; applied
/// to another kind it panics, since the test is then wrong.
pub trait Build: Sized {
    /// `metadata.namespace`.
    fn in_namespace(self, namespace: &str) -> Self;
    /// A Backend's protocol.
    fn protocol(self, protocol: Protocol) -> Self;
    /// A Backend's endpoints (DNS, a Service).
    fn endpoints(self, endpoints: Endpoints) -> Self;
    /// A route's hostnames, replacing the ones it has.
    fn hostnames(self, hostnames: &[&str]) -> Self;
    /// Adds a parent Service to a route.
    fn parent(self, parent: ParentRef) -> Self;
    /// A GRPCRoute's rules, replacing the ones it has.
    fn grpc_rules(self, rules: Vec<GrpcRouteRule>) -> Self;
    /// An HTTPRoute's rules, replacing the ones it has.
    fn http_rules(self, rules: Vec<HttpRouteRule>) -> Self;
    /// A retry policy on every rule of a route.
    fn retry(self, retry: Retry) -> Self;
    /// Timeouts on every rule of a route.
    fn timeouts(self, timeouts: Timeouts) -> Self;
    /// Fault injection on every rule of a route.
    fn fault(self, fault: FaultInjection) -> Self;
    /// A BackendTrafficPolicy's load balancer.
    fn load_balancer(self, lb: LoadBalancerType) -> Self;
    /// A BackendTrafficPolicy's bulkhead limits.
    fn circuit_breaker(self, cb: CircuitBreaker) -> Self;
    /// A BackendTrafficPolicy's outlier detection.
    fn outlier_detection(self, od: OutlierDetection) -> Self;
    /// A BackendTrafficPolicy's retry budget.
    fn retry_budget(self, percent: f64, min_retries_per_second: u32) -> Self;
    /// A BackendTrafficPolicy's rate limit.
    fn rate_limit(self, requests_per_second: u32, burst: u32) -> Self;
}

fn wrong(r: &Resource, what: &str) -> ! {
    panic!("{} has no {what}", r.display_name())
}

/// Runs `$f` on every rule of the route `$r`, whichever its kind.
macro_rules! on_rules {
    ($r:ident, $what:expr, |$rule:ident| $body:expr) => {{
        match &mut $r.spec {
            Spec::GrpcRoute(s) => s.rules.iter_mut().for_each(|$rule| $body),
            Spec::HttpRoute(s) => s.rules.iter_mut().for_each(|$rule| $body),
            _ => wrong(&$r, $what),
        }
        $r
    }};
}

/// Applies `$f` to the spec of the route `$r`, whichever its kind.
macro_rules! on_route {
    ($r:ident, $what:expr, |$spec:ident| $body:expr) => {{
        match &mut $r.spec {
            Spec::GrpcRoute($spec) => $body,
            Spec::HttpRoute($spec) => $body,
            _ => wrong(&$r, $what),
        }
        $r
    }};
}

impl Build for Resource {
    fn in_namespace(mut self, namespace: &str) -> Self {
        self.metadata.namespace = namespace.to_string();
        self
    }

    fn protocol(mut self, protocol: Protocol) -> Self {
        match &mut self.spec {
            Spec::Backend(b) => b.protocol = Some(protocol),
            _ => wrong(&self, "protocol"),
        }
        self
    }

    fn endpoints(mut self, endpoints: Endpoints) -> Self {
        match &mut self.spec {
            Spec::Backend(b) => b.endpoints = endpoints,
            _ => wrong(&self, "endpoints"),
        }
        self
    }

    fn hostnames(mut self, hostnames: &[&str]) -> Self {
        let hostnames: Vec<String> = hostnames.iter().map(|h| (*h).to_string()).collect();
        on_route!(self, "hostnames", |s| s.hostnames.clone_from(&hostnames))
    }

    fn parent(mut self, parent: ParentRef) -> Self {
        on_route!(self, "parentRefs", |s| s.parent_refs.push(parent.clone()))
    }

    fn grpc_rules(mut self, rules: Vec<GrpcRouteRule>) -> Self {
        match &mut self.spec {
            Spec::GrpcRoute(s) => s.rules = rules,
            _ => wrong(&self, "GRPCRoute rules"),
        }
        self
    }

    fn http_rules(mut self, rules: Vec<HttpRouteRule>) -> Self {
        match &mut self.spec {
            Spec::HttpRoute(s) => s.rules = rules,
            _ => wrong(&self, "HTTPRoute rules"),
        }
        self
    }

    fn retry(mut self, retry: Retry) -> Self {
        on_rules!(self, "retry", |r| r.retry = Some(retry.clone()))
    }

    fn timeouts(mut self, timeouts: Timeouts) -> Self {
        on_rules!(self, "timeouts", |r| r.timeouts = Some(timeouts))
    }

    fn fault(mut self, fault: FaultInjection) -> Self {
        on_rules!(self, "faultInjection", |r| r.fault_injection =
            Some(fault.clone()))
    }

    fn load_balancer(self, lb: LoadBalancerType) -> Self {
        traffic(self, "loadBalancer", |t| t.load_balancer = Some(lb))
    }

    fn circuit_breaker(self, cb: CircuitBreaker) -> Self {
        traffic(self, "circuitBreaker", |t| t.circuit_breaker = Some(cb))
    }

    fn outlier_detection(self, od: OutlierDetection) -> Self {
        traffic(self, "outlierDetection", |t| t.outlier_detection = Some(od))
    }

    fn retry_budget(self, percent: f64, min_retries_per_second: u32) -> Self {
        traffic(self, "retryBudget", |t| {
            t.retry_budget = Some(RetryBudget {
                percent,
                min_retries_per_second,
            });
        })
    }

    fn rate_limit(self, requests_per_second: u32, burst: u32) -> Self {
        traffic(self, "rateLimit", |t| {
            t.rate_limit = Some(RateLimit {
                requests_per_second,
                burst,
            });
        })
    }
}

fn traffic(mut r: Resource, what: &str, f: impl FnOnce(&mut BackendTrafficPolicySpec)) -> Resource {
    match &mut r.spec {
        Spec::BackendTrafficPolicy(t) => f(t),
        _ => wrong(&r, what),
    }
    r
}
