//! Matching a request to a route rule, and a rule to a weighted backend.
//!
//! Built once per policy snapshot: rules are indexed by hostname and sorted
//! by Gateway API precedence, so a request costs one hash lookup (a few, when
//! it falls through from `host:port` to `host` to wildcards to routes without
//! hostnames) and a short scan, with no allocation in the common case.
//!
//! Precedence within a hostname, most specific first: for HTTPRoute, exact
//! path, then the longest path prefix, then a method match, then the most
//! header matches; for GRPCRoute, the longest service, then the longest
//! method, then the most header matches. Ties go to the route that sorts
//! first by namespace/name, then to rule order. A gRPC request (by content
//! type) is matched against GRPCRoute rules first, then HTTPRoute rules;
//! other requests only against HTTPRoute rules.

use std::borrow::Cow;
use std::cmp::Reverse;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::{HeaderMap, HeaderName, HeaderValue, Method};
use pylon_proto::policy::{FaultInjection, PathMatch, Retry, Timeouts};

use crate::proxy::backend::Backend;
use crate::telemetry::metrics::{Metrics, RequestMetrics};
use prometheus_client::metrics::counter::Counter;

/// A compiled route rule: where matching requests go, and the per-route
/// policy the layers below read.
#[derive(Debug)]
pub struct Rule {
    /// `GRPCRoute/greeter`, for errors and the config dump.
    pub route: Arc<str>,
    pub index: usize,
    /// Backends with their cumulative weights.
    backends: Vec<(u32, Arc<Backend>)>,
    total_weight: u32,
    pub timeouts: Option<Timeouts>,
    pub retry: Option<Retry>,
    pub fault_injection: Option<FaultInjection>,
    pub fault_delays: Counter,
    pub fault_aborts: Counter,
    /// Request counts and durations per backend, in the order of `backends`.
    requests: Vec<RequestMetrics>,
}

/// A rule's policy besides its backends.
#[derive(Debug, Clone, Default)]
pub struct RulePolicy {
    pub timeouts: Option<Timeouts>,
    pub retry: Option<Retry>,
    pub fault_injection: Option<FaultInjection>,
}

impl Rule {
    pub fn new(
        route: Arc<str>,
        index: usize,
        weighted: Vec<(u32, Arc<Backend>)>,
        policy: RulePolicy,
        metrics: &Metrics,
    ) -> Self {
        let mut total = 0u32;
        let backends = weighted
            .into_iter()
            .filter(|(w, _)| *w > 0)
            .map(|(w, b)| {
                total = total.saturating_add(w);
                (total, b)
            })
            .collect::<Vec<(u32, Arc<Backend>)>>();
        let requests = backends
            .iter()
            .map(|(_, b)| metrics.outbound_requests(&route, &b.name))
            .collect();
        Rule {
            requests,
            fault_delays: metrics.fault(&route, "delay"),
            fault_aborts: metrics.fault(&route, "abort"),
            route,
            index,
            backends,
            total_weight: total,
            timeouts: policy.timeouts,
            retry: policy.retry,
            fault_injection: policy.fault_injection,
        }
    }

    /// A backend chosen at random in proportion to the weights; `None` when
    /// every weight is 0.
    pub fn pick_backend(&self) -> Option<&Arc<Backend>> {
        match self.backends.as_slice() {
            [] => None,
            [(_, only)] => Some(only),
            many => {
                let r = fastrand::u32(0..self.total_weight);
                many.iter().find(|(cum, _)| r < *cum).map(|(_, b)| b)
            }
        }
    }

    /// The request counts and durations of calls of this rule to `backend`.
    pub fn requests_to(&self, backend: &Arc<Backend>) -> Option<&RequestMetrics> {
        let i = self
            .backends
            .iter()
            .position(|(_, b)| Arc::ptr_eq(b, backend))?;
        self.requests.get(i)
    }

    /// `(weight, backend)` pairs, for the config dump.
    pub fn weighted_backends(&self) -> impl Iterator<Item = (u32, &Arc<Backend>)> {
        let mut prev = 0;
        self.backends.iter().map(move |(cum, b)| {
            let w = cum - prev;
            prev = *cum;
            (w, b)
        })
    }
}

