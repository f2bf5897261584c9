//! Matching a request to a route rule, and a rule to a weighted backend.
//!
//! Built once per policy snapshot: rules are indexed by hostname and sorted
//! by Gateway API precedence, so a request costs one hash lookup (a few, when
//! it falls through from `host:port` to `host` to wildcards to routes without
//! hostnames) and a short scan, with no allocation in the common case.
//!
//! Routes attached to Kubernetes Services (`parentRefs`) are indexed under
//! the Service's cluster DNS names, expanded here once per snapshot
//! ([`RouteHosts`]): a parent with a port counts as a `host:port` hostname,
//! one without as a `host` hostname, so both kinds of route meet in the same
//! levels and the rule precedence below decides between them (ADR 13).
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

use crate::policy::backend::Backend;
use crate::telemetry::metrics::{FaultCounters, Metrics, RequestMetrics};

/// The maps of a [`RouteTable`]: keyed by hostnames, addresses and route
/// names from policy, and hashed with foldhash rather than SipHash, which
/// showed in compile profiles and in every lookup. Request authorities
/// only ever look keys up, never insert, so a caller cannot grow a chain
/// of colliding keys (HashDoS): a fixed-key fast hash would do; foldhash's
/// is seeded per process anyway.
pub type Map<K, V> = HashMap<K, V, foldhash::fast::RandomState>;

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
    pub faults: Option<RuleFaults>,
    /// Request counts and durations per backend, in the order of `backends`.
    requests: Vec<RequestMetrics>,
}

/// A rule's fault injection, and the counters of the faults it injected
/// (the route's, shared by its rules).
#[derive(Debug)]
pub struct RuleFaults {
    pub injection: FaultInjection,
    pub counters: FaultCounters,
}

/// A rule's policy besides its backends.
#[derive(Debug, Clone, Default)]
pub struct RulePolicy {
    pub timeouts: Option<Timeouts>,
    pub retry: Option<Retry>,
    pub fault_injection: Option<FaultInjection>,
}

/// One route's metric handles, made once and shared by its rules: the
/// fault counters (once a rule injects faults), and the request metrics per
/// backend its rules name.
pub struct RouteMetrics<'m> {
    metrics: &'m Metrics,
    route: Arc<str>,
    faults: Option<FaultCounters>,
    /// The request metrics per backend the rules named so far.
    requests: Vec<(Arc<str>, RequestMetrics)>,
    /// Those the same route had in the previous snapshot, not named yet.
    kept: Vec<(Arc<str>, RequestMetrics)>,
}

/// A route's metric handles as a snapshot keeps them, so that the next
/// snapshot's route of the same name starts from them instead of looking
/// every series up again.
#[derive(Debug, Clone)]
pub struct RouteSeries {
    faults: Option<FaultCounters>,
    requests: Vec<(Arc<str>, RequestMetrics)>,
}

impl<'m> RouteMetrics<'m> {
    pub fn new(route: Arc<str>, metrics: &'m Metrics) -> Self {
        RouteMetrics {
            faults: None,
            requests: Vec::new(),
            kept: Vec::new(),
            metrics,
            route,
        }
    }

    /// The handles of `route`, starting from `kept` (the same route's in
    /// the previous snapshot) when there is one. `kept` must come from
    /// `metrics`: a series handle is the series itself, and a family never
    /// drops a series, so a kept handle is what a lookup would return.
    pub fn reusing(route: Arc<str>, metrics: &'m Metrics, kept: Option<&RouteSeries>) -> Self {
        match kept {
            Some(kept) => RouteMetrics {
                faults: kept.faults.clone(),
                requests: Vec::with_capacity(kept.requests.len()),
                kept: kept.requests.clone(),
                metrics,
                route,
            },
            None => RouteMetrics::new(route, metrics),
        }
    }

    /// The handles to keep for the next snapshot: those of the backends
    /// this snapshot's rules name.
    pub fn into_series(self) -> RouteSeries {
        RouteSeries {
            faults: self.faults,
            requests: self.requests,
        }
    }

    fn requests(&mut self, backend: &Backend) -> RequestMetrics {
        if let Some((_, m)) = self.requests.iter().find(|(b, _)| *b == backend.name) {
            return m.clone();
        }
        let m = match self.kept.iter().position(|(b, _)| *b == backend.name) {
            Some(i) => self.kept.swap_remove(i).1,
            None => self
                .metrics
                .outbound_requests(self.route.clone(), backend.name.clone()),
        };
        self.requests.push((backend.name.clone(), m.clone()));
        m
    }

    fn faults(&mut self) -> FaultCounters {
        let (metrics, route) = (self.metrics, &self.route);
        self.faults
            .get_or_insert_with(|| metrics.faults(route))
            .clone()
    }
}

