//! The inbound path: mTLS from a mesh peer to the local app.
//!
//! The TLS handshake requires a client certificate chained to the trust
//! bundle and carrying a SPIFFE ID; the app receives that ID in
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
use super::error::{ProxyError, is_grpc, respond};
use super::headers::{
    Wire, X_PYLON_ORIG_PROTO, X_PYLON_PEER_IDENTITY, request_authority, response_for_caller,
    rewrite_for, strip_hop_by_hop,
};
use super::http_server;
use super::pool::{Endpoint, Transport};
use crate::identity::spiffe_id_of;

/// How long a caller may take to complete the TLS handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

pub struct Inbound {
    tls: TlsAcceptor,
    app: Arc<Endpoint>,
    app_name: Arc<str>,
    server: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
}

impl Inbound {
    pub fn new(tls: Arc<rustls::ServerConfig>, app: SocketAddr) -> Arc<Self> {
        Arc::new(Inbound {
            tls: TlsAcceptor::from(tls),
            app: Endpoint::new(app, Transport::Plain),
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
            .and_then(|id| HeaderValue::from_str(&id).ok());
        let Some(identity) = identity else {
            tracing::info!(%peer, "inbound connection without a usable peer identity");
            return;
        };
        tracing::debug!(%peer, identity = ?identity, "inbound connection");
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            let identity = identity.clone();
            async move { Ok::<_, Infallible>(this.handle(req, identity).await) }
        });
        let conn = self.server.serve_connection(TokioIo::new(tls), svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "inbound connection ended with an error");
        }
    }

    async fn handle(&self, req: Request<Incoming>, identity: HeaderValue) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        respond(self.forward(req, identity).await, grpc)
    }

    async fn forward(
        &self,
        mut req: Request<Incoming>,
        identity: HeaderValue,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let authority = request_authority(&req);
        let headers = req.headers_mut();
        let te_trailers = strip_hop_by_hop(headers);
        let orig_http1 = headers
            .remove(X_PYLON_ORIG_PROTO)
            .is_some_and(|v| v.as_bytes().starts_with(b"HTTP/1"));
        // `insert` replaces every copy the caller may have sent.
        headers.insert(X_PYLON_PEER_IDENTITY, identity);
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
        Ok(resp)
    }
}
