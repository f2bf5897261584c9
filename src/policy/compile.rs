//! Policy resources → [`Snapshot`]: names resolved once, routes indexed,
//! backends' live state (endpoints and their connections, TLS configs)
//! carried over from the previous snapshot wherever it still applies.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use http::{HeaderName, HeaderValue, Method};
use pylon_proto::policy::{
    BackendRef, BackendSpec, BackendTls, Endpoints, FaultInjection, GrpcRouteSpec, HeaderMatch,
    HttpRouteSpec, Resource, Retry, Spec, Timeouts,
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
            Spec::GrpcRoute(spec) => grpc_rules(spec)
                .and_then(|rules| add_route(&mut routes, r, &spec.hostnames, rules, &backends)),
            Spec::HttpRoute(spec) => http_rules(spec)
                .and_then(|rules| add_route(&mut routes, r, &spec.hostnames, rules, &backends)),
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

/// One route rule, whatever its kind, with its matches already turned into
/// matchers (a method string that is no method is reported with its path).
struct RuleInput<'a> {
    backend_refs: &'a [BackendRef],
    timeouts: Option<Timeouts>,
    retry: Option<Retry>,
    fault_injection: Option<FaultInjection>,
    matches: Vec<(Matcher, &'a [HeaderMatch])>,
    /// The matcher of a rule without matches.
    match_all: Matcher,
}

fn grpc_rules(spec: &GrpcRouteSpec) -> Result<Vec<RuleInput<'_>>, String> {
    Ok(spec
        .rules
        .iter()
        .map(|rule| RuleInput {
            backend_refs: &rule.backend_refs,
            timeouts: rule.timeouts,
            retry: rule.retry.clone(),
            fault_injection: rule.fault_injection.clone(),
            matches: rule
                .matches
                .iter()
                .map(|m| {
                    let matcher = Matcher::Grpc {
                        service: m.method.as_ref().and_then(|mm| mm.service.clone()),
                        method: m.method.as_ref().and_then(|mm| mm.method.clone()),
                    };
                    (matcher, m.headers.as_slice())
                })
                .collect(),
            match_all: Matcher::Grpc {
                service: None,
                method: None,
            },
        })
        .collect())
}

fn http_rules(spec: &HttpRouteSpec) -> Result<Vec<RuleInput<'_>>, String> {
    spec.rules
        .iter()
        .enumerate()
        .map(|(i, rule)| {
            let matches = rule
                .matches
                .iter()
                .enumerate()
                .map(|(j, m)| {
                    let method = m
                        .method
                        .as_deref()
                        .map(|s| Method::from_bytes(s.as_bytes()))
                        .transpose()
                        .map_err(|_| {
                            format!("spec.rules[{i}].matches[{j}].method: not a method")
                        })?;
                    let matcher = Matcher::Http {
                        path: m.path.clone(),
                        method,
                    };
                    Ok((matcher, m.headers.as_slice()))
                })
                .collect::<Result<_, String>>()?;
            Ok(RuleInput {
                backend_refs: &rule.backend_refs,
                timeouts: rule.timeouts,
                retry: rule.retry.clone(),
                fault_injection: rule.fault_injection.clone(),
                matches,
                match_all: Matcher::Http {
                    path: None,
                    method: None,
                },
            })
        })
        .collect()
}

fn add_route(
    routes: &mut RouteTable,
    r: &Resource,
    hostnames: &[String],
    rules: Vec<RuleInput<'_>>,
    backends: &BTreeMap<String, Arc<Backend>>,
) -> Result<(), String> {
    let name: Arc<str> = r.display_name().into();
    for (i, rule) in rules.into_iter().enumerate() {
        let weighted = resolve_refs(rule.backend_refs, &r.metadata.namespace, backends)
            .map_err(|e| format!("spec.rules[{i}].backendRefs: {e}"))?;
        let compiled = Arc::new(Rule::new(
            name.clone(),
            i,
            weighted,
            rule.timeouts,
            rule.retry,
            rule.fault_injection,
        ));
        if rule.matches.is_empty() {
            routes.add(hostnames, rule.match_all, vec![], &compiled);
        }
        for (j, (matcher, headers)) in rule.matches.into_iter().enumerate() {
            let headers = compile_headers(headers)
                .map_err(|e| format!("spec.rules[{i}].matches[{j}].headers: {e}"))?;
            routes.add(hostnames, matcher, headers, &compiled);
        }
    }
    Ok(())
}
