//! Listeners and the request paths through the sidecar.
//!
//! - [`outbound`]: plaintext HTTP/1.1 and h2c from the local app, explicit or
//!   redirected by iptables; routed by policy to a backend.
//! - [`inbound`]: mTLS from mesh peers; forwarded to the local app with the
//!   caller's identity.
//!
//! Both serve HTTP/1.1 and HTTP/2 on one port (the HTTP/2 preface decides)
//! and stream bodies in both directions; nothing is buffered whole.

pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod retry;
pub mod stack;
pub mod transparent;

use std::future::Future;
use std::net::SocketAddr;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

use crate::http::listener::Acceptor;

/// Accepts connections (within `acceptor`'s cap) until `shutdown` turns
/// true, handing each to `serve` with the drain signal, which tells the
/// connection to go away; then waits up to `drain` for the open
/// connections to finish their requests.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    acceptor: Acceptor,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, watch::Receiver<bool>) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    loop {
        tokio::select! {
            (tcp, peer, open) = acceptor.accept(&listener) => {
                let serving = serve(tcp, peer, shutdown.clone());
                tokio::spawn(async move {
                    serving.await;
                    drop(open);
                });
            }
            _ = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, acceptor.all_closed())
        .await
        .is_err()
    {
        tracing::warn!(?drain, "connections still open after the drain timeout");
    }
}

/// The address a redirected connection was originally sent to
/// (`SO_ORIGINAL_DST`), or `None` when the caller dialled the listener
/// itself.
pub fn original_dst(tcp: &TcpStream) -> Option<SocketAddr> {
    let local = tcp.local_addr().ok()?;
    let sock = socket2::SockRef::from(tcp);
    let dst = if local.is_ipv4() {
        sock.original_dst_v4()
    } else {
        sock.original_dst_v6()
    };
    dst.ok()
        .and_then(|a| a.as_socket())
        .filter(|dst| *dst != local)
}

/// Resolves once `shutdown` is true (or its sender is gone).
pub async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|stop| *stop).await;
}
