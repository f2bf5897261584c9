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

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::{Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;

use http::uri::{Authority, Scheme};
use http::{HeaderValue, Request, Response, Version};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;
use tokio_rustls::TlsAcceptor;

use super::original_dst;
use super::transparent::{Prefixed, Protocol, detect, is_tls, passthrough};
use crate::config::InboundMode;
use crate::http::body::ProxyBody;
use crate::http::error::{ProxyError, is_grpc};
use crate::http::headers::{
    Wire, X_PYLON_ORIG_PROTO, X_PYLON_PEER_IDENTITY, request_authority, response_for_caller,
    rewrite_for, strip_hop_by_hop,
};
use crate::http::server;
use crate::http::upstream::PlainUpstream;

use super::observe::{CallTimer, Held, respond};
use crate::http::end::observe;
use crate::identity::spiffe_id_of;
use crate::policy::authz::{Caller, InboundCall};
use crate::policy::inbound::InboundLimits;
use crate::telemetry::Telemetry;
use crate::telemetry::request_scope::{RequestScope, Side};
use crate::telemetry::trace::TRACEPARENT;

/// How long a caller may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    tls: TlsAcceptor,
    /// The configured app (`inbound.app`), for connections not redirected.
    app: Arc<App>,
    /// The app by port, for redirected connections.
    apps: Mutex<HashMap<u16, Arc<App>>>,
    options: InboundOptions,
    limits: Arc<InboundLimits>,
    telemetry: Arc<Telemetry>,
    server: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
}

/// A connection's peer: its address and, over mTLS, its verified SPIFFE
/// ID (as text for authorization, and as the value of
/// `x-pylon-peer-identity`); plaintext callers (permissive mode) have none.
struct Peer {
    addr: SocketAddr,
    identity: Option<(Arc<str>, HeaderValue)>,
}

/// The local app at one port.
type App = PlainUpstream;

fn app_at(addr: SocketAddr) -> Arc<App> {
    Arc::new(PlainUpstream::new("inbound app", addr))
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
}

impl Inbound {
    pub fn new(
        tls: Arc<rustls::ServerConfig>,
        app: SocketAddr,
        limits: Arc<InboundLimits>,
        telemetry: Arc<Telemetry>,
        options: InboundOptions,
    ) -> Arc<Self> {
        Arc::new(Inbound {
            limits,
            telemetry,
            tls: TlsAcceptor::from(tls),
            app: app_at(app),
            apps: Mutex::new(HashMap::new()),
            options,
            server: server::builder(),
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
            .or_insert_with(|| app_at(addr))
            .clone()
    }

    /// Serves one accepted connection: handshake, then HTTP until it closes.
    /// In permissive mode a plaintext caller is served too, without an
    /// identity: HTTP through the same checks, anything else passed to the
    /// app unchanged.
    pub async fn serve(self: Arc<Self>, mut tcp: TcpStream, peer: SocketAddr, watcher: Watcher) {
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
                    .serve_plaintext(tcp, read, protocol, peer, app, watcher)
                    .await;
            }
            prefix = read;
        }
        let io = Prefixed::new(prefix, tcp);
        let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, self.tls.accept(io)).await {
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
                Some((Arc::<str>::from(id), header))
            });
        let Some(identity) = identity else {
            tracing::info!(%peer, "inbound connection without a usable peer identity");
            return;
        };
        tracing::debug!(%peer, identity = %identity.0, "inbound connection");
        let peer = Arc::new(Peer {
            addr: peer,
            identity: Some(identity),
        });
        self.serve_http(TokioIo::new(tls), peer, app, watcher).await;
    }

    /// A plaintext caller from outside the mesh (permissive mode).
    async fn serve_plaintext(
        self: Arc<Self>,
        tcp: TcpStream,
        prefix: Bytes,
        protocol: Protocol,
        peer: SocketAddr,
        app: Arc<App>,
        watcher: Watcher,
    ) {
        if protocol == Protocol::Opaque {
            passthrough(tcp, prefix, app.addr()).await;
            return;
        }
        let peer = Arc::new(Peer {
            addr: peer,
            identity: None,
        });
        self.serve_http(TokioIo::new(Prefixed::new(prefix, tcp)), peer, app, watcher)
            .await;
    }

    async fn serve_http<I>(self: Arc<Self>, io: I, peer: Arc<Peer>, app: Arc<App>, watcher: Watcher)
    where
        I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
    {
        let addr = peer.addr;
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let peer = peer.clone();
            let app = app.clone();
            async move { Ok::<_, Infallible>(this.handle(req, &peer, &app).await) }
        });
        let conn = self.server.serve_connection(io, svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(peer = %addr, error = %e, "inbound connection ended with an error");
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        peer: &Peer,
        app: &App,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let timer = CallTimer::start(Some(&self.limits.requests), grpc);
        let authority = request_authority(&req);
        let scope = RequestScope::begin(
            &self.telemetry,
            Side::Inbound,
            &mut req,
            grpc,
            authority.as_ref().map(Authority::as_str),
            peer.identity.as_ref().map(|(id, _)| (peer.addr, id)),
        );
        let result = self.forward(req, authority, peer, app, grpc, &scope).await;
        respond(scope, grpc, CallTimer::finish(timer, result))
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        authority: Option<Authority>,
        peer: &Peer,
        app: &App,
        grpc: bool,
        scope: &RequestScope,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let call = InboundCall {
            grpc,
            method: req.method().as_str(),
            path: req.uri().path(),
        };
        let caller = match &peer.identity {
            Some((id, _)) => Caller::new(id),
            None => Caller::unauthenticated(),
        };
        let permit = self.limits.admit(&caller, &call)?;
        let headers = req.headers_mut();
        let te_trailers = strip_hop_by_hop(headers);
        let orig_http1 = headers
            .remove(X_PYLON_ORIG_PROTO)
            .is_some_and(|v| v.as_bytes().starts_with(b"HTTP/1"));
        // `insert` replaces every copy the caller may have sent; a caller
        // without an identity gets none, whatever it sent.
        match &peer.identity {
            Some((_, header)) => {
                headers.insert(X_PYLON_PEER_IDENTITY, header.clone());
            }
            None => {
                headers.remove(X_PYLON_PEER_IDENTITY);
            }
        }
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
        let mut resp = app.send(req, wire).await?;
        response_for_caller(&mut resp);
        if let Some(permit) = permit {
            resp = observe(resp, Box::new(Held(permit)));
        }
        Ok(resp)
    }
}