impl Rule {
    pub fn new(
        route: Arc<str>,
        index: usize,
        weighted: Vec<(u32, Arc<Backend>)>,
        policy: RulePolicy,
        metrics: &Metrics,
    ) -> Self {
        Rule::of_route(
            index,
            weighted,
            policy,
            &mut RouteMetrics::new(route, metrics),
        )
    }

    /// Rule `index` of the route whose handles are `route`.
    pub fn of_route(
        index: usize,
        weighted: Vec<(u32, Arc<Backend>)>,
        policy: RulePolicy,
        route: &mut RouteMetrics<'_>,
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
        let requests = backends.iter().map(|(_, b)| route.requests(b)).collect();
        Rule {
            requests,
            faults: policy.fault_injection.map(|injection| RuleFaults {
                injection,
                counters: route.faults(),
            }),
            route: route.route.clone(),
            index,
            backends,
            total_weight: total,
            timeouts: policy.timeouts,
            retry: policy.retry,
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

/// One match of a rule: what it matches besides the hostname, and the rule.
#[derive(Debug, Clone)]
pub struct Entry {
    matcher: Matcher,
    headers: Vec<(HeaderName, HeaderValue)>,
    rule: Arc<Rule>,
}

impl Entry {
    pub fn new(matcher: Matcher, headers: Vec<(HeaderName, HeaderValue)>, rule: Arc<Rule>) -> Self {
        Entry {
            matcher,
            headers,
            rule,
        }
    }

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
    fn push(&mut self, entry: Entry) {
        match entry.matcher {
            Matcher::Grpc { .. } => self.grpc.push(entry),
            Matcher::Http { .. } => self.http.push(entry),
        }
    }

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
                Reverse(service.as_ref().map_or(0, String::len)),
                Reverse(method.as_ref().map_or(0, String::len)),
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

/// How Kubernetes names Services for this sidecar: its own namespace (bare
/// Service names resolve there only, through the pod's DNS search path) and
/// the cluster domain.
#[derive(Debug, Clone)]
pub struct ClusterDns {
    /// `None` when the sidecar does not know its namespace: then no bare
    /// name matches a Service.
    pub namespace: Option<String>,
    /// Lowercase, without a trailing dot (`cluster.local`).
    pub domain: String,
}

impl Default for ClusterDns {
    fn default() -> Self {
        ClusterDns {
            namespace: None,
            domain: crate::config::DEFAULT_CLUSTER_DOMAIN.to_string(),
        }
    }
}

impl ClusterDns {
    /// The fully qualified name of a Service, with the trailing dot that
    /// keeps resolvers from trying search domains first.
    pub fn service_fqdn(&self, name: &str, namespace: &str) -> String {
        format!("{name}.{namespace}.svc.{}.", self.domain)
    }

    /// Every name a client of this sidecar reaches a Service by:
    /// `name.ns`, `name.ns.svc`, `name.ns.svc.<domain>` (also with the
    /// trailing dot) from any namespace, and `name` only from the Service's
    /// own namespace.
    pub fn service_names(&self, name: &str, namespace: &str) -> Vec<String> {
        let short = format!("{name}.{namespace}");
        let svc = format!("{short}.svc");
        let full = format!("{svc}.{}", self.domain);
        let fqdn = format!("{full}.");
        let mut names = Vec::with_capacity(5);
        if self.namespace.as_deref() == Some(namespace) {
            names.push(name.to_string());
        }
        names.extend([short, svc, full, fqdn]);
        names
    }
}

/// Where a route applies: its `hostnames` as written, and the authorities
/// its Service parents expand to. Built once per route per snapshot.
#[derive(Debug, Default, Clone)]
pub struct RouteHosts {
    hostnames: Vec<String>,
    /// `name` (every port) or `name:port` keys of the Service parents.
    services: Vec<String>,
    /// Service names whose parent has port 80: an authority without a port
    /// is a request to the scheme's default port, 80 for the plaintext
    /// HTTP the outbound listener speaks.
    services_port_80: Vec<String>,
}

impl RouteHosts {
    /// A route with `hostnames` only (empty: every authority).
    pub fn hostnames(hostnames: &[String]) -> Self {
        RouteHosts {
            hostnames: hostnames.to_vec(),
            ..RouteHosts::default()
        }
    }

    /// A route's hostnames and Service parents; each parent is `(name,
    /// namespace, port)` with the namespace already defaulted to the route's.
    pub fn new<'a>(
        hostnames: &[String],
        parents: impl IntoIterator<Item = (&'a str, &'a str, Option<u16>)>,
        dns: &ClusterDns,
    ) -> Self {
        let mut hosts = RouteHosts::hostnames(hostnames);
        for (name, namespace, port) in parents {
            for host in dns.service_names(name, namespace) {
                match port {
                    None => hosts.services.push(host),
                    Some(p) => {
                        hosts.services.push(format!("{host}:{p}"));
                        if p == 80 {
                            hosts.services_port_80.push(host);
                        }
                    }
                }
            }
        }
        // Two parents may name the same authority; one entry is enough.
        for keys in [&mut hosts.services, &mut hosts.services_port_80] {
            keys.sort();
            keys.dedup();
        }
        hosts
    }

    /// No hostnames and no parents: the route applies to every authority.
    fn is_any(&self) -> bool {
        self.hostnames.is_empty() && self.services.is_empty()
    }

    /// The rule lists of a [`RouteTable`] that a route with these hosts
    /// adds its entries to.
    fn slots(&self) -> Vec<Slot<'_>> {
        let mut slots = Vec::with_capacity(
            usize::from(self.is_any())
                + self.services.len()
                + self.services_port_80.len()
                + self.hostnames.len(),
        );
        if self.is_any() {
            slots.push(Slot::Any);
        }
        slots.extend(self.services.iter().map(|h| Slot::Exact(h)));
        slots.extend(self.services_port_80.iter().map(|h| Slot::Port80(h)));
        for h in &self.hostnames {
            let (host, port) = split_host_port(h);
            if let Some(suffix) = host.strip_prefix('*') {
                slots.push(Slot::Wildcard(suffix, port));
                continue;
            }
            slots.push(Slot::Exact(h));
            let bare = host.trim_start_matches('[').trim_end_matches(']');
            if let Ok(ip) = bare.parse::<IpAddr>() {
                slots.push(match port {
                    Some(p) => Slot::Addr(SocketAddr::new(ip, p)),
                    None => Slot::Ip(ip),
                });
            }
        }
        slots
    }
}

/// One rule list of a [`RouteTable`], by its key.
enum Slot<'h> {
    Any,
    /// A `host` or `host:port` key.
    Exact(&'h str),
    /// A Service name of a parent with port 80.
    Port80(&'h str),
    /// `.suffix` of a `*.suffix` hostname, and its port.
    Wildcard(&'h str, Option<u16>),
    Ip(IpAddr),
    Addr(SocketAddr),
}

/// Every route rule of a snapshot, indexed by hostname.
#[derive(Debug, Default)]
pub struct RouteTable {
    /// `host` and `host:port` keys, lowercase.
    exact: Map<String, HostRules>,
    /// Service names of parents with port 80, for authorities without a
    /// port; looked up at the `host:port` level.
    port_80: Map<String, HostRules>,
    /// Hostnames that are IP literals, for routing by original destination.
    by_ip: Map<IpAddr, HostRules>,
    by_addr: Map<SocketAddr, HostRules>,
    /// `*.suffix` hostnames by `.suffix` (validation admits no other
    /// wildcard), then by port: those with a port first, `None` (every
    /// port) last. A lookup tries the authority's own suffixes, longest
    /// first, so its cost depends on the authority, not on how many
    /// wildcards there are.
    wildcard: Map<String, Vec<(Option<u16>, HostRules)>>,
    /// Shortest and longest key of `wildcard`, to skip suffixes no key has.
    wildcard_lengths: (usize, usize),
    /// Routes without hostnames.
    any: HostRules,
    /// Each route's metric handles, by route name, for the next snapshot.
    series: Map<Arc<str>, RouteSeries>,
}

impl RouteTable {
    /// An empty table with room for `routes` routes over `hosts` hostnames
    /// (and Service names), so that compiling does not rehash as it grows.
    pub fn with_capacity(routes: usize, hosts: usize) -> Self {
        RouteTable {
            exact: Map::with_capacity_and_hasher(hosts, Default::default()),
            series: Map::with_capacity_and_hasher(routes, Default::default()),
            ..RouteTable::default()
        }
    }

    /// Adds one match of a rule for the given hosts (tests build tables
    /// this way; compiling adds whole routes, [`RouteTable::add_route`]).
    /// Call in route-name, rule, match order; then [`RouteTable::finish`].
    #[cfg(test)]
    pub fn add(
        &mut self,
        hosts: &RouteHosts,
        matcher: Matcher,
        headers: Vec<(HeaderName, HeaderValue)>,
        rule: &Arc<Rule>,
    ) {
        self.add_route(hosts, vec![Entry::new(matcher, headers, rule.clone())]);
    }

    /// Adds every match of a route's rules (in rule, match order) for the
    /// route's hosts: each host's list is looked up once per route, and the
    /// entries are moved into the last list (cloned only for a route with
    /// more than one). Call in route-name order; then
    /// [`RouteTable::finish`].
    pub fn add_route(&mut self, hosts: &RouteHosts, entries: Vec<Entry>) {
        let slots = hosts.slots();
        let Some((last, others)) = slots.split_last() else {
            return;
        };
        for slot in others {
            let rules = self.rules_mut(slot);
            for e in &entries {
                rules.push(e.clone());
            }
        }
        let rules = self.rules_mut(last);
        for e in entries {
            rules.push(e);
        }
    }

    fn rules_mut(&mut self, slot: &Slot<'_>) -> &mut HostRules {
        match *slot {
            Slot::Any => &mut self.any,
            Slot::Exact(h) => self.exact.entry(h.to_owned()).or_default(),
            Slot::Port80(h) => self.port_80.entry(h.to_owned()).or_default(),
            Slot::Wildcard(suffix, port) => {
                let slots = self.wildcard.entry(suffix.to_owned()).or_default();
                let i = match slots.iter().position(|(p, _)| *p == port) {
                    Some(i) => i,
                    None => {
                        slots.push((port, HostRules::default()));
                        slots.len() - 1
                    }
                };
                &mut slots[i].1
            }
            Slot::Ip(ip) => self.by_ip.entry(ip).or_default(),
            Slot::Addr(addr) => self.by_addr.entry(addr).or_default(),
        }
    }

    /// Keeps `route`'s metric handles for the next snapshot's compile.
    pub fn keep_series(&mut self, route: Arc<str>, series: RouteSeries) {
        self.series.insert(route, series);
    }

    /// The metric handles `route` had in this snapshot.
    pub fn series(&self, route: &str) -> Option<&RouteSeries> {
        self.series.get(route)
    }

    /// Sorts every hostname's rules into precedence order.
    pub fn finish(&mut self) {
        for rules in self
            .exact
            .values_mut()
            .chain(self.port_80.values_mut())
            .chain(self.by_ip.values_mut())
            .chain(self.by_addr.values_mut())
            .chain(self.wildcard.values_mut().flatten().map(|(_, r)| r))
        {
            rules.sort();
        }
        self.any.sort();
        for slots in self.wildcard.values_mut() {
            slots.sort_by_key(|(p, _)| p.is_none());
        }
        self.wildcard_lengths = (
            self.wildcard.keys().map(String::len).min().unwrap_or(0),
            self.wildcard.keys().map(String::len).max().unwrap_or(0),
        );
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
            // Without a port, `host` is also `host:80` for Service parents.
            let with_port = match port {
                Some(_) => self.exact.get(authority.as_ref()),
                None => self.port_80.get(host),
            };
            let found = with_port
                .and_then(|r| r.find(req))
                .or_else(|| self.exact.get(host).and_then(|r| r.find(req)))
                .or_else(|| self.find_wildcard(host, port, req));
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

    /// The rule of the longest `*.suffix` hostname that `host` ends with
    /// (after at least one character) and that has a matching rule.
    fn find_wildcard(
        &self,
        host: &str,
        port: Option<u16>,
        req: &RequestView<'_>,
    ) -> Option<&Arc<Rule>> {
        if self.wildcard.is_empty() {
            return None;
        }
        let (shortest, longest) = self.wildcard_lengths;
        host.match_indices('.')
            .map(|(i, _)| &host[i..])
            .filter(|suffix| {
                suffix.len() < host.len() && (shortest..=longest).contains(&suffix.len())
            })
            .filter_map(|suffix| self.wildcard.get(suffix))
            .flatten()
            .filter(|(p, _)| p.is_none_or(|p| Some(p) == port))
            .find_map(|(_, r)| r.find(req))
    }

    /// Every distinct rule with the hostnames it serves ("*" for all), for
    /// the config dump.
    pub fn describe(&self) -> Vec<(String, &Arc<Rule>)> {
        let mut out: Vec<(String, &Arc<Rule>)> = Vec::new();
        for (host, rules) in &self.exact {
            out.extend(rules.rules().map(|r| (host.clone(), r)));
        }
        for (suffix, slots) in &self.wildcard {
            for (port, rules) in slots {
                let host = match port {
                    Some(p) => format!("*{suffix}:{p}"),
                    None => format!("*{suffix}"),
                };
                out.extend(rules.rules().map(|r| (host.clone(), r)));
            }
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
    use crate::policy::backend::Backend;

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
            &RouteHosts::hostnames(&hosts),
            http(Some(PathMatch::Prefix("/".into())), None),
            vec![],
            &root,
        );
        t.add(
            &RouteHosts::hostnames(&hosts),
            http(Some(PathMatch::Prefix("/api".into())), None),
            vec![],
            &api,
        );
        t.add(
            &RouteHosts::hostnames(&hosts),
            http(Some(PathMatch::Prefix("/api".into())), Some(Method::GET)),
            vec![],
            &api_get,
        );
        t.add(
            &RouteHosts::hostnames(&hosts),
            http(Some(PathMatch::Prefix("/api".into())), None),
            vec![(
                HeaderName::from_static("x-v"),
                HeaderValue::from_static("2"),
            )],
            &api_hdr,
        );
        t.add(
            &RouteHosts::hostnames(&hosts),
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
            &RouteHosts::hostnames(&hosts),
            Matcher::Grpc {
                service: Some("helloworld.Greeter".into()),
                method: None,
            },
            vec![],
            &svc,
        );
        t.add(
            &RouteHosts::hostnames(&hosts),
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
        t.add(
            &RouteHosts::hostnames(&["svc:8080".to_string()]),
            any(),
            vec![],
            &port,
        );
        t.add(
            &RouteHosts::hostnames(&["svc".to_string()]),
            any(),
            vec![],
            &bare,
        );
        t.add(
            &RouteHosts::hostnames(&["*.example.com".to_string()]),
            any(),
            vec![],
            &wild,
        );
        t.add(
            &RouteHosts::hostnames(&["10.1.2.3:80".to_string()]),
            any(),
            vec![],
            &ip,
        );
        t.add(&RouteHosts::default(), any(), vec![], &all);
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

    fn cluster(namespace: Option<&str>) -> ClusterDns {
        ClusterDns {
            namespace: namespace.map(Into::into),
            domain: "cluster.local".into(),
        }
    }

    /// A table of match-everything HTTP rules, one per `(route, hosts)`.
    fn table(routes: &[(&str, RouteHosts)]) -> RouteTable {
        let mut t = RouteTable::default();
        for (name, hosts) in routes {
            t.add(hosts, http(None, None), vec![], &rule(name));
        }
        t.finish();
        t
    }

    fn route_for(t: &RouteTable, authority: &str) -> Option<String> {
        let h = HeaderMap::new();
        t.find(Some(authority), None, &view(&Method::GET, "/", &h, false))
            .map(|r| r.route.to_string())
    }

    fn parent(
        name: &'static str,
        ns: &'static str,
        port: Option<u16>,
        dns: &ClusterDns,
    ) -> RouteHosts {
        RouteHosts::new(&[], [(name, ns, port)], dns)
    }

    #[test]
    fn a_service_parent_matches_every_dns_form_of_its_port() {
        let dns = cluster(Some("shop"));
        let t = table(&[("svc", parent("greeter", "shop", Some(50051), &dns))]);
        for authority in [
            "greeter:50051",
            "greeter.shop:50051",
            "greeter.shop.svc:50051",
            "greeter.shop.svc.cluster.local:50051",
            "greeter.shop.svc.cluster.local.:50051",
            "Greeter.SHOP.svc:50051",
        ] {
            assert_eq!(
                route_for(&t, authority).as_deref(),
                Some("svc"),
                "{authority}"
            );
        }
        for authority in [
            "greeter:8080",
            "greeter.shop:8080",
            "greeter.shop.svc.cluster.local:80",
            "greeter",
            "greeter.shop",
            "greeter.other:50051",
            "greeter.shop.svc.cluster:50051",
            "greeter.shop.svc.other.local:50051",
            "greeter.shop.cluster.local:50051",
            "greeter-x.shop:50051",
            "x.greeter.shop:50051",
        ] {
            assert_eq!(route_for(&t, authority), None, "{authority}");
        }
    }

    #[test]
    fn a_service_parent_without_a_port_matches_every_port() {
        let dns = cluster(Some("shop"));
        let t = table(&[("svc", parent("greeter", "shop", None, &dns))]);
        for authority in [
            "greeter",
            "greeter:50051",
            "greeter.shop",
            "greeter.shop:8080",
            "greeter.shop.svc",
            "greeter.shop.svc.cluster.local:1",
        ] {
            assert_eq!(
                route_for(&t, authority).as_deref(),
                Some("svc"),
                "{authority}"
            );
        }
        assert_eq!(route_for(&t, "greeter.other"), None);
    }

    #[test]
    fn an_authority_without_a_port_is_port_80_for_service_parents() {
        let dns = cluster(Some("shop"));
        let t = table(&[("web", parent("web", "shop", Some(80), &dns))]);
        for authority in ["web", "web:80", "web.shop", "web.shop.svc.cluster.local:80"] {
            assert_eq!(
                route_for(&t, authority).as_deref(),
                Some("web"),
                "{authority}"
            );
        }
        assert_eq!(route_for(&t, "web:8080"), None);
        let t = table(&[("web", parent("web", "shop", Some(8080), &dns))]);
        assert_eq!(route_for(&t, "web:8080").as_deref(), Some("web"));
        assert_eq!(route_for(&t, "web"), None, "no port is 80, not 8080");
    }

    #[test]
    fn bare_service_names_match_only_from_the_services_namespace() {
        let from = |ns: Option<&str>| {
            let dns = cluster(ns);
            table(&[("svc", parent("greeter", "shop", Some(50051), &dns))])
        };
        let elsewhere = from(Some("web"));
        assert_eq!(route_for(&elsewhere, "greeter:50051"), None);
        assert_eq!(
            route_for(&elsewhere, "greeter.shop:50051").as_deref(),
            Some("svc")
        );
        let unknown = from(None);
        assert_eq!(route_for(&unknown, "greeter:50051"), None);
        assert_eq!(
            route_for(&unknown, "greeter.shop.svc:50051").as_deref(),
            Some("svc")
        );
        assert_eq!(
            route_for(&from(Some("shop")), "greeter:50051").as_deref(),
            Some("svc")
        );
    }

    #[test]
    fn a_same_named_service_of_another_namespace_does_not_match() {
        let dns = cluster(Some("shop"));
        let t = table(&[
            ("other/greeter", parent("greeter", "other", None, &dns)),
            ("shop/greeter", parent("greeter", "shop", None, &dns)),
        ]);
        assert_eq!(route_for(&t, "greeter").as_deref(), Some("shop/greeter"));
        assert_eq!(
            route_for(&t, "greeter.shop:50051").as_deref(),
            Some("shop/greeter")
        );
        assert_eq!(
            route_for(&t, "greeter.other:50051").as_deref(),
            Some("other/greeter")
        );
        assert_eq!(
            route_for(&t, "greeter.other.svc.cluster.local").as_deref(),
            Some("other/greeter")
        );
        let t = table(&[("other/greeter", parent("greeter", "other", None, &dns))]);
        assert_eq!(route_for(&t, "greeter"), None);
        assert_eq!(route_for(&t, "greeter.shop"), None);
    }

    #[test]
    fn the_cluster_domain_comes_from_the_sidecar() {
        let dns = ClusterDns {
            namespace: Some("shop".into()),
            domain: "corp.example".into(),
        };
        let t = table(&[("svc", parent("greeter", "shop", None, &dns))]);
        assert_eq!(
            route_for(&t, "greeter.shop.svc.corp.example").as_deref(),
            Some("svc")
        );
        assert_eq!(route_for(&t, "greeter.shop.svc.cluster.local"), None);
    }

    #[test]
    fn a_route_with_only_service_parents_is_not_a_catch_all() {
        let dns = cluster(Some("shop"));
        let t = table(&[
            ("all", RouteHosts::default()),
            ("svc", parent("greeter", "shop", Some(50051), &dns)),
        ]);
        assert_eq!(route_for(&t, "greeter:50051").as_deref(), Some("svc"));
        assert_eq!(route_for(&t, "elsewhere").as_deref(), Some("all"));
        assert_eq!(route_for(&t, "greeter:8080").as_deref(), Some("all"));
    }

    #[test]
    fn service_parents_and_hostnames_share_the_hostname_levels() {
        let dns = cluster(Some("shop"));
        let svc_port = || parent("greeter", "shop", Some(50051), &dns);
        let svc_any = || parent("greeter", "shop", None, &dns);
        let host = |h: &str| RouteHosts::hostnames(&[h.to_string()]);

        // A parent with a port is a `host:port` hostname: it beats `host`
        // and wildcard hostnames, whatever their rules.
        let t = table(&[
            ("a-host", host("greeter")),
            ("b-wild", host("*.svc.cluster.local")),
            ("c-svc", svc_port()),
        ]);
        assert_eq!(route_for(&t, "greeter:50051").as_deref(), Some("c-svc"));
        assert_eq!(
            route_for(&t, "greeter.shop.svc.cluster.local:50051").as_deref(),
            Some("c-svc")
        );
        assert_eq!(route_for(&t, "greeter:8080").as_deref(), Some("a-host"));
        assert_eq!(
            route_for(&t, "greeter.shop.svc.cluster.local:8080").as_deref(),
            Some("b-wild")
        );

        // A `host:port` hostname beats a parent without a port.
        let t = table(&[("a-svc", svc_any()), ("b-host", host("greeter:50051"))]);
        assert_eq!(route_for(&t, "greeter:50051").as_deref(), Some("b-host"));
        assert_eq!(route_for(&t, "greeter:8080").as_deref(), Some("a-svc"));

        // On the same level the rule precedence decides, then route order.
        let t = table(&[("a-host", host("greeter:50051")), ("b-svc", svc_port())]);
        assert_eq!(route_for(&t, "greeter:50051").as_deref(), Some("a-host"));
        let t = table(&[("a-svc", svc_port()), ("b-host", host("greeter:50051"))]);
        assert_eq!(route_for(&t, "greeter:50051").as_deref(), Some("a-svc"));

        let mut t = RouteTable::default();
        let h = HeaderMap::new();
        let (by_host, by_svc) = (rule("a-host"), rule("b-svc"));
        t.add(&host("greeter:50051"), http(None, None), vec![], &by_host);
        t.add(
            &svc_port(),
            http(Some(PathMatch::Prefix("/api".into())), None),
            vec![],
            &by_svc,
        );
        t.finish();
        let find = |path: &str| {
            t.find(
                Some("greeter:50051"),
                None,
                &view(&Method::GET, path, &h, false),
            )
            .map(|r| r.route.to_string())
        };
        assert_eq!(find("/api/x").as_deref(), Some("b-svc"), "longer prefix");
        assert_eq!(find("/other").as_deref(), Some("a-host"));
    }

    #[test]
    fn a_level_without_a_matching_rule_falls_through_to_hostnames() {
        let dns = cluster(Some("shop"));
        let mut t = RouteTable::default();
        let (by_svc, by_host) = (rule("svc"), rule("host"));
        t.add(
            &parent("greeter", "shop", Some(50051), &dns),
            Matcher::Grpc {
                service: Some("helloworld.Greeter".into()),
                method: Some("SayHello".into()),
            },
            vec![],
            &by_svc,
        );
        t.add(
            &RouteHosts::hostnames(&["greeter".to_string()]),
            Matcher::Grpc {
                service: None,
                method: None,
            },
            vec![],
            &by_host,
        );
        t.finish();
        let h = HeaderMap::new();
        let find = |path: &str| {
            t.find(
                Some("greeter:50051"),
                None,
                &view(&Method::POST, path, &h, true),
            )
            .map(|r| r.route.to_string())
        };
        assert_eq!(find("/helloworld.Greeter/SayHello").as_deref(), Some("svc"));
        assert_eq!(find("/helloworld.Greeter/Other").as_deref(), Some("host"));
    }

    #[test]
    fn service_names_and_route_hosts() {
        let dns = cluster(Some("shop"));
        assert_eq!(
            dns.service_names("greeter", "shop"),
            [
                "greeter",
                "greeter.shop",
                "greeter.shop.svc",
                "greeter.shop.svc.cluster.local",
                "greeter.shop.svc.cluster.local.",
            ]
        );
        assert_eq!(dns.service_names("greeter", "other").len(), 4);
        assert_eq!(
            dns.service_fqdn("greeter", "other"),
            "greeter.other.svc.cluster.local."
        );
        // Two parents naming the same authorities index them once.
        let hosts = RouteHosts::new(
            &[],
            [("greeter", "shop", Some(80)), ("greeter", "shop", Some(80))],
            &dns,
        );
        assert_eq!(hosts.services.len(), 5);
        assert_eq!(hosts.services_port_80.len(), 5);
        assert!(hosts.services.contains(&"greeter.shop.svc:80".to_string()));
    }

    #[test]
    fn host_port_splitting() {
        assert_eq!(split_host_port("a:80"), ("a", Some(80)));
        assert_eq!(split_host_port("a"), ("a", None));
        assert_eq!(split_host_port("[::1]:80"), ("[::1]", Some(80)));
        assert_eq!(split_host_port("[::1]"), ("[::1]", None));
    }

    #[test]
    fn a_route_added_whole_is_indexed_as_when_added_match_by_match() {
        let dns = cluster(Some("default"));
        let hostnames: Vec<String> = ["web", "*.example.com", "10.0.0.1:8080", "10.0.0.2"]
            .map(String::from)
            .into();
        let hosts = RouteHosts::new(&hostnames, [("greeter", "default", Some(80))], &dns);
        let (api, post, grpc) = (rule("api"), rule("post"), rule("grpc"));
        let canary = || {
            vec![(
                HeaderName::from_static("x-canary"),
                HeaderValue::from_static("1"),
            )]
        };
        let matches = || {
            vec![
                Entry::new(
                    http(Some(PathMatch::Prefix("/api".into())), None),
                    vec![],
                    api.clone(),
                ),
                Entry::new(http(None, Some(Method::POST)), canary(), post.clone()),
                Entry::new(
                    Matcher::Grpc {
                        service: Some("pkg.Svc".into()),
                        method: None,
                    },
                    vec![],
                    grpc.clone(),
                ),
            ]
        };
        let mut one_by_one = RouteTable::default();
        for e in matches() {
            one_by_one.add(&hosts, e.matcher, e.headers, &e.rule);
        }
        one_by_one.finish();
        let mut whole = RouteTable::default();
        whole.add_route(&hosts, matches());
        whole.finish();

        let described = |t: &RouteTable| {
            t.describe()
                .into_iter()
                .map(|(host, r)| (host, r.route.to_string()))
                .collect::<Vec<_>>()
        };
        assert_eq!(described(&whole), described(&one_by_one));
        // Three hostnames, one wildcard, five names of the Service parent.
        assert_eq!(
            described(&whole).len(),
            (3 + 1 + 5) * 3,
            "every host has every rule"
        );

        let mut with_canary = HeaderMap::new();
        with_canary.insert("x-canary", HeaderValue::from_static("1"));
        let none = HeaderMap::new();
        let cases = [
            (
                Some("web"),
                None,
                &Method::GET,
                "/api/x",
                &none,
                false,
                Some("api"),
            ),
            (
                Some("a.example.com"),
                None,
                &Method::POST,
                "/",
                &with_canary,
                false,
                Some("post"),
            ),
            (
                Some("a.example.com"),
                None,
                &Method::POST,
                "/",
                &none,
                false,
                None,
            ),
            (
                None,
                Some("10.0.0.1:8080"),
                &Method::POST,
                "/pkg.Svc/M",
                &none,
                true,
                Some("grpc"),
            ),
            (
                None,
                Some("10.0.0.2:1"),
                &Method::GET,
                "/api",
                &none,
                false,
                Some("api"),
            ),
            (
                Some("greeter"),
                None,
                &Method::GET,
                "/api",
                &none,
                false,
                Some("api"),
            ),
            (
                Some("greeter.default.svc:80"),
                None,
                &Method::GET,
                "/api",
                &none,
                false,
                Some("api"),
            ),
            (
                Some("other"),
                None,
                &Method::GET,
                "/api",
                &none,
                false,
                None,
            ),
        ];
        for (authority, dst, method, path, headers, grpc, want) in cases {
            let dst = dst.map(|d| d.parse().unwrap());
            let req = view(method, path, headers, grpc);
            let found = |t: &RouteTable| t.find(authority, dst, &req).map(|r| r.route.to_string());
            assert_eq!(
                found(&whole),
                found(&one_by_one),
                "{authority:?} {dst:?} {path}"
            );
            assert_eq!(
                found(&whole).as_deref(),
                want,
                "{authority:?} {dst:?} {path}"
            );
        }
    }

    #[test]
    fn a_route_without_hosts_is_added_to_every_authority() {
        let mut t = RouteTable::default();
        t.add_route(
            &RouteHosts::default(),
            vec![Entry::new(http(None, None), vec![], rule("all"))],
        );
        t.finish();
        assert_eq!(route_for(&t, "anything").as_deref(), Some("all"));
    }

    #[test]
    fn kept_route_series_are_the_same_series_and_only_for_backends_still_named() {
        let metrics = Metrics::new();
        let (b1, b2, b3) = (
            Backend::for_tests("b1"),
            Backend::for_tests("b2"),
            Backend::for_tests("b3"),
        );
        let faulty = || RulePolicy {
            fault_injection: Some(FaultInjection {
                delay: None,
                abort: None,
            }),
            ..RulePolicy::default()
        };
        let mut first = RouteMetrics::new("GRPCRoute/r".into(), &metrics);
        let r1 = Rule::of_route(
            0,
            vec![(1, b1.clone()), (1, b2.clone())],
            faulty(),
            &mut first,
        );
        let kept = first.into_series();

        let mut again = RouteMetrics::reusing("GRPCRoute/r".into(), &metrics, Some(&kept));
        let r2 = Rule::of_route(
            0,
            vec![(1, b2.clone()), (1, b3.clone())],
            faulty(),
            &mut again,
        );
        let plain = Rule::of_route(1, vec![(1, b3.clone())], RulePolicy::default(), &mut again);
        let counters = |r: &Rule| r.faults.as_ref().unwrap().counters.clone();
        counters(&r1).aborts.inc();
        assert_eq!(counters(&r2).aborts.get(), 1, "the same fault series");
        assert_eq!(counters(&r2).delays.get(), 0);
        assert!(plain.faults.is_none());
        let names = |s: &RouteSeries| {
            s.requests
                .iter()
                .map(|(b, _)| b.to_string())
                .collect::<Vec<_>>()
        };
        assert_eq!(
            names(&again.into_series()),
            ["b2", "b3"],
            "b1 is no longer named"
        );

        // A call recorded through the first snapshot's handle and one through
        // the second's count in one series.
        let ok = crate::telemetry::metrics::RequestStatus::Http(200);
        let ms = std::time::Duration::from_millis(1);
        r1.requests_to(&b2).unwrap().record(ok, ms);
        r2.requests_to(&b2).unwrap().record(ok, ms);
        let text = metrics.encode();
        let labels = "route=\"GRPCRoute/r\",backend=\"b2\"";
        for line in [
            format!("pylon_outbound_requests_total{{{labels},status=\"2xx\"}} 2"),
            format!("pylon_outbound_request_duration_seconds_count{{{labels}}} 2"),
        ] {
            assert!(text.lines().any(|l| l == line), "{line} in\n{text}");
        }

        // Series come into being with their first call or fault: a route
        // that injects no faults has no fault series, a backend never
        // called no request series.
        let mut other = RouteMetrics::reusing("GRPCRoute/other".into(), &metrics, None);
        assert!(other.requests.is_empty() && other.kept.is_empty());
        let quiet = Rule::of_route(0, vec![(1, b1.clone())], RulePolicy::default(), &mut other);
        assert!(quiet.faults.is_none() && quiet.requests_to(&b1).is_some());
        let text = metrics.encode();
        for absent in ["GRPCRoute/other", "backend=\"b3\""] {
            assert!(!text.contains(absent), "{absent} in\n{text}");
        }
        assert!(
            text.contains("pylon_faults_injected_total{route=\"GRPCRoute/r\",fault=\"abort\"} 1")
        );
    }
}
