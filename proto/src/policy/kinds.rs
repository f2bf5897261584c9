//! Decoding a document tree into a [`Resource`]: the field names, defaults
//! and per-resource rules of each kind.
//!
//! Everything here goes through the [`Decoder`] helpers, so one pass reports
//! every problem in the document with its path. Rules that need other
//! resources (references, duplicates) live in `validate::check_set`.

use std::time::Duration;

use super::PolicyError;
use super::decode::{Decoder, Obj, Val};
use super::model::*;
use super::node::{Node, SNode, find_str};
use super::validate::*;

/// Decodes and validates one document; on failure, every problem found,
/// attributed to `Kind/name` when those can be read, else `document N`.
pub(crate) fn document(root: &SNode, number: usize) -> Result<Resource, Vec<PolicyError>> {
    let mut d = Decoder::default();
    let resource = resource(&mut d, &Val::root(root));
    if let Some(r) = resource
        && d.problems.is_empty()
    {
        return Ok(r);
    }
    if d.problems.is_empty() {
        // Every failing helper records a problem; this only guards against a
        // silent failure ever turning into an empty error list.
        d.error_at(String::new(), None, "invalid document");
    }
    let name = label(root).unwrap_or_else(|| format!("document {number}"));
    Err(d
        .problems
        .into_iter()
        .map(|p| PolicyError {
            resource: name.clone(),
            path: p.path,
            message: p.message,
            line: p.line,
        })
        .collect())
}

/// `Kind/name` when the kind is valid and the name is a string, whatever
/// else is wrong with the document.
fn label(root: &SNode) -> Option<String> {
    let kind =
        find_str(root, "kind").and_then(|k| Kind::ALL.into_iter().find(|x| x.as_str() == k))?;
    let name = find_str(root, "metadata.name").filter(|n| !n.is_empty())?;
    let namespace = find_str(root, "metadata.namespace").unwrap_or(DEFAULT_NAMESPACE);
    Some(display_name(kind, namespace, name))
}

fn resource(d: &mut Decoder, root: &Val<'_>) -> Option<Resource> {
    let o = d.obj(root, &["apiVersion", "kind", "metadata", "spec"])?;
    if let Some(v) = d.required(&o, "apiVersion")
        && let Some(s) = d.string(&v)
        && s != API_VERSION
    {
        d.error(
            &v,
            format!("unsupported apiVersion {s:?} (expected {API_VERSION})"),
        );
    }
    let kind = d.req(&o, "kind", |d, v| {
        let s = d.string(v)?;
        let kind = Kind::ALL.into_iter().find(|k| k.as_str() == s);
        if kind.is_none() {
            let expected = Kind::ALL.map(Kind::as_str).join(", ");
            d.error(
                v,
                format!("unknown kind {s:?} (expected one of: {expected})"),
            );
        }
        kind
    });
    let metadata = d.req(&o, "metadata", metadata);
    let spec = d
        .required(&o, "spec")
        .zip(kind)
        .and_then(|(v, kind)| match kind {
            Kind::Backend => backend(d, &v).map(Spec::Backend),
            Kind::GrpcRoute => route(d, &v, grpc_match).map(Spec::GrpcRoute),
            Kind::HttpRoute => route(d, &v, http_match).map(Spec::HttpRoute),
            Kind::BackendTrafficPolicy => traffic_policy(d, &v).map(Spec::BackendTrafficPolicy),
            Kind::AuthorizationPolicy => authorization(d, &v).map(Spec::AuthorizationPolicy),
        });
    Some(Resource {
        metadata: metadata?,
        spec: spec?,
    })
}

fn metadata(d: &mut Decoder, at: &Val<'_>) -> Option<Metadata> {
    let o = d.obj(
        at,
        &[
            "name",
            "namespace",
            "resourceVersion",
            "labels",
            "annotations",
        ],
    )?;
    let name = d.req(&o, "name", |d, v| d.string_with(v, resource_name));
    let namespace = d.opt(&o, "namespace", |d, v| d.string_with(v, namespace));
    let resource_version = d.opt(&o, "resourceVersion", Decoder::string);
    let labels = d.opt(&o, "labels", Decoder::string_map);
    let annotations = d.opt(&o, "annotations", Decoder::string_map);
    Some(Metadata {
        name: name?,
        namespace: namespace?.unwrap_or_else(|| DEFAULT_NAMESPACE.to_string()),
        resource_version: resource_version?,
        labels: labels?.unwrap_or_default(),
        annotations: annotations?.unwrap_or_default(),
    })
}

