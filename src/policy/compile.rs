//! Policy resources → [`Snapshot`]: names resolved once, routes indexed,
//! each Backend joined with its BackendTrafficPolicy, the local app's
//! authorization compiled.
//!
//! Compiling changes nothing that is live: backends that exist in the
//! previous snapshot are reused (their state survives the reload) but their
//! new configuration is only returned as [`BackendUpdate`]s, applied by the
//! caller once the whole policy compiled. A policy that fails leaves every
//! backend as it was.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use pylon_proto::policy::{
    BackendRef, BackendSpec, BackendTls, BackendTrafficPolicySpec, Endpoints, GrpcRouteMatch,
    HeaderMatch, HttpRouteMatch, Resource, RouteSpec, Spec, TargetKind,
};

use super::{InboundPolicy, Snapshot};
use crate::http::pool::Transport;
use crate::identity::{IdentityStore, tls};
use crate::policy::authz::Authorization;
use crate::policy::backend::{Backend, BackendConfig, EndpointSource};
use crate::policy::routing::{
    ClusterDns, Entry, Map, Matcher, RouteHosts, RouteMetrics, RouteTable, Rule, RulePolicy,
};
use crate::telemetry::metrics::Metrics;

/// What compiling needs besides the resources.
pub struct CompileContext<'a> {
    pub identity: &'a Arc<IdentityStore>,
    pub metrics: &'a Metrics,
    /// This workload's service account (namespace, name), from its SPIFFE
    /// ID: the AuthorizationPolicies and the BackendTrafficPolicy targeting
    /// it protect the local app.
    pub service_account: Option<(String, String)>,
    /// How Kubernetes Services are named here, for route parents and
    /// Service endpoints.
    pub cluster: &'a ClusterDns,
}

/// New configuration for a backend, applied once the policy compiled.
pub struct BackendUpdate {
    pub backend: Arc<Backend>,
    pub config: BackendConfig,
    pub endpoints: EndpointSource,
}

/// Compiles validated resources. `prev` lends its backends.
pub fn compile(
    resources: Vec<Resource>,
    version: String,
    prev: &Snapshot,
    ctx: &CompileContext<'_>,
) -> Result<(Snapshot, Vec<BackendUpdate>), Vec<String>> {
    let mut errors = Vec::new();
    let mut tls_configs: HashMap<String, Arc<rustls::ClientConfig>> = prev
        .backends
        .values()
        .filter_map(|b| {
            let config = b.config();
            match (&config.tls, &config.transport) {
                (BackendTls::Mesh { identity }, Transport::Mesh(c)) => {
                    Some((identity.clone(), c.clone()))
                }
                _ => None,
            }
        })
        .collect();

    // BackendTrafficPolicies by the backend (or service account) they target.
    let mut traffic: HashMap<String, &BackendTrafficPolicySpec> = HashMap::new();
    let mut inbound = InboundPolicy::default();
    for r in &resources {
        if let Spec::BackendTrafficPolicy(spec) = &r.spec {
            for t in &spec.target_refs {
                match t.kind {
                    TargetKind::Backend => {
                        traffic.insert(format!("{}/{}", r.metadata.namespace, t.name), spec);
                    }
                    TargetKind::ServiceAccount => {
                        let own = ctx
                            .service_account
                            .as_ref()
                            .is_some_and(|(ns, sa)| *ns == r.metadata.namespace && *sa == t.name);
                        if own {
                            inbound.max_parallel_requests =
                                spec.circuit_breaker.and_then(|c| c.max_parallel_requests);
                            inbound.rate_limit = spec.rate_limit;
                        }
                    }
                }
            }
        }
    }

    inbound.authorization = Arc::new(Authorization::compile(
        &resources,
        ctx.service_account.as_ref(),
    ));

    let mut backends = BTreeMap::new();
    let mut updates = Vec::new();
    for r in &resources {
        if let Spec::Backend(spec) = &r.spec {
            let key = format!("{}/{}", r.metadata.namespace, r.metadata.name);
            let config = backend_config(spec, traffic.get(&key).copied(), &mut tls_configs, ctx);
            match config {
                Ok(config) => {
                    let backend = match prev.backends.get(&key) {
                        Some(b) => b.clone(),
                        None => Backend::new(r.display_name().into(), config.clone(), ctx.metrics),
                    };
                    backends.insert(key, backend.clone());
                    updates.push(BackendUpdate {
                        backend,
                        config,
                        endpoints: endpoint_source(
                            &spec.endpoints,
                            &r.metadata.namespace,
                            ctx.cluster,
                        ),
                    });
                }
                Err(e) => errors.push(format!("{}: {e}", r.display_name())),
            }
        }
    }

    let mut ordered: Vec<&Resource> = resources
        .iter()
        .filter(|r| matches!(r.spec, Spec::GrpcRoute(_) | Spec::HttpRoute(_)))
        .collect();
    let mut routes =
        RouteTable::with_capacity(ordered.len(), ordered.iter().map(|r| hosts_of(r)).sum());
    // The Backends by `namespace/name` again, hashed: routes look up every
    // backendRef (tens of thousands in a large policy), faster than in the
    // ordered map.
    let by_key: Map<&str, &Arc<Backend>> = backends.iter().map(|(k, b)| (k.as_str(), b)).collect();
    ordered.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    let mut key = String::new();
    for r in ordered {
        let result = match &r.spec {
            Spec::GrpcRoute(spec) => {
                add_route(&mut routes, r, spec, &by_key, &prev.routes, ctx, &mut key)
            }
            Spec::HttpRoute(spec) => {
                add_route(&mut routes, r, spec, &by_key, &prev.routes, ctx, &mut key)
            }
            _ => Ok(()),
        };
        if let Err(e) = result {
            errors.push(format!("{}: {e}", r.display_name()));
        }
    }
    routes.finish();

    if !errors.is_empty() {
        return Err(errors);
    }
    let snapshot = Snapshot {
        version,
        resources,
        routes,
        backends,
        inbound,
    };
    Ok((snapshot, updates))
}

