//! Writing resources back out: multi-document YAML that [`super::parse`]
//! reads back to an equal set, and the same tree as JSON.
//!
//! Fields come out in a fixed, readable order (apiVersion, kind, metadata,
//! spec, then each kind's fields as documented); absent optionals and empty
//! lists are omitted, defaults that the model stores are written explicitly.
//! Validation is not repeated here: the input is assumed to be valid.

use std::time::Duration;

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};

use super::duration::format_duration;
use super::model::*;

/// An ordered JSON-like tree, so YAML keeps the documented field order.
enum Out {
    Str(String),
    Int(i64),
    Float(f64),
    List(Vec<Out>),
    Map(Vec<(String, Out)>),
}

impl Serialize for Out {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Out::Str(v) => s.serialize_str(v),
            Out::Int(v) => s.serialize_i64(*v),
            Out::Float(v) => s.serialize_f64(*v),
            Out::List(items) => {
                let mut seq = s.serialize_seq(Some(items.len()))?;
                items.iter().try_for_each(|i| seq.serialize_element(i))?;
                seq.end()
            }
            Out::Map(entries) => {
                let mut map = s.serialize_map(Some(entries.len()))?;
                entries
                    .iter()
                    .try_for_each(|(k, v)| map.serialize_entry(k, v))?;
                map.end()
            }
        }
    }
}

impl Out {
    fn json(&self) -> serde_json::Value {
        use serde_json::Value;
        match self {
            Out::Str(v) => Value::String(v.clone()),
            Out::Int(v) => Value::from(*v),
            Out::Float(v) => serde_json::Number::from_f64(*v).map_or(Value::Null, Value::Number),
            Out::List(items) => Value::Array(items.iter().map(Out::json).collect()),
            Out::Map(entries) => {
                Value::Object(entries.iter().map(|(k, v)| (k.clone(), v.json())).collect())
            }
        }
    }
}

impl From<&str> for Out {
    fn from(v: &str) -> Self {
        Out::Str(v.to_string())
    }
}

impl From<&String> for Out {
    fn from(v: &String) -> Self {
        Out::Str(v.clone())
    }
}

impl From<u32> for Out {
    fn from(v: u32) -> Self {
        Out::Int(v.into())
    }
}

impl From<u16> for Out {
    fn from(v: u16) -> Self {
        Out::Int(v.into())
    }
}

impl From<f64> for Out {
    fn from(v: f64) -> Self {
        Out::Float(v)
    }
}

impl From<Duration> for Out {
    fn from(v: Duration) -> Self {
        Out::Str(format_duration(v))
    }
}

impl From<M> for Out {
    fn from(m: M) -> Self {
        Out::Map(m.0)
    }
}

/// Builds a mapping in field order.
#[derive(Default)]
struct M(Vec<(String, Out)>);

impl M {
    fn set(mut self, key: &str, value: impl Into<Out>) -> Self {
        self.0.push((key.to_string(), value.into()));
        self
    }

    fn opt<T: Into<Out>>(self, key: &str, value: Option<T>) -> Self {
        match value {
            Some(v) => self.set(key, v),
            None => self,
        }
    }

    /// A list, omitted when empty.
    fn list<T>(self, key: &str, items: &[T], f: impl Fn(&T) -> Out) -> Self {
        let list = (!items.is_empty()).then(|| Out::List(items.iter().map(f).collect()));
        self.opt(key, list)
    }

    /// A list of strings, omitted when empty.
    fn strings(self, key: &str, items: &[String]) -> Self {
        self.list(key, items, |s| Out::Str(s.clone()))
    }
}

/// Multi-document YAML for `resources`, in order, separated by `---`.
pub fn to_yaml(resources: &[Resource]) -> String {
    let docs: Vec<String> = resources
        .iter()
        .map(|r| {
            let out = resource(r);
            // Serialising this tree cannot fail short of a serializer bug;
            // should it, JSON is valid YAML and reads back the same.
            serde_saphyr::to_string(&out).unwrap_or_else(|_| format!("{}\n", out.json()))
        })
        .collect();
    docs.join("---\n")
}