/// What a rule matches on besides the hostname.
#[derive(Debug, Clone)]
pub enum Matcher {
    Grpc {
        service: Option<String>,
        method: Option<String>,
    },
    Http {
        path: Option<PathMatch>,
        method: Option<Method>,
    },
}

/// The parts of a request that routing looks at.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    pub path: &'a str,
    pub headers: &'a HeaderMap,
    pub grpc: bool,
}

#[derive(Debug)]
struct Entry {
    matcher: Matcher,
    headers: Vec<(HeaderName, HeaderValue)>,
    rule: Arc<Rule>,
}

impl Entry {
    fn matches(&self, req: &RequestView<'_>) -> bool {
        let head_ok = match &self.matcher {
            Matcher::Grpc { service, method } => {
                let (s, m) = split_grpc_path(req.path);
                service.as_deref().is_none_or(|want| Some(want) == s)
                    && method.as_deref().is_none_or(|want| Some(want) == m)
            }
            Matcher::Http { path, method } => {
                method.as_ref().is_none_or(|m| m == req.method)
                    && path.as_ref().is_none_or(|p| path_matches(p, req.path))
            }
        };
        head_ok
            && self
                .headers
                .iter()
                .all(|(name, value)| req.headers.get_all(name).iter().any(|v| v == value))
    }
}

/// Splits `/package.Service/Method` into service and method.
fn split_grpc_path(path: &str) -> (Option<&str>, Option<&str>) {
    match path.strip_prefix('/').and_then(|p| p.split_once('/')) {
        Some((s, m)) if !s.is_empty() && !m.is_empty() && !m.contains('/') => (Some(s), Some(m)),
        _ => (None, None),
    }
}

fn path_matches(want: &PathMatch, path: &str) -> bool {
    let path = path.split_once('?').map_or(path, |(p, _)| p);
    match want {
        PathMatch::Exact(p) => path == p,
        PathMatch::Prefix(p) => {
            let p = p.strip_suffix('/').unwrap_or(p);
            p.is_empty()
                || (path.starts_with(p)
                    && matches!(path.as_bytes().get(p.len()), None | Some(b'/')))
        }
    }
}

/// The rules of one hostname (or of every hostname), in precedence order.
#[derive(Debug, Default)]
pub struct HostRules {
    grpc: Vec<Entry>,
    http: Vec<Entry>,
}

impl HostRules {
    fn find(&self, req: &RequestView<'_>) -> Option<&Arc<Rule>> {
        let grpc = if req.grpc { self.grpc.as_slice() } else { &[] };
        grpc.iter()
            .chain(self.http.iter())
            .find(|e| e.matches(req))
            .map(|e| &e.rule)
    }

    fn sort(&mut self) {
        // Stable sorts: entries were added in route-name, rule, match order,
        // which settles ties.
        self.grpc.sort_by_key(|e| match &e.matcher {
            Matcher::Grpc { service, method } => (
                Reverse(service.as_ref().map_or(0, |s| s.len())),
                Reverse(method.as_ref().map_or(0, |m| m.len())),
                Reverse(e.headers.len()),
            ),
            Matcher::Http { .. } => (Reverse(0), Reverse(0), Reverse(0)),
        });
        self.http.sort_by_key(|e| match &e.matcher {
            Matcher::Http { path, method } => {
                let (exact, len) = match path {
                    Some(PathMatch::Exact(p)) => (true, p.len()),
                    Some(PathMatch::Prefix(p)) => (false, p.len()),
                    None => (false, 1),
                };
                (
                    !exact,
                    Reverse(len),
                    method.is_none(),
                    Reverse(e.headers.len()),
                )
            }
            Matcher::Grpc { .. } => (true, Reverse(0), true, Reverse(0)),
        });
    }

    fn rules(&self) -> impl Iterator<Item = &Arc<Rule>> {
        self.grpc.iter().chain(self.http.iter()).map(|e| &e.rule)
    }
}

