//! A Backend as the data path sees it: its endpoints with their connection
//! pools, how to reach them, and which protocol to speak.
//!
//! A `Backend` belongs to one policy snapshot; its endpoints (and so its
//! connections) are carried over to the next snapshot when the address and
//! transport stay the same, so a reload opens no new connection.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::uri::Scheme;
use http::{Request, Response, Version};
use pylon_proto::policy::{BackendTls, Protocol};

use super::body::ProxyBody;
use super::error::ProxyError;
use super::headers::{ORIG_PROTO_HTTP1, Wire, X_PYLON_ORIG_PROTO, rewrite_for};
use super::pool::{ConnectError, Endpoint, SendError, Transport};

#[derive(Debug)]
pub struct Backend {
    /// `Backend/greeter`, for errors and the config dump.
    pub name: Arc<str>,
    pub protocol: Option<Protocol>,
    pub tls: BackendTls,
    transport: Transport,
    endpoints: Vec<Arc<Endpoint>>,
    next: AtomicUsize,
}

impl Backend {
    pub fn new(
        name: Arc<str>,
        protocol: Option<Protocol>,
        tls: BackendTls,
        transport: Transport,
        endpoints: Vec<Arc<Endpoint>>,
    ) -> Self {
        Backend {
            name,
            protocol,
            tls,
            transport,
            endpoints,
            next: AtomicUsize::new(0),
        }
    }

    pub fn transport(&self) -> &Transport {
        &self.transport
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Round robin over the endpoints.
    fn pick(&self) -> Option<&Arc<Endpoint>> {
        if self.endpoints.is_empty() {
            return None;
        }
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.endpoints.len();
        self.endpoints.get(i)
    }

    /// The wire protocol of the next hop for a caller that spoke `caller`.
    /// Mesh hops are always HTTP/2; a plaintext backend speaks its declared
    /// protocol, or the caller's when none is declared.
    fn wire(&self, caller: Version) -> Wire {
        match (&self.transport, self.protocol) {
            (Transport::Mesh(_), _) => Wire::Http2,
            (Transport::Plain, Some(Protocol::Http1)) => Wire::Http1,
            (Transport::Plain, Some(Protocol::Http2 | Protocol::Grpc)) => Wire::Http2,
            (Transport::Plain, None) if caller == Version::HTTP_2 => Wire::Http2,
            (Transport::Plain, None) => Wire::Http1,
        }
    }

    /// Sends a request (hop-by-hop fields already removed) to one endpoint.
    pub async fn forward(
        &self,
        mut req: Request<ProxyBody>,
        authority: Option<&http::uri::Authority>,
        te_trailers: bool,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(endpoint) = self.pick() else {
            return Err(ProxyError::NoEndpoint {
                backend: self.name.clone(),
            });
        };
        let caller = req.version();
        let wire = self.wire(caller);
        let scheme = match self.transport {
            Transport::Mesh(_) => {
                if caller != Version::HTTP_2 {
                    req.headers_mut()
                        .insert(X_PYLON_ORIG_PROTO, ORIG_PROTO_HTTP1);
                }
                Scheme::HTTPS
            }
            Transport::Plain => Scheme::HTTP,
        };
        rewrite_for(&mut req, wire, scheme, authority, te_trailers);
        endpoint
            .send(req, wire)
            .await
            .map_err(|e| upstream_error(&self.name, endpoint.addr(), e))
    }

    #[cfg(test)]
    pub fn for_tests(name: &str) -> Arc<Backend> {
        Arc::new(Backend::new(
            name.into(),
            None,
            BackendTls::Disabled,
            Transport::Plain,
            vec![],
        ))
    }
}

/// Names a failure at `addr` of `backend` as the caller will read it.
pub fn upstream_error(backend: &Arc<str>, addr: SocketAddr, e: SendError) -> ProxyError {
    let backend = backend.clone();
    match e {
        SendError::Http(source) => ProxyError::Upstream {
            backend,
            addr,
            source,
        },
        SendError::Connect(ConnectError::Identity(mismatch)) => ProxyError::IdentityMismatch {
            backend,
            addr,
            mismatch,
        },
        SendError::Connect(ConnectError::Timeout(timeout)) => ProxyError::ConnectTimeout {
            backend,
            addr,
            timeout,
        },
        SendError::Connect(error @ (ConnectError::Tls(_) | ConnectError::NoH2)) => {
            ProxyError::Tls {
                backend,
                addr,
                error,
            }
        }
        SendError::Connect(error) => ProxyError::Connect {
            backend,
            addr,
            error,
        },
    }
}
