//! End-to-end tests of the public API: parsing, every validation rule
//! (accepted and rejected), error wording, set checks and the YAML round trip.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use super::*;

const DESIGN: &str = r#"apiVersion: pylon.dev/v1
kind: Backend
metadata: { name: greeter, namespace: default }
spec:
  protocol: grpc
  endpoints:
    static: ["10.0.0.7:15006", "10.0.0.8:15006"]
  tls: { mode: mesh, identity: "spiffe://pylon.local/ns/default/sa/greeter" }
---
apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: { name: greeter }
spec:
  hostnames: ["greeter", "greeter.default.svc.cluster.local"]
  rules:
    - matches: [{ method: { service: helloworld.Greeter, method: SayHello } }]
      backendRefs: [{ name: greeter, weight: 90 }, { name: greeter-v2, weight: 10 }]
      timeouts: { request: 2s, backendRequest: 500ms }
      retry: { attempts: 3, codes: [UNAVAILABLE], backoff: { base: 25ms, max: 250ms } }
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: { name: greeter }
spec:
  targetRefs: [{ kind: Backend, name: greeter }]
  loadBalancer: { type: LeastRequest }
  circuitBreaker: { maxConnections: 64, maxParallelRequests: 256, maxPendingRequests: 64 }
  outlierDetection: { consecutive5xxErrors: 5, consecutiveGatewayErrors: 3, interval: 5s,
                      baseEjectionTime: 15s, maxEjectionTime: 300s, maxEjectionPercent: 50 }
  retryBudget: { percent: 20, minRetriesPerSecond: 10 }
  rateLimit: { requestsPerSecond: 1000, burst: 200 }
---
apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: greeter }
spec:
  targetRef: { kind: ServiceAccount, name: greeter }
  rules: [{ from: { principals: ["spiffe://pylon.local/ns/default/sa/client"] },
            to:   { methods: ["/helloworld.Greeter/*"] } }]
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: { name: greeter-v2 }
spec:
  endpoints: { static: ["10.0.0.9:15006"] }
"#;

/// A Backend named `b` that routes in tests can point at.
const BACKEND_B: &str = "apiVersion: pylon.dev/v1\nkind: Backend\nmetadata: {name: b}\nspec: {endpoints: {static: [\"10.0.0.1:80\"]}}\n";

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

/// A one-line-spec document: everything in `spec` is on line 4.
fn doc(kind: &str, spec: &str) -> String {
    format!("apiVersion: pylon.dev/v1\nkind: {kind}\nmetadata: {{name: x}}\nspec: {spec}\n")
}

