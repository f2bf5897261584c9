//! Route matching: a route table compiled from a policy (fuzzed, or a fixed
//! one with every kind of hostname, parent and match), then requests with
//! fuzzed authorities, paths, methods, headers and original destinations.
//!
//! Input: `<policy YAML>\0<request lines>`, or request lines alone for the
//! fixed policy. A request line is `<flags><method> <authority> <path>
//! [<name>:<value> ...]`, flags bit 0 = gRPC, bit 1 = no authority, bits
//! 2–4 = the original destination.
//!
//! Invariants: no panic; matching is deterministic and case-insensitive in
//! the authority; a query string never changes an HTTP match; a matched
//! rule is one the config dump lists, and has a backend unless every
//! weight is 0.
#![no_main]

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock};

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use libfuzzer_sys::fuzz_target;
use pylon::identity::IdentityStore;
use pylon::identity::dev::DevCa;
use pylon::policy::Snapshot;
use pylon::policy::compile::{CompileContext, compile};
use pylon::policy::routing::{ClusterDns, RequestView, Rule};
use pylon::telemetry::metrics::Metrics;

const FIXED: &str = r#"
apiVersion: pylon.dev/v1
kind: Backend
metadata: { name: web, namespace: shop }
spec: { endpoints: { static: ["10.0.0.7:8080", "[fd00::7]:8080"] } }
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: { name: canary, namespace: shop }
spec:
  endpoints: { dns: { hostname: canary.example.com, port: 8080 } }
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: { name: greeter, namespace: shop }
spec:
  protocol: grpc
  endpoints: { service: { name: greeter, port: 50051 } }
  tls: { mode: mesh, identity: "spiffe://pylon.local/ns/shop/sa/greeter" }
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: { name: other, namespace: default }
spec: { endpoints: { static: ["10.0.0.9:80"] } }
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: { name: web, namespace: shop }
spec:
  hostnames: ["web.example.com", "*.web.example.com:8443", "10.0.0.7", "[fd00::7]:8080", "*.example.com"]
  rules:
    - matches:
        - path: { type: Exact, value: /healthz }
          method: GET
      backendRefs: [{ name: web }]
    - matches: [{ path: { value: /api/ }, headers: [{ name: x-canary, value: "true" }] }]
      backendRefs: [{ name: canary, weight: 10 }, { name: web, weight: 90 }]
    - matches: [{ path: { value: /api } }, { method: POST }]
      backendRefs: [{ name: web }]
    - backendRefs: [{ name: other, namespace: default, weight: 0 }]
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: { name: shop-svc, namespace: shop }
spec:
  parentRefs: [{ kind: Service, name: shop, port: 80 }, { kind: Service, name: cart, namespace: default }]
  rules:
    - matches: [{ path: { type: Exact, value: / } }]
      backendRefs: [{ name: web }]
    - backendRefs: [{ name: canary }]
---
apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: { name: greeter, namespace: shop }
spec:
  parentRefs: [{ group: "", kind: Service, name: greeter, port: 50051 }]
  hostnames: ["greeter.example.com"]
  rules:
    - matches: [{ method: { service: helloworld.Greeter, method: SayHello } }]
      backendRefs: [{ name: greeter }]
    - matches: [{ method: { service: helloworld.Greeter }, headers: [{ name: x-user, value: admin }] }]
      backendRefs: [{ name: greeter }, { name: web }]
    - backendRefs: [{ name: greeter }]
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: { name: catch-all, namespace: default }
spec:
  rules:
    - matches: [{ path: { value: / } }]
      backendRefs: [{ name: other }]
"#;

/// Original destinations a redirected connection may have dialled.
const DESTINATIONS: [&str; 7] = [
    "10.0.0.7:8080",
    "10.0.0.7:80",
    "[fd00::7]:8080",
    "[fd00::7]:80",
    "10.0.0.9:80",
    "127.0.0.1:15001",
    "0.0.0.0:0",
];

struct Env {
    identity: Arc<IdentityStore>,
    cluster: ClusterDns,
    fixed: Snapshot,
}

