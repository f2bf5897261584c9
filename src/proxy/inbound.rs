//! The inbound path: mTLS from a mesh peer to the local app.
//!
//! The TLS handshake requires a client certificate chained to the trust
//! bundle and carrying a SPIFFE ID. Each call is then authorized for that
//! ID, and admitted by the rate limit and the cap on calls in flight, in
//! that order (the local app's protection, [`InboundLimits`]); a call
//! refused by any of them never reaches the app. The app receives the ID in
//! `x-pylon-peer-identity` (any copy the caller sent is removed first). The
//! request reaches the app over the protocol the caller spoke: HTTP/2 as
//! h2c, HTTP/1.1 as HTTP/1.1 — including HTTP/1.1 that crossed the mesh
//! as HTTP/2 and says so in `x-pylon-orig-proto`.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Scheme;
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::backend::upstream_error;
use super::body::ProxyBody;
use super::error::{ProxyError, is_grpc};
use super::headers::{
    Wire, X_PYLON_ORIG_PROTO, X_PYLON_PEER_IDENTITY, request_authority, response_for_caller,
    rewrite_for, strip_hop_by_hop,
};
use super::http_server;
use super::pool::{EndpointPool, Transport};
use arc_swap::ArcSwap;
use pylon_proto::policy::RateLimit;
use tokio::time::Instant;

use super::tracked::{BodyEnd, OnEnd, TrackedBody};
use crate::authz::{Call, Caller};
use crate::identity::spiffe_id_of;
use crate::policy::InboundPolicy;
use crate::resilience::bulkhead::{Bulkhead, BulkheadPermit, ConnectionLimit};
use crate::resilience::ratelimit::RateLimiter;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::{AuthorizationMetrics, BackendMetrics, Metrics, RequestMetrics};
use crate::telemetry::request::{RequestScope, Side};
use crate::telemetry::requests::CallTimer;
use crate::telemetry::trace::TRACEPARENT;

/// How long a caller may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    tls: TlsAcceptor,
    app: Arc<EndpointPool>,
    app_name: Arc<str>,
    limits: Arc<InboundLimits>,
    telemetry: Arc<Telemetry>,
    server: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
}

/// The protection of the local app: who may call it (the
/// AuthorizationPolicies), then a rate limit and a cap on calls in flight
/// (the BackendTrafficPolicy), all targeting this workload's service
/// account. State survives policy reloads; limits change in place.
pub struct InboundLimits {
    policy: ArcSwap<InboundPolicy>,
    bulkhead: Arc<Bulkhead>,
    rate: RateLimiter,
    metrics: BackendMetrics,
    authorization: AuthorizationMetrics,
    requests: RequestMetrics,
}

const INBOUND: &str = "inbound";

impl InboundLimits {
    pub fn new(metrics: &Metrics) -> Self {
        InboundLimits {
            policy: ArcSwap::from_pointee(InboundPolicy::default()),
            bulkhead: Arc::new(Bulkhead::new(None, None)),
            rate: RateLimiter::new(RateLimit {
                requests_per_second: u32::MAX,
                burst: u32::MAX,
            }),
            metrics: metrics.backend(INBOUND),
            authorization: metrics.authorization(),
            requests: metrics.inbound_requests(),
        }
    }

    pub fn apply(&self, policy: &InboundPolicy) {
        self.bulkhead.set_limits(policy.max_parallel_requests, None);
        if let Some(limit) = policy.rate_limit {
            self.rate.set_limit(limit);
        }
        self.policy.store(Arc::new(policy.clone()));
    }

    /// Admits one call now, or says why not. The permit (when a cap is set)
    /// must live as long as the call.
    async fn admit(
        &self,
        caller: &Caller<'_>,
        call: &Call<'_>,
    ) -> Result<Option<BulkheadPermit>, ProxyError> {
        let policy = self.policy.load();
        // Before the limits: a call that may not reach the app spends none
        // of their capacity.
        let authorization = &policy.authorization;
        if !authorization.allows(caller, call) {
            self.authorization.denied.inc();
            return Err(ProxyError::Unauthorized {
                caller: caller.principal().to_string(),
                call: call.to_string(),
            });
        }
        if authorization.enforced() {
            self.authorization.allowed.inc();
        }
        let now = Instant::now();
        if policy.rate_limit.is_some()
            && let Err(retry_after) = self.rate.try_acquire(now)
        {
            self.metrics.rate_limited.inc();
            return Err(ProxyError::RateLimited {
                backend: INBOUND.into(),
                retry_after,
            });
        }
        if policy.max_parallel_requests.is_none() {
            return Ok(None);
        }
        // No waiting room: the app's protection fails fast.
        match self.bulkhead.acquire(now).await {
            Ok(permit) => Ok(Some(permit)),
            Err(_) => {
                self.metrics.overflow.inc();
                Err(ProxyError::Overflow {
                    backend: INBOUND.into(),
                    what: "parallel requests",
                })
            }
        }
    }
}

