//! Accepting connections on one listener: a cap on the connections open
//! at once (one over it is closed at accept and counted), TCP keepalive on
//! every accepted socket, and accept errors (out of file descriptors) met
//! with a backoff of this listener alone and a throttled log, so that the
//! sidecar's other listeners keep serving.
//!
//! Not here: what a connection is served with ([`super::server`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::telemetry::metrics::{Limit, ListenerLimits};

/// The first wait after a failed accept; it doubles up to [`MAX_BACKOFF`].
const MIN_BACKOFF: Duration = Duration::from_millis(5);
const MAX_BACKOFF: Duration = Duration::from_secs(1);
/// Keepalive probes, once the first is due, go out this often (at most).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(10);

/// How one listener (and its IPv6 twin) accepts connections.
#[derive(Debug, Clone)]
pub struct Acceptor {
    open: Arc<Semaphore>,
    max_connections: u32,
    tcp_keepalive: Option<Duration>,
    limits: ListenerLimits,
}

/// A connection counted against its listener's cap until dropped.
#[derive(Debug)]
pub struct OpenConnection {
    _permit: OwnedSemaphorePermit,
}

impl Acceptor {
    pub fn new(
        max_connections: u32,
        tcp_keepalive: Option<Duration>,
        limits: ListenerLimits,
    ) -> Acceptor {
        Acceptor {
            open: Arc::new(Semaphore::new(max_connections as usize)),
            max_connections,
            tcp_keepalive,
            limits,
        }
    }

    /// The next connection within the cap. Connections over the cap are
    /// closed as they are accepted; a failed accept backs off (this
    /// listener only) before the next.
    pub async fn accept(&self, listener: &TcpListener) -> (TcpStream, SocketAddr, OpenConnection) {
        let mut backoff = MIN_BACKOFF;
        loop {
            let (tcp, peer) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    self.limits.hit(
                        Limit::AcceptError,
                        &format_args!(
                            "accepting a connection failed: {e}; backing off {backoff:?}"
                        ),
                    );
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    continue;
                }
            };
            backoff = MIN_BACKOFF;
            let Ok(permit) = self.open.clone().try_acquire_owned() else {
                self.limits.hit(
                    Limit::MaxConnections,
                    &format_args!(
                        "closed a connection from {peer}: {} connections are open, the most this listener takes",
                        self.max_connections
                    ),
                );
                drop(tcp);
                continue;
            };
            let _ = tcp.set_nodelay(true);
            if let Some(idle) = self.tcp_keepalive {
                let keepalive = TcpKeepalive::new()
                    .with_time(idle)
                    .with_interval(idle.min(KEEPALIVE_INTERVAL));
                let _ = SockRef::from(&tcp).set_tcp_keepalive(&keepalive);
            }
            return (tcp, peer, OpenConnection { _permit: permit });
        }
    }

    /// Resolves once every connection this acceptor let in has ended.
    pub async fn all_closed(&self) {
        let _ = self.open.acquire_many(self.max_connections).await;
    }

    /// Where this listener counts the limits it hits.
    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;
    use tokio::io::AsyncReadExt;

    #[tokio::test]
    async fn a_connection_over_the_cap_is_closed_and_counted() {
        let metrics = Metrics::new();
        let limits = metrics.listener_limits("outbound");
        let acceptor = Acceptor::new(1, Some(Duration::from_secs(60)), limits);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _first = TcpStream::connect(addr).await.unwrap();
        let (_tcp, _, open) = acceptor.accept(&listener).await;
        let accepting = tokio::spawn({
            let acceptor = acceptor.clone();
            async move { acceptor.accept(&listener).await }
        });
        // Over the cap: closed at accept.
        let mut second = TcpStream::connect(addr).await.unwrap();
        assert_eq!(second.read(&mut [0; 1]).await.unwrap_or(0), 0);
        // A slot frees: the next connection is taken.
        drop(open);
        let third = TcpStream::connect(addr).await.unwrap();
        let (_tcp, peer, _open) = accepting.await.unwrap();
        assert_eq!(peer, third.local_addr().unwrap());
        let text = metrics.encode();
        assert!(
            text.contains(
                "pylon_connection_limits_total{listener=\"outbound\",limit=\"max_connections\"} 1"
            ),
            "{text}"
        );
    }
}
