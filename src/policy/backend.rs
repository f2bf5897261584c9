//! A Backend as the data path sees it: its endpoints (connections, health,
//! load), how to reach them, which protocol to speak, and the resilience
//! state that policy configures (retry budget, bulkhead, rate limit, outlier
//! detection).
//!
//! A `Backend` outlives policy snapshots: a reload that keeps a backend
//! (same namespace and name) keeps this object, so its counters, ejections,
//! permits, latency estimates and connections carry over, and its limits are
//! adjusted in place ([`Backend::apply`]). In-flight calls keep the `Arc`s
//! they hold.

use std::net::SocketAddr;
use std::sync::atomic::AtomicUsize;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::Duration;

use arc_swap::ArcSwap;
use http::uri::Scheme;
use http::{Request, Response, Version};
use pylon_proto::policy::{
    BackendTls, CircuitBreaker, LoadBalancerType, OutlierDetection, Protocol, RateLimit,
};
use tokio::time::Instant;

use super::admission::Admission;
use crate::discovery::{self, Dns};
use crate::http::body::ProxyBody;
use crate::http::error::ProxyError;
use crate::http::headers::{ORIG_PROTO_HTTP1, Wire, X_PYLON_ORIG_PROTO, rewrite_for};
use crate::http::pool::{EndpointPool, Transport};
use crate::http::upstream::upstream_error;
use crate::resilience::balancer::{self, Candidate, EndpointLoad};
use crate::resilience::budget::RetryBudget;
use crate::resilience::bulkhead::ConnectionLimit;
use crate::resilience::outlier::{EndpointHealth, Outcome, OutlierDetector};
use crate::telemetry::metrics::{BackendMetrics, Metrics};

/// One endpoint of a backend: its connections and what the balancer and the
/// outlier detector know of it.
#[derive(Debug)]
pub struct Endpoint {
    pub pool: Arc<EndpointPool>,
    pub health: EndpointHealth,
    pub load: Arc<EndpointLoad>,
}

impl Endpoint {
    pub fn addr(&self) -> SocketAddr {
        self.pool.addr()
    }
}

impl Candidate for Endpoint {
    fn load(&self) -> &EndpointLoad {
        &self.load
    }

    fn health(&self) -> &EndpointHealth {
        &self.health
    }
}

/// Where a backend's endpoints come from, with names already completed
/// (a Kubernetes Service in policy becomes its fully qualified DNS name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EndpointSource {
    Static(Vec<SocketAddr>),
    Dns { hostname: String, port: u16 },
}

/// What policy says about a backend, swapped whole on reload.
#[derive(Debug, Clone)]
pub struct BackendConfig {
    pub protocol: Option<Protocol>,
    pub tls: BackendTls,
    pub transport: Transport,
    pub load_balancer: LoadBalancerType,
    pub rate_limit: Option<RateLimit>,
    pub circuit_breaker: CircuitBreaker,
    pub outlier_detection: Option<OutlierDetection>,
    pub retry_budget: Option<pylon_proto::policy::RetryBudget>,
}

#[derive(Debug)]
pub struct Backend {
    /// `Backend/greeter`, for errors, metrics and the config dump.
    pub name: Arc<str>,
    config: ArcSwap<BackendConfig>,
    endpoints: ArcSwap<Vec<Arc<Endpoint>>>,
    pub budget: RetryBudget,
    /// The rate limit and the cap on calls in flight.
    pub admission: Admission,
    connections: Arc<ConnectionLimit>,
    outlier: OutlierDetector,
    round_robin: AtomicUsize,
    pub metrics: BackendMetrics,
    /// Background work owned by this backend (outlier sweeps), ended when
    /// the backend is dropped.
    tasks: Mutex<Vec<tokio::task::AbortHandle>>,
    /// The DNS name being watched for endpoints, and the watching task.
    dns_watch: Mutex<Option<((String, u16), tokio::task::AbortHandle)>>,
}

impl Drop for Backend {
    fn drop(&mut self) {
        for t in self
            .tasks
            .get_mut()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
        {
            t.abort();
        }
        let watch = self.dns_watch.get_mut().unwrap_or_else(|e| e.into_inner());
        if let Some((_, t)) = watch.take() {
            t.abort();
        }
    }
}