/// The verified SPIFFE ID of a connection's peer: as text for
/// authorization, and as the value of `x-pylon-peer-identity`.
struct PeerIdentity {
    id: Arc<str>,
    header: HeaderValue,
    addr: SocketAddr,
}

/// A bulkhead permit held until the response body ends.
struct HeldPermit(#[allow(dead_code)] BulkheadPermit);

impl OnEnd for HeldPermit {
    fn on_end(self: Box<Self>, _end: BodyEnd) {}
}

impl Inbound {
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        app: SocketAddr,
        limits: Arc<InboundLimits>,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        Arc::new(Inbound {
            limits,
            telemetry,
            tls: TlsAcceptor::from(tls),
            app: EndpointPool::new(app, Transport::Plain, Arc::new(ConnectionLimit::new(None))),
            app_name: format!("inbound app {app}").into(),
            server: http_server(),
        })
    }

    /// Serves one accepted connection: handshake, then HTTP until it closes.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, watcher: Watcher) {
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(tcp)).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "inbound TLS handshake refused");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, "inbound TLS handshake timed out");
                return;
            }
        };
        // The verifier already required exactly one SPIFFE ID.
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| spiffe_id_of(leaf).ok())
            .and_then(|id| {
                let header = HeaderValue::from_str(&id).ok()?;
                Some(Arc::new(PeerIdentity {
                    id: id.into(),
                    header,
                    addr: peer,
                }))
            });
        let Some(identity) = identity else {
            tracing::info!(%peer, "inbound connection without a usable peer identity");
            return;
        };
        tracing::debug!(%peer, identity = %identity.id, "inbound connection");
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let identity = identity.clone();
            async move { Ok::<_, Infallible>(this.handle(req, &identity).await) }
        });
        let conn = self.server.serve_connection(TokioIo::new(tls), svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "inbound connection ended with an error");
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        identity: &PeerIdentity,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let timer = CallTimer::start(Some(&self.limits.requests), grpc);
        let scope = RequestScope::begin(
            &self.telemetry,
            Side::Inbound,
            &mut req,
            grpc,
            Some((identity.addr, &identity.id)),
        );
        let result = timer.finish(self.forward(req, identity, grpc, &scope).await);
        scope.finish(result)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        identity: &PeerIdentity,
        grpc: bool,
        scope: &RequestScope,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let call = Call {
            grpc,
            method: req.method().as_str(),
            path: req.uri().path(),
        };
        let permit = self.limits.admit(&Caller::new(&identity.id), &call).await?;
        let authority = request_authority(&req);
        let headers = req.headers_mut();
        let te_trailers = strip_hop_by_hop(headers);
        let orig_http1 = headers
            .remove(X_PYLON_ORIG_PROTO)
            .is_some_and(|v| v.as_bytes().starts_with(b"HTTP/1"));
        // `insert` replaces every copy the caller may have sent.
        headers.insert(X_PYLON_PEER_IDENTITY, identity.header.clone());
        // The app's spans are children of this sidecar's server span.
        if let Some(traceparent) = scope.traceparent() {
            headers.insert(TRACEPARENT, traceparent);
        }
        let wire = if req.version() == Version::HTTP_2 && !orig_http1 {
            Wire::Http2
        } else {
            Wire::Http1
        };
        let mut req = req.map(ProxyBody::Incoming);
        rewrite_for(
            &mut req,
            wire,
            Scheme::HTTP,
            authority.as_ref(),
            te_trailers,
        );
        let mut resp = self
            .app
            .send(req, wire)
            .await
            .map_err(|e| upstream_error(&self.app_name, self.app.addr(), e))?;
        response_for_caller(&mut resp);
        if let Some(permit) = permit {
            let grpc = is_grpc(resp.headers());
            resp = resp.map(|body| {
                let held: Box<dyn OnEnd> = Box::new(HeldPermit(permit));
                ProxyBody::Tracked(Box::new(TrackedBody::new(
                    body,
                    None,
                    None,
                    grpc,
                    Some(held),
                )))
            });
        }
        Ok(resp)
    }
}
