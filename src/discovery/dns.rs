//! Backend hostnames resolved with hickory-resolver (A and AAAA), and
//! [`watch`], which keeps a backend's endpoint set current: re-resolved when
//! the TTL runs out, the last good set kept while DNS fails.
//!
//! Refresh timing is ours. An answer's TTL is clamped to
//! `[dns.minTtl, dns.maxTtl]`, and hickory's cache is bounded so that it
//! never answers a refresh from something older than we would accept:
//! positive answers are cached at most `maxTtl`, negative answers not at all
//! (ADR 0006).
//!
//! Not here: what an endpoint change means (the caller's `on_change`), SRV
//! records, health checks.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::config::{
    ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig, ResolverOpts,
};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError as ResponseError, NetError, NoRecords};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::Name;
use hickory_resolver::{Resolver, TokioResolver};
use pylon_proto::backoff::Backoff;

use crate::config::DnsConfig;

/// The first retry after a failed resolution; later ones double up to
/// `maxTtl`.
const FIRST_RETRY: Duration = Duration::from_secs(1);

/// A resolver for backend hostnames, shared by every watch
/// (`Arc<Dns>`), so that they share hickory's connections and cache.
#[derive(Debug)]
pub struct Dns {
    resolver: TokioResolver,
    min_ttl: Duration,
    max_ttl: Duration,
}

/// The addresses a hostname resolved to, and how long they may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// Sorted, without duplicates, never empty.
    pub addrs: Vec<SocketAddr>,
    /// The smallest record TTL, clamped to `[dns.minTtl, dns.maxTtl]`.
    pub ttl: Duration,
}

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("{hostname:?} is not a valid DNS name: {reason}")]
    InvalidName { hostname: String, reason: String },
    /// Both the A and the AAAA query answered NXDOMAIN.
    #[error("{hostname}: no addresses (no such name)")]
    NoSuchName { hostname: String },
    /// The name exists, with neither A nor AAAA records.
    #[error("{hostname}: no addresses")]
    NoAddresses { hostname: String },
    /// The name servers could not answer: timeout, SERVFAIL, REFUSED, I/O.
    #[error("{hostname}: lookup failed: {source}")]
    Lookup {
        hostname: String,
        #[source]
        source: NetError,
    },
}

impl Dns {
    /// A resolver that asks `config.nameservers` (UDP, TCP when a reply is
    /// truncated), or the system's name servers (`/etc/resolv.conf`, and
    /// `/etc/hosts`) when that list is empty. `config.searchDomains`, when
    /// given, replaces the system's search list.
    ///
    /// Reads the system configuration from disk when it is used: call it at
    /// start-up, or from `spawn_blocking`, not on a runtime worker.
    pub fn new(config: &DnsConfig) -> Result<Dns, String> {
        if config.min_ttl.is_zero() || config.min_ttl > config.max_ttl {
            return Err(format!(
                "dns: minTtl ({:?}) must be greater than zero and at most maxTtl ({:?})",
                config.min_ttl, config.max_ttl
            ));
        }
        let search = config
            .search_domains
            .iter()
            .map(|d| Name::from_utf8(d).map_err(|e| format!("dns.searchDomains: {d:?}: {e}")))
            .collect::<Result<Vec<_>, _>>()?;

        let (resolver_config, mut options) = if config.nameservers.is_empty() {
            let (system, options) = hickory_resolver::system_conf::read_system_conf()
                .map_err(|e| format!("dns: cannot read the system DNS configuration: {e}"))?;
            let system = if search.is_empty() {
                system
            } else {
                let (_domain, _search, name_servers) = system.into_parts();
                ResolverConfig::from_parts(None, search, name_servers)
            };
            (system, options)
        } else {
            let name_servers = config
                .nameservers
                .iter()
                .map(|addr| {
                    let mut udp = ConnectionConfig::udp();
                    udp.port = addr.port();
                    let mut tcp = ConnectionConfig::tcp();
                    tcp.port = addr.port();
                    NameServerConfig::new(addr.ip(), true, vec![udp, tcp])
                })
                .collect();
            let mut options = ResolverOpts::default();
            // Explicit name servers mean "ask these": no local overrides.
            options.use_hosts_file = ResolveHosts::Never;
            (
                ResolverConfig::from_parts(None, search, name_servers),
                options,
            )
        };
        // The cache must not outlive our own refresh: a positive answer is
        // kept at most maxTtl (what we would wait anyway), and a negative one
        // not at all, so that a retry after a failure really asks again.
        // Record TTLs below maxTtl are left as they are: they set our timing.
        options.positive_min_ttl = None;
        options.positive_max_ttl = Some(config.max_ttl);
        options.negative_min_ttl = None;
        options.negative_max_ttl = Some(Duration::ZERO);

        let resolver =
            Resolver::builder_with_config(resolver_config, TokioRuntimeProvider::default())
                .with_options(options)
                .build()
                .map_err(|e| format!("dns: cannot build the resolver: {e}"))?;
        Ok(Dns {
            resolver,
            min_ttl: config.min_ttl,
            max_ttl: config.max_ttl,
        })
    }

