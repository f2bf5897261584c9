//! Authorization of inbound calls: the AuthorizationPolicies that target this
//! workload's service account, compiled into matchers, and the decision for
//! one call.
//!
//! Policies are ALLOW lists. With none applying, every mesh caller may call
//! everything; once one applies, a call must match a rule of some applying
//! policy. Patterns are compiled once per policy version, so a decision
//! allocates nothing and takes no lock.
//!
//! Not here: where the decision sits on the inbound path and what a denied
//! caller is told (the inbound path), and how the caller's identity
//! is verified ([`crate::identity::tls`]).

use std::fmt;
use std::ops::Range;
use std::sync::Arc;

use pylon_proto::policy::{AuthorizationRule, Resource, Spec, TargetKind};

/// The compiled authorization of one workload, part of a policy snapshot.
#[derive(Debug, Default, PartialEq)]
pub struct Authorization {
    /// `None`: no policy applies, every call is allowed. `Some`: the rules of
    /// every applying policy, one of which a call must match (none: every
    /// call is denied).
    rules: Option<Box<[Rule]>>,
}

/// Who is calling: the verified SPIFFE ID of the mTLS peer.
#[derive(Debug, Clone, Copy)]
pub struct Caller<'a> {
    principal: &'a str,
    /// The `<ns>` of `spiffe://<td>/ns/<ns>/sa/<sa>`; `None` for IDs of
    /// another form, which then match no `namespaces` list.
    namespace: Option<&'a str>,
}

impl<'a> Caller<'a> {
    /// A caller without a verified identity (plaintext, permissive mode):
    /// it matches no `principals` or `namespaces` entry, not even `*`.
    pub fn unauthenticated() -> Caller<'static> {
        Caller {
            principal: "",
            namespace: None,
        }
    }

    pub fn principal(&self) -> &'a str {
        self.principal
    }
}

/// A connection's verified SPIFFE ID, read once when the connection is
/// accepted: each of its requests gets its [`Caller`] without parsing the
/// ID again.
#[derive(Debug, Clone)]
pub struct Principal {
    id: Arc<str>,
    /// Where the `<ns>` of `spiffe://<td>/ns/<ns>/sa/<sa>` lies in `id`.
    namespace: Option<Range<usize>>,
}

impl Principal {
    pub fn new(id: Arc<str>) -> Principal {
        let namespace = namespace_of(&id).map(|ns| {
            let start = ns.as_ptr().addr() - id.as_ptr().addr();
            start..start + ns.len()
        });
        Principal { id, namespace }
    }

    pub fn id(&self) -> &Arc<str> {
        &self.id
    }

    /// The caller of a request on this connection.
    pub fn caller(&self) -> Caller<'_> {
        Caller {
            principal: &self.id,
            namespace: self.namespace.clone().and_then(|r| self.id.get(r)),
        }
    }
}

/// The inbound call being authorized: what a rule's `to` side matches.
#[derive(Debug, Clone, Copy)]
pub struct InboundCall<'a> {
    /// A gRPC call (by content type); its path is `/package.Service/Method`.
    pub grpc: bool,
    /// The HTTP method (`POST` for every gRPC call).
    pub method: &'a str,
    /// The request path, without the query.
    pub path: &'a str,
}

/// How a denial names the call: the gRPC method's path, or `METHOD /path`.
impl fmt::Display for InboundCall<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.grpc {
            f.write_str(self.path)
        } else {
            write!(f, "{} {}", self.method, self.path)
        }
    }
}

impl Authorization {
    /// The authorization of the workload whose service account is
    /// `service_account` (namespace, name): the AuthorizationPolicies in that
    /// namespace with a `ServiceAccount` target of that name. A workload
    /// without a service account (its SPIFFE ID is not of the
    /// `/ns/<ns>/sa/<sa>` form) can be targeted by none.
    pub fn compile(resources: &[Resource], service_account: Option<&(String, String)>) -> Self {
        let Some((own_ns, own_sa)) = service_account else {
            return Authorization::default();
        };
        let mut rules: Option<Vec<Rule>> = None;
        for r in resources {
            let Spec::AuthorizationPolicy(spec) = &r.spec else {
                continue;
            };
            let applies = r.metadata.namespace == *own_ns
                && spec
                    .target_refs
                    .iter()
                    .any(|t| t.kind == TargetKind::ServiceAccount && t.name == *own_sa);
            if applies {
                rules
                    .get_or_insert_with(Vec::new)
                    .extend(spec.rules.iter().map(Rule::compile));
            }
        }
        Authorization {
            rules: rules.map(Vec::into_boxed_slice),
        }
    }

