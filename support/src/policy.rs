//! Policy documents for tests, built as the model's [`Resource`]s and
//! written by its writer ([`pylon_proto::policy::to_yaml`]), so a test
//! states what it routes, not how YAML spells it. Tests that are about YAML
//! text (parsing, validation errors) keep theirs.

use std::net::SocketAddr;

use pylon_proto::policy::{
    BackendRef, BackendSpec, BackendTls, Endpoints, Kind, Metadata, Resource, RouteRule, RouteSpec,
    Spec, to_yaml,
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
            rules: vec![RouteRule {
                matches: Vec::new(),
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
            }],
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
