//! The inbound path: mTLS from a mesh peer to the local app.
//!
//! The TLS handshake requires a client certificate chained to the trust
//! bundle and carrying a SPIFFE ID. Each call is then authorized for that
//! ID, and admitted by the rate limit and the cap on calls in flight, in
//! that order (the local app's protection, [`InboundLimits`]); a call
//! refused by any of them never reaches the app. The app receives the ID in
//! `x-pylon-peer-identity` and `x-forwarded-client-cert` (any copy the
//! caller sent is removed first, as is every other `x-pylon-*` field but
//! those the peer sidecar sets for the hop). TLS handshakes are capped in
//! number and time (`inbound.maxConcurrentHandshakes`,
//! `inbound.handshakeTimeout`), and so are the app's connections
//! (`inbound.appMaxConnections`). The
//! request reaches the app over the protocol the caller spoke: HTTP/2 as
//! h2c, HTTP/1.1 as HTTP/1.1 — including HTTP/1.1 that crossed the mesh
//! as HTTP/2 and says so in `x-pylon-orig-proto`.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use crate::http::request_body::RequestBody;
use http::uri::Authority;
use http::{Request, Response, Version};
use hyper::service::service_fn;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, watch};
use tokio_rustls::TlsAcceptor;

use super::original_dst;
use super::transparent::{Prefixed, Protocol, detect, is_tls, passthrough};
use crate::config::{InboundMode, UnderscoreAction};
use crate::http::body::ProxyBody;
use crate::http::error::{ProxyError, is_grpc};
use crate::http::headers::{
    PeerHeaders, Wire, X_PYLON_ORIG_PROTO, request_authority, sanitize_inbound, strip_hop_by_hop,
};
use crate::http::server::HttpServer;
use crate::http::upstream::PlainUpstream;

use super::observe::{CallTimer, respond};
use super::stack::{self, ToApp};
use crate::identity::spiffe_id_of;
use crate::policy::authz::Principal;
use crate::policy::inbound::InboundLimits;
use crate::telemetry::Telemetry;
use crate::telemetry::metrics::Limit;
use crate::telemetry::request_scope::{RequestScope, Side};
use crate::telemetry::trace::TRACEPARENT;
use tower::Service;

pub struct Inbound {
    tls: TlsAcceptor,
    /// The configured app (`inbound.app`), for connections not redirected.
    app: Arc<App>,
    /// The app by port, for redirected connections.
    apps: Mutex<HashMap<u16, Arc<App>>>,
    options: InboundOptions,
    limits: Arc<InboundLimits>,
    telemetry: Arc<Telemetry>,
    server: HttpServer,
    /// Turns at a TLS handshake (`inbound.maxConcurrentHandshakes`).
    handshakes: Arc<Semaphore>,
}

/// A connection's peer: its address and, over mTLS, its verified SPIFFE
/// ID (with its namespace found, for authorization) and what the app is
/// told of it; plaintext callers (permissive mode) have neither.
struct Peer {
    addr: SocketAddr,
    identity: Option<Principal>,
    /// What the app is told about a caller with an identity.
    headers: Option<PeerHeaders>,
}

/// The local app at one port.
type App = PlainUpstream;

/// The local app at `addr`, its connections capped (overflows counted with
/// the app's other protection).
fn app_at(options: &InboundOptions, limits: &InboundLimits, addr: SocketAddr) -> Arc<App> {
    Arc::new(PlainUpstream::limited(
        "inbound app",
        addr,
        options.app_max_connections,
        limits.app_connections_overflow(),
    ))
}

/// How the inbound listener treats what reaches it.
#[derive(Debug, Clone)]
pub struct InboundOptions {
    pub mode: InboundMode,
    /// Ports of the sidecar's other listeners: a connection redirected to
    /// one of them is refused (it would loop).
    pub own_ports: Vec<u16>,
    /// How long a plaintext caller may stay silent (permissive mode).
    pub detect_timeout: Duration,
    /// This workload's SPIFFE ID (the `By` of `x-forwarded-client-cert`).
    pub own_identity: String,
    /// `inbound.handshakeTimeout`, waiting for a turn included.
    pub handshake_timeout: Duration,
    /// `inbound.maxConcurrentHandshakes`.
    pub max_concurrent_handshakes: u32,
    /// `inbound.appMaxConnections`, per app port.
    pub app_max_connections: u32,
    /// `headers.withUnderscores`.
    pub underscores: UnderscoreAction,
}