// ---------------------------------------------------------------- Backend

fn backend(d: &mut Decoder, at: &Val<'_>) -> Option<BackendSpec> {
    let o = d.obj(at, &["protocol", "endpoints", "tls"])?;
    let protocol = d.opt(&o, "protocol", |d, v| {
        d.one_of(
            v,
            &[
                ("grpc", Protocol::Grpc),
                ("http1", Protocol::Http1),
                ("http2", Protocol::Http2),
            ],
        )
    });
    let endpoints = d.req(&o, "endpoints", endpoints);
    let tls = d.opt(&o, "tls", tls);
    Some(BackendSpec {
        protocol: protocol?,
        endpoints: endpoints?,
        tls: tls?.unwrap_or(BackendTls::Disabled),
    })
}

fn endpoints(d: &mut Decoder, at: &Val<'_>) -> Option<Endpoints> {
    let o = d.obj(at, &["static", "dns", "service"])?;
    let one = d.exactly_one_of(&o, &["static", "dns", "service"]);
    let addrs = d.opt(&o, "static", |d, v| {
        d.each_nonempty(v, |d, a| {
            d.string(a).and_then(|s| d.check(a, socket_addr(&s)))
        })
    });
    let dns = d.opt(&o, "dns", |d, v| {
        let o = d.obj(v, &["hostname", "port"])?;
        let hostname = d.req(&o, "hostname", |d, v| d.string_with(v, dns_hostname));
        let port = d.req(&o, "port", |d, v| d.int(v, 1, 65535));
        Some(Endpoints::Dns {
            hostname: hostname?,
            port: u16::try_from(port?).ok()?,
        })
    });
    let service = d.opt(&o, "service", |d, v| {
        let o = d.obj(v, &["name", "namespace", "port"])?;
        let name = d.req(&o, "name", |d, v| d.string_with(v, service_name));
        let namespace = d.opt(&o, "namespace", |d, v| d.string_with(v, namespace));
        let port = d.req(&o, "port", |d, v| d.int(v, 1, 65535));
        Some(Endpoints::Service {
            name: name?,
            namespace: namespace?,
            port: u16::try_from(port?).ok()?,
        })
    });
    let (addrs, dns, service) = (addrs?, dns?, service?);
    if !one {
        return None;
    }
    addrs.map(Endpoints::Static).or(dns).or(service)
}

fn tls(d: &mut Decoder, at: &Val<'_>) -> Option<BackendTls> {
    let o = d.obj(at, &["mode", "identity"])?;
    let mesh = d.req(&o, "mode", |d, v| {
        d.one_of(v, &[("mesh", true), ("disabled", false)])
    });
    let identity = d.opt(&o, "identity", |d, v| d.string_with(v, spiffe_id));
    match (mesh?, identity?) {
        (true, Some(identity)) => Some(BackendTls::Mesh { identity }),
        (false, None) => Some(BackendTls::Disabled),
        (true, None) => {
            d.error_at(
                o.path("identity"),
                o.val.line(),
                "required when mode is mesh",
            );
            None
        }
        (false, Some(_)) => {
            let v = o.get("identity")?;
            d.error(&v, "not allowed when mode is disabled");
            None
        }
    }
}

// ---------------------------------------------------------------- routes

