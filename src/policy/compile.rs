//! Policy resources → [`Snapshot`]: names resolved once, routes indexed,
//! backends' live state (endpoints and their connections, TLS configs)
//! carried over from the previous snapshot wherever it still applies.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use pylon_proto::policy::{
    BackendRef, BackendSpec, BackendTls, Endpoints, GrpcRouteMatch, HeaderMatch, HttpRouteMatch,
    Resource, RouteSpec, Spec,
};

use super::Snapshot;
use crate::identity::{IdentityStore, tls};
use crate::proxy::backend::Backend;
use crate::proxy::pool::{Endpoint, Transport};
use crate::routing::{Matcher, RouteTable, Rule};

/// Compiles validated resources. `prev` lends its live state.
pub fn compile(
    resources: Vec<Resource>,
    version: String,
    prev: &Snapshot,
    identity: &Arc<IdentityStore>,
) -> Result<Snapshot, Vec<String>> {
    let mut errors = Vec::new();
    let mut tls_configs: HashMap<String, Arc<rustls::ClientConfig>> = prev
        .backends
        .values()
        .filter_map(|b| match (&b.tls, b.transport()) {
            (BackendTls::Mesh { identity }, Transport::Mesh(c)) => {
                Some((identity.clone(), c.clone()))
            }
            _ => None,
        })
        .collect();

    let mut backends = BTreeMap::new();
    for r in &resources {
        if let Spec::Backend(spec) = &r.spec {
            let key = format!("{}/{}", r.metadata.namespace, r.metadata.name);
            match compile_backend(r, spec, prev.backends.get(&key), &mut tls_configs, identity) {
                Ok(b) => {
                    backends.insert(key, Arc::new(b));
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
            Spec::GrpcRoute(spec) => add_route(&mut routes, r, spec, &backends),
            Spec::HttpRoute(spec) => add_route(&mut routes, r, spec, &backends),
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
    Ok(Snapshot {
        version,
        resources,
        routes,
        backends,
    })
}

fn compile_backend(
    r: &Resource,
    spec: &BackendSpec,
    prev: Option<&Arc<Backend>>,
    tls_configs: &mut HashMap<String, Arc<rustls::ClientConfig>>,
    identity: &Arc<IdentityStore>,
) -> Result<Backend, String> {
    let transport = match &spec.tls {
        BackendTls::Disabled => Transport::Plain,
        BackendTls::Mesh { identity: expected } => {
            let config = match tls_configs.get(expected) {
                Some(c) => c.clone(),
                None => {
                    let c = tls::client_config(identity, expected)
                        .map_err(|e| format!("spec.tls: {e}"))?;
                    tls_configs.insert(expected.clone(), c.clone());
                    c
                }
            };
            Transport::Mesh(config)
        }
    };
    let addrs: &[std::net::SocketAddr] = match &spec.endpoints {
        Endpoints::Static(addrs) => addrs,
        Endpoints::Dns { hostname, .. } => {
            tracing::warn!(
                backend = %r.display_name(),
                %hostname,
                "DNS endpoints are not resolved by this version; the backend has no endpoint"
            );
            &[]
        }
    };
    let endpoints = addrs
        .iter()
        .map(|&addr| {
            prev.and_then(|b| {
                b.endpoints()
                    .iter()
                    .find(|e| e.reusable_for(addr, &transport))
                    .cloned()
            })
            .unwrap_or_else(|| Endpoint::new(addr, transport.clone()))
        })
        .collect();
    Ok(Backend::new(
        r.display_name().into(),
        spec.protocol,
        spec.tls.clone(),
        transport,
        endpoints,
    ))
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
) -> Result<(), String> {
    let name: Arc<str> = r.display_name().into();
    for (i, rule) in spec.rules.iter().enumerate() {
        let weighted = resolve_refs(&rule.backend_refs, &r.metadata.namespace, backends)
            .map_err(|e| format!("spec.rules[{i}].backendRefs: {e}"))?;
        let compiled = Arc::new(Rule::new(
            name.clone(),
            i,
            weighted,
            rule.timeouts,
            rule.retry.clone(),
            rule.fault_injection.clone(),
        ));
        if rule.matches.is_empty() {
            routes.add(&spec.hostnames, M::match_all(), vec![], &compiled);
        }
        for (j, m) in rule.matches.iter().enumerate() {
            let at = format!("spec.rules[{i}].matches[{j}]");
            let matcher = m.matcher().map_err(|e| format!("{at}.{e}"))?;
            let headers = compile_headers(m.headers()).map_err(|e| format!("{at}.headers: {e}"))?;
            routes.add(&spec.hostnames, matcher, headers, &compiled);
        }
    }
    Ok(())
}
