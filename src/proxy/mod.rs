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

use hyper_util::server::graceful::{GracefulShutdown, Watcher};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;

/// Accepts connections until `shutdown` turns true, handing each to
/// `serve` with a graceful-shutdown watcher; then waits up to `drain` for
/// the open connections to finish their requests.
pub async fn accept_loop<F, Fut>(
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
    drain: Duration,
    serve: F,
) where
    F: Fn(TcpStream, SocketAddr, Watcher) -> Fut + Send + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let graceful = GracefulShutdown::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((tcp, peer)) => {
                    let _ = tcp.set_nodelay(true);
                    tokio::spawn(serve(tcp, peer, graceful.watcher()));
                }
                Err(e) => {
                    // Out of descriptors and the like: back off briefly
                    // rather than spin; the listener itself stays open.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = stopped(&mut shutdown) => break,
        }
    }
    drop(listener);
    if tokio::time::timeout(drain, graceful.shutdown())
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