impl Backend {
    /// A backend with no endpoint yet; [`Backend::apply`] configures it.
    pub fn new(name: Arc<str>, config: BackendConfig, metrics: &Metrics) -> Arc<Backend> {
        let backend_metrics = metrics.backend(&name);
        let backend = Arc::new(Backend {
            budget: RetryBudget::new(config.retry_budget),
            admission: {
                let a = Admission::new(name.clone(), backend_metrics.clone());
                a.configure(
                    config.rate_limit,
                    config.circuit_breaker.max_parallel_requests,
                    config.circuit_breaker.max_pending_requests,
                );
                a
            },
            connections: Arc::new(ConnectionLimit::new(Some(max_connections(
                &config.circuit_breaker,
            )))),
            outlier: OutlierDetector::new(config.outlier_detection),
            round_robin: AtomicUsize::new(0),
            config: ArcSwap::from_pointee(config),
            endpoints: ArcSwap::from_pointee(Vec::new()),
            tasks: Mutex::new(Vec::new()),
            dns_watch: Mutex::new(None),
            metrics: backend_metrics,
            name,
        });
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let weak = Arc::downgrade(&backend);
            backend.own_task(runtime.spawn(sweep_outliers(weak)).abort_handle());
        }
        backend
    }

    /// Keeps `task` running while this backend lives.
    pub fn own_task(&self, task: tokio::task::AbortHandle) {
        self.tasks
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(task);
    }

    pub fn config(&self) -> Arc<BackendConfig> {
        self.config.load_full()
    }

    /// Installs new policy: limits change in place, in-flight calls keep
    /// their permits; endpoints are kept where address and transport stay.
    pub fn apply(&self, config: BackendConfig) {
        self.budget.set_budget(config.retry_budget);
        self.admission.configure(
            config.rate_limit,
            config.circuit_breaker.max_parallel_requests,
            config.circuit_breaker.max_pending_requests,
        );
        self.connections
            .set_max(Some(max_connections(&config.circuit_breaker)));
        self.outlier.configure(config.outlier_detection);
        let transport_changed = !self.config.load().transport.same_as(&config.transport);
        self.config.store(Arc::new(config));
        if transport_changed {
            let addrs: Vec<SocketAddr> = self.endpoints().iter().map(|e| e.addr()).collect();
            self.endpoints.store(Arc::new(Vec::new()));
            self.set_addresses(&addrs);
        }
    }

    /// The endpoint set becomes `addrs`; endpoints that remain keep their
    /// connections, health and load.
    pub fn set_addresses(&self, addrs: &[SocketAddr]) {
        let transport = self.config.load().transport.clone();
        let current = self.endpoints.load();
        let next: Vec<Arc<Endpoint>> = addrs
            .iter()
            .map(|&addr| {
                current
                    .iter()
                    .find(|e| e.pool.reusable_for(addr, &transport))
                    .cloned()
                    .unwrap_or_else(|| {
                        Arc::new(Endpoint {
                            pool: EndpointPool::new(
                                addr,
                                transport.clone(),
                                self.connections.clone(),
                            ),
                            health: EndpointHealth::new(),
                            load: Arc::new(EndpointLoad::new()),
                        })
                    })
            })
            .collect();
        self.endpoints.store(Arc::new(next));
    }

    /// Installs the endpoints policy names: static addresses now; a DNS
    /// name is watched (re-resolved at its TTL) by a task this backend owns,
    /// kept across reloads that name the same host and port.
    pub fn set_endpoints(self: &Arc<Self>, endpoints: &EndpointSource, dns: &Arc<Dns>) {
        let mut watch = self
            .dns_watch
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match endpoints {
            EndpointSource::Static(addrs) => {
                if let Some((_, task)) = watch.take() {
                    task.abort();
                }
                self.set_addresses(addrs);
            }
            EndpointSource::Dns { hostname, port } => {
                let target = (hostname.clone(), *port);
                if watch.as_ref().is_some_and(|(t, _)| *t == target) {
                    return;
                }
                if let Some((_, task)) = watch.take() {
                    task.abort();
                }
                let weak = Arc::downgrade(self);
                let task = tokio::spawn(discovery::watch(
                    dns.clone(),
                    hostname.clone(),
                    *port,
                    move |addrs| {
                        if let Some(backend) = weak.upgrade() {
                            tracing::info!(backend = %backend.name, endpoints = ?addrs, "endpoints resolved");
                            backend.set_addresses(&addrs);
                        }
                    },
                ));
                *watch = Some((target, task.abort_handle()));
            }
        }
    }

    pub fn endpoints(&self) -> Arc<Vec<Arc<Endpoint>>> {
        self.endpoints.load_full()
    }

    /// An endpoint for the next attempt, avoiding `tried` where possible.
    pub fn pick(&self, now: Instant, tried: &[SocketAddr]) -> Result<Arc<Endpoint>, ProxyError> {
        let endpoints = self.endpoints.load();
        if endpoints.is_empty() {
            return Err(ProxyError::NoEndpoint {
                backend: self.name.clone(),
            });
        }
        // Retries choose by least request among the endpoints not yet
        // tried, so they do not consume round-robin turns (which would skew
        // where first tries land).
        let lb = if tried.is_empty() {
            self.config.load().load_balancer
        } else {
            LoadBalancerType::LeastRequest
        };
        balancer::pick(lb, &self.round_robin, &endpoints, now, |e| {
            tried.contains(&e.addr())
        })
        .cloned()
        .ok_or_else(|| ProxyError::NoHealthyEndpoint {
            backend: self.name.clone(),
        })
    }

    /// Records how an attempt on `endpoint` went, for outlier detection.
    pub fn observe(&self, endpoint: &Endpoint, outcome: Outcome, now: Instant) {
        let endpoints = self.endpoints.load();
        let all = endpoints.iter().map(|e| &e.health);
        if self.outlier.observe(&endpoint.health, outcome, all, now) {
            self.metrics.ejections.inc();
            tracing::warn!(backend = %self.name, endpoint = %endpoint.addr(), "endpoint ejected");
        }
    }

    /// Endpoints ejected now.
    pub fn ejected(&self, now: Instant) -> usize {
        let endpoints = self.endpoints.load();
        self.outlier
            .ejected_count(endpoints.iter().map(|e| &e.health), now)
    }

    /// The wire protocol of the next hop for a caller that spoke `caller`.
    /// Mesh hops are always HTTP/2; a plaintext backend speaks its declared
    /// protocol, or the caller's when none is declared.
    fn wire(config: &BackendConfig, caller: Version) -> Wire {
        match (&config.transport, config.protocol) {
            (Transport::Mesh(_), _) => Wire::Http2,
            (Transport::Plain, Some(Protocol::Http1)) => Wire::Http1,
            (Transport::Plain, Some(Protocol::Http2 | Protocol::Grpc)) => Wire::Http2,
            (Transport::Plain, None) if caller == Version::HTTP_2 => Wire::Http2,
            (Transport::Plain, None) => Wire::Http1,
        }
    }

    /// Sends one attempt (hop-by-hop fields already removed) to `endpoint`.
    pub async fn send(
        &self,
        endpoint: &Endpoint,
        mut req: Request<ProxyBody>,
        authority: Option<&http::uri::Authority>,
        te_trailers: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let config = self.config.load();
        let caller = req.version();
        let wire = Self::wire(&config, caller);
        let scheme = match config.transport {
            Transport::Mesh(_) => {
                if caller != Version::HTTP_2 {
                    req.headers_mut()
                        .insert(X_PYLON_ORIG_PROTO, ORIG_PROTO_HTTP1);
                }
                Scheme::HTTPS
            }
            Transport::Plain => Scheme::HTTP,
        };
        drop(config);
        rewrite_for(&mut req, wire, scheme, authority, te_trailers);
        endpoint.pool.send(req, wire).await.map_err(|e| {
            let e = upstream_error(&self.name, endpoint.addr(), e);
            if matches!(e, ProxyError::Overflow { .. }) {
                self.metrics.overflow.inc();
            }
            e
        })
    }

    #[cfg(test)]
    pub fn for_tests(name: &str) -> Arc<Backend> {
        Backend::new(
            name.into(),
            BackendConfig {
                protocol: None,
                tls: BackendTls::Disabled,
                transport: Transport::Plain,
                load_balancer: LoadBalancerType::default(),
                rate_limit: None,
                circuit_breaker: CircuitBreaker::default(),
                outlier_detection: None,
                retry_budget: None,
            },
            &Metrics::new(),
        )
    }
}