/// The JSON form of one resource: the same fields as [`to_yaml`].
pub fn to_json(resource: &Resource) -> serde_json::Value {
    self::resource(resource).json()
}

fn resource(r: &Resource) -> Out {
    let m = &r.metadata;
    let labels = |map: &std::collections::BTreeMap<String, String>| {
        (!map.is_empty())
            .then(|| Out::Map(map.iter().map(|(k, v)| (k.clone(), Out::from(v))).collect()))
    };
    let metadata = M::default()
        .set("name", &m.name)
        .set("namespace", &m.namespace)
        .opt("resourceVersion", m.resource_version.as_ref())
        .opt("labels", labels(&m.labels))
        .opt("annotations", labels(&m.annotations));
    let spec = match &r.spec {
        Spec::Backend(s) => backend(s),
        Spec::GrpcRoute(s) => route(s, grpc_match),
        Spec::HttpRoute(s) => route(s, http_match),
        Spec::BackendTrafficPolicy(s) => traffic_policy(s),
        Spec::AuthorizationPolicy(s) => authorization(s),
    };
    M::default()
        .set("apiVersion", API_VERSION)
        .set("kind", r.kind().as_str())
        .set("metadata", metadata)
        .set("spec", spec)
        .into()
}

fn backend(s: &BackendSpec) -> M {
    let endpoints = match &s.endpoints {
        Endpoints::Static(addrs) => M::default().set(
            "static",
            Out::List(addrs.iter().map(|a| Out::Str(a.to_string())).collect()),
        ),
        Endpoints::Dns { hostname, port } => M::default().set(
            "dns",
            M::default().set("hostname", hostname).set("port", *port),
        ),
        Endpoints::Service {
            name,
            namespace,
            port,
        } => M::default().set(
            "service",
            M::default()
                .set("name", name)
                .opt("namespace", namespace.as_ref())
                .set("port", *port),
        ),
    };
    let tls = match &s.tls {
        // Absent means disabled, so the default is left out.
        BackendTls::Disabled => None,
        BackendTls::Mesh { identity } => {
            Some(M::default().set("mode", "mesh").set("identity", identity))
        }
    };
    M::default()
        .opt("protocol", s.protocol.map(Protocol::as_str))
        .set("endpoints", endpoints)
        .opt("tls", tls)
}

fn route<T>(spec: &RouteSpec<T>, matcher: fn(&T) -> Out) -> M {
    let rules = spec.rules.iter().map(|r| route_rule(r, matcher)).collect();
    // `group: ""` is written out: Gateway API's default group is its own,
    // where no Service kind exists, so a CRD reader needs it.
    let parent_ref = |p: &ParentRef| {
        M::default()
            .set("group", "")
            .set("kind", "Service")
            .set("name", &p.name)
            .opt("namespace", p.namespace.as_ref())
            .opt("port", p.port)
            .into()
    };
    M::default()
        .list("parentRefs", &spec.parent_refs, parent_ref)
        .strings("hostnames", &spec.hostnames)
        .set("rules", Out::List(rules))
}

fn route_rule<T>(rule: &RouteRule<T>, matcher: fn(&T) -> Out) -> Out {
    let m = M::default().list("matches", &rule.matches, matcher);
    let (refs, timeouts, retry, fault) = (
        &rule.backend_refs,
        &rule.timeouts,
        &rule.retry,
        &rule.fault_injection,
    );
    let backend_ref = |b: &BackendRef| {
        M::default()
            .set("name", &b.name)
            .opt("namespace", b.namespace.as_ref())
            .set("weight", b.weight)
            .into()
    };
    let timeouts = timeouts.map(|t| {
        M::default()
            .opt("request", t.request)
            .opt("backendRequest", t.backend_request)
    });
    let retry = retry.as_ref().map(|r| {
        let code = |c: &RetryOn| match c {
            RetryOn::Grpc(g) => Out::from(g.as_str()),
            RetryOn::Http(n) => Out::from(*n),
        };
        let backoff = r
            .backoff
            .map(|b| M::default().set("base", b.base).set("max", b.max));
        M::default()
            .set("attempts", r.attempts)
            .list("codes", &r.codes, code)
            .opt("backoff", backoff)
    });
    let fault = fault.as_ref().map(|f| {
        let delay = f.delay.as_ref().map(|d| {
            M::default()
                .set("fixedDelay", d.fixed_delay)
                .set("percent", d.percent)
        });
        let abort = f.abort.as_ref().map(|a| {
            let m = match a.status {
                AbortStatus::Grpc(g) => M::default().set("grpcStatus", g.as_str()),
                AbortStatus::Http(n) => M::default().set("httpStatus", n),
            };
            m.set("percent", a.percent)
        });
        M::default().opt("delay", delay).opt("abort", abort)
    });
    m.list("backendRefs", refs, backend_ref)
        .opt("timeouts", timeouts)
        .opt("retry", retry)
        .opt("faultInjection", fault)
        .into()
}