    /// Resolves `hostname` (A and AAAA, concurrently) to socket addresses
    /// on `port`. One family may be missing; a failure of either query
    /// fails the whole resolution, so that a transient error never passes
    /// for a smaller endpoint set. An IP literal resolves to itself.
    pub async fn resolve(&self, hostname: &str, port: u16) -> Result<Resolved, DnsError> {
        if let Ok(ip) = hostname.parse::<IpAddr>() {
            return Ok(Resolved {
                addrs: vec![SocketAddr::new(ip, port)],
                ttl: self.max_ttl,
            });
        }
        let name = Name::from_utf8(hostname).map_err(|e| DnsError::InvalidName {
            hostname: hostname.to_string(),
            reason: e.to_string(),
        })?;
        let (v4, v6) = tokio::join!(
            self.resolver.ipv4_lookup(name.clone()),
            self.resolver.ipv6_lookup(name)
        );

        let mut addrs = Vec::new();
        let mut min_ttl_secs: Option<u32> = None;
        let mut name_exists = false;
        for result in [v4, v6] {
            match result {
                Ok(lookup) => {
                    name_exists = true;
                    if let Some(ttl) = collect_addrs(&lookup, port, &mut addrs) {
                        min_ttl_secs = Some(min_ttl_secs.map_or(ttl, |t| t.min(ttl)));
                    }
                }
                Err(e) => match no_records(&e) {
                    Some(ResponseCode::NXDomain) => {}
                    Some(_) => name_exists = true,
                    None => {
                        return Err(DnsError::Lookup {
                            hostname: hostname.to_string(),
                            source: e,
                        });
                    }
                },
            }
        }

        let Some(ttl_secs) = min_ttl_secs else {
            let hostname = hostname.to_string();
            return Err(if name_exists {
                DnsError::NoAddresses { hostname }
            } else {
                DnsError::NoSuchName { hostname }
            });
        };
        addrs.sort_unstable();
        addrs.dedup();
        Ok(Resolved {
            addrs,
            ttl: Duration::from_secs(ttl_secs.into()).clamp(self.min_ttl, self.max_ttl),
        })
    }
}

/// Appends the lookup's addresses; returns the smallest TTL of its answer
/// records (CNAMEs included: the chain is only as fresh as its oldest link),
/// or `None` when it held no address.
fn collect_addrs(lookup: &Lookup, port: u16, addrs: &mut Vec<SocketAddr>) -> Option<u32> {
    let before = addrs.len();
    addrs.extend(
        lookup
            .answers()
            .iter()
            .filter_map(|r| r.data.ip_addr())
            .map(|ip| SocketAddr::new(ip, port)),
    );
    if addrs.len() == before {
        return None;
    }
    lookup.answers().iter().map(|r| r.ttl).min()
}

/// The response code of a "no records" answer (NXDOMAIN, or NOERROR with an
/// empty answer); `None` for every real failure.
fn no_records(e: &NetError) -> Option<ResponseCode> {
    match e {
        NetError::Dns(ResponseError::NoRecordsFound(NoRecords { response_code, .. })) => {
            Some(*response_code)
        }
        _ => None,
    }
}