    /// Whether any policy applies (otherwise every call is allowed).
    pub fn enforced(&self) -> bool {
        self.rules.is_some()
    }

    /// Whether `caller` may make `call`.
    pub fn allows(&self, caller: &Caller<'_>, call: &InboundCall<'_>) -> bool {
        let Some(rules) = &self.rules else {
            return true;
        };
        let path = PathView {
            path: call.path,
            canonical: is_canonical(call.path),
        };
        rules.iter().any(|r| r.matches(caller, call, &path))
    }
}

/// One rule: every non-empty list must have a matching entry.
#[derive(Debug, PartialEq)]
struct Rule {
    principals: Box<[Pattern]>,
    namespaces: Box<[Pattern]>,
    methods: Box<[MethodPattern]>,
    paths: Box<[Pattern]>,
}

impl Rule {
    fn compile(rule: &AuthorizationRule) -> Rule {
        let patterns = |list: Option<&Vec<String>>| -> Box<[Pattern]> {
            list.map_or_else(Box::default, |l| {
                l.iter().map(|p| Pattern::new(p)).collect()
            })
        };
        let from = rule.from.as_ref();
        let to = rule.to.as_ref();
        Rule {
            principals: patterns(from.map(|f| &f.principals)),
            namespaces: patterns(from.map(|f| &f.namespaces)),
            methods: to.map_or_else(Box::default, |t| {
                t.methods.iter().map(|m| MethodPattern::new(m)).collect()
            }),
            paths: patterns(to.map(|t| &t.paths)),
        }
    }

    fn matches(&self, caller: &Caller<'_>, call: &InboundCall<'_>, path: &PathView<'_>) -> bool {
        any_or_empty(&self.principals, |p| {
            !caller.principal.is_empty() && p.matches(caller.principal)
        }) && any_or_empty(&self.namespaces, |p| {
            caller.namespace.is_some_and(|ns| p.matches(ns))
        }) && any_or_empty(&self.methods, |m| m.matches(call, path))
            && any_or_empty(&self.paths, |p| path.matches(p))
    }
}

/// Whether `list` is empty (anything goes) or an entry matches.
fn any_or_empty<T>(list: &[T], matches: impl Fn(&T) -> bool) -> bool {
    list.is_empty() || list.iter().any(matches)
}

/// A pattern as validation admits it: exact, `prefix*`, `*suffix` or `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    Any,
    Exact(Box<str>),
    Prefix(Box<str>),
    Suffix(Box<str>),
}

impl Pattern {
    fn new(s: &str) -> Pattern {
        if s == "*" {
            Pattern::Any
        } else if let Some(prefix) = s.strip_suffix('*') {
            Pattern::Prefix(prefix.into())
        } else if let Some(suffix) = s.strip_prefix('*') {
            Pattern::Suffix(suffix.into())
        } else {
            Pattern::Exact(s.into())
        }
    }

    fn matches(&self, value: &str) -> bool {
        match self {
            Pattern::Any => true,
            Pattern::Exact(s) => value == &**s,
            Pattern::Prefix(p) => value.starts_with(&**p),
            Pattern::Suffix(s) => value.ends_with(&**s),
        }
    }
}

/// A `to.methods` entry: one that contains `/` names gRPC methods and is
/// matched against the path of gRPC calls; any other is an HTTP method
/// pattern (no HTTP method token contains `/`), matched against the request
/// method of every call, gRPC calls included (`POST`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum MethodPattern {
    Grpc(Pattern),
    Http(Pattern),
}

impl MethodPattern {
    fn new(s: &str) -> MethodPattern {
        if s.contains('/') {
            MethodPattern::Grpc(Pattern::new(s))
        } else {
            MethodPattern::Http(Pattern::new(s))
        }
    }

    fn matches(&self, call: &InboundCall<'_>, path: &PathView<'_>) -> bool {
        match self {
            MethodPattern::Grpc(p) => call.grpc && path.matches(p),
            MethodPattern::Http(p) => p.matches(call.method),
        }
    }
}

/// The request path and whether it is canonical.
struct PathView<'a> {
    path: &'a str,
    canonical: bool,
}

impl PathView<'_> {
    /// A path the app might read as another path (see [`is_canonical`])
    /// matches only `*`: a prefix must not let `/public/../admin` through.
    fn matches(&self, p: &Pattern) -> bool {
        matches!(p, Pattern::Any) || (self.canonical && p.matches(self.path))
    }
}