fn headers(m: M, headers: &[HeaderMatch]) -> M {
    m.list("headers", headers, |h| {
        M::default()
            .set("name", &h.name)
            .set("value", &h.value)
            .into()
    })
}

fn grpc_match(m: &GrpcRouteMatch) -> Out {
    let method = m.method.as_ref().map(|g| {
        M::default()
            .opt("service", g.service.as_ref())
            .opt("method", g.method.as_ref())
    });
    headers(M::default().opt("method", method), &m.headers).into()
}

fn http_match(m: &HttpRouteMatch) -> Out {
    let path = m.path.as_ref().map(|p| match p {
        PathMatch::Exact(v) => M::default().set("type", "Exact").set("value", v),
        PathMatch::Prefix(v) => M::default().set("type", "PathPrefix").set("value", v),
    });
    headers(
        M::default()
            .opt("path", path)
            .opt("method", m.method.as_ref()),
        &m.headers,
    )
    .into()
}

fn target_refs(refs: &[TargetRef]) -> Out {
    Out::List(
        refs.iter()
            .map(|t| {
                M::default()
                    .set("kind", t.kind.as_str())
                    .set("name", &t.name)
                    .into()
            })
            .collect(),
    )
}

fn traffic_policy(s: &BackendTrafficPolicySpec) -> M {
    let cb = s.circuit_breaker.map(|c| {
        M::default()
            .opt("maxConnections", c.max_connections)
            .opt("maxParallelRequests", c.max_parallel_requests)
            .opt("maxPendingRequests", c.max_pending_requests)
    });
    let od = s.outlier_detection.map(|o| {
        M::default()
            .opt("consecutive5xxErrors", o.consecutive_5xx_errors)
            .opt("consecutiveGatewayErrors", o.consecutive_gateway_errors)
            .set("interval", o.interval)
            .set("baseEjectionTime", o.base_ejection_time)
            .set("maxEjectionTime", o.max_ejection_time)
            .set("maxEjectionPercent", o.max_ejection_percent)
    });
    let budget = s.retry_budget.map(|b| {
        M::default()
            .set("percent", b.percent)
            .set("minRetriesPerSecond", b.min_retries_per_second)
    });
    let rate = s.rate_limit.map(|r| {
        M::default()
            .set("requestsPerSecond", r.requests_per_second)
            .set("burst", r.burst)
    });
    M::default()
        .set("targetRefs", target_refs(&s.target_refs))
        .opt(
            "loadBalancer",
            s.load_balancer
                .map(|l| M::default().set("type", l.as_str())),
        )
        .opt("circuitBreaker", cb)
        .opt("outlierDetection", od)
        .opt("retryBudget", budget)
        .opt("rateLimit", rate)
}

fn authorization(s: &AuthorizationPolicySpec) -> M {
    let rule = |r: &AuthorizationRule| {
        let from = r.from.as_ref().map(|f| {
            M::default()
                .strings("principals", &f.principals)
                .strings("namespaces", &f.namespaces)
        });
        let to = r.to.as_ref().map(|t| {
            M::default()
                .strings("methods", &t.methods)
                .strings("paths", &t.paths)
        });
        M::default().opt("from", from).opt("to", to).into()
    };
    M::default()
        .set("targetRefs", target_refs(&s.target_refs))
        .set("rules", Out::List(s.rules.iter().map(rule).collect()))
}