impl Inbound {
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        app: SocketAddr,
        limits: Arc<InboundLimits>,
        telemetry: Arc<Telemetry>,
        options: InboundOptions,
        server: HttpServer,
    ) -> Arc<Self> {
        let app = app_at(&options, &limits, app);
        Arc::new(Inbound {
            handshakes: Arc::new(Semaphore::new(options.max_concurrent_handshakes as usize)),
            limits,
            telemetry,
            tls: TlsAcceptor::from(tls),
            app,
            apps: Mutex::new(HashMap::new()),
            options,
            server,
        })
    }

    /// The app a connection goes to: the one it was addressed to before
    /// iptables redirected it (`127.0.0.1:<original port>`), else the
    /// configured one.
    fn app_for(&self, dst: Option<SocketAddr>) -> Arc<App> {
        let Some(dst) = dst else {
            return self.app.clone();
        };
        let addr = SocketAddr::from((Ipv4Addr::LOCALHOST, dst.port()));
        if addr == self.app.addr() {
            return self.app.clone();
        }
        let mut apps = self.apps.lock().unwrap_or_else(PoisonError::into_inner);
        apps.entry(dst.port())
            .or_insert_with(|| app_at(&self.options, &self.limits, addr))
            .clone()
    }

    /// Serves one accepted connection: handshake, then HTTP until it closes.
    /// In permissive mode a plaintext caller is served too, without an
    /// identity: HTTP through the same checks, anything else passed to the
    /// app unchanged.
    pub async fn serve(
        self: Arc<Self>,
        mut tcp: TcpStream,
        peer: SocketAddr,
        drain: watch::Receiver<bool>,
    ) {
        let dst = original_dst(&tcp);
        if let Some(dst) = dst
            && self.options.own_ports.contains(&dst.port())
        {
            tracing::warn!(%peer, %dst, "refused an inbound connection redirected to one of the sidecar's own ports");
            return;
        }
        let app = self.app_for(dst);
        let mut prefix = Bytes::new();
        if self.options.mode == InboundMode::Permissive {
            let (protocol, read) = match detect(&mut tcp, self.options.detect_timeout).await {
                Ok(d) => d,
                Err(e) => {
                    tracing::debug!(%peer, error = %e, "inbound connection failed during protocol detection");
                    return;
                }
            };
            if protocol != Protocol::Opaque || !is_tls(&read) {
                return self
                    .serve_plaintext(tcp, read, protocol, peer, app, drain)
                    .await;
            }
            prefix = read;
        }
        let io = Prefixed::new(prefix, tcp);
        let Some(tls) = self.handshake(io, peer).await else {
            return;
        };
        // The verifier already required exactly one SPIFFE ID.
        let identity = tls
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|leaf| spiffe_id_of(leaf).ok());
        // `None` when the ID is no valid header value.
        let headers = identity
            .as_ref()
            .and_then(|id| PeerHeaders::new(&self.options.own_identity, id));
        let (Some(identity), Some(headers)) = (identity, headers) else {
            tracing::info!(%peer, "inbound connection without a usable peer identity");
            return;
        };
        tracing::debug!(%peer, %identity, "inbound connection");
        let peer = Arc::new(Peer {
            addr: peer,
            identity: Some(Principal::new(identity.into())),
            headers: Some(headers),
        });
        self.serve_http(tls, peer, app, drain).await;
    }

    /// The TLS handshake, once a turn among the concurrent handshakes is
    /// free; both within the handshake timeout.
    async fn handshake(
        &self,
        io: Prefixed<TcpStream>,
        peer: SocketAddr,
    ) -> Option<tokio_rustls::server::TlsStream<Prefixed<TcpStream>>> {
        let timeout = self.options.handshake_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let Ok(Ok(_turn)) =
            tokio::time::timeout_at(deadline, self.handshakes.clone().acquire_owned()).await
        else {
            self.server.limits().hit(
                Limit::Handshakes,
                &format_args!(
                    "closed a connection from {peer}: no turn among the {} concurrent TLS handshakes within {timeout:?}",
                    self.options.max_concurrent_handshakes
                ),
            );
            return None;
        };
        match tokio::time::timeout_at(deadline, self.tls.accept(io)).await {
            Ok(Ok(tls)) => Some(tls),
            Ok(Err(e)) => {
                tracing::info!(%peer, error = %e, "inbound TLS handshake refused");
                None
            }
            Err(_) => {
                self.server.limits().hit(
                    Limit::HandshakeTimeout,
                    &format_args!(
                        "closed a connection from {peer}: no TLS handshake within {timeout:?}"
                    ),
                );
                None
            }
        }
    }

    /// A plaintext caller from outside the mesh (permissive mode).
    async fn serve_plaintext(
        self: Arc<Self>,
        tcp: TcpStream,
        prefix: Bytes,
        protocol: Protocol,
        peer: SocketAddr,
        app: Arc<App>,
        drain: watch::Receiver<bool>,
    ) {
        if protocol == Protocol::Opaque {
            passthrough(tcp, prefix, app.addr()).await;
            return;
        }
        let peer = Arc::new(Peer {
            addr: peer,
            identity: None,
            headers: None,
        });
        self.serve_http(Prefixed::new(prefix, tcp), peer, app, drain)
            .await;
    }

    async fn serve_http<I>(
        self: Arc<Self>,
        io: I,
        peer: Arc<Peer>,
        app: Arc<App>,
        drain: watch::Receiver<bool>,
    ) where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let addr = peer.addr;
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let peer = peer.clone();
            let app = app.clone();
            async move { Ok::<_, Infallible>(this.handle(req, &peer, &app).await) }
        });
        if let Err(e) = self.server.serve(io, svc, Some(drain)).await {
            tracing::debug!(peer = %addr, error = %e, "inbound connection ended with an error");
        }
    }

    async fn handle(
        &self,
        mut req: Request<RequestBody>,
        peer: &Peer,
        app: &App,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let allowed = sanitize_inbound(
            req.headers_mut(),
            peer.headers.as_ref(),
            self.options.underscores,
        );
        let timer = CallTimer::start(Some(&self.limits.requests), grpc);
        let authority = request_authority(&req);
        let scope = RequestScope::begin(
            &self.telemetry,
            Side::Inbound,
            &mut req,
            grpc,
            authority.as_ref(),
            peer.identity.as_ref().map(|p| (peer.addr, p.id())),
        );
        let result = match allowed {
            Ok(()) => self.forward(req, authority, peer, app, grpc, &scope).await,
            Err(name) => Err(ProxyError::InvalidHeader {
                name: name.to_string(),
            }),
        };
        respond(scope, grpc, CallTimer::finish(timer, result))
    }

    async fn forward(
        &self,
        mut req: Request<RequestBody>,
        authority: Option<Authority>,
        peer: &Peer,
        app: &App,
        grpc: bool,
        scope: &RequestScope,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let headers = req.headers_mut();
        let te_trailers = strip_hop_by_hop(headers);
        let orig_http1 = headers
            .remove(X_PYLON_ORIG_PROTO)
            .is_some_and(|v| v.as_bytes().starts_with(b"HTTP/1"));
        // The caller's identity (or its absence) was set by
        // `sanitize_inbound` in `handle`, replacing whatever it sent.
        // The app's spans are children of this sidecar's server span.
        if let Some(traceparent) = scope.traceparent() {
            headers.insert(TRACEPARENT, traceparent);
        }
        let wire = if req.version() == Version::HTTP_2 && !orig_http1 {
            Wire::Http2
        } else {
            Wire::Http1
        };
        let to_app = ToApp {
            req: req.map(ProxyBody::Request),
            grpc,
            caller: peer.identity.as_ref(),
            authority,
            wire,
            te_trailers,
        };
        stack::inbound(&self.limits, app).call(to_app).await
    }
}