/// How many hostnames (and Service names, five per parent) a route
/// indexes, to size the route table.
fn hosts_of(r: &Resource) -> usize {
    let (hostnames, parents) = match &r.spec {
        Spec::GrpcRoute(spec) => (spec.hostnames.len(), spec.parent_refs.len()),
        Spec::HttpRoute(spec) => (spec.hostnames.len(), spec.parent_refs.len()),
        _ => (0, 0),
    };
    hostnames + 5 * parents
}

/// Where a Backend's endpoints come from. A Service is named by its fully
/// qualified name, so the pod's search domains play no part.
fn endpoint_source(endpoints: &Endpoints, namespace: &str, cluster: &ClusterDns) -> EndpointSource {
    match endpoints {
        Endpoints::Static(addrs) => EndpointSource::Static(addrs.clone()),
        Endpoints::Dns { hostname, port } => EndpointSource::Dns {
            hostname: hostname.clone(),
            port: *port,
        },
        Endpoints::Service {
            name,
            namespace: ns,
            port,
        } => EndpointSource::Dns {
            hostname: cluster.service_fqdn(name, ns.as_deref().unwrap_or(namespace)),
            port: *port,
        },
    }
}

fn backend_config(
    spec: &BackendSpec,
    traffic: Option<&BackendTrafficPolicySpec>,
    tls_configs: &mut HashMap<String, Arc<rustls::ClientConfig>>,
    ctx: &CompileContext<'_>,
) -> Result<BackendConfig, String> {
    let transport = match &spec.tls {
        BackendTls::Disabled => Transport::Plain,
        BackendTls::Mesh { identity: expected } => {
            let config = match tls_configs.get(expected) {
                Some(c) => c.clone(),
                None => {
                    let c = tls::client_config(ctx.identity, expected)
                        .map_err(|e| format!("spec.tls: {e}"))?;
                    tls_configs.insert(expected.clone(), c.clone());
                    c
                }
            };
            Transport::Mesh(config)
        }
    };
    Ok(BackendConfig {
        protocol: spec.protocol,
        tls: spec.tls.clone(),
        transport,
        load_balancer: traffic.and_then(|t| t.load_balancer).unwrap_or_default(),
        rate_limit: traffic.and_then(|t| t.rate_limit),
        circuit_breaker: traffic.and_then(|t| t.circuit_breaker).unwrap_or_default(),
        outlier_detection: traffic.and_then(|t| t.outlier_detection),
        retry_budget: traffic.and_then(|t| t.retry_budget),
    })
}

