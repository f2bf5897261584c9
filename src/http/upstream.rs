//! Plaintext upstreams outside the policy: the local app (inbound) and a
//! redirected connection's original destination (outbound pass-through),
//! and how a failed send reads as the proxy's own answer.

use std::net::SocketAddr;
use std::sync::Arc;

use http::{Request, Response};
use prometheus_client::metrics::counter::Counter;

use super::body::ProxyBody;
use super::error::ProxyError;
use super::headers::Wire;
use super::pool::{ConnectError, EndpointPool, SendError, Transport};
use super::request_body::BodyReadTimeout;
use crate::resilience::bulkhead::ConnectionLimit;
use crate::telemetry::logging::Throttle;

/// How often a full upstream's overflow is logged at most.
const OVERFLOW_LOG_INTERVAL: std::time::Duration = std::time::Duration::from_secs(10);

/// One plaintext address outside the policy: the local app (inbound) or a
/// redirected connection's original destination (outbound pass-through).
/// Its name says which in errors and spans.
pub struct PlainUpstream {
    pool: Arc<EndpointPool>,
    pub name: Arc<str>,
    /// Counts calls refused because every allowed connection is in use.
    overflow: Option<(Counter, Throttle)>,
}

impl PlainUpstream {
    /// An upstream with no cap on its connections (a pass-through's
    /// original destination: one per redirected connection).
    pub fn new(what: &str, addr: SocketAddr) -> PlainUpstream {
        PlainUpstream {
            pool: EndpointPool::new(addr, Transport::Plain, Arc::new(ConnectionLimit::new(None))),
            name: format!("{what} {addr}").into(),
            overflow: None,
        }
    }

    /// An upstream of at most `max_connections` open connections; a call
    /// that would need one more fails fast (`overflow`) and is counted in
    /// `overflow`.
    pub fn limited(
        what: &str,
        addr: SocketAddr,
        max_connections: u32,
        overflow: Counter,
    ) -> PlainUpstream {
        PlainUpstream {
            pool: EndpointPool::new(
                addr,
                Transport::Plain,
                Arc::new(ConnectionLimit::new(Some(max_connections))),
            ),
            name: format!("{what} {addr}").into(),
            overflow: Some((overflow, Throttle::default())),
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
        self.pool.send(req, wire).await.map_err(|e| {
            if let (SendError::Connect(ConnectError::Overflow), Some((count, log))) =
                (&e, &self.overflow)
            {
                count.inc();
                if let Some(skipped) = log.permit(OVERFLOW_LOG_INTERVAL) {
                    tracing::warn!(upstream = %self.name, skipped, "a call was refused: every connection the upstream may have is in use");
                }
            }
            upstream_error(&self.name, self.pool.addr(), e)
        })
    }
}

/// Names a failure at `addr` of `backend` as the caller will read it.
pub fn upstream_error(backend: &Arc<str>, addr: SocketAddr, e: SendError) -> ProxyError {
    let backend = backend.clone();
    match e {
        SendError::RequestBody(BodyReadTimeout { timeout }) => {
            ProxyError::BodyReadTimeout { timeout }
        }
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