/// Every route rule of a snapshot, indexed by hostname.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// `host` and `host:port` keys, lowercase.
    exact: HashMap<String, HostRules>,
    /// Hostnames that are IP literals, for routing by original destination.
    by_ip: HashMap<IpAddr, HostRules>,
    by_addr: HashMap<SocketAddr, HostRules>,
    /// `*.suffix` hostnames as (`.suffix`, port), longest suffix first.
    wildcard: Vec<(String, Option<u16>, HostRules)>,
    /// Routes without hostnames.
    any: HostRules,
}

impl RouteTable {
    /// Adds one match of a rule for the given hostnames (empty: every host).
    /// Call in route-name, rule, match order; then [`RouteTable::finish`].
    pub fn add(
        &mut self,
        hostnames: &[String],
        matcher: Matcher,
        headers: Vec<(HeaderName, HeaderValue)>,
        rule: &Arc<Rule>,
    ) {
        let entry = || Entry {
            matcher: matcher.clone(),
            headers: headers.clone(),
            rule: rule.clone(),
        };
        let push = |rules: &mut HostRules| {
            let e = entry();
            match e.matcher {
                Matcher::Grpc { .. } => rules.grpc.push(e),
                Matcher::Http { .. } => rules.http.push(e),
            }
        };
        if hostnames.is_empty() {
            push(&mut self.any);
        }
        for h in hostnames {
            let (host, port) = split_host_port(h);
            if let Some(suffix) = host.strip_prefix('*') {
                let slot = match self
                    .wildcard
                    .iter_mut()
                    .position(|(s, p, _)| s == suffix && *p == port)
                {
                    Some(i) => &mut self.wildcard[i].2,
                    None => {
                        self.wildcard
                            .push((suffix.to_string(), port, HostRules::default()));
                        let last = self.wildcard.len() - 1;
                        &mut self.wildcard[last].2
                    }
                };
                push(slot);
                continue;
            }
            push(self.exact.entry(h.clone()).or_default());
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                match port {
                    Some(p) => push(self.by_addr.entry(SocketAddr::new(ip, p)).or_default()),
                    None => push(self.by_ip.entry(ip).or_default()),
                }
            }
        }
    }

    /// Sorts every hostname's rules into precedence order.
    pub fn finish(&mut self) {
        for rules in self
            .exact
            .values_mut()
            .chain(self.by_ip.values_mut())
            .chain(self.by_addr.values_mut())
            .chain(self.wildcard.iter_mut().map(|(_, _, r)| r))
        {
            rules.sort();
        }
        self.any.sort();
        self.wildcard
            .sort_by_key(|(s, p, _)| (Reverse(s.len()), p.is_none()));
    }

    /// The rule for a request to `authority` (as the request named it), or,
    /// failing that, to `original_dst` (the address the caller dialled, when
    /// the connection was redirected to the sidecar).
    pub fn find(
        &self,
        authority: Option<&str>,
        original_dst: Option<SocketAddr>,
        req: &RequestView<'_>,
    ) -> Option<&Arc<Rule>> {
        if let Some(authority) = authority {
            let authority = ascii_lowercase(authority);
            let (host, port) = split_host_port(&authority);
            let found = port
                .and_then(|_| self.exact.get(authority.as_ref()))
                .and_then(|r| r.find(req))
                .or_else(|| self.exact.get(host).and_then(|r| r.find(req)))
                .or_else(|| {
                    self.wildcard
                        .iter()
                        .filter(|(suffix, p, _)| {
                            host.len() > suffix.len()
                                && host.ends_with(suffix.as_str())
                                && p.is_none_or(|p| Some(p) == port)
                        })
                        .find_map(|(_, _, r)| r.find(req))
                });
            if found.is_some() {
                return found;
            }
        }
        if let Some(dst) = original_dst {
            let found = self
                .by_addr
                .get(&dst)
                .and_then(|r| r.find(req))
                .or_else(|| self.by_ip.get(&dst.ip()).and_then(|r| r.find(req)));
            if found.is_some() {
                return found;
            }
        }
        self.any.find(req)
    }

    /// Every distinct rule with the hostnames it serves ("*" for all), for
    /// the config dump.
    pub fn describe(&self) -> Vec<(String, &Arc<Rule>)> {
        let mut out: Vec<(String, &Arc<Rule>)> = Vec::new();
        for (host, rules) in &self.exact {
            out.extend(rules.rules().map(|r| (host.clone(), r)));
        }
        for (suffix, port, rules) in &self.wildcard {
            let host = match port {
                Some(p) => format!("*{suffix}:{p}"),
                None => format!("*{suffix}"),
            };
            out.extend(rules.rules().map(|r| (host.clone(), r)));
        }
        out.extend(self.any.rules().map(|r| ("*".to_string(), r)));
        out.sort_by(|a, b| (&a.1.route, a.1.index, &a.0).cmp(&(&b.1.route, b.1.index, &b.0)));
        out.dedup_by(|a, b| Arc::ptr_eq(a.1, b.1) && a.0 == b.0);
        out
    }
}

