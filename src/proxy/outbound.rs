//! The outbound path: a request from the local app, routed by policy.
//!
//! The route comes from the request's authority, or from the original
//! destination when iptables redirected the connection and the authority
//! names no route. One `ArcSwap` load per request; the chosen backend's
//! `Arc` keeps its snapshot's state alive until the request is done.

use std::convert::Infallible;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock};

use crate::http::request_body::RequestBody;
use http::uri::Authority;
use http::{Request, Response};
use hyper::service::service_fn;
use tokio::net::TcpStream;
use tokio::sync::watch;
use tower::Service;

use bytes::Bytes;
use http::Version;
use http::uri::Scheme;

use super::observe::{CallTimer, respond};
use super::original_dst;
use super::stack::{self, Call, CallCtx};
use super::transparent::{Prefixed, Protocol, detect, passthrough};
use crate::config::{UnderscoreAction, Unmatched};
use crate::http::body::ProxyBody;
use crate::http::error::{ProxyError, is_grpc};
use crate::http::headers::{
    Wire, request_authority, response_for_caller, rewrite_for, sanitize_outbound, strip_hop_by_hop,
};
use crate::http::own_socket::OwnSocket;
use crate::http::server::HttpServer;
use crate::http::upstream::PlainUpstream;
use crate::policy::PolicyStore;
use crate::policy::routing::RequestView;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::ConnectionMetrics;
use crate::telemetry::request_scope::{RequestScope, Side};

pub struct Outbound {
    policy: Arc<PolicyStore>,
    retry_buffer_bytes: usize,
    telemetry: Arc<Telemetry>,
    transparent: TransparentConfig,
    passthrough_connections: ConnectionMetrics,
    server: HttpServer,
    underscores: UnderscoreAction,
}

/// How redirected connections are treated.
#[derive(Debug, Clone)]
pub struct TransparentConfig {
    pub unmatched: Unmatched,
    pub detect_timeout: std::time::Duration,
    pub server_first_ports: Vec<u16>,
    /// The sidecar's own listeners: a connection redirected to one of
    /// them would loop.
    pub own_listeners: Vec<SocketAddr>,
    /// This pod's addresses (the pod IP, when known), on which listeners
    /// bound to all addresses are reached.
    pub local_ips: Vec<IpAddr>,
}

impl TransparentConfig {
    /// Whether `dst` is one of the sidecar's own listeners: its port, on
    /// the listener's address, on loopback, or on this pod's address when
    /// the listener takes every address. (Another host's port 15006 is
    /// not ours.)
    pub fn is_own_listener(&self, dst: SocketAddr) -> bool {
        let ip = dst.ip();
        self.own_listeners.iter().any(|l| {
            l.port() == dst.port()
                && (l.ip() == ip
                    || ip.is_loopback()
                    || (l.ip().is_unspecified() && self.local_ips.contains(&ip)))
        })
    }
}

/// The unrouted requests of one redirected connection go to its original
/// destination over a connection of their own, made at the first such
/// request (most connections never have one).
struct Passthrough {
    dst: SocketAddr,
    upstream: OnceLock<PlainUpstream>,
}

impl Passthrough {
    fn upstream(&self) -> &PlainUpstream {
        self.upstream
            .get_or_init(|| PlainUpstream::new("passthrough", self.dst))
    }
}

impl Outbound {
    pub fn new(
        policy: Arc<PolicyStore>,
        retry_buffer_bytes: usize,
        telemetry: Arc<Telemetry>,
        transparent: TransparentConfig,
        server: HttpServer,
        underscores: UnderscoreAction,
    ) -> Arc<Self> {
        let passthrough_connections = policy.metrics().connections("passthrough");
        Arc::new(Outbound {
            policy,
            retry_buffer_bytes,
            telemetry,
            transparent,
            passthrough_connections,
            server,
            underscores,
        })
    }

    /// Serves one accepted connection until it closes. A connection that
    /// iptables redirected is detected first: HTTP is served (and routed);
    /// anything else goes to its original destination unchanged.
    pub async fn serve(
        self: Arc<Self>,
        mut tcp: TcpStream,
        peer: SocketAddr,
        drain: watch::Receiver<bool>,
    ) {
        let dst = original_dst(&tcp);
        let mut prefix = Bytes::new();
        if let Some(dst) = dst {
            if OwnSocket::is_own(peer) || self.transparent.is_own_listener(dst) {
                tracing::warn!(
                    %peer, %dst,
                    "refused a redirect loop: the sidecar's own traffic came back to it (is the proxy's UID excluded from interception?)"
                );
                return;
            }
            let protocol = if self.transparent.server_first_ports.contains(&dst.port()) {
                Protocol::Opaque
            } else {
                match detect(&mut tcp, self.transparent.detect_timeout).await {
                    Ok((protocol, read)) => {
                        prefix = read;
                        protocol
                    }
                    Err(e) => {
                        tracing::debug!(%peer, %dst, error = %e, "outbound connection failed during protocol detection");
                        return;
                    }
                }
            };
            if protocol == Protocol::Opaque {
                let _open = self.passthrough_connections.open();
                passthrough(tcp, prefix, dst).await;
                return;
            }
        }
        let this = self.clone();
        let passthrough = match (dst, self.transparent.unmatched) {
            (Some(dst), Unmatched::Passthrough) => Some(Arc::new(Passthrough {
                dst,
                upstream: OnceLock::new(),
            })),
            _ => None,
        };
        let svc = service_fn(move |req| {
            let this = this.clone();
            let passthrough = passthrough.clone();
            async move { Ok::<_, Infallible>(this.handle(req, dst, passthrough.as_deref()).await) }
        });
        let io = Prefixed::new(prefix, tcp);
        if let Err(e) = self.server.serve(io, svc, Some(drain)).await {
            tracing::debug!(%peer, error = %e, "outbound connection ended with an error");
        }
    }