/// Whether a path names itself plainly: it starts with `/` and has no empty,
/// `.` or `..` segment, no backslash, and no percent-encoded `.`, `/` or `\`
/// (all of which servers may resolve to a different path).
fn is_canonical(path: &str) -> bool {
    let Some(rest) = path.strip_prefix('/') else {
        return false;
    };
    // A trailing `/` is plain; any other empty segment (`//`) is not.
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    let plain_segments = path == "/" || rest.split('/').all(|seg| !matches!(seg, "" | "." | ".."));
    plain_segments && !path.contains('\\') && !has_encoded_separator(path.as_bytes())
}

/// Whether `%2e`, `%2f` or `%5c` (any case) occurs.
fn has_encoded_separator(bytes: &[u8]) -> bool {
    bytes.windows(3).any(|w| {
        w[0] == b'%'
            && matches!(
                (w[1], w[2].to_ascii_lowercase()),
                (b'2', b'e') | (b'2', b'f') | (b'5', b'c')
            )
    })
}

/// The namespace of a SPIFFE ID of the form `spiffe://<td>/ns/<ns>/sa/<sa>`
/// (the form [`crate::identity::service_account`] reads), without copying.
fn namespace_of(spiffe_id: &str) -> Option<&str> {
    pylon_proto::spiffe::parse_shape(spiffe_id).map(|w| w.namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CLIENT_A: &str = "spiffe://pylon.test/ns/default/sa/client-a";
    const CLIENT_B: &str = "spiffe://pylon.test/ns/default/sa/client-b";
    const OTHER_NS: &str = "spiffe://pylon.test/ns/team-x/sa/client-a";
    const OWN: (&str, &str) = ("default", "greeter");

    fn grpc(path: &str) -> InboundCall<'_> {
        InboundCall {
            grpc: true,
            method: "POST",
            path,
        }
    }

    fn http<'a>(method: &'a str, path: &'a str) -> InboundCall<'a> {
        InboundCall {
            grpc: false,
            method,
            path,
        }
    }

    /// The authorization of the workload `OWN` under `yaml`.
    fn authz(yaml: &str) -> Authorization {
        authz_of(yaml, OWN)
    }

    fn authz_of(yaml: &str, (ns, sa): (&str, &str)) -> Authorization {
        let resources = pylon_proto::policy::parse(yaml).expect("valid policy");
        Authorization::compile(&resources, Some(&(ns.to_string(), sa.to_string())))
    }

    /// An AuthorizationPolicy `name` for the service account `greeter` with
    /// `rules` (a YAML flow sequence).
    fn policy(name: &str, rules: &str) -> String {
        format!(
            "apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: {{ name: {name} }}
spec:
  targetRef: {{ kind: ServiceAccount, name: greeter }}
  rules: {rules}
---
"
        )
    }

    fn allows(a: &Authorization, caller: &str, call: InboundCall<'_>) -> bool {
        a.allows(&Principal::new(caller.into()).caller(), &call)
    }

    #[test]
    fn patterns() {
        let cases = [
            ("*", "", true),
            ("*", "anything", true),
            ("/a", "/a", true),
            ("/a", "/ab", false),
            ("/a*", "/a", true),
            ("/a*", "/ab/c", true),
            ("/a*", "/b", false),
            ("*/M", "/pkg.S/M", true),
            ("*/M", "/pkg.S/MM", false),
            ("GET", "GET", true),
            ("GET", "get", false),
        ];
        for (pattern, value, want) in cases {
            assert_eq!(
                Pattern::new(pattern).matches(value),
                want,
                "{pattern} {value}"
            );
        }
        assert_eq!(Pattern::new("a*"), Pattern::Prefix("a".into()));
        assert_eq!(Pattern::new("*a"), Pattern::Suffix("a".into()));
    }

    #[test]
    fn without_a_policy_everything_is_allowed() {
        let a = authz("");
        assert!(!a.enforced());
        assert!(allows(&a, CLIENT_A, grpc("/pkg.S/M")));
        assert!(allows(&a, "spiffe://elsewhere/x", http("DELETE", "/../x")));
        assert!(!Authorization::compile(&[], None).enforced());
    }

    #[test]
    fn a_policy_without_rules_denies_everything() {
        let a = authz(&policy("deny", "[]"));
        assert!(a.enforced());
        assert!(!allows(&a, CLIENT_A, grpc("/pkg.S/M")));
        assert!(!allows(&a, CLIENT_A, http("GET", "/")));
    }

    #[test]
    fn an_empty_rule_allows_everything() {
        let a = authz(&policy("all", "[{}]"));
        assert!(allows(&a, CLIENT_B, grpc("/pkg.S/M")));
        assert!(allows(&a, OTHER_NS, http("PUT", "/x")));
        let a = authz(&policy("all", "[{ from: {}, to: {} }]"));
        assert!(allows(&a, CLIENT_B, http("PUT", "/x")));
    }

    #[test]
    fn only_policies_targeting_the_own_service_account_in_its_namespace_apply() {
        let other_sa = "apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: p }
spec:
  targetRef: { kind: ServiceAccount, name: someone-else }
  rules: []
";
        assert!(!authz(other_sa).enforced());
        let other_ns = "apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: p, namespace: team-x }
spec:
  targetRef: { kind: ServiceAccount, name: greeter }
  rules: []
";
        assert!(!authz(other_ns).enforced());
        assert!(authz_of(other_ns, ("team-x", "greeter")).enforced());
        // Any of several targets will do; an absent namespace is `default`.
        let several = "apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: p }
spec:
  targetRefs: [{ kind: ServiceAccount, name: a }, { kind: ServiceAccount, name: greeter }]
  rules: []
";
        assert!(authz(several).enforced());
        let resources = pylon_proto::policy::parse(several).unwrap();
        assert!(!Authorization::compile(&resources, None).enforced());
    }

    #[test]
    fn rules_are_ored_within_and_across_policies() {
        let a = authz(
            &(policy(
                "a",
                &format!("[{{ from: {{ principals: [\"{CLIENT_A}\"] }} }}]"),
            ) + &policy(
                "b",
                "[{ to: { paths: [\"/public/*\"] } }, { to: { methods: [GET] } }]",
            ) + &policy("deny-all", "[]")),
        );
        assert!(allows(&a, CLIENT_A, http("DELETE", "/private")));
        assert!(allows(&a, CLIENT_B, http("POST", "/public/x")));
        assert!(allows(&a, CLIENT_B, http("GET", "/private")));
        assert!(!allows(&a, CLIENT_B, http("POST", "/private")));
    }

    #[test]
    fn lists_within_from_and_to_are_anded() {
        let a = authz(&policy(
            "p",
            "[{ from: { principals: [\"*/sa/client-a\"], namespaces: [default] },
                to: { methods: [GET, HEAD], paths: [\"/api/*\"] } }]",
        ));
        assert!(allows(&a, CLIENT_A, http("GET", "/api/x")));
        assert!(allows(&a, CLIENT_A, http("HEAD", "/api/")));
        assert!(!allows(&a, CLIENT_B, http("GET", "/api/x")), "principal");
        assert!(!allows(&a, OTHER_NS, http("GET", "/api/x")), "namespace");
        assert!(!allows(&a, CLIENT_A, http("POST", "/api/x")), "method");
        assert!(!allows(&a, CLIENT_A, http("GET", "/other")), "path");
    }

    #[test]
    fn namespaces_need_an_id_with_a_namespace() {
        let a = authz(&policy("p", "[{ from: { namespaces: [\"*\"] } }]"));
        assert!(allows(&a, OTHER_NS, grpc("/pkg.S/M")));
        assert!(!allows(
            &a,
            "spiffe://pylon.test/workload",
            grpc("/pkg.S/M")
        ));
        assert!(!allows(
            &a,
            "spiffe://pylon.test/ns//sa/x",
            grpc("/pkg.S/M")
        ));
        let a = authz(&policy("p", "[{ from: { principals: [\"*\"] } }]"));
        assert!(allows(&a, "spiffe://pylon.test/workload", grpc("/pkg.S/M")));
    }

    #[test]
    fn grpc_methods_match_grpc_paths_and_http_methods_match_every_call() {
        let a = authz(&policy(
            "p",
            "[{ to: { methods: [\"/helloworld.Greeter/*\", \"*/Check\"] } }]",
        ));
        assert!(allows(&a, CLIENT_A, grpc("/helloworld.Greeter/SayHello")));
        assert!(allows(&a, CLIENT_A, grpc("/grpc.health.v1.Health/Check")));
        assert!(!allows(&a, CLIENT_A, grpc("/helloworld.Other/SayHello")));
        // The same path over plain HTTP is not a gRPC call.
        assert!(!allows(
            &a,
            CLIENT_A,
            http("POST", "/helloworld.Greeter/SayHello")
        ));

        let a = authz(&policy("p", "[{ to: { methods: [POST] } }]"));
        assert!(allows(&a, CLIENT_A, grpc("/helloworld.Greeter/SayHello")));
        assert!(allows(&a, CLIENT_A, http("POST", "/form")));
        assert!(!allows(&a, CLIENT_A, http("GET", "/form")));

        let a = authz(&policy("p", "[{ to: { methods: [GET] } }]"));
        assert!(!allows(&a, CLIENT_A, grpc("/helloworld.Greeter/SayHello")));
    }

    #[test]
    fn paths_that_could_resolve_elsewhere_match_only_a_star() {
        let a = authz(&policy(
            "p",
            "[{ to: { paths: [\"/public/*\"] } }, { to: { methods: [\"/pkg.S/*\"] } }]",
        ));
        assert!(allows(&a, CLIENT_A, http("GET", "/public/a/b/")));
        for path in [
            "/public/../admin",
            "/public/./x",
            "/public/..",
            "/public//x",
            "/public/%2e%2e/admin",
            "/public/%2E%2e/admin",
            "/public/..%2Fadmin",
            "/public/..%5cadmin",
            "/public/..\\admin",
        ] {
            assert!(!allows(&a, CLIENT_A, http("GET", path)), "{path}");
        }
        assert!(!allows(&a, CLIENT_A, grpc("/pkg.S/../admin.A/Delete")));
        let a = authz(&policy("p", "[{ to: { paths: [\"*\"] } }]"));
        assert!(allows(&a, CLIENT_A, http("GET", "/public/../admin")));
    }

    /// The example of docs/policy.md, section AuthorizationPolicy.
    #[test]
    fn the_reference_example() {
        let a = authz(
            "apiVersion: pylon.dev/v1
kind: AuthorizationPolicy
metadata: { name: greeter }
spec:
  targetRef: { kind: ServiceAccount, name: greeter }
  rules:
    # The client may call every Greeter method.
    - from: { principals: [\"spiffe://pylon.local/ns/default/sa/client\"] }
      to:   { methods: [\"/helloworld.Greeter/*\"] }
    # Anyone in the namespace `monitoring` may read /metrics over HTTP.
    - from: { namespaces: [monitoring] }
      to:   { methods: [GET], paths: [\"/metrics\"] }
",
        );
        let client = "spiffe://pylon.local/ns/default/sa/client";
        let prometheus = "spiffe://pylon.local/ns/monitoring/sa/prometheus";
        assert!(allows(&a, client, grpc("/helloworld.Greeter/SayHello")));
        assert!(!allows(&a, client, http("GET", "/metrics")));
        assert!(allows(&a, prometheus, http("GET", "/metrics")));
        assert!(!allows(
            &a,
            prometheus,
            grpc("/helloworld.Greeter/SayHello")
        ));
    }

    #[test]
    fn canonical_paths() {
        for ok in [
            "/", "/a", "/a/", "/a/b.c", "/a/..b", "/a/%20", "/a..", "/%2",
        ] {
            assert!(is_canonical(ok), "{ok}");
        }
        for bad in [
            "", "*", "a", "//", "/a//b", "/a/.", "/./a", "/a/../b", "/a%2fb", "/a\\b",
        ] {
            assert!(!is_canonical(bad), "{bad}");
        }
    }

    #[test]
    fn namespaces_of_spiffe_ids() {
        assert_eq!(namespace_of(CLIENT_A), Some("default"));
        assert_eq!(namespace_of(OTHER_NS), Some("team-x"));
        for id in [
            "spiffe://td/ns/x/sa/",
            "spiffe://td/ns/x/sa/y/z",
            "spiffe://td/ns/x",
            "spiffe://td/sa/y/ns/x",
            "spiffe://td",
            "https://td/ns/x/sa/y",
        ] {
            assert_eq!(namespace_of(id), None, "{id}");
        }
    }

    #[test]
    fn a_principal_finds_its_namespace_once_for_every_caller() {
        for id in [CLIENT_A, OTHER_NS, "spiffe://pylon.test/team-x/client"] {
            let principal = Principal::new(id.into());
            let caller = principal.caller();
            assert_eq!(caller.principal(), id);
            assert_eq!(caller.namespace, namespace_of(id), "{id}");
        }
    }
}