/// A route spec with the kind's own match decoder: hostnames and rules.
fn route<M>(
    d: &mut Decoder,
    at: &Val<'_>,
    matcher: impl Fn(&mut Decoder, &Val<'_>) -> Option<M>,
) -> Option<RouteSpec<M>> {
    let o = d.obj(at, &["parentRefs", "hostnames", "rules"])?;
    let parent_refs = d.opt(&o, "parentRefs", |d, v| {
        let refs = d.each(v, parent_ref)?;
        let items = d.list(v)?;
        let mut ok = true;
        for (j, p) in refs.iter().enumerate() {
            if refs[..j].contains(p) {
                d.error(&items[j], "duplicate parentRef");
                ok = false;
            }
        }
        ok.then_some(refs)
    });
    let hostnames = d.opt(&o, "hostnames", |d, v| {
        d.each(v, |d, h| d.string_with(h, route_hostname))
    });
    let rules = d.req(&o, "rules", |d, v| {
        d.each_nonempty(v, |d, r| {
            let o = d.obj(
                r,
                &[
                    "matches",
                    "backendRefs",
                    "timeouts",
                    "retry",
                    "faultInjection",
                ],
            )?;
            let matches = d.opt(&o, "matches", |d, v| d.each(v, |d, m| matcher(d, m)));
            let backend_refs = d.req(&o, "backendRefs", |d, v| d.each_nonempty(v, backend_ref));
            let timeouts = d.opt(&o, "timeouts", timeouts);
            let retry = d.opt(&o, "retry", retry);
            let fault_injection = d.opt(&o, "faultInjection", fault_injection);
            Some(RouteRule {
                matches: matches?.unwrap_or_default(),
                backend_refs: backend_refs?,
                timeouts: timeouts?,
                retry: retry?,
                fault_injection: fault_injection?,
            })
        })
    });
    Some(RouteSpec {
        parent_refs: parent_refs?.unwrap_or_default(),
        hostnames: hostnames?.unwrap_or_default(),
        rules: rules?,
    })
}

/// A `parentRefs` entry. Gateway API defaults `kind` to Gateway, which a
/// sidecar has no use for, so `kind: Service` must be written out.
fn parent_ref(d: &mut Decoder, at: &Val<'_>) -> Option<ParentRef> {
    const ONLY_SERVICE: &str = "only Service is supported (Gateway API mesh, GAMMA)";
    let o = d.obj(at, &["group", "kind", "name", "namespace", "port"])?;
    let group = d.opt(&o, "group", |d, v| {
        let g = d.string(v)?;
        if !g.is_empty() {
            d.error(
                v,
                format!("unsupported group {g:?} (a Service is in the core group: write \"\" or leave group out)"),
            );
            return None;
        }
        Some(())
    });
    let kind = match o.get("kind") {
        None => {
            d.error_at(
                o.path("kind"),
                o.val.line(),
                format!("required: {ONLY_SERVICE}"),
            );
            None
        }
        Some(v) => d.string(&v).and_then(|k| {
            if k == "Service" {
                Some(())
            } else {
                d.error(&v, format!("{ONLY_SERVICE}, not {k:?}"));
                None
            }
        }),
    };
    let name = d.req(&o, "name", |d, v| d.string_with(v, service_name));
    let namespace = d.opt(&o, "namespace", |d, v| d.string_with(v, namespace));
    let port = d.opt(&o, "port", |d, v| d.int(v, 1, 65535));
    group?;
    kind?;
    Some(ParentRef {
        name: name?,
        namespace: namespace?,
        port: port?.map(u16::try_from).transpose().ok()?,
    })
}

fn grpc_match(d: &mut Decoder, at: &Val<'_>) -> Option<GrpcRouteMatch> {
    let o = d.obj(at, &["method", "headers"])?;
    let method = d.opt(&o, "method", |d, v| {
        let o = d.obj(v, &["type", "service", "method"])?;
        let exact = exact_only(d, &o);
        let service = d.opt(&o, "service", |d, v| d.string_with(v, grpc_name));
        let method = d.opt(&o, "method", |d, v| d.string_with(v, grpc_name));
        if !o.has("service") && !o.has("method") {
            d.error(v, "at least one of service and method is required");
            return None;
        }
        exact?;
        Some(GrpcMethodMatch {
            service: service?,
            method: method?,
        })
    });
    let headers = d.opt(&o, "headers", |d, v| d.each(v, header_match));
    Some(GrpcRouteMatch {
        method: method?,
        headers: headers?.unwrap_or_default(),
    })
}

fn http_match(d: &mut Decoder, at: &Val<'_>) -> Option<HttpRouteMatch> {
    let o = d.obj(at, &["path", "method", "headers"])?;
    let path = d.opt(&o, "path", |d, v| {
        let o = d.obj(v, &["type", "value"])?;
        let exact = d.opt(&o, "type", |d, v| {
            d.one_of(v, &[("Exact", true), ("PathPrefix", false)])
        });
        let value = d.req(&o, "value", |d, v| d.string_with(v, http_path));
        let value = value?;
        Some(if exact?.unwrap_or(false) {
            PathMatch::Exact(value)
        } else {
            PathMatch::Prefix(value)
        })
    });
    let method = d.opt(&o, "method", |d, v| d.string_with(v, http_method));
    let headers = d.opt(&o, "headers", |d, v| d.each(v, header_match));
    Some(HttpRouteMatch {
        path: path?,
        method: method?,
        headers: headers?.unwrap_or_default(),
    })
}

/// The optional `type` of gRPC method and header matches, where only the
/// default, `Exact`, exists.
fn exact_only(d: &mut Decoder, o: &Obj<'_>) -> Option<()> {
    d.opt(o, "type", |d, v| {
        let s = d.string(v)?;
        if s != "Exact" {
            d.error(v, "only Exact is supported");
            return None;
        }
        Some(())
    })
    .map(drop)
}

fn header_match(d: &mut Decoder, at: &Val<'_>) -> Option<HeaderMatch> {
    let o = d.obj(at, &["type", "name", "value"])?;
    let exact = exact_only(d, &o);
    let name = d.req(&o, "name", |d, v| d.string_with(v, header_name));
    let value = d.req(&o, "value", |d, v| d.string_with(v, header_value));
    exact?;
    Some(HeaderMatch {
        name: name?,
        value: value?,
    })
}

fn backend_ref(d: &mut Decoder, at: &Val<'_>) -> Option<BackendRef> {
    let o = d.obj(at, &["name", "namespace", "weight"])?;
    let name = d.req(&o, "name", |d, v| d.string_with(v, resource_name));
    let namespace = d.opt(&o, "namespace", |d, v| d.string_with(v, namespace));
    let weight = d.opt(&o, "weight", |d, v| d.int(v, 0, 1_000_000));
    let weight = weight?.map_or(Some(1), |w| u32::try_from(w).ok());
    Some(BackendRef {
        name: name?,
        namespace: namespace?,
        weight: weight?,
    })
}

fn positive(d: &mut Decoder, v: &Val<'_>) -> Option<Duration> {
    d.duration(v, false)
}

fn timeouts(d: &mut Decoder, at: &Val<'_>) -> Option<Timeouts> {
    let o = d.obj(at, &["request", "backendRequest"])?;
    let request = d.opt(&o, "request", positive)?;
    let backend_request = d.opt(&o, "backendRequest", positive)?;
    if let (Some(r), Some(b)) = (request, backend_request) {
        d.duration_bound(&o, "backendRequest", b, r, "request", true);
    }
    Some(Timeouts {
        request,
        backend_request,
    })
}

fn retry(d: &mut Decoder, at: &Val<'_>) -> Option<Retry> {
    let o = d.obj(at, &["attempts", "codes", "backoff"])?;
    let attempts = d.req(&o, "attempts", |d, v| d.int(v, 1, 10));
    let codes = d.req(&o, "codes", |d, v| {
        d.each_nonempty(v, |d, c| match c.node.value {
            Node::Int(_) => d
                .int(c, 400, 599)
                .and_then(|n| u16::try_from(n).ok())
                .map(RetryOn::Http),
            Node::Str(_) => grpc_code(d, c).map(RetryOn::Grpc),
            _ => d.type_error(c, "a gRPC status name or an HTTP status code"),
        })
    });
    let backoff = d.opt(&o, "backoff", |d, v| {
        let o = d.obj(v, &["base", "max"])?;
        let base = d.req(&o, "base", positive);
        let max = d.req(&o, "max", positive);
        let (base, max) = (base?, max?);
        d.duration_bound(&o, "max", max, base, "base", false);
        Some(Backoff { base, max })
    });
    Some(Retry {
        attempts: u32::try_from(attempts?).ok()?,
        codes: codes?,
        backoff: backoff?,
    })
}

/// A gRPC status by name, in any case.
fn grpc_code(d: &mut Decoder, at: &Val<'_>) -> Option<GrpcCode> {
    let s = d.string(at)?;
    let code = GrpcCode::ALL
        .into_iter()
        .find(|c| c.as_str().eq_ignore_ascii_case(&s));
    if code.is_none() {
        d.error(
            at,
            format!("unknown gRPC status {s:?} (expected a name such as UNAVAILABLE)"),
        );
    }
    code
}

fn fault_injection(d: &mut Decoder, at: &Val<'_>) -> Option<FaultInjection> {
    let o = d.obj(at, &["delay", "abort"])?;
    if !o.has("delay") && !o.has("abort") {
        d.error(at, "at least one of delay and abort is required");
        return None;
    }
    let delay = d.opt(&o, "delay", |d, v| {
        let o = d.obj(v, &["fixedDelay", "percent"])?;
        let fixed_delay = d.req(&o, "fixedDelay", positive);
        let percent = d.req(&o, "percent", Decoder::percent);
        Some(FaultDelay {
            fixed_delay: fixed_delay?,
            percent: percent?,
        })
    });
    let abort = d.opt(&o, "abort", |d, v| {
        let o = d.obj(v, &["grpcStatus", "httpStatus", "percent"])?;
        let one = d.exactly_one(&o, "grpcStatus", "httpStatus");
        let grpc = d.opt(&o, "grpcStatus", grpc_code);
        let http = d.opt(&o, "httpStatus", |d, v| d.int(v, 200, 599));
        let percent = d.req(&o, "percent", Decoder::percent);
        let status = match (grpc?, http?) {
            (Some(code), None) => AbortStatus::Grpc(code),
            (None, Some(n)) => AbortStatus::Http(u16::try_from(n).ok()?),
            _ => return None,
        };
        one.then_some(FaultAbort {
            status,
            percent: percent?,
        })
    });
    Some(FaultInjection {
        delay: delay?,
        abort: abort?,
    })
}

// ---------------------------------------------------------------- policies

/// `targetRefs: [...]` or a single `targetRef: {...}`, of the given kinds.
fn target_refs(
    d: &mut Decoder,
    o: &Obj<'_>,
    kinds: &[(&str, TargetKind)],
) -> Option<Vec<TargetRef>> {
    let one = d.exactly_one(o, "targetRefs", "targetRef");
    let list = d.opt(o, "targetRefs", |d, v| {
        let refs = d.each_nonempty(v, |d, t| target_ref(d, t, kinds))?;
        let items = d.list(v)?;
        let mut ok = true;
        for (j, t) in refs.iter().enumerate() {
            if refs[..j].contains(t) {
                d.error(&items[j], "duplicate target");
                ok = false;
            }
        }
        ok.then_some(refs)
    });
    let single = d.opt(o, "targetRef", |d, v| target_ref(d, v, kinds));
    let (list, single) = (list?, single?);
    if !one {
        return None;
    }
    list.or(single.map(|t| vec![t]))
}

fn target_ref(d: &mut Decoder, at: &Val<'_>, kinds: &[(&str, TargetKind)]) -> Option<TargetRef> {
    let o = d.obj(at, &["group", "kind", "name"])?;
    let group = d.opt(&o, "group", |d, v| {
        let g = d.string(v)?;
        let ok = g.is_empty() || g == "pylon.dev";
        if !ok {
            d.error(
                v,
                format!("unsupported group {g:?} (expected \"\" or \"pylon.dev\")"),
            );
        }
        ok.then_some(())
    });
    let kind = d.req(&o, "kind", |d, v| d.one_of(v, kinds));
    let name = d.req(&o, "name", |d, v| d.string_with(v, resource_name));
    group?;
    Some(TargetRef {
        kind: kind?,
        name: name?,
    })
}

fn traffic_policy(d: &mut Decoder, at: &Val<'_>) -> Option<BackendTrafficPolicySpec> {
    let fields = [
        "targetRefs",
        "targetRef",
        "loadBalancer",
        "circuitBreaker",
        "outlierDetection",
        "retryBudget",
        "rateLimit",
    ];
    let o = d.obj(at, &fields)?;
    let kinds = [
        ("Backend", TargetKind::Backend),
        ("ServiceAccount", TargetKind::ServiceAccount),
    ];
    let target_refs = target_refs(d, &o, &kinds);
    let load_balancer = d.opt(&o, "loadBalancer", |d, v| {
        let o = d.obj(v, &["type"])?;
        let choices =
            [LoadBalancerType::LeastRequest, LoadBalancerType::RoundRobin].map(|t| (t.as_str(), t));
        d.req(&o, "type", |d, v| d.one_of(v, &choices))
    });
    let circuit_breaker = d.opt(&o, "circuitBreaker", |d, v| {
        let o = d.obj(
            v,
            &[
                "maxConnections",
                "maxParallelRequests",
                "maxPendingRequests",
            ],
        )?;
        let mut limit = |key| d.opt(&o, key, |d, v| d.u32(v, 1));
        let (c, p, q) = (
            limit("maxConnections"),
            limit("maxParallelRequests"),
            limit("maxPendingRequests"),
        );
        Some(CircuitBreaker {
            max_connections: c?,
            max_parallel_requests: p?,
            max_pending_requests: q?,
        })
    });
    let outlier_detection = d.opt(&o, "outlierDetection", outlier_detection);
    let retry_budget = d.opt(&o, "retryBudget", |d, v| {
        let o = d.obj(v, &["percent", "minRetriesPerSecond"])?;
        let percent = d.req(&o, "percent", Decoder::percent);
        let min = d.opt(&o, "minRetriesPerSecond", |d, v| d.u32(v, 0));
        Some(RetryBudget {
            percent: percent?,
            min_retries_per_second: min?.unwrap_or(10),
        })
    });
    let rate_limit = d.opt(&o, "rateLimit", |d, v| {
        let o = d.obj(v, &["requestsPerSecond", "burst"])?;
        let rps = d.req(&o, "requestsPerSecond", |d, v| d.u32(v, 1));
        let burst = d.opt(&o, "burst", |d, v| d.u32(v, 1));
        let rps = rps?;
        Some(RateLimit {
            requests_per_second: rps,
            burst: burst?.unwrap_or(rps),
        })
    });
    Some(BackendTrafficPolicySpec {
        target_refs: target_refs?,
        load_balancer: load_balancer?,
        circuit_breaker: circuit_breaker?,
        outlier_detection: outlier_detection?,
        retry_budget: retry_budget?,
        rate_limit: rate_limit?,
    })
}

fn outlier_detection(d: &mut Decoder, at: &Val<'_>) -> Option<OutlierDetection> {
    let fields = [
        "consecutive5xxErrors",
        "consecutiveGatewayErrors",
        "interval",
        "baseEjectionTime",
        "maxEjectionTime",
        "maxEjectionPercent",
    ];
    let o = d.obj(at, &fields)?;
    let consecutive_5xx = d.opt(&o, "consecutive5xxErrors", |d, v| d.u32(v, 1));
    let consecutive_gateway = d.opt(&o, "consecutiveGatewayErrors", |d, v| d.u32(v, 1));
    let mut time = |key, default| {
        d.opt(&o, key, positive)
            .map(|t| t.unwrap_or(Duration::from_secs(default)))
    };
    let (interval, base, max) = (
        time("interval", 10),
        time("baseEjectionTime", 30),
        time("maxEjectionTime", 300),
    );
    let percent = d.opt(&o, "maxEjectionPercent", |d, v| d.int(v, 0, 100));
    let (base, max) = (base?, max?);
    d.duration_bound(&o, "maxEjectionTime", max, base, "baseEjectionTime", false);
    Some(OutlierDetection {
        consecutive_5xx_errors: consecutive_5xx?,
        consecutive_gateway_errors: consecutive_gateway?,
        interval: interval?,
        base_ejection_time: base,
        max_ejection_time: max,
        max_ejection_percent: percent?.map_or(Some(10), |p| u32::try_from(p).ok())?,
    })
}

fn authorization(d: &mut Decoder, at: &Val<'_>) -> Option<AuthorizationPolicySpec> {
    let o = d.obj(at, &["targetRefs", "targetRef", "rules"])?;
    let target_refs = target_refs(d, &o, &[("ServiceAccount", TargetKind::ServiceAccount)]);
    let rules = d.req(&o, "rules", |d, v| {
        d.each(v, |d, r| {
            let o = d.obj(r, &["from", "to"])?;
            let from = d.opt(&o, "from", |d, v| {
                let [principals, namespaces] = patterns(d, v, ["principals", "namespaces"])?;
                Some(AuthorizationFrom {
                    principals,
                    namespaces,
                })
            });
            let to = d.opt(&o, "to", |d, v| {
                let [methods, paths] = patterns(d, v, ["methods", "paths"])?;
                Some(AuthorizationTo { methods, paths })
            });
            Some(AuthorizationRule {
                from: from?,
                to: to?,
            })
        })
    });
    Some(AuthorizationPolicySpec {
        target_refs: target_refs?,
        rules: rules?,
    })
}

/// A mapping of the two given optional pattern lists.
fn patterns(d: &mut Decoder, at: &Val<'_>, keys: [&str; 2]) -> Option<[Vec<String>; 2]> {
    let o = d.obj(at, &keys)?;
    let [a, b] = keys.map(|key| d.opt(&o, key, |d, v| d.each(v, |d, p| d.string_with(p, pattern))));
    Some([a?.unwrap_or_default(), b?.unwrap_or_default()])
}