    async fn handle(
        &self,
        mut req: Request<RequestBody>,
        dst: Option<SocketAddr>,
        passthrough: Option<&Passthrough>,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let allowed = sanitize_outbound(req.headers_mut(), self.underscores);
        let authority = request_authority(&req)
            .or_else(|| dst.and_then(|d| Authority::try_from(d.to_string()).ok()));
        let mut scope = RequestScope::begin(
            &self.telemetry,
            Side::Outbound,
            &mut req,
            grpc,
            authority.as_ref(),
            None,
        );
        let result = match allowed {
            Ok(()) => {
                self.route(req, authority, grpc, dst, passthrough, &mut scope)
                    .await
            }
            Err(name) => Err(ProxyError::InvalidHeader {
                name: name.to_string(),
            }),
        };
        respond(scope, grpc, result)
    }

    async fn route(
        &self,
        mut req: Request<RequestBody>,
        authority: Option<Authority>,
        grpc: bool,
        dst: Option<SocketAddr>,
        passthrough: Option<&Passthrough>,
        scope: &mut RequestScope,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let (rule, backend) = {
            let snapshot = self.policy.load();
            let view = RequestView {
                method: req.method(),
                path: req.uri().path(),
                headers: req.headers(),
                grpc,
            };
            let found = snapshot
                .routes
                .find(authority.as_ref().map(Authority::as_str), dst, &view);
            let rule = match (found, passthrough) {
                (Some(rule), _) => rule,
                (None, Some(p)) => {
                    drop(snapshot);
                    // Boxed: rare, and inline it would grow every
                    // request's future.
                    return Box::pin(pass_through(req, authority.as_ref(), p, scope)).await;
                }
                (None, None) => {
                    return Err(ProxyError::NoRoute {
                        authority: authority
                            .as_ref()
                            .map_or_else(String::new, ToString::to_string),
                        path: req.uri().path().to_string(),
                    });
                }
            };
            let backend = rule
                .pick_backend()
                .cloned()
                .ok_or_else(|| ProxyError::NoBackend {
                    route: rule.route.clone(),
                })?;
            (rule.clone(), backend)
        };
        scope.set_backend(&backend.name);
        let te_trailers = strip_hop_by_hop(req.headers_mut());
        let call = Call {
            req: req.map(ProxyBody::Request),
            ctx: CallCtx {
                grpc,
                authority,
                te_trailers,
                replay_limit: self.retry_buffer_bytes,
                deadline: None,
                trace: scope.attempt_trace(),
            },
        };
        let timer = CallTimer::start(rule.requests_to(&backend), grpc);
        // The stack's future (~2.5 KB) boxed where it is made: inline, it
        // made this future and the request's twice as large, and each is
        // copied whole as it is made and moved into its parent.
        let Ok(called) = Box::pin(stack::outbound(&rule, &backend).call(call)).await;
        scope.set_attempts(called.summary.attempts, called.summary.endpoint);
        let mut resp = CallTimer::finish(timer, called.result)?;
        response_for_caller(&mut resp);
        Ok(resp)
    }
}

/// An HTTP request no route matches, on a redirected connection: sent on
/// unchanged to the connection's original destination, over the protocol
/// the app spoke.
async fn pass_through(
    mut req: Request<RequestBody>,
    authority: Option<&Authority>,
    p: &Passthrough,
    scope: &mut RequestScope,
) -> Result<Response<ProxyBody>, ProxyError> {
    let upstream = p.upstream();
    scope.set_backend(&upstream.name);
    let te_trailers = strip_hop_by_hop(req.headers_mut());
    let wire = if req.version() == Version::HTTP_2 {
        Wire::Http2
    } else {
        Wire::Http1
    };
    let mut req = req.map(ProxyBody::Request);
    rewrite_for(&mut req, wire, Scheme::HTTP, authority, te_trailers);
    let mut resp = upstream.send(req, wire).await?;
    response_for_caller(&mut resp);
    Ok(resp)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_this_pods_listeners_count_as_its_own() {
        let config = TransparentConfig {
            unmatched: Unmatched::Passthrough,
            detect_timeout: std::time::Duration::from_secs(1),
            server_first_ports: Vec::new(),
            own_listeners: vec![
                "127.0.0.1:15001".parse().unwrap(),
                "0.0.0.0:15006".parse().unwrap(),
            ],
            local_ips: vec!["198.18.0.10".parse().unwrap()],
        };
        let own = |a: &str| config.is_own_listener(a.parse().unwrap());
        assert!(own("127.0.0.1:15001"));
        assert!(own("127.0.0.2:15001"));
        assert!(own("127.0.0.1:15006"));
        assert!(own("198.18.0.10:15006"));
        // Another pod's inbound port, and this pod's other ports.
        assert!(!own("198.18.0.11:15006"));
        assert!(!own("198.18.0.10:15001"));
        assert!(!own("198.18.0.10:8080"));
    }
}
