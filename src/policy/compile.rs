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
    ClusterDns, Matcher, RouteHosts, RouteMetrics, RouteTable, Rule, RulePolicy,
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

    let mut routes = RouteTable::default();
    let mut ordered: Vec<&Resource> = resources
        .iter()
        .filter(|r| matches!(r.spec, Spec::GrpcRoute(_) | Spec::HttpRoute(_)))
        .collect();
    ordered.sort_by(|a, b| {
        (&a.metadata.namespace, &a.metadata.name).cmp(&(&b.metadata.namespace, &b.metadata.name))
    });
    for r in ordered {
        let result = match &r.spec {
            Spec::GrpcRoute(spec) => add_route(&mut routes, r, spec, &backends, ctx),
            Spec::HttpRoute(spec) => add_route(&mut routes, r, spec, &backends, ctx),
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

fn resolve_refs(
    refs: &[BackendRef],
    namespace: &str,
    backends: &BTreeMap<String, Arc<Backend>>,
) -> Result<Vec<(u32, Arc<Backend>)>, String> {
    refs.iter()
        .map(|br| {
            let ns = br.namespace.as_deref().unwrap_or(namespace);
            backends
                .get(&format!("{ns}/{}", br.name))
                .map(|b| (br.weight, b.clone()))
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

fn add_route<M: RouteMatch>(
    routes: &mut RouteTable,
    r: &Resource,
    spec: &RouteSpec<M>,
    backends: &BTreeMap<String, Arc<Backend>>,
    ctx: &CompileContext<'_>,
) -> Result<(), String> {
    let name: Arc<str> = r.display_name().into();
    let route_ns = r.metadata.namespace.as_str();
    let parents = spec.parent_refs.iter().map(|p| {
        let ns = p.namespace.as_deref().unwrap_or(route_ns);
        (p.name.as_str(), ns, p.port)
    });
    let hosts = RouteHosts::new(&spec.hostnames, parents, ctx.cluster);
    let mut handles = RouteMetrics::new(name, ctx.metrics);
    for (i, rule) in spec.rules.iter().enumerate() {
        let weighted = resolve_refs(&rule.backend_refs, &r.metadata.namespace, backends)
            .map_err(|e| format!("spec.rules[{i}].backendRefs: {e}"))?;
        let policy = RulePolicy {
            timeouts: rule.timeouts,
            retry: rule.retry.clone(),
            fault_injection: rule.fault_injection.clone(),
        };
        let compiled = Arc::new(Rule::of_route(i, weighted, policy, &mut handles));
        if rule.matches.is_empty() {
            routes.add(&hosts, M::match_all(), vec![], &compiled);
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("spec.rules[{i}].matches[{j}]");
            let matcher = m.matcher().map_err(|e| format!("{at}.{e}"))?;
            let headers = compile_headers(m.headers()).map_err(|e| format!("{at}.headers: {e}"))?;
            routes.add(&hosts, matcher, headers, &compiled);
        }
    }
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
}