/// The Backends `refs` name, with their weights. `key` is scratch space
/// for the `namespace/name` keys, reused across calls.
fn resolve_refs(
    refs: &[BackendRef],
    namespace: &str,
    backends: &Map<&str, &Arc<Backend>>,
    key: &mut String,
) -> Result<Vec<(u32, Arc<Backend>)>, String> {
    refs.iter()
        .map(|br| {
            let ns = br.namespace.as_deref().unwrap_or(namespace);
            key.clear();
            key.extend([ns, "/", br.name.as_str()]);
            backends
                .get(key.as_str())
                .map(|b| (br.weight, Arc::clone(b)))
                .ok_or_else(|| format!("no Backend \"{}\" in namespace \"{ns}\"", br.name))
        })
        .collect()
}

fn compile_headers(headers: &[HeaderMatch]) -> Result<Vec<(HeaderName, HeaderValue)>, String> {
    headers
        .iter()
        .map(|h| {
            let name = HeaderName::from_bytes(h.name.as_bytes())
                .map_err(|_| format!("{:?} is not a valid header name", h.name))?;
            let value = HeaderValue::from_str(&h.value)
                .map_err(|_| format!("{:?} is not a valid header value", h.value))?;
            Ok((name, value))
        })
        .collect()
}

/// How a match of one route kind becomes a routing matcher.
trait RouteMatch {
    /// The matcher of a rule without matches.
    fn match_all() -> Matcher;
    /// This match's matcher; an error names the field (`method: ...`).
    fn matcher(&self) -> Result<Matcher, String>;
    fn headers(&self) -> &[HeaderMatch];
}

impl RouteMatch for GrpcRouteMatch {
    fn match_all() -> Matcher {
        Matcher::Grpc {
            service: None,
            method: None,
        }
    }

    fn matcher(&self) -> Result<Matcher, String> {
        Ok(Matcher::Grpc {
            service: self.method.as_ref().and_then(|m| m.service.clone()),
            method: self.method.as_ref().and_then(|m| m.method.clone()),
        })
    }

    fn headers(&self) -> &[HeaderMatch] {
        &self.headers
    }
}

impl RouteMatch for HttpRouteMatch {
    fn match_all() -> Matcher {
        Matcher::Http {
            path: None,
            method: None,
        }
    }

    fn matcher(&self) -> Result<Matcher, String> {
        let method = self
            .method
            .as_deref()
            .map(|s| Method::from_bytes(s.as_bytes()))
            .transpose()
            .map_err(|_| "method: not an HTTP method".to_string())?;
        Ok(Matcher::Http {
            path: self.path.clone(),
            method,
        })
    }

    fn headers(&self) -> &[HeaderMatch] {
        &self.headers
    }
}