fn errors(yaml: &str) -> Vec<String> {
    match parse(yaml) {
        Ok(r) => panic!("expected errors, parsed {r:#?}"),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

fn ok(kind: &str, spec: &str) -> Spec {
    let yaml = doc(kind, spec);
    match parse_documents(&yaml) {
        Ok(mut r) if r.len() == 1 => r.remove(0).spec,
        other => panic!("{spec}: {other:?}"),
    }
}

/// Asserts the document has exactly one problem, at `path`, whose message
/// contains `message`.
fn rejects(kind: &str, spec: &str, path: &str, message: &str) {
    let yaml = doc(kind, spec);
    let errs = match parse_documents(&yaml) {
        Ok(r) => panic!("{spec}: accepted as {r:?}"),
        Err(e) => e.0,
    };
    assert_eq!(errs.len(), 1, "{spec}: {errs:#?}");
    assert_eq!(errs[0].path, path, "{spec}: {}", errs[0]);
    assert!(errs[0].message.contains(message), "{spec}: {}", errs[0]);
    assert_eq!(errs[0].line, Some(4), "{spec}: {}", errs[0]);
}

fn route_rule(extra: &str) -> String {
    format!("{{rules: [{{backendRefs: [{{name: b}}]{extra}}}]}}")
}

// ---------------------------------------------------------------- whole inputs

#[test]
fn design_example_parses_to_what_it_says() {
    let got = parse(DESIGN).expect("design example");
    let mut meta = Metadata::new("greeter");
    let addrs: Vec<SocketAddr> = vec![
        "10.0.0.7:15006".parse().unwrap(),
        "10.0.0.8:15006".parse().unwrap(),
    ];
    let want = vec![
        Resource {
            metadata: meta.clone(),
            spec: Spec::Backend(BackendSpec {
                protocol: Some(Protocol::Grpc),
                endpoints: Endpoints::Static(addrs),
                tls: BackendTls::Mesh {
                    identity: "spiffe://pylon.local/ns/default/sa/greeter".into(),
                },
            }),
        },
        Resource {
            metadata: meta.clone(),
            spec: Spec::GrpcRoute(GrpcRouteSpec {
                parent_refs: vec![],
                hostnames: vec!["greeter".into(), "greeter.default.svc.cluster.local".into()],
                rules: vec![GrpcRouteRule {
                    matches: vec![GrpcRouteMatch {
                        method: Some(GrpcMethodMatch {
                            service: Some("helloworld.Greeter".into()),
                            method: Some("SayHello".into()),
                        }),
                        headers: vec![],
                    }],
                    backend_refs: vec![
                        BackendRef {
                            name: "greeter".into(),
                            namespace: None,
                            weight: 90,
                        },
                        BackendRef {
                            name: "greeter-v2".into(),
                            namespace: None,
                            weight: 10,
                        },
                    ],
                    timeouts: Some(Timeouts {
                        request: Some(ms(2000)),
                        backend_request: Some(ms(500)),
                    }),
                    retry: Some(Retry {
                        attempts: 3,
                        codes: vec![RetryOn::Grpc(GrpcCode::Unavailable)],
                        backoff: Some(Backoff {
                            base: ms(25),
                            max: ms(250),
                        }),
                    }),
                    fault_injection: None,
                }],
            }),
        },
        Resource {
            metadata: meta.clone(),
            spec: Spec::BackendTrafficPolicy(BackendTrafficPolicySpec {
                target_refs: vec![TargetRef {
                    kind: TargetKind::Backend,
                    name: "greeter".into(),
                }],
                load_balancer: Some(LoadBalancerType::LeastRequest),
                circuit_breaker: Some(CircuitBreaker {
                    max_connections: Some(64),
                    max_parallel_requests: Some(256),
                    max_pending_requests: Some(64),
                }),
                outlier_detection: Some(OutlierDetection {
                    consecutive_5xx_errors: Some(5),
                    consecutive_gateway_errors: Some(3),
                    interval: ms(5000),
                    base_ejection_time: ms(15_000),
                    max_ejection_time: ms(300_000),
                    max_ejection_percent: 50,
                }),
                retry_budget: Some(RetryBudget {
                    percent: 20.0,
                    min_retries_per_second: 10,
                }),
                rate_limit: Some(RateLimit {
                    requests_per_second: 1000,
                    burst: 200,
                }),
            }),
        },
        Resource {
            metadata: meta.clone(),
            spec: Spec::AuthorizationPolicy(AuthorizationPolicySpec {
                target_refs: vec![TargetRef {
                    kind: TargetKind::ServiceAccount,
                    name: "greeter".into(),
                }],
                rules: vec![AuthorizationRule {
                    from: Some(AuthorizationFrom {
                        principals: vec!["spiffe://pylon.local/ns/default/sa/client".into()],
                        namespaces: vec![],
                    }),
                    to: Some(AuthorizationTo {
                        methods: vec!["/helloworld.Greeter/*".into()],
                        paths: vec![],
                    }),
                }],
            }),
        },
        {
            meta.name = "greeter-v2".into();
            Resource {
                metadata: meta,
                spec: Spec::Backend(BackendSpec {
                    protocol: None,
                    endpoints: Endpoints::Static(vec!["10.0.0.9:15006".parse().unwrap()]),
                    tls: BackendTls::Disabled,
                }),
            }
        },
    ];
    assert_eq!(got, want);
}

#[test]
fn empty_inputs_are_empty_policies() {
    for yaml in [
        "",
        "\n",
        "# just a comment\n# and another\n",
        "---\n",
        "---\n# c\n---\n",
    ] {
        assert_eq!(parse(yaml), Ok(vec![]), "{yaml:?}");
    }
}

#[test]
fn empty_documents_are_skipped_but_counted() {
    let yaml = format!("{BACKEND_B}---\n# nothing\n---\napiVersion: pylon.dev/v1\nkind: Foo\n");
    let errs = errors(&yaml);
    assert_eq!(
        errs,
        [
            "document 3: metadata: required (line 8)",
            "document 3: spec: required (line 8)",
            "document 3: kind: unknown kind \"Foo\" (expected one of: Backend, GRPCRoute, HTTPRoute, BackendTrafficPolicy, AuthorizationPolicy) (line 9)",
        ]
    );
}

#[test]
fn documented_error_strings() {
    let route = "apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata:
  name: greeter
spec:
  rules:
    - backendRefs:
        - name: b
        - name: x
      retry:
        attempts: 0
        codes: [UNAVAILABLE]
";
    assert_eq!(
        errors(&format!("{BACKEND_B}---\n{route}")),
        [
            "GRPCRoute/greeter: spec.rules[0].backendRefs[1].name: no Backend \"x\" (line 14)",
            "GRPCRoute/greeter: spec.rules[0].retry.attempts: must be ≥ 1 (line 16)",
        ]
    );
    let fixed = route.replace("attempts: 0", "attempts: 1");
    assert_eq!(
        errors(&format!("{BACKEND_B}---\n{fixed}")),
        ["GRPCRoute/greeter: spec.rules[0].backendRefs[1].name: no Backend \"x\" (line 14)"]
    );

    let backend = "apiVersion: pylon.dev/v1
kind: Backend
metadata:
  name: greeter
spec:
  endpoints: {static: [\"10.0.0.1:80\"]}
  tls: {mode: mesh}
";
    assert_eq!(
        errors(backend),
        ["Backend/greeter: spec.tls.identity: required when mode is mesh (line 7)"]
    );

    let unknown = format!(
        "{BACKEND_B}---\napiVersion: pylon.dev/v1\n# comment\n\n\n\n\nkind: Foo\nmetadata: {{name: foo}}\nspec: {{}}\n"
    );
    assert_eq!(
        errors(&unknown),
        [
            "document 2: kind: unknown kind \"Foo\" (expected one of: Backend, GRPCRoute, HTTPRoute, BackendTrafficPolicy, AuthorizationPolicy) (line 12)"
        ]
    );

    let typo = doc("GRPCRoute", &route_rule(", retyr: {attempts: 2}"));
    assert_eq!(
        errors(&format!("{BACKEND_B}---\n{typo}")),
        [
            "GRPCRoute/x: spec.rules[0].retyr: unknown field \"retyr\" (expected one of: matches, backendRefs, timeouts, retry, faultInjection) (line 9)"
        ]
    );
}

#[test]
fn namespaced_resources_are_named_with_their_namespace() {
    let yaml = "apiVersion: pylon.dev/v1\nkind: Backend\nmetadata: {name: b, namespace: team-a}\nspec: {endpoints: {static: [nope]}}\n";
    let errs = errors(yaml);
    assert_eq!(errs.len(), 1);
    assert!(
        errs[0]
            .starts_with("Backend/team-a/b: spec.endpoints.static[0]: invalid endpoint \"nope\""),
        "{}",
        errs[0]
    );
    assert_eq!(parse(BACKEND_B).unwrap()[0].display_name(), "Backend/b");
}

#[test]
fn every_problem_in_a_document_is_reported() {
    let yaml = "apiVersion: pylon.dev/v2
kind: GRPCRoute
metadata: {name: r, labels: {app: 1}}
status: {}
spec:
  hostnames: [\"bad_host\"]
  rules:
    - matches: [{method: {type: RegularExpression, service: a}}]
      backendRefs: [{name: b, weight: -1}, {weight: 2}]
      timeouts: {request: 1.5s}
      retry: {attempts: 11, codes: [NOPE, 200]}
      faultInjection: {}
";
    let errs = errors(yaml);
    let want = [
        "GRPCRoute/r: apiVersion: unsupported apiVersion \"pylon.dev/v2\" (expected pylon.dev/v1) (line 1)",
        "GRPCRoute/r: metadata.labels.app: expected a string, found an integer (line 3)",
        "GRPCRoute/r: status: unknown field \"status\" (expected one of: apiVersion, kind, metadata, spec) (line 4)",
        "GRPCRoute/r: spec.hostnames[0]: invalid hostname \"bad_host\": label \"bad_host\" must be 1 to 63 letters, digits or inner hyphens (line 6)",
        "GRPCRoute/r: spec.rules[0].matches[0].method.type: only Exact is supported (line 8)",
        "GRPCRoute/r: spec.rules[0].backendRefs[0].weight: must not be negative (line 9)",
        "GRPCRoute/r: spec.rules[0].backendRefs[1].name: required (line 9)",
        "GRPCRoute/r: spec.rules[0].backendRefs[0].name: no Backend \"b\" (line 9)",
        "GRPCRoute/r: spec.rules[0].timeouts.request: invalid duration \"1.5s\": fractional values are not allowed; use a smaller unit (1500ms, not 1.5s) (line 10)",
        "GRPCRoute/r: spec.rules[0].retry.attempts: must be ≤ 10 (line 11)",
        "GRPCRoute/r: spec.rules[0].retry.codes[0]: unknown gRPC status \"NOPE\" (expected a name such as UNAVAILABLE) (line 11)",
        "GRPCRoute/r: spec.rules[0].retry.codes[1]: must be ≥ 400 (line 11)",
        "GRPCRoute/r: spec.rules[0].faultInjection: at least one of delay and abort is required (line 12)",
    ];
    assert_eq!(errs, want);
}

#[test]
fn errors_are_sorted_by_document_then_line() {
    let yaml = format!(
        "{}---\n{}---\n{}",
        doc("Backend", "{endpoints: {dns: {hostname: a, port: 0}}}"),
        "- not a mapping\n",
        "apiVersion: pylon.dev/v1\nkind: Backend\nspec: {}\nmetadata: {}\n"
    );
    let errs = parse(&yaml).unwrap_err();
    let text = errs.to_string();
    assert_eq!(
        text,
        "Backend/x: spec.endpoints.dns.port: must be ≥ 1 (line 4)
document 2: expected a mapping, found a list (line 6)
document 3: spec.endpoints: required (line 10)
document 3: metadata.name: required (line 11)"
    );
    assert_eq!(errs.len(), 4);
    assert!(std::error::Error::source(&errs).is_none());
}

#[test]
fn yaml_problems_are_reported_by_document() {
    let dup = format!("{BACKEND_B}---\napiVersion: pylon.dev/v1\nkind: Backend\nkind: Backend\n");
    let errs = parse(&dup).unwrap_err();
    assert_eq!(errs.len(), 1);
    assert_eq!(errs.0[0].resource, "document 2");
    assert_eq!(errs.0[0].line, Some(8));
    assert!(
        errs.0[0].message.contains("duplicate mapping key"),
        "{}",
        errs.0[0]
    );

    let syntax = format!("{BACKEND_B}---\nkind: [Backend\n");
    let errs = parse(&syntax).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs}");
    assert_eq!(errs.0[0].resource, "document 2");
    assert_eq!(errs.0[0].path, "");
    assert!(errs.0[0].line.is_some());

    // Tabs for indentation, a YAML error rather than a policy one.
    assert_eq!(parse("kind:\n\t- x\n").unwrap_err().len(), 1);
}

/// Found by the `policy_yaml` fuzz target: YAML (and serde-saphyr's line
/// numbers) breaks lines at a lone CR too, but documents were counted by
/// `str::lines`, so a CR-only file numbered every document 1.
#[test]
fn documents_are_counted_with_every_yaml_line_break() {
    for eol in ["\n", "\r\n", "\r"] {
        let yaml = format!("{BACKEND_B}---\nkind: Nope\n").replace('\n', eol);
        let errs = parse(&yaml).unwrap_err();
        assert!(
            errs.iter()
                .all(|e| e.resource == "document 2" && e.line == Some(6)),
            "{eol:?}: {errs}"
        );
    }
}

#[test]
fn alias_bombs_fail_quickly() {
    let mut yaml = String::from("a0: &a0 [x, x, x, x, x, x, x, x, x, x]\n");
    for i in 1..12 {
        let p = format!("*a{}", i - 1);
        yaml.push_str(&format!("a{i}: &a{i} [{}]\n", [p.as_str(); 10].join(", ")));
    }
    let start = std::time::Instant::now();
    let errs = parse(&yaml).unwrap_err();
    assert_eq!(errs.len(), 1, "{errs}");
    assert!(
        errs.0[0].message.contains("too large or too complex"),
        "{errs}"
    );
    // The budget stops expansion at a few hundred thousand nodes, far from
    // the 10^12 the document describes.
    assert!(
        start.elapsed() < Duration::from_secs(30),
        "{:?}",
        start.elapsed()
    );

    let deep = format!("a: {}{}\n", "[".repeat(1000), "]".repeat(1000));
    assert_eq!(parse(&deep).unwrap_err().len(), 1);
}

// ---------------------------------------------------------------- envelope

#[test]
fn envelope_rules() {
    let base = "apiVersion: pylon.dev/v1\nkind: Backend\nmetadata: {name: b}\nspec: {endpoints: {static: [\"10.0.0.1:80\"]}}\n";
    let cases = [
        (
            "apiVersion: pylon.dev/v1\n",
            "apiVersion: v1\n",
            "Backend/b: apiVersion: unsupported apiVersion \"v1\" (expected pylon.dev/v1) (line 1)",
        ),
        (
            "apiVersion: pylon.dev/v1\n",
            "",
            "Backend/b: apiVersion: required (line 1)",
        ),
        (
            "kind: Backend\n",
            "kind: backend\n",
            "document 1: kind: unknown kind \"backend\" (expected one of: Backend, GRPCRoute, HTTPRoute, BackendTrafficPolicy, AuthorizationPolicy) (line 2)",
        ),
        ("kind: Backend\n", "", "document 1: kind: required (line 1)"),
        (
            "metadata: {name: b}\n",
            "",
            "document 1: metadata: required (line 1)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {}\n",
            "document 1: metadata.name: required (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: B}\n",
            "Backend/B: metadata.name: invalid name \"B\": must consist of lowercase letters, digits, '-' and '.', and start and end with a letter or digit (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: 7}\n",
            "document 1: metadata.name: expected a string, found an integer (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: b, namespace: a.b}\n",
            "Backend/a.b/b: metadata.namespace: invalid namespace \"a.b\": must consist of lowercase letters, digits and '-', and start and end with a letter or digit (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: b, resourceVersion: 42}\n",
            "Backend/b: metadata.resourceVersion: expected a string, found an integer (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: b, uid: x}\n",
            "Backend/b: metadata.uid: unknown field \"uid\" (expected one of: name, namespace, resourceVersion, labels, annotations) (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: b, annotations: [x]}\n",
            "Backend/b: metadata.annotations: expected a mapping of strings to strings, found a list (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: b, labels: {1: x}}\n",
            "Backend/b: metadata.labels: keys must be strings, found an integer (line 3)",
        ),
        (
            "metadata: {name: b}\n",
            "metadata: {name: b, labels: {app.kubernetes.io/name: [x]}}\n",
            "Backend/b: metadata.labels[\"app.kubernetes.io/name\"]: expected a string, found a list (line 3)",
        ),
        (
            "spec: {endpoints: {static: [\"10.0.0.1:80\"]}}\n",
            "",
            "Backend/b: spec: required (line 1)",
        ),
        (
            "spec: {endpoints: {static: [\"10.0.0.1:80\"]}}\n",
            "spec: []\n",
            "Backend/b: spec: expected a mapping, found a list (line 4)",
        ),
        (
            "spec: {endpoints: {static: [\"10.0.0.1:80\"]}}\n",
            "spec: {endpoints: {static: [\"10.0.0.1:80\"]}}\nstatus: {}\n",
            "Backend/b: status: unknown field \"status\" (expected one of: apiVersion, kind, metadata, spec) (line 5)",
        ),
    ];
    for (from, to, want) in cases {
        assert_eq!(errors(&base.replace(from, to)), [want], "{to}");
    }
    let m = parse(&base.replace("metadata: {name: b}", "metadata: {name: b.c-1, namespace: team-a, resourceVersion: \"42\", labels: {app: b, on: \"yes\"}, annotations: {note: \"\"}}"))
        .unwrap()
        .remove(0)
        .metadata;
    assert_eq!(m.name, "b.c-1");
    assert_eq!(m.namespace, "team-a");
    assert_eq!(m.resource_version.as_deref(), Some("42"));
    assert_eq!(
        m.labels,
        BTreeMap::from([("app".into(), "b".into()), ("on".into(), "yes".into())])
    );
    assert_eq!(
        m.annotations,
        BTreeMap::from([("note".into(), String::new())])
    );
    assert_eq!(
        parse(base).unwrap()[0].metadata,
        Metadata::new("b"),
        "namespace defaults to default"
    );
    assert_eq!(
        errors("- a\n"),
        ["document 1: expected a mapping, found a list (line 1)"]
    );
}

// ---------------------------------------------------------------- Backend

#[test]
fn backend_rules() {
    let Spec::Backend(b) = ok(
        "Backend",
        "{protocol: http2, endpoints: {dns: {hostname: greeter.svc.cluster.local., port: 8080}}}",
    ) else {
        panic!()
    };
    assert_eq!(b.protocol, Some(Protocol::Http2));
    assert_eq!(
        b.endpoints,
        Endpoints::Dns {
            hostname: "greeter.svc.cluster.local.".into(),
            port: 8080
        }
    );
    assert_eq!(b.tls, BackendTls::Disabled);
    let Spec::Backend(b) = ok(
        "Backend",
        "{protocol: http1, endpoints: {static: [\"[fd00::7]:80\"]}, tls: {mode: disabled}}",
    ) else {
        panic!()
    };
    assert_eq!(b.protocol, Some(Protocol::Http1));
    assert_eq!(b.tls, BackendTls::Disabled);

    let e = "endpoints: {static: [\"10.0.0.1:80\"]}";
    for (spec, path, message) in [
        (
            format!("{{protocol: GRPC, {e}}}"),
            "spec.protocol",
            "unknown value \"GRPC\" (expected one of: grpc, http1, http2)",
        ),
        ("{}".into(), "spec.endpoints", "required"),
        (
            "{endpoints: {}}".into(),
            "spec.endpoints",
            "one of static, dns and service is required",
        ),
        (
            "{endpoints: {static: [\"10.0.0.1:80\"], dns: {hostname: a, port: 1}}}".into(),
            "spec.endpoints",
            "only one of static, dns and service may be set",
        ),
        (
            "{endpoints: {static: []}}".into(),
            "spec.endpoints.static",
            "must not be empty",
        ),
        (
            "{endpoints: {static: [\"10.0.0.1:80\", \"10.0.0.1\"]}}".into(),
            "spec.endpoints.static[1]",
            "invalid endpoint \"10.0.0.1\" (expected ip:port",
        ),
        (
            "{endpoints: {static: [\"10.0.0.1:0\"]}}".into(),
            "spec.endpoints.static[0]",
            "port must be 1-65535",
        ),
        (
            "{endpoints: {static: [80]}}".into(),
            "spec.endpoints.static[0]",
            "expected a string, found an integer",
        ),
        (
            "{endpoints: {static: \"10.0.0.1:80\"}}".into(),
            "spec.endpoints.static",
            "expected a list, found a string",
        ),
        (
            "{endpoints: {dns: {hostname: a_b, port: 80}}}".into(),
            "spec.endpoints.dns.hostname",
            "invalid hostname \"a_b\"",
        ),
        (
            "{endpoints: {dns: {hostname: a, port: 65536}}}".into(),
            "spec.endpoints.dns.port",
            "must be ≤ 65535",
        ),
        (
            "{endpoints: {dns: {hostname: a}}}".into(),
            "spec.endpoints.dns.port",
            "required",
        ),
        (
            "{endpoints: {dns: {hostname: a, port: \"80\"}}}".into(),
            "spec.endpoints.dns.port",
            "expected an integer, found a string",
        ),
        (
            format!("{{{e}, tls: {{mode: mesh}}}}"),
            "spec.tls.identity",
            "required when mode is mesh",
        ),
        (
            format!("{{{e}, tls: {{mode: disabled, identity: \"spiffe://a/b\"}}}}"),
            "spec.tls.identity",
            "not allowed when mode is disabled",
        ),
        (
            format!("{{{e}, tls: {{mode: mesh, identity: \"spiffe://a\"}}}}"),
            "spec.tls.identity",
            "invalid SPIFFE ID \"spiffe://a\": a path is required",
        ),
        (
            format!("{{{e}, tls: {{mode: mesh, identity: \"spiffe:///x\"}}}}"),
            "spec.tls.identity",
            "the trust domain is empty",
        ),
        (
            format!("{{{e}, tls: {{mode: mesh, identity: \"https://a/b\"}}}}"),
            "spec.tls.identity",
            "must start with spiffe://",
        ),
        (
            format!("{{{e}, tls: {{mode: strict}}}}"),
            "spec.tls.mode",
            "unknown value \"strict\" (expected one of: mesh, disabled)",
        ),
        (
            format!("{{{e}, tls: {{identity: \"spiffe://a/b\"}}}}"),
            "spec.tls.mode",
            "required",
        ),
        (
            format!("{{{e}, tls: true}}"),
            "spec.tls",
            "expected a mapping, found a boolean",
        ),
    ] {
        rejects("Backend", &spec, path, message);
    }
}

#[test]
fn backend_endpoints_can_name_a_kubernetes_service() {
    let Spec::Backend(b) = ok(
        "Backend",
        "{endpoints: {service: {name: greeter-headless, port: 50051}}}",
    ) else {
        panic!()
    };
    assert_eq!(
        b.endpoints,
        Endpoints::Service {
            name: "greeter-headless".into(),
            namespace: None,
            port: 50051
        }
    );
    let Spec::Backend(b) = ok(
        "Backend",
        "{endpoints: {service: {name: db, namespace: data, port: 5432}}}",
    ) else {
        panic!()
    };
    assert_eq!(
        b.endpoints,
        Endpoints::Service {
            name: "db".into(),
            namespace: Some("data".into()),
            port: 5432
        }
    );

    for (spec, path, message) in [
        (
            "{endpoints: {dns: {hostname: a, port: 1}, service: {name: a, port: 1}}}",
            "spec.endpoints",
            "only one of static, dns and service may be set",
        ),
        (
            "{endpoints: {service: {port: 80}}}",
            "spec.endpoints.service.name",
            "required",
        ),
        (
            "{endpoints: {service: {name: a}}}",
            "spec.endpoints.service.port",
            "required",
        ),
        (
            "{endpoints: {service: {name: a.b, port: 80}}}",
            "spec.endpoints.service.name",
            "invalid Service name \"a.b\"",
        ),
        (
            "{endpoints: {service: {name: 1a, port: 80}}}",
            "spec.endpoints.service.name",
            "must start with a lowercase letter",
        ),
        (
            "{endpoints: {service: {name: a, namespace: A, port: 80}}}",
            "spec.endpoints.service.namespace",
            "invalid namespace \"A\"",
        ),
        (
            "{endpoints: {service: {name: a, port: 0}}}",
            "spec.endpoints.service.port",
            "must be ≥ 1",
        ),
        (
            "{endpoints: {service: {name: a, port: 80, kind: Service}}}",
            "spec.endpoints.service.kind",
            "unknown field \"kind\" (expected one of: name, namespace, port)",
        ),
    ] {
        rejects("Backend", spec, path, message);
    }
}

// ---------------------------------------------------------------- routes

fn grpc_rule(spec: &str) -> GrpcRouteRule {
    match ok("GRPCRoute", spec) {
        Spec::GrpcRoute(mut r) => r.rules.remove(0),
        other => panic!("{other:?}"),
    }
}

fn http_rule(spec: &str) -> HttpRouteRule {
    match ok("HTTPRoute", spec) {
        Spec::HttpRoute(mut r) => r.rules.remove(0),
        other => panic!("{other:?}"),
    }
}

#[test]
fn route_hostnames_and_backend_refs() {
    let Spec::GrpcRoute(r) = ok(
        "GRPCRoute",
        &format!(
            "{{hostnames: [Greeter, \"*.Example.com:8443\", \"10.0.0.1\", \"[::1]:80\"], {}",
            &route_rule("")[1..]
        ),
    ) else {
        panic!()
    };
    assert_eq!(
        r.hostnames,
        ["greeter", "*.example.com:8443", "10.0.0.1", "[::1]:80"]
    );
    let Spec::GrpcRoute(r) = ok("GRPCRoute", &route_rule("")) else {
        panic!()
    };
    assert!(r.hostnames.is_empty());
    assert!(r.rules[0].matches.is_empty());
    assert_eq!(
        r.rules[0].backend_refs,
        [BackendRef {
            name: "b".into(),
            namespace: None,
            weight: 1
        }]
    );

    let rule = grpc_rule(
        "{rules: [{backendRefs: [{name: b, weight: 0}, {name: c, namespace: other, weight: 1000000}]}]}",
    );
    assert_eq!(
        rule.backend_refs[0].weight, 0,
        "all-zero or zero weights are allowed"
    );
    assert_eq!(rule.backend_refs[1].namespace.as_deref(), Some("other"));
    let Spec::HttpRoute(r) = ok(
        "HTTPRoute",
        "{rules: [{backendRefs: [{name: b, weight: 0}]}]}",
    ) else {
        panic!()
    };
    assert_eq!(r.rules[0].backend_refs[0].weight, 0);

    for kind in ["GRPCRoute", "HTTPRoute"] {
        for (spec, path, message) in [
            (
                format!("{{hostnames: [\"a..b\"], {}", &route_rule("")[1..]),
                "spec.hostnames[0]",
                "invalid hostname \"a..b\"",
            ),
            (
                format!("{{hostnames: [\"a.*.b\"], {}", &route_rule("")[1..]),
                "spec.hostnames[0]",
                "wildcard",
            ),
            (
                format!("{{hostnames: [\"a:0\"], {}", &route_rule("")[1..]),
                "spec.hostnames[0]",
                "port must be 1-65535",
            ),
            (
                format!("{{hostnames: a, {}", &route_rule("")[1..]),
                "spec.hostnames",
                "expected a list, found a string",
            ),
            ("{}".to_string(), "spec.rules", "required"),
            ("{rules: []}".to_string(), "spec.rules", "must not be empty"),
            (
                "{rules: [{}]}".to_string(),
                "spec.rules[0].backendRefs",
                "required",
            ),
            (
                "{rules: [{backendRefs: []}]}".to_string(),
                "spec.rules[0].backendRefs",
                "must not be empty",
            ),
            (
                "{rules: [{backendRefs: [{name: b, weight: 1000001}]}]}".to_string(),
                "spec.rules[0].backendRefs[0].weight",
                "must be ≤ 1000000",
            ),
            (
                "{rules: [{backendRefs: [{name: b, weight: 1.5}]}]}".to_string(),
                "spec.rules[0].backendRefs[0].weight",
                "expected an integer, found a float",
            ),
            (
                "{rules: [{backendRefs: [{name: b, namespace: A}]}]}".to_string(),
                "spec.rules[0].backendRefs[0].namespace",
                "invalid namespace \"A\"",
            ),
            (
                "{rules: [{backendRefs: [{name: b, kind: Service}]}]}".to_string(),
                "spec.rules[0].backendRefs[0].kind",
                "unknown field \"kind\" (expected one of: name, namespace, weight)",
            ),
            (
                "{rules: [{backendRefs: [b]}]}".to_string(),
                "spec.rules[0].backendRefs[0]",
                "expected a mapping, found a string",
            ),
        ] {
            rejects(kind, &spec, path, message);
        }
    }
}

fn parents(kind: &str, refs: &str) -> Vec<ParentRef> {
    let spec = format!("{{parentRefs: {refs}, {}", &route_rule("")[1..]);
    match ok(kind, &spec) {
        Spec::GrpcRoute(r) => r.parent_refs,
        Spec::HttpRoute(r) => r.parent_refs,
        other => panic!("{other:?}"),
    }
}

#[test]
fn route_parent_refs_name_kubernetes_services() {
    for kind in ["GRPCRoute", "HTTPRoute"] {
        assert_eq!(
            parents(
                kind,
                "[{group: \"\", kind: Service, name: greeter, namespace: shop, port: 50051}, \
                 {kind: Service, name: web}]"
            ),
            [
                ParentRef {
                    name: "greeter".into(),
                    namespace: Some("shop".into()),
                    port: Some(50051),
                },
                ParentRef {
                    name: "web".into(),
                    namespace: None,
                    port: None,
                },
            ]
        );
        assert!(parents(kind, "[]").is_empty());
        // A route may have both, and the hostnames are kept as they were.
        let spec = format!(
            "{{parentRefs: [{{kind: Service, name: greeter}}], hostnames: [greeter.example], {}",
            &route_rule("")[1..]
        );
        let (parent_refs, hostnames) = match ok(kind, &spec) {
            Spec::GrpcRoute(r) => (r.parent_refs, r.hostnames),
            Spec::HttpRoute(r) => (r.parent_refs, r.hostnames),
            other => panic!("{other:?}"),
        };
        assert_eq!(parent_refs.len(), 1);
        assert_eq!(hostnames, ["greeter.example"]);

        let with = |refs: &str| format!("{{parentRefs: {refs}, {}", &route_rule("")[1..]);
        for (refs, path, message) in [
            (
                "[{name: greeter}]",
                "spec.parentRefs[0].kind",
                "required: only Service is supported (Gateway API mesh, GAMMA)",
            ),
            (
                "[{kind: Gateway, name: greeter}]",
                "spec.parentRefs[0].kind",
                "only Service is supported (Gateway API mesh, GAMMA), not \"Gateway\"",
            ),
            (
                "[{group: gateway.networking.k8s.io, kind: Service, name: greeter}]",
                "spec.parentRefs[0].group",
                "unsupported group \"gateway.networking.k8s.io\"",
            ),
            ("[{kind: Service}]", "spec.parentRefs[0].name", "required"),
            (
                "[{kind: Service, name: greeter.shop}]",
                "spec.parentRefs[0].name",
                "invalid Service name \"greeter.shop\"",
            ),
            (
                "[{kind: Service, name: greeter, namespace: Shop}]",
                "spec.parentRefs[0].namespace",
                "invalid namespace \"Shop\"",
            ),
            (
                "[{kind: Service, name: greeter, port: 0}]",
                "spec.parentRefs[0].port",
                "must be ≥ 1",
            ),
            (
                "[{kind: Service, name: greeter, port: 65536}]",
                "spec.parentRefs[0].port",
                "must be ≤ 65535",
            ),
            (
                "[{kind: Service, name: greeter, port: \"80\"}]",
                "spec.parentRefs[0].port",
                "expected an integer, found a string",
            ),
            (
                "[{kind: Service, name: greeter, sectionName: grpc}]",
                "spec.parentRefs[0].sectionName",
                "unknown field \"sectionName\" (expected one of: group, kind, name, namespace, port)",
            ),
            (
                "[{kind: Service, name: a, port: 80}, {kind: Service, name: a, port: 80}]",
                "spec.parentRefs[1]",
                "duplicate parentRef",
            ),
            (
                "{kind: Service, name: a}",
                "spec.parentRefs",
                "expected a list, found a mapping",
            ),
        ] {
            rejects(kind, &with(refs), path, message);
        }
    }
}

#[test]
fn every_parent_ref_problem_is_reported_with_its_path() {
    let yaml = "apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: shop}
spec:
  parentRefs:
    - {kind: Gateway, name: mesh}
    - {group: apps, kind: Service, name: Greeter, port: 0}
    - {name: web}
  rules: [{backendRefs: [{name: b}]}]
---
"
    .to_string()
        + BACKEND_B
            .replace("name: b}", "name: b, namespace: shop}")
            .as_str();
    assert_eq!(
        errors(&yaml),
        [
            "GRPCRoute/shop/greeter: spec.parentRefs[0].kind: only Service is supported (Gateway API mesh, GAMMA), not \"Gateway\" (line 6)",
            "GRPCRoute/shop/greeter: spec.parentRefs[1].group: unsupported group \"apps\" (a Service is in the core group: write \"\" or leave group out) (line 7)",
            "GRPCRoute/shop/greeter: spec.parentRefs[1].name: invalid Service name \"Greeter\": must consist of lowercase letters, digits and '-', and start and end with a letter or digit (line 7)",
            "GRPCRoute/shop/greeter: spec.parentRefs[1].port: must be ≥ 1 (line 7)",
            "GRPCRoute/shop/greeter: spec.parentRefs[2].kind: required: only Service is supported (Gateway API mesh, GAMMA) (line 8)",
        ]
    );
}

#[test]
fn parent_refs_round_trip_with_the_core_group_written_out() {
    let yaml = "apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: {name: web, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: web, port: 8080}, {kind: Service, name: web, namespace: other}]
  hostnames: [web.example]
  rules: [{backendRefs: [{name: b}]}]
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: {name: b, namespace: shop}
spec: {endpoints: {service: {name: web-headless, port: 8080}}}
";
    let resources = parse(yaml).unwrap();
    let out = to_yaml(&resources);
    assert!(
        out.contains(
            "spec:\n  parentRefs:\n  - group: \"\"\n    kind: Service\n    name: web\n    port: 8080\n"
        ),
        "{out}"
    );
    assert_eq!(parse(&out), Ok(resources.clone()), "{out}");
    let json = to_json(&resources[0]);
    assert_eq!(
        json["spec"]["parentRefs"],
        serde_json::json!([
            {"group": "", "kind": "Service", "name": "web", "port": 8080},
            {"group": "", "kind": "Service", "name": "web", "namespace": "other"},
        ])
    );
    assert_eq!(
        to_json(&resources[1])["spec"]["endpoints"],
        serde_json::json!({"service": {"name": "web-headless", "port": 8080}})
    );
    assert_eq!(
        parse_documents(&json.to_string()),
        Ok(vec![resources[0].clone()])
    );
}

#[test]
fn grpc_matches() {
    let rule = grpc_rule(&route_rule(
        ", matches: [{method: {type: Exact, method: SayHello}, headers: [{name: X-User, value: alice}, {type: Exact, name: a, value: \"\"}]}, {}]",
    ));
    assert_eq!(
        rule.matches,
        [
            GrpcRouteMatch {
                method: Some(GrpcMethodMatch {
                    service: None,
                    method: Some("SayHello".into())
                }),
                headers: vec![
                    HeaderMatch {
                        name: "x-user".into(),
                        value: "alice".into()
                    },
                    HeaderMatch {
                        name: "a".into(),
                        value: String::new()
                    },
                ],
            },
            GrpcRouteMatch::default(),
        ]
    );
    let m = "spec.rules[0].matches[0]";
    for (extra, path, message) in [
        (
            ", matches: [{method: {type: RegularExpression, service: a}}]",
            format!("{m}.method.type"),
            "only Exact is supported",
        ),
        (
            ", matches: [{method: {}}]",
            format!("{m}.method"),
            "at least one of service and method is required",
        ),
        (
            ", matches: [{method: {service: a/b}}]",
            format!("{m}.method.service"),
            "invalid name \"a/b\"",
        ),
        (
            ", matches: [{headers: [{type: RegularExpression, name: a, value: b}]}]",
            format!("{m}.headers[0].type"),
            "only Exact is supported",
        ),
        (
            ", matches: [{headers: [{name: a}]}]",
            format!("{m}.headers[0].value"),
            "required",
        ),
        (
            ", matches: [{headers: [{name: \"a b\", value: c}]}]",
            format!("{m}.headers[0].name"),
            "invalid header name \"a b\"",
        ),
        (
            ", matches: [{headers: [{name: a, value: 5}]}]",
            format!("{m}.headers[0].value"),
            "expected a string, found an integer",
        ),
        (
            ", matches: [{path: {value: /}}]",
            format!("{m}.path"),
            "unknown field \"path\" (expected one of: method, headers)",
        ),
    ] {
        rejects("GRPCRoute", &route_rule(extra), &path, message);
    }
}

#[test]
fn http_matches() {
    let rule = http_rule(&route_rule(
        ", matches: [{path: {value: /api}}, {path: {type: Exact, value: /healthz}, method: get}, {method: POST, headers: [{name: Accept, value: text/plain}]}]",
    ));
    assert_eq!(
        rule.matches,
        [
            HttpRouteMatch {
                path: Some(PathMatch::Prefix("/api".into())),
                ..Default::default()
            },
            HttpRouteMatch {
                path: Some(PathMatch::Exact("/healthz".into())),
                method: Some("GET".into()),
                headers: vec![]
            },
            HttpRouteMatch {
                path: None,
                method: Some("POST".into()),
                headers: vec![HeaderMatch {
                    name: "accept".into(),
                    value: "text/plain".into()
                }],
            },
        ]
    );
    let m = "spec.rules[0].matches[0]";
    for (extra, path, message) in [
        (
            ", matches: [{path: {type: RegularExpression, value: /a}}]",
            format!("{m}.path.type"),
            "unknown value \"RegularExpression\" (expected one of: Exact, PathPrefix)",
        ),
        (
            ", matches: [{path: {value: api}}]",
            format!("{m}.path.value"),
            "must start with \"/\"",
        ),
        (
            ", matches: [{path: {type: Exact}}]",
            format!("{m}.path.value"),
            "required",
        ),
        (
            ", matches: [{method: \"GE T\"}]",
            format!("{m}.method"),
            "invalid HTTP method \"GE T\"",
        ),
        (
            ", matches: [{headers: [{type: Prefix, name: a, value: b}]}]",
            format!("{m}.headers[0].type"),
            "only Exact is supported",
        ),
        (
            ", matches: [{method: {service: a}}]",
            format!("{m}.method"),
            "expected a string, found a mapping",
        ),
    ] {
        rejects("HTTPRoute", &route_rule(extra), &path, message);
    }
}

#[test]
fn timeouts_retries_and_faults() {
    let rule = http_rule(&route_rule(
        ", timeouts: {request: 1m}, retry: {attempts: 10, codes: [unavailable, Resource_Exhausted, 503]}, \
         faultInjection: {delay: {fixedDelay: 100ms, percent: 12.5}, abort: {httpStatus: 503, percent: 1}}",
    ));
    assert_eq!(
        rule.timeouts,
        Some(Timeouts {
            request: Some(ms(60_000)),
            backend_request: None
        })
    );
    assert_eq!(
        rule.retry,
        Some(Retry {
            attempts: 10,
            codes: vec![
                RetryOn::Grpc(GrpcCode::Unavailable),
                RetryOn::Grpc(GrpcCode::ResourceExhausted),
                RetryOn::Http(503)
            ],
            backoff: None,
        })
    );
    assert_eq!(
        rule.fault_injection,
        Some(FaultInjection {
            delay: Some(FaultDelay {
                fixed_delay: ms(100),
                percent: 12.5
            }),
            abort: Some(FaultAbort {
                status: AbortStatus::Http(503),
                percent: 1.0
            }),
        })
    );
    let rule = grpc_rule(&route_rule(
        ", timeouts: {backendRequest: 2s, request: 2s}, faultInjection: {abort: {grpcStatus: unavailable, percent: 0}}",
    ));
    assert_eq!(
        rule.timeouts,
        Some(Timeouts {
            request: Some(ms(2000)),
            backend_request: Some(ms(2000))
        })
    );
    assert_eq!(
        rule.fault_injection.unwrap().abort.unwrap().status,
        AbortStatus::Grpc(GrpcCode::Unavailable)
    );
    let rule = grpc_rule(&route_rule(
        ", timeouts: {}, retry: {attempts: 1, codes: [500], backoff: {base: 1s, max: 1s}}",
    ));
    assert_eq!(rule.timeouts, Some(Timeouts::default()));
    assert_eq!(
        rule.retry.unwrap().backoff,
        Some(Backoff {
            base: ms(1000),
            max: ms(1000)
        })
    );

    let r = "spec.rules[0]";
    for (extra, path, message) in [
        (
            ", timeouts: {request: 0s}",
            format!("{r}.timeouts.request"),
            "must be greater than 0s",
        ),
        (
            ", timeouts: {request: \"2\"}",
            format!("{r}.timeouts.request"),
            "invalid duration \"2\": missing unit",
        ),
        (
            ", timeouts: {request: 2}",
            format!("{r}.timeouts.request"),
            "expected a duration such as \"250ms\" or \"2s\", found an integer",
        ),
        (
            ", timeouts: {request: 2.5}",
            format!("{r}.timeouts.request"),
            "expected a duration such as \"250ms\" or \"2s\", found a float",
        ),
        (
            ", timeouts: {request: 1s, backendRequest: 1001ms}",
            format!("{r}.timeouts.backendRequest"),
            "must be ≤ request (1s)",
        ),
        (
            ", timeouts: {idle: 1s}",
            format!("{r}.timeouts.idle"),
            "unknown field \"idle\" (expected one of: request, backendRequest)",
        ),
        (
            ", retry: {attempts: 0, codes: [500]}",
            format!("{r}.retry.attempts"),
            "must be ≥ 1",
        ),
        (
            ", retry: {attempts: -3, codes: [500]}",
            format!("{r}.retry.attempts"),
            "must be ≥ 1",
        ),
        (
            ", retry: {attempts: 11, codes: [500]}",
            format!("{r}.retry.attempts"),
            "must be ≤ 10",
        ),
        (
            ", retry: {codes: [500]}",
            format!("{r}.retry.attempts"),
            "required",
        ),
        (
            ", retry: {attempts: 1}",
            format!("{r}.retry.codes"),
            "required",
        ),
        (
            ", retry: {attempts: 1, codes: []}",
            format!("{r}.retry.codes"),
            "must not be empty",
        ),
        (
            ", retry: {attempts: 1, codes: [600]}",
            format!("{r}.retry.codes[0]"),
            "must be ≤ 599",
        ),
        (
            ", retry: {attempts: 1, codes: [\"503\"]}",
            format!("{r}.retry.codes[0]"),
            "unknown gRPC status \"503\"",
        ),
        (
            ", retry: {attempts: 1, codes: [true]}",
            format!("{r}.retry.codes[0]"),
            "expected a gRPC status name or an HTTP status code, found a boolean",
        ),
        (
            ", retry: {attempts: 1, codes: [500], backoff: {base: 1s}}",
            format!("{r}.retry.backoff.max"),
            "required",
        ),
        (
            ", retry: {attempts: 1, codes: [500], backoff: {base: 0s, max: 1s}}",
            format!("{r}.retry.backoff.base"),
            "must be greater than 0s",
        ),
        (
            ", retry: {attempts: 1, codes: [500], backoff: {base: 1s, max: 999ms}}",
            format!("{r}.retry.backoff.max"),
            "must be ≥ base (1s)",
        ),
        (
            ", faultInjection: {}",
            format!("{r}.faultInjection"),
            "at least one of delay and abort is required",
        ),
        (
            ", faultInjection: {delay: {fixedDelay: 1s}}",
            format!("{r}.faultInjection.delay.percent"),
            "required",
        ),
        (
            ", faultInjection: {delay: {fixedDelay: 0ms, percent: 1}}",
            format!("{r}.faultInjection.delay.fixedDelay"),
            "must be greater than 0s",
        ),
        (
            ", faultInjection: {delay: {fixedDelay: 1s, percent: 100.5}}",
            format!("{r}.faultInjection.delay.percent"),
            "must be ≤ 100",
        ),
        (
            ", faultInjection: {delay: {fixedDelay: 1s, percent: -1}}",
            format!("{r}.faultInjection.delay.percent"),
            "must not be negative",
        ),
        (
            ", faultInjection: {delay: {fixedDelay: 1s, percent: \"5\"}}",
            format!("{r}.faultInjection.delay.percent"),
            "expected a number, found a string",
        ),
        (
            ", faultInjection: {abort: {percent: 1}}",
            format!("{r}.faultInjection.abort"),
            "one of grpcStatus and httpStatus is required",
        ),
        (
            ", faultInjection: {abort: {grpcStatus: INTERNAL, httpStatus: 500, percent: 1}}",
            format!("{r}.faultInjection.abort"),
            "only one of grpcStatus and httpStatus may be set",
        ),
        (
            ", faultInjection: {abort: {httpStatus: 199, percent: 1}}",
            format!("{r}.faultInjection.abort.httpStatus"),
            "must be ≥ 200",
        ),
        (
            ", faultInjection: {abort: {grpcStatus: 14, percent: 1}}",
            format!("{r}.faultInjection.abort.grpcStatus"),
            "expected a string, found an integer",
        ),
        (
            ", faultInjection: {abort: {grpcStatus: NOPE, percent: 1}}",
            format!("{r}.faultInjection.abort.grpcStatus"),
            "unknown gRPC status \"NOPE\"",
        ),
    ] {
        rejects("GRPCRoute", &route_rule(extra), &path, message);
    }
}

// ---------------------------------------------------------------- policies

fn traffic(spec: &str) -> BackendTrafficPolicySpec {
    match ok("BackendTrafficPolicy", spec) {
        Spec::BackendTrafficPolicy(s) => s,
        other => panic!("{other:?}"),
    }
}

#[test]
fn backend_traffic_policy_rules() {
    let t = "targetRef: {group: \"\", kind: Backend, name: b}";
    let p = traffic(&format!(
        "{{{t}, outlierDetection: {{}}, retryBudget: {{percent: 12.5}}, rateLimit: {{requestsPerSecond: 5}}, circuitBreaker: {{}}, loadBalancer: {{type: RoundRobin}}}}"
    ));
    assert_eq!(
        p.target_refs,
        [TargetRef {
            kind: TargetKind::Backend,
            name: "b".into()
        }]
    );
    assert_eq!(p.load_balancer, Some(LoadBalancerType::RoundRobin));
    assert_eq!(p.circuit_breaker, Some(CircuitBreaker::default()));
    assert_eq!(
        p.outlier_detection,
        Some(OutlierDetection {
            consecutive_5xx_errors: None,
            consecutive_gateway_errors: None,
            interval: ms(10_000),
            base_ejection_time: ms(30_000),
            max_ejection_time: ms(300_000),
            max_ejection_percent: 10,
        })
    );
    assert_eq!(
        p.retry_budget,
        Some(RetryBudget {
            percent: 12.5,
            min_retries_per_second: 10
        })
    );
    assert_eq!(
        p.rate_limit,
        Some(RateLimit {
            requests_per_second: 5,
            burst: 5
        })
    );
    let p = traffic(
        "{targetRefs: [{group: pylon.dev, kind: ServiceAccount, name: sa}, {kind: Backend, name: b}]}",
    );
    assert_eq!(p.target_refs.len(), 2);
    assert_eq!(
        (p.load_balancer, p.circuit_breaker, p.rate_limit),
        (None, None, None)
    );
    let p = traffic(&format!(
        "{{{t}, outlierDetection: {{baseEjectionTime: 1s, maxEjectionTime: 1s, maxEjectionPercent: 0}}, retryBudget: {{percent: 0, minRetriesPerSecond: 0}}}}"
    ));
    assert_eq!(p.outlier_detection.unwrap().max_ejection_percent, 0);
    assert_eq!(p.retry_budget.unwrap().min_retries_per_second, 0);

    for (spec, path, message) in [
        (
            "{}".to_string(),
            "spec",
            "one of targetRefs and targetRef is required",
        ),
        (
            format!("{{{t}, targetRefs: [{{kind: Backend, name: c}}]}}"),
            "spec",
            "only one of targetRefs and targetRef may be set",
        ),
        (
            "{targetRefs: []}".to_string(),
            "spec.targetRefs",
            "must not be empty",
        ),
        (
            "{targetRefs: [{kind: Backend, name: b}, {kind: Backend, name: b}]}".to_string(),
            "spec.targetRefs[1]",
            "duplicate target",
        ),
        (
            "{targetRef: {group: apps, kind: Backend, name: b}}".to_string(),
            "spec.targetRef.group",
            "unsupported group \"apps\" (expected \"\" or \"pylon.dev\")",
        ),
        (
            "{targetRef: {kind: Service, name: b}}".to_string(),
            "spec.targetRef.kind",
            "unknown value \"Service\" (expected one of: Backend, ServiceAccount)",
        ),
        (
            "{targetRef: {kind: Backend}}".to_string(),
            "spec.targetRef.name",
            "required",
        ),
        (
            format!("{{{t}, loadBalancer: {{type: Random}}}}"),
            "spec.loadBalancer.type",
            "unknown value \"Random\" (expected one of: LeastRequest, RoundRobin)",
        ),
        (
            format!("{{{t}, loadBalancer: {{}}}}"),
            "spec.loadBalancer.type",
            "required",
        ),
        (
            format!("{{{t}, circuitBreaker: {{maxConnections: 0}}}}"),
            "spec.circuitBreaker.maxConnections",
            "must be ≥ 1",
        ),
        (
            format!("{{{t}, circuitBreaker: {{maxPendingRequests: 4294967296}}}}"),
            "spec.circuitBreaker.maxPendingRequests",
            "must be ≤ 4294967295",
        ),
        (
            format!("{{{t}, circuitBreaker: {{maxParallelRequests: 99999999999999999999999}}}}"),
            "spec.circuitBreaker.maxParallelRequests",
            "must be ≤ 4294967295",
        ),
        (
            format!("{{{t}, outlierDetection: {{consecutive5xxErrors: 0}}}}"),
            "spec.outlierDetection.consecutive5xxErrors",
            "must be ≥ 1",
        ),
        (
            format!("{{{t}, outlierDetection: {{consecutiveGatewayErrors: 0}}}}"),
            "spec.outlierDetection.consecutiveGatewayErrors",
            "must be ≥ 1",
        ),
        (
            format!("{{{t}, outlierDetection: {{interval: 0s}}}}"),
            "spec.outlierDetection.interval",
            "must be greater than 0s",
        ),
        (
            format!("{{{t}, outlierDetection: {{baseEjectionTime: 10m}}}}"),
            "spec.outlierDetection.maxEjectionTime",
            "defaults to 5m, which must be ≥ baseEjectionTime (10m)",
        ),
        (
            format!("{{{t}, outlierDetection: {{baseEjectionTime: 2s, maxEjectionTime: 1s}}}}"),
            "spec.outlierDetection.maxEjectionTime",
            "must be ≥ baseEjectionTime (2s)",
        ),
        (
            format!("{{{t}, outlierDetection: {{maxEjectionPercent: 101}}}}"),
            "spec.outlierDetection.maxEjectionPercent",
            "must be ≤ 100",
        ),
        (
            format!("{{{t}, outlierDetection: {{maxEjectionPercent: 50.5}}}}"),
            "spec.outlierDetection.maxEjectionPercent",
            "expected an integer, found a float",
        ),
        (
            format!("{{{t}, retryBudget: {{}}}}"),
            "spec.retryBudget.percent",
            "required",
        ),
        (
            format!("{{{t}, retryBudget: {{percent: -0.5}}}}"),
            "spec.retryBudget.percent",
            "must not be negative",
        ),
        (
            format!("{{{t}, retryBudget: {{percent: 1, minRetriesPerSecond: -1}}}}"),
            "spec.retryBudget.minRetriesPerSecond",
            "must not be negative",
        ),
        (
            format!("{{{t}, rateLimit: {{requestsPerSecond: 0}}}}"),
            "spec.rateLimit.requestsPerSecond",
            "must be ≥ 1",
        ),
        (
            format!("{{{t}, rateLimit: {{requestsPerSecond: 1, burst: 0}}}}"),
            "spec.rateLimit.burst",
            "must be ≥ 1",
        ),
        (
            format!("{{{t}, rateLimit: {{burst: 1}}}}"),
            "spec.rateLimit.requestsPerSecond",
            "required",
        ),
    ] {
        rejects("BackendTrafficPolicy", &spec, path, message);
    }
}

#[test]
fn authorization_policy_rules() {
    let Spec::AuthorizationPolicy(p) = ok(
        "AuthorizationPolicy",
        "{targetRefs: [{kind: ServiceAccount, name: sa}], rules: []}",
    ) else {
        panic!()
    };
    assert!(p.rules.is_empty(), "an empty rule list denies everything");
    let Spec::AuthorizationPolicy(p) = ok(
        "AuthorizationPolicy",
        "{targetRef: {kind: ServiceAccount, name: sa}, rules: [{}, {from: {namespaces: [\"*\", \"team-*\"]}, to: {paths: [\"*.json\", /exact]}}, {from: {}}]}",
    ) else {
        panic!()
    };
    assert_eq!(
        p.rules,
        [
            AuthorizationRule::default(),
            AuthorizationRule {
                from: Some(AuthorizationFrom {
                    principals: vec![],
                    namespaces: vec!["*".into(), "team-*".into()]
                }),
                to: Some(AuthorizationTo {
                    methods: vec![],
                    paths: vec!["*.json".into(), "/exact".into()]
                }),
            },
            AuthorizationRule {
                from: Some(AuthorizationFrom::default()),
                to: None
            },
        ]
    );

    let t = "targetRef: {kind: ServiceAccount, name: sa}";
    for (spec, path, message) in [
        (
            "{targetRef: {kind: Backend, name: b}, rules: []}".to_string(),
            "spec.targetRef.kind",
            "unknown value \"Backend\" (expected one of: ServiceAccount)",
        ),
        (
            "{rules: []}".to_string(),
            "spec",
            "one of targetRefs and targetRef is required",
        ),
        (format!("{{{t}}}"), "spec.rules", "required"),
        (
            format!("{{{t}, rules: [{{from: {{principals: [\"a*b\"]}}}}]}}"),
            "spec.rules[0].from.principals[0]",
            "invalid pattern \"a*b\"",
        ),
        (
            format!("{{{t}, rules: [{{to: {{methods: [\"**\"]}}}}]}}"),
            "spec.rules[0].to.methods[0]",
            "invalid pattern \"**\"",
        ),
        (
            format!("{{{t}, rules: [{{to: {{paths: [\"\"]}}}}]}}"),
            "spec.rules[0].to.paths[0]",
            "must not be empty",
        ),
        (
            format!("{{{t}, rules: [{{to: {{hosts: [a]}}}}]}}"),
            "spec.rules[0].to.hosts",
            "unknown field \"hosts\" (expected one of: methods, paths)",
        ),
        (
            format!("{{{t}, rules: [{{when: {{}}}}]}}"),
            "spec.rules[0].when",
            "unknown field \"when\" (expected one of: from, to)",
        ),
    ] {
        rejects("AuthorizationPolicy", &spec, path, message);
    }
}

// ---------------------------------------------------------------- set checks

#[test]
fn cross_resource_rules() {
    let route = |refs: &str| {
        doc(
            "HTTPRoute",
            &format!("{{rules: [{{backendRefs: [{refs}]}}]}}"),
        )
    };
    let other_ns = BACKEND_B.replace("{name: b}", "{name: b, namespace: other}");

    // References resolve in the route's namespace, or the one given.
    assert!(parse(&format!("{BACKEND_B}---\n{}", route("{name: b}"))).is_ok());
    assert!(
        parse(&format!(
            "{other_ns}---\n{}",
            route("{name: b, namespace: other}")
        ))
        .is_ok()
    );
    assert_eq!(
        errors(&format!(
            "{other_ns}---\n{}",
            route("{name: b}, {name: b, namespace: third}")
        )),
        [
            "HTTPRoute/x: spec.rules[0].backendRefs[0].name: no Backend \"b\" (line 9)",
            "HTTPRoute/x: spec.rules[0].backendRefs[1].name: no Backend \"b\" in namespace \"third\" (line 9)",
        ]
    );
    // parse_documents leaves references to the set check.
    assert!(parse_documents(&route("{name: missing}")).is_ok());

    assert_eq!(
        errors(&format!("{BACKEND_B}---\n{BACKEND_B}")),
        [
            "Backend/b: metadata.name: duplicate: another Backend named \"b\" exists in namespace \"default\" (line 8)"
        ]
    );
    // Same name, different kind or namespace: no conflict.
    assert!(
        parse(&format!(
            "{BACKEND_B}---\n{other_ns}---\n{}",
            doc("HTTPRoute", "{rules: [{backendRefs: [{name: b}]}]}").replace("name: x", "name: b")
        ))
        .is_ok()
    );

    let policy = |name: &str, target: &str| {
        format!(
            "apiVersion: pylon.dev/v1\nkind: BackendTrafficPolicy\nmetadata: {{name: {name}}}\nspec: {{{target}}}\n"
        )
    };
    assert_eq!(
        errors(&format!(
            "{BACKEND_B}---\n{}",
            policy("p", "targetRef: {kind: Backend, name: nope}")
        )),
        ["BackendTrafficPolicy/p: spec.targetRef.name: no Backend \"nope\" (line 9)"]
    );
    assert!(
        parse(&policy(
            "p",
            "targetRef: {kind: ServiceAccount, name: nope}"
        ))
        .is_ok(),
        "service accounts are not resources"
    );
    assert_eq!(
        errors(&format!(
            "{BACKEND_B}---\n{}---\n{}",
            policy("first", "targetRefs: [{kind: Backend, name: b}]"),
            policy(
                "second",
                "targetRefs: [{kind: ServiceAccount, name: b}, {kind: Backend, name: b}]"
            )
        )),
        [
            "BackendTrafficPolicy/second: spec.targetRefs[1].name: Backend \"b\" is already targeted by BackendTrafficPolicy/first (line 14)"
        ]
    );
}

#[test]
fn validate_set_works_on_models_without_lines() {
    let mut resources = parse(DESIGN).unwrap();
    assert_eq!(validate_set(&resources), Ok(()));
    resources.retain(|r| r.metadata.name != "greeter-v2");
    resources.push(resources[0].clone());
    let errs = validate_set(&resources).unwrap_err();
    assert_eq!(
        errs.to_string(),
        "GRPCRoute/greeter: spec.rules[0].backendRefs[1].name: no Backend \"greeter-v2\"
Backend/greeter: metadata.name: duplicate: another Backend named \"greeter\" exists in namespace \"default\""
    );
}

// ---------------------------------------------------------------- writing

/// Every field of every kind, with strings that need quoting.
const RICH: &str = r#"apiVersion: pylon.dev/v1
kind: Backend
metadata:
  name: greeter
  namespace: team-a
  resourceVersion: "17"
  labels: {app: greeter, "yes": "true", num: "0x10", star: "*", empty: ""}
  annotations:
    note: "line one\nline two\n"
    long: "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa bbb"
    "app.kubernetes.io/name": ": # - ? { } [ ] , & ! | > ' \" % @ `"
    tab: "\ttab and trailing space "
spec:
  protocol: http2
  endpoints: {static: ["10.0.0.7:15006", "[fd00::1]:443"]}
  tls: {mode: mesh, identity: "spiffe://pylon.local/ns/team-a/sa/greeter"}
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: {name: dns}
spec:
  protocol: http1
  endpoints: {dns: {hostname: example.com., port: 443}}
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: {name: svc, namespace: team-a}
spec:
  endpoints: {service: {name: greeter-headless, port: 50051}}
---
apiVersion: pylon.dev/v1
kind: Backend
metadata: {name: svc-other}
spec:
  endpoints: {service: {name: greeter, namespace: team-a, port: 8080}}
---
apiVersion: pylon.dev/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: team-a}
spec:
  parentRefs:
    - {group: "", kind: Service, name: greeter, port: 50051}
    - {kind: Service, name: greeter, namespace: team-b}
  hostnames: ["greeter", "*.example.com:8443"]
  rules:
    - matches:
        - method: {service: helloworld.Greeter, method: SayHello}
          headers: [{name: x-user, value: "on"}]
        - method: {method: SayGoodbye}
        - {}
      backendRefs: [{name: greeter, weight: 90}, {name: dns, namespace: default, weight: 0}]
      timeouts: {request: 1h, backendRequest: 1500ms}
      retry: {attempts: 3, codes: [UNAVAILABLE, 503], backoff: {base: 25ms, max: 1m30s}}
      faultInjection:
        delay: {fixedDelay: 2s, percent: 12.5}
        abort: {grpcStatus: DEADLINE_EXCEEDED, percent: 0.1}
    - backendRefs: [{name: greeter}]
      timeouts: {}
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: {name: web}
spec:
  rules:
    - matches:
        - path: {type: Exact, value: /healthz}
          method: GET
          headers: [{name: accept, value: "*"}]
        - path: {value: /api}
      backendRefs: [{name: dns}]
      retry: {attempts: 1, codes: [500]}
      faultInjection: {abort: {httpStatus: 418, percent: 100}}
    - backendRefs: [{name: dns}]
      faultInjection: {delay: {fixedDelay: 10ms, percent: 50}}
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: {name: greeter, namespace: team-a}
spec:
  targetRefs: [{kind: Backend, name: greeter}, {kind: ServiceAccount, name: client}]
  loadBalancer: {type: RoundRobin}
  circuitBreaker: {maxConnections: 1, maxPendingRequests: 4294967295}
  outlierDetection: {consecutive5xxErrors: 5, baseEjectionTime: 1s}
  retryBudget: {percent: 33.3}
  rateLimit: {requestsPerSecond: 7}
---
apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: {name: empty}
spec:
  targetRef: {kind: Backend, name: dns}
  circuitBreaker: {}
---
apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: {name: greeter, namespace: team-a}
spec:
  targetRef: {kind: ServiceAccount, name: greeter}
  rules:
    - from: {principals: ["spiffe://pylon.local/ns/team-a/*"], namespaces: ["*"]}
      to: {methods: ["/helloworld.Greeter/*"], paths: ["*.json"]}
    - {}
    - {from: {}, to: {}}
---
apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: {name: deny-all}
spec:
  targetRefs: [{kind: ServiceAccount, name: locked}]
  rules: []
"#;

#[test]
fn to_yaml_round_trips() {
    let resources = parse(RICH).expect("rich policy");
    assert_eq!(resources.len(), 10);
    let yaml = to_yaml(&resources);
    assert_eq!(parse(&yaml).as_ref(), Ok(&resources), "{yaml}");
    assert_eq!(
        to_yaml(&parse(&yaml).unwrap()),
        yaml,
        "writing is deterministic"
    );

    let design = parse(DESIGN).unwrap();
    assert_eq!(parse(&to_yaml(&design)), Ok(design));
    assert_eq!(to_yaml(&[]), "");
    assert_eq!(parse(&to_yaml(&[])), Ok(vec![]));
}

#[test]
fn to_yaml_writes_the_documented_shape() {
    let r = parse(DESIGN).unwrap();
    let yaml = to_yaml(&r[..2]);
    assert!(
        yaml.starts_with("apiVersion: pylon.dev/v1\nkind: Backend\nmetadata:\n  name: greeter\n  namespace: default\nspec:\n  protocol: grpc\n"),
        "{yaml}"
    );
    assert!(
        yaml.contains("\n---\napiVersion: pylon.dev/v1\nkind: GRPCRoute\n"),
        "{yaml}"
    );
    for canonical in [
        "request: 2s",
        "backendRequest: 500ms",
        "base: 25ms",
        "max: 250ms",
    ] {
        assert!(yaml.contains(canonical), "{canonical} in {yaml}");
    }
    assert!(
        !yaml.contains("resourceVersion")
            && !yaml.contains("labels")
            && !yaml.contains("faultInjection"),
        "{yaml}"
    );
}

#[test]
fn to_json_mirrors_the_yaml() {
    let r = parse(DESIGN).unwrap();
    let json = to_json(&r[2]);
    assert_eq!(json["apiVersion"], "pylon.dev/v1");
    assert_eq!(json["kind"], "BackendTrafficPolicy");
    assert_eq!(
        json["metadata"],
        serde_json::json!({"name": "greeter", "namespace": "default"})
    );
    assert_eq!(
        json["spec"]["targetRefs"],
        serde_json::json!([{"kind": "Backend", "name": "greeter"}])
    );
    assert_eq!(json["spec"]["outlierDetection"]["interval"], "5s");
    assert_eq!(json["spec"]["outlierDetection"]["maxEjectionTime"], "5m");
    assert_eq!(json["spec"]["retryBudget"]["percent"], 20.0);
    assert_eq!(
        json["spec"]["rateLimit"],
        serde_json::json!({"requestsPerSecond": 1000, "burst": 200})
    );
    let route = to_json(&r[1]);
    assert_eq!(
        route["spec"]["rules"][0]["retry"]["codes"],
        serde_json::json!(["UNAVAILABLE"])
    );
    // JSON is YAML: the JSON form parses back to the same resource.
    assert_eq!(parse(&to_json(&r[0]).to_string()), Ok(vec![r[0].clone()]));
}

#[test]
fn model_built_in_code_round_trips() {
    let mut metadata = Metadata::new("svc");
    metadata.labels.insert("tier".into(), "1".into());
    let r = Resource {
        metadata,
        spec: Spec::HttpRoute(HttpRouteSpec {
            parent_refs: vec![],
            hostnames: vec![],
            rules: vec![HttpRouteRule {
                matches: vec![HttpRouteMatch::default()],
                backend_refs: vec![BackendRef {
                    name: "svc".into(),
                    namespace: None,
                    weight: 1,
                }],
                timeouts: Some(Timeouts {
                    request: Some(Duration::from_secs(7200)),
                    backend_request: None,
                }),
                retry: Some(Retry {
                    attempts: 2,
                    codes: vec![RetryOn::Http(502), RetryOn::Grpc(GrpcCode::Ok)],
                    backoff: None,
                }),
                fault_injection: Some(FaultInjection {
                    delay: None,
                    abort: Some(FaultAbort {
                        status: AbortStatus::Grpc(GrpcCode::Internal),
                        percent: 0.0,
                    }),
                }),
            }],
        }),
    };
    let yaml = to_yaml(std::slice::from_ref(&r));
    assert!(yaml.contains("request: 2h"), "{yaml}");
    assert_eq!(parse_documents(&yaml), Ok(vec![r]));
}

#[test]
fn references_are_checked_even_when_some_document_fails() {
    let yaml = "apiVersion: pylon.dev/v1
kind: Backend
metadata: {name: a}
spec: {endpoints: {static: [\"10.0.0.1:80\"]}, colour: red}
---
apiVersion: pylon.dev/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  rules:
    - backendRefs: [{name: a}, {name: missing}]
";
    let errs = errors(yaml);
    assert_eq!(
        errs,
        [
            "Backend/a: spec.colour: unknown field \"colour\" (expected one of: protocol, endpoints, tls) (line 4)",
            "HTTPRoute/r: spec.rules[0].backendRefs[1].name: no Backend \"missing\" (line 11)",
        ]
    );

    // A document whose kind cannot be read might be the missing Backend:
    // no reference is reported then.
    let unknown = format!("metadata: {{name: missing}}\n---\n{yaml}");
    let errs = errors(&unknown);
    assert!(errs.iter().all(|e| !e.contains("no Backend")), "{errs:?}");
}

#[test]
fn a_service_account_is_targeted_by_one_traffic_policy_at_most() {
    let policy = |name: &str| {
        format!(
            "apiVersion: pylon.dev/v1
kind: BackendTrafficPolicy
metadata: {{name: {name}}}
spec:
  targetRef: {{kind: ServiceAccount, name: greeter}}
  rateLimit: {{requestsPerSecond: 10}}
"
        )
    };
    let errs = errors(&format!("{}---\n{}", policy("a"), policy("b")));
    assert_eq!(
        errs,
        [
            "BackendTrafficPolicy/b: spec.targetRef.name: ServiceAccount \"greeter\" is already targeted by BackendTrafficPolicy/a (line 12)"
        ]
    );
}