fn ascii_lowercase(s: &str) -> Cow<'_, str> {
    if s.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(s.to_ascii_lowercase())
    } else {
        Cow::Borrowed(s)
    }
}

/// Splits `host:port`, `[v6]:port` or a bare host.
fn split_host_port(authority: &str) -> (&str, Option<u16>) {
    if let Some(rest) = authority.strip_prefix('[') {
        if let Some((v6, tail)) = rest.split_once(']') {
            let port = tail.strip_prefix(':').and_then(|p| p.parse().ok());
            return (&authority[..v6.len() + 2], port);
        }
        return (authority, None);
    }
    match authority.rsplit_once(':') {
        Some((h, p)) if !h.contains(':') => match p.parse() {
            Ok(port) => (h, Some(port)),
            Err(_) => (authority, None),
        },
        _ => (authority, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::backend::Backend;

    fn rule(name: &str) -> Arc<Rule> {
        let b = Backend::for_tests(name);
        Arc::new(Rule::new(
            name.into(),
            0,
            vec![(1, b)],
            RulePolicy::default(),
            &Metrics::new(),
        ))
    }

    fn view<'a>(
        method: &'a Method,
        path: &'a str,
        headers: &'a HeaderMap,
        grpc: bool,
    ) -> RequestView<'a> {
        RequestView {
            method,
            path,
            headers,
            grpc,
        }
    }

    fn http(path: Option<PathMatch>, method: Option<Method>) -> Matcher {
        Matcher::Http { path, method }
    }

    #[test]
    fn http_precedence_exact_then_longest_prefix_then_method_then_headers() {
        let mut t = RouteTable::default();
        let hosts = vec!["web".to_string()];
        let (root, api, api_get, api_hdr, exact) = (
            rule("root"),
            rule("api"),
            rule("api-get"),
            rule("api-hdr"),
            rule("exact"),
        );
        t.add(
            &hosts,
            http(Some(PathMatch::Prefix("/".into())), None),
            vec![],
            &root,
        );
        t.add(
            &hosts,
            http(Some(PathMatch::Prefix("/api".into())), None),
            vec![],
            &api,
        );
        t.add(
            &hosts,
            http(Some(PathMatch::Prefix("/api".into())), Some(Method::GET)),
            vec![],
            &api_get,
        );
        t.add(
            &hosts,
            http(Some(PathMatch::Prefix("/api".into())), None),
            vec![(
                HeaderName::from_static("x-v"),
                HeaderValue::from_static("2"),
            )],
            &api_hdr,
        );
        t.add(
            &hosts,
            http(Some(PathMatch::Exact("/api/exact".into())), None),
            vec![],
            &exact,
        );
        t.finish();

        let mut h = HeaderMap::new();
        let find = |m: &Method, p: &str, h: &HeaderMap| {
            t.find(Some("web"), None, &view(m, p, h, false))
                .map(|r| r.route.to_string())
        };
        assert_eq!(
            find(&Method::POST, "/api/exact", &h).as_deref(),
            Some("exact")
        );
        assert_eq!(find(&Method::GET, "/api/x", &h).as_deref(), Some("api-get"));
        assert_eq!(find(&Method::POST, "/api/x", &h).as_deref(), Some("api"));
        assert_eq!(
            find(&Method::POST, "/apix", &h).as_deref(),
            Some("root"),
            "prefix matches whole segments"
        );
        h.insert("x-v", HeaderValue::from_static("2"));
        assert_eq!(
            find(&Method::POST, "/api?q=1", &h).as_deref(),
            Some("api-hdr")
        );
    }

    #[test]
    fn grpc_rules_match_service_and_method_and_only_grpc_requests() {
        let mut t = RouteTable::default();
        let hosts = vec!["greeter".to_string()];
        let (svc, m) = (rule("svc"), rule("method"));
        t.add(
            &hosts,
            Matcher::Grpc {
                service: Some("helloworld.Greeter".into()),
                method: None,
            },
            vec![],
            &svc,
        );
        t.add(
            &hosts,
            Matcher::Grpc {
                service: Some("helloworld.Greeter".into()),
                method: Some("SayHello".into()),
            },
            vec![],
            &m,
        );
        t.finish();
        let h = HeaderMap::new();
        let find = |p: &str, grpc: bool| {
            t.find(
                Some("greeter:50051"),
                None,
                &view(&Method::POST, p, &h, grpc),
            )
            .map(|r| r.route.to_string())
        };
        assert_eq!(
            find("/helloworld.Greeter/SayHello", true).as_deref(),
            Some("method")
        );
        assert_eq!(
            find("/helloworld.Greeter/Other", true).as_deref(),
            Some("svc")
        );
        assert_eq!(find("/other.Svc/SayHello", true), None);
        assert_eq!(find("/helloworld.Greeter/SayHello", false), None);
    }

    #[test]
    fn hostname_lookup_order_and_original_destination() {
        let mut t = RouteTable::default();
        let any = || http(None, None);
        let (port, bare, wild, ip, all) = (
            rule("port"),
            rule("bare"),
            rule("wild"),
            rule("ip"),
            rule("all"),
        );
        t.add(&["svc:8080".to_string()], any(), vec![], &port);
        t.add(&["svc".to_string()], any(), vec![], &bare);
        t.add(&["*.example.com".to_string()], any(), vec![], &wild);
        t.add(&["10.1.2.3:80".to_string()], any(), vec![], &ip);
        t.add(&[], any(), vec![], &all);
        t.finish();
        let h = HeaderMap::new();
        let v = view(&Method::GET, "/", &h, false);
        let find = |a: Option<&str>, dst: Option<&str>| {
            t.find(a, dst.map(|d| d.parse().unwrap()), &v)
                .map(|r| r.route.to_string())
                .unwrap()
        };
        assert_eq!(find(Some("svc:8080"), None), "port");
        assert_eq!(find(Some("SVC:9090"), None), "bare");
        assert_eq!(find(Some("a.b.example.com"), None), "wild");
        assert_eq!(find(Some("example.com"), None), "all");
        assert_eq!(find(Some("10.1.2.3:80"), None), "ip");
        assert_eq!(find(Some("unknown"), Some("10.1.2.3:80")), "ip");
        assert_eq!(find(None, Some("10.1.2.3:81")), "all");
    }

    #[test]
    fn weights_split_traffic_and_zero_weights_get_none() {
        let a = Backend::for_tests("a");
        let b = Backend::for_tests("b");
        let r = Rule::new(
            "r".into(),
            0,
            vec![(3, a.clone()), (1, b), (0, Backend::for_tests("c"))],
            RulePolicy::default(),
            &Metrics::new(),
        );
        fastrand::seed(7);
        let picks_a = (0..4000)
            .filter(|_| Arc::ptr_eq(r.pick_backend().unwrap(), &a))
            .count();
        assert!(
            (2700..3300).contains(&picks_a),
            "{picks_a} of 4000 went to a (weight 3 of 4)"
        );
        let weights: Vec<u32> = r.weighted_backends().map(|(w, _)| w).collect();
        assert_eq!(weights, vec![3, 1]);
        let none = Rule::new(
            "r".into(),
            0,
            vec![(0, Backend::for_tests("z"))],
            RulePolicy::default(),
            &Metrics::new(),
        );
        assert!(none.pick_backend().is_none());
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("a:80"), ("a", Some(80)));
        assert_eq!(split_host_port("a"), ("a", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
    }
}