/// Adds route `r`'s rules to `routes`. Its metric handles start from the
/// same route's in `prev` (the previous snapshot's table, compiled with
/// the same metrics), and are kept in `routes` for the next compile.
fn add_route<M: RouteMatch>(
    routes: &mut RouteTable,
    r: &Resource,
    spec: &RouteSpec<M>,
    backends: &Map<&str, &Arc<Backend>>,
    prev: &RouteTable,
    ctx: &CompileContext<'_>,
    key: &mut String,
) -> Result<(), String> {
    let name: Arc<str> = r.display_name().into();
    let route_ns = r.metadata.namespace.as_str();
    let parents = spec.parent_refs.iter().map(|p| {
        let ns = p.namespace.as_deref().unwrap_or(route_ns);
        (p.name.as_str(), ns, p.port)
    });
    let hosts = RouteHosts::new(&spec.hostnames, parents, ctx.cluster);
    let mut handles = RouteMetrics::reusing(name.clone(), ctx.metrics, prev.series(&name));
    let mut entries = Vec::with_capacity(spec.rules.iter().map(|r| r.matches.len().max(1)).sum());
    for (i, rule) in spec.rules.iter().enumerate() {
        let weighted = resolve_refs(&rule.backend_refs, &r.metadata.namespace, backends, key)
            .map_err(|e| format!("spec.rules[{i}].backendRefs: {e}"))?;
        let policy = RulePolicy {
            timeouts: rule.timeouts,
            retry: rule.retry.clone(),
            fault_injection: rule.fault_injection.clone(),
        };
        let compiled = Arc::new(Rule::of_route(i, weighted, policy, &mut handles));
        if rule.matches.is_empty() {
            entries.push(Entry::new(M::match_all(), vec![], compiled.clone()));
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let at = || format!("spec.rules[{i}].matches[{j}]");
            let matcher = m.matcher().map_err(|e| format!("{}.{e}", at()))?;
            let headers =
                compile_headers(m.headers()).map_err(|e| format!("{}.headers: {e}", at()))?;
            entries.push(Entry::new(matcher, headers, compiled.clone()));
        }
    }
    routes.add_route(&hosts, entries);
    routes.keep_series(name, handles.into_series());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_service_endpoint_is_its_fully_qualified_name() {
        let cluster = ClusterDns {
            namespace: Some("web".into()),
            domain: "corp.example".into(),
        };
        let service = |namespace: Option<&str>| Endpoints::Service {
            name: "greeter-headless".into(),
            namespace: namespace.map(Into::into),
            port: 50051,
        };
        assert_eq!(
            endpoint_source(&service(None), "shop", &cluster),
            EndpointSource::Dns {
                hostname: "greeter-headless.shop.svc.corp.example.".into(),
                port: 50051
            },
            "the Backend's namespace, not the sidecar's"
        );
        assert_eq!(
            endpoint_source(&service(Some("data")), "shop", &cluster),
            EndpointSource::Dns {
                hostname: "greeter-headless.data.svc.corp.example.".into(),
                port: 50051
            }
        );
        let dns = Endpoints::Dns {
            hostname: "greeter".into(),
            port: 1,
        };
        assert_eq!(
            endpoint_source(&dns, "shop", &cluster),
            EndpointSource::Dns {
                hostname: "greeter".into(),
                port: 1
            }
        );
    }

    #[test]
    fn a_reload_keeps_each_routes_series_and_compiles_as_a_first_compile() {
        use pylon_proto::policy::Kind;
        use pylon_test_support::policy::{backend, route};

        let ca = crate::identity::dev::DevCa::new("compile test").unwrap();
        let identity = ca
            .identity_store("spiffe://pylon.local/ns/default/sa/client", &[&ca])
            .unwrap();
        let metrics = Metrics::new();
        let cluster = ClusterDns::default();
        let ctx = CompileContext {
            identity: &identity,
            metrics: &metrics,
            service_account: None,
            cluster: &cluster,
        };
        let addr = "127.0.0.1:1".parse().unwrap();
        let policy = |to: &str| {
            vec![
                backend("a", &[addr], None),
                backend("b", &[addr], None),
                route(Kind::HttpRoute, "web", "web", &[(to, 1)]),
                route(Kind::GrpcRoute, "rpc", "rpc", &[("a", 1)]),
            ]
        };
        let (first, _) = compile(policy("a"), "1".into(), &Snapshot::default(), &ctx).unwrap();
        let (reload, _) = compile(policy("b"), "2".into(), &first, &ctx).unwrap();
        let (fresh, _) = compile(policy("b"), "3".into(), &Snapshot::default(), &ctx).unwrap();

        let described = |s: &Snapshot| {
            s.routes
                .describe()
                .into_iter()
                .map(|(host, r)| {
                    let to: Vec<String> = r
                        .weighted_backends()
                        .map(|(w, b)| format!("{w} {}", b.name))
                        .collect();
                    (host, r.route.to_string(), r.index, to)
                })
                .collect::<Vec<_>>()
        };
        assert_eq!(described(&reload), described(&fresh));
        assert_eq!(
            described(&reload)[1],
            (
                "web".into(),
                "HTTPRoute/web".into(),
                0,
                vec!["1 Backend/b".into()]
            )
        );

        let web = |s: &Snapshot| s.routes.describe()[1].1.clone();
        let rpc = |s: &Snapshot| s.routes.describe()[0].1.clone();
        let ok = crate::telemetry::metrics::RequestStatus::Http(200);
        for s in [&first, &reload] {
            let a = &s.backends["default/a"];
            let calls = rpc(s).requests_to(a).unwrap().clone();
            calls.record(ok, std::time::Duration::from_millis(1));
        }
        let line = "pylon_outbound_requests_total{route=\"GRPCRoute/rpc\",backend=\"Backend/a\",status=\"2xx\"} 2";
        let text = metrics.encode();
        assert!(text.lines().any(|l| l == line), "the same series: {text}");
        let b = &reload.backends["default/b"];
        assert!(web(&reload).requests_to(b).is_some());
        assert!(reload.routes.series("HTTPRoute/web").is_some());
        assert!(reload.routes.series("HTTPRoute/gone").is_none());
    }
}