/// Keeps `hostname`'s endpoint set current until the future is dropped or
/// its task aborted; the caller owns the task.
///
/// Resolves at once and calls `on_change` with the first set, then again
/// whenever a resolution yields a set different from the last one
/// delivered. Re-resolves when the (clamped) TTL runs out. A failed
/// resolution, including NXDOMAIN and an empty answer, delivers nothing: the
/// last good set stays in force, a warning is logged, and the resolution is
/// retried after an exponential backoff (1 s doubling up to `maxTtl`,
/// jittered).
pub async fn watch(
    dns: Arc<Dns>,
    hostname: String,
    port: u16,
    mut on_change: impl FnMut(Vec<SocketAddr>) + Send + 'static,
) {
    let mut last: Option<Vec<SocketAddr>> = None;
    let mut backoff = Backoff::equal_jitter(FIRST_RETRY, dns.max_ttl);
    loop {
        let wait = match dns.resolve(&hostname, port).await {
            Ok(Resolved { addrs, ttl }) => {
                backoff.reset();
                if last.as_ref() != Some(&addrs) {
                    tracing::debug!(%hostname, port, endpoints = ?addrs, ?ttl, "DNS endpoints changed");
                    on_change(addrs.clone());
                    last = Some(addrs);
                }
                ttl
            }
            Err(error) => {
                let retry_in = backoff.next_delay();
                tracing::warn!(
                    %hostname,
                    port,
                    %error,
                    ?retry_in,
                    endpoints_kept = last.as_ref().map_or(0, Vec::len),
                    "DNS resolution failed; keeping the last good endpoints"
                );
                retry_in
            }
        };
        tokio::time::sleep(wait).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::discovery::testing::TestDnsServer;
    use tokio::sync::mpsc;
    use tokio::time::timeout;

    /// How long a test waits for something that should take a second or
    /// two; only reached when the behaviour is broken.
    const PATIENCE: Duration = Duration::from_secs(20);

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    fn addrs(list: &[&str]) -> Vec<SocketAddr> {
        list.iter().map(|s| s.parse().unwrap()).collect()
    }

    async fn setup(min_ttl: u64, max_ttl: u64) -> (TestDnsServer, Arc<Dns>) {
        let server = TestDnsServer::start().await.unwrap();
        let config = DnsConfig {
            min_ttl: Duration::from_secs(min_ttl),
            max_ttl: Duration::from_secs(max_ttl),
            ..server.config()
        };
        let dns = Dns::new(&config).unwrap();
        (server, Arc::new(dns))
    }

    /// Waits until `name` has been asked about at least `n` times in all.
    async fn queried(server: &TestDnsServer, name: &str, n: usize) {
        timeout(PATIENCE, async {
            while server.queries(name) < n {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
        .unwrap_or_else(|_| panic!("{name} queried {} times, want {n}", server.queries(name)));
    }

    async fn next(rx: &mut mpsc::UnboundedReceiver<Vec<SocketAddr>>) -> Vec<SocketAddr> {
        timeout(PATIENCE, rx.recv())
            .await
            .expect("no endpoint set delivered in time")
            .expect("watch stopped")
    }

    #[tokio::test]
    async fn resolves_a_and_aaaa_sorted_and_deduplicated() {
        let (server, dns) = setup(1, 300).await;
        server.set(
            "greeter.test",
            ips(&["10.0.0.2", "fd00::1", "10.0.0.1", "10.0.0.2"]),
            30,
        );
        let r = dns.resolve("greeter.test", 8080).await.unwrap();
        assert_eq!(
            r.addrs,
            addrs(&["10.0.0.1:8080", "10.0.0.2:8080", "[fd00::1]:8080"])
        );
        assert_eq!(r.ttl, Duration::from_secs(30));
        assert!(server.queries("greeter.test") >= 2, "one A and one AAAA");

        server.set("v6.test", ips(&["fd00::2"]), 30);
        let r = dns.resolve("v6.test.", 443).await.unwrap();
        assert_eq!(r.addrs, addrs(&["[fd00::2]:443"]), "one family is enough");
    }

    #[tokio::test]
    async fn ttl_is_clamped_both_ways() {
        let (server, dns) = setup(2, 60).await;
        server.set("zero.test", ips(&["10.0.0.1"]), 0);
        server.set("day.test", ips(&["10.0.0.1"]), 86_400);
        server.set("mid.test", ips(&["10.0.0.1", "fd00::1"]), 30);
        let ttl = |name: &'static str| {
            let dns = dns.clone();
            async move { dns.resolve(name, 80).await.unwrap().ttl }
        };
        assert_eq!(ttl("zero.test").await, Duration::from_secs(2));
        assert_eq!(ttl("day.test").await, Duration::from_secs(60));
        assert_eq!(ttl("mid.test").await, Duration::from_secs(30));
    }

    #[tokio::test]
    async fn empty_unknown_and_failing_names_are_errors() {
        let (server, dns) = setup(1, 300).await;
        server.set("empty.test", Vec::new(), 30);
        server.fail("broken.test");
        let err = dns.resolve("empty.test", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::NoAddresses { .. }), "{err}");
        assert_eq!(err.to_string(), "empty.test: no addresses");
        let err = dns.resolve("unknown.test", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::NoSuchName { .. }), "{err}");
        let err = dns.resolve("broken.test", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::Lookup { .. }), "{err}");
        let err = dns.resolve("a..b", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::InvalidName { .. }), "{err}");
    }

    #[tokio::test]
    async fn ip_literals_resolve_to_themselves() {
        let (server, dns) = setup(1, 300).await;
        let r = dns.resolve("fd00::7", 15006).await.unwrap();
        assert_eq!(r.addrs, addrs(&["[fd00::7]:15006"]));
        assert_eq!(r.ttl, Duration::from_secs(300));
        assert_eq!(server.queries("fd00::7"), 0);
    }

    #[tokio::test]
    async fn search_domains_apply() {
        let server = TestDnsServer::start().await.unwrap();
        let config = DnsConfig {
            search_domains: vec!["other.test".into(), "svc.test".into()],
            ..server.config()
        };
        let dns = Dns::new(&config).unwrap();
        server.set("web.svc.test", ips(&["10.1.0.1"]), 30);
        let r = dns.resolve("web", 80).await.unwrap();
        assert_eq!(r.addrs, addrs(&["10.1.0.1:80"]));
        assert!(server.queries("web.other.test") >= 1, "tried in order");
        assert!(server.queries("web.svc.test") >= 1);

        let without = Dns::new(&server.config()).unwrap();
        let err = without.resolve("web", 80).await.unwrap_err();
        assert!(matches!(err, DnsError::NoSuchName { .. }), "{err}");
    }

    #[tokio::test]
    async fn watch_delivers_the_first_set_then_each_change() {
        let (server, dns) = setup(1, 300).await;
        server.set("api.test", ips(&["10.0.0.1"]), 1);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(watch(dns, "api.test".into(), 9000, move |set| {
            let _ = tx.send(set);
        }));

        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.1:9000"]));

        // Re-resolved after the TTL with the same answer: nothing delivered,
        // so the next delivery must be the changed set.
        let asked = server.queries("api.test");
        queried(&server, "api.test", asked + 2).await;
        server.set("api.test", ips(&["10.0.0.2", "10.0.0.1"]), 1);
        assert_eq!(
            next(&mut rx).await,
            addrs(&["10.0.0.1:9000", "10.0.0.2:9000"])
        );
        server.set("api.test", ips(&["fd00::9"]), 1);
        assert_eq!(next(&mut rx).await, addrs(&["[fd00::9]:9000"]));
        task.abort();
    }

    #[tokio::test]
    async fn watch_keeps_the_last_good_set_through_failures_and_recovers() {
        let (server, dns) = setup(1, 2).await;
        server.set("db.test", ips(&["10.0.0.1"]), 1);
        let (tx, mut rx) = mpsc::unbounded_channel();
        let task = tokio::spawn(watch(dns, "db.test".into(), 5432, move |set| {
            let _ = tx.send(set);
        }));
        assert_eq!(next(&mut rx).await, addrs(&["10.0.0.1:5432"]));

        server.fail("db.test");
        let asked = server.queries("db.test");
        queried(&server, "db.test", asked + 4).await;
        server.remove("db.test");
        let asked = server.queries("db.test");
        queried(&server, "db.test", asked + 4).await;
        server.set("db.test", Vec::new(), 1);
        let asked = server.queries("db.test");
        queried(&server, "db.test", asked + 4).await;

        // Nothing was delivered meanwhile: the next set is the recovered one.
        // (The negative answers allowed an hour of caching; a resolver that
        // honoured that would never see the name come back.)
        server.set("db.test", ips(&["10.0.0.1", "10.0.0.3"]), 1);
        assert_eq!(
            next(&mut rx).await,
            addrs(&["10.0.0.1:5432", "10.0.0.3:5432"])
        );
        assert!(rx.try_recv().is_err());
        task.abort();
    }

    #[test]
    fn new_refuses_ttl_bounds_that_cannot_be_clamped_to() {
        let config = DnsConfig {
            nameservers: vec!["127.0.0.1:53".parse().unwrap()],
            min_ttl: Duration::from_secs(10),
            max_ttl: Duration::from_secs(5),
            ..DnsConfig::default()
        };
        assert!(Dns::new(&config).is_err());
        let config = DnsConfig {
            min_ttl: Duration::ZERO,
            ..config
        };
        assert!(Dns::new(&config).is_err());
    }
}