static ENV: LazyLock<Env> = LazyLock::new(|| {
    let ca = DevCa::new("fuzz CA").expect("a dev CA");
    let identity = ca
        .identity_store("spiffe://pylon.local/ns/shop/sa/web", &[&ca])
        .expect("an identity");
    let cluster = ClusterDns {
        namespace: Some("shop".into()),
        domain: "cluster.local".into(),
    };
    let fixed = build(&identity, &cluster, FIXED).expect("the fixed policy compiles");
    Env {
        identity,
        cluster,
        fixed,
    }
});

fn build(identity: &Arc<IdentityStore>, cluster: &ClusterDns, yaml: &str) -> Option<Snapshot> {
    // As `PolicyStore::apply`: parse with the set checks, then compile.
    let resources = pylon_proto::policy::parse(yaml).ok()?;
    let metrics = Metrics::new();
    let ctx = CompileContext {
        identity,
        metrics: &metrics,
        service_account: Some(("shop".into(), "web".into())),
        cluster,
    };
    let (snapshot, _) = compile(resources, "fuzz".into(), &Snapshot::default(), &ctx).ok()?;
    Some(snapshot)
}

fn same(a: Option<&Arc<Rule>>, b: Option<&Arc<Rule>>) -> bool {
    match (a, b) {
        (Some(a), Some(b)) => Arc::ptr_eq(a, b),
        (None, None) => true,
        _ => false,
    }
}

fuzz_target!(|data: &[u8]| {
    let env = &*ENV;
    let text = String::from_utf8_lossy(data);
    let owned;
    let (snapshot, requests) = match text.split_once('\0') {
        Some((yaml, requests)) => {
            let Some(s) = build(&env.identity, &env.cluster, yaml) else {
                return;
            };
            owned = s;
            (&owned, requests)
        }
        None => (&env.fixed, &*text),
    };
    let table = &snapshot.routes;
    let listed: HashSet<*const Rule> = table
        .describe()
        .into_iter()
        .map(|(_, r)| Arc::as_ptr(r))
        .collect();
    for line in requests.lines().take(64) {
        let Some((&flags, rest)) = line.as_bytes().split_first() else {
            continue;
        };
        let rest = std::str::from_utf8(rest).unwrap_or("");
        let mut words = rest.split(' ');
        let method =
            Method::from_bytes(words.next().unwrap_or("").as_bytes()).unwrap_or(Method::GET);
        let authority = words.next().unwrap_or("");
        let path = words.next().unwrap_or("/");
        let mut headers = HeaderMap::new();
        for h in words {
            if let Some((n, v)) = h.split_once(':')
                && let (Ok(n), Ok(v)) = (
                    HeaderName::from_bytes(n.as_bytes()),
                    HeaderValue::from_str(v),
                )
            {
                headers.append(n, v);
            }
        }
        let grpc = flags & 1 == 1;
        let authority = (flags & 2 == 0).then_some(authority);
        let dst: Option<SocketAddr> = DESTINATIONS
            .get(usize::from(flags >> 2 & 7))
            .and_then(|d| d.parse().ok());
        let req = RequestView {
            method: &method,
            path,
            headers: &headers,
            grpc,
        };
        let found = table.find(authority, dst, &req);
        assert!(
            same(found, table.find(authority, dst, &req)),
            "not deterministic"
        );
        if let Some(a) = authority {
            let upper = a.to_ascii_uppercase();
            let lower = a.to_ascii_lowercase();
            let f_upper = table.find(Some(&upper), dst, &req);
            let f_lower = table.find(Some(&lower), dst, &req);
            assert!(
                same(found, f_upper) && same(found, f_lower),
                "case matters for {a:?}"
            );
        }
        if !grpc && !path.contains('?') {
            let with_query = format!("{path}?q=1");
            let q = RequestView {
                path: &with_query,
                ..req
            };
            assert!(
                same(found, table.find(authority, dst, &q)),
                "the query changes {path:?}"
            );
        }
        if let Some(rule) = found {
            assert!(
                listed.contains(&Arc::as_ptr(rule)),
                "{} not in the dump",
                rule.route
            );
            let weights: u64 = rule.weighted_backends().map(|(w, _)| u64::from(w)).sum();
            assert_eq!(rule.pick_backend().is_some(), weights > 0, "{}", rule.route);
        }
    }
});