/// The connections a Backend may open to its endpoints together when its
/// policy sets no `circuitBreaker.maxConnections` (Envoy's default too):
/// a flood of HTTP/1.1 calls cannot open a socket each without bound.
pub const DEFAULT_MAX_CONNECTIONS: u32 = 1024;

/// The connection cap of a backend with `circuit_breaker`.
fn max_connections(circuit_breaker: &CircuitBreaker) -> u32 {
    circuit_breaker
        .max_connections
        .unwrap_or(DEFAULT_MAX_CONNECTIONS)
}

/// How often a backend without outlier detection checks whether it got some.
const IDLE_SWEEP: Duration = Duration::from_secs(10);

/// Every `interval` of the backend's outlier detection: returns and decays.
/// Ends when the backend is gone.
async fn sweep_outliers(backend: Weak<Backend>) {
    loop {
        let interval = match backend.upgrade() {
            Some(b) => b.outlier.config().map_or(IDLE_SWEEP, |c| c.interval),
            None => return,
        };
        tokio::time::sleep(interval.max(Duration::from_millis(10))).await;
        let Some(b) = backend.upgrade() else { return };
        let now = Instant::now();
        let endpoints = b.endpoints.load();
        b.outlier.sweep(endpoints.iter().map(|e| &e.health), now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_are_capped_by_default_and_by_policy() {
        assert_eq!(
            max_connections(&CircuitBreaker::default()),
            DEFAULT_MAX_CONNECTIONS
        );
        let set = CircuitBreaker {
            max_connections: Some(3),
            ..CircuitBreaker::default()
        };
        assert_eq!(max_connections(&set), 3);
    }
}
