//! Plaintext upstreams outside the policy: the local app (inbound) and a
//! redirected connection's original destination (outbound pass-through),
//! and how a failed send reads as the proxy's own answer.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};

use super::body::ProxyBody;
use super::error::ProxyError;
use super::headers::Wire;
use super::pool::{ConnectError, EndpointPool, SendError, Transport};
use crate::resilience::bulkhead::ConnectionLimit;

/// One plaintext address outside the policy: the local app (inbound) or a
/// redirected connection's original destination (outbound pass-through).
/// Its name says which in errors and spans.
pub struct PlainUpstream {
    pool: Arc<EndpointPool>,
    pub name: Arc<str>,
}

impl PlainUpstream {
    pub fn new(what: &str, addr: SocketAddr) -> PlainUpstream {
        PlainUpstream {
            pool: EndpointPool::new(addr, Transport::Plain, Arc::new(ConnectionLimit::new(None))),
            name: format!("{what} {addr}").into(),
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.pool.addr()
    }

    /// Sends `req` over `wire`; a failure is the proxy's own answer.
    pub async fn send(
        &self,
        req: Request<ProxyBody>,
        wire: Wire,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.pool
            .send(req, wire)
            .await
            .map_err(|e| upstream_error(&self.name, self.pool.addr(), e))
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
        SendError::Connect(ConnectError::Overflow) => ProxyError::Overflow {
            backend,
            what: "connections",
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
