//! The HTTP server settings every listener shares (the mesh listeners, the
//! admin port and the probe listener).

use std::time::Duration;

use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;

/// Concurrent HTTP/2 streams a caller may open on one connection.
const MAX_CONCURRENT_STREAMS: u32 = 1024;
/// Streams a caller may reset before the server accepted them, per
/// connection, before it is told to calm down (GOAWAY ENHANCE_YOUR_CALM).
/// hyper's default (20) trips on legitimate clients that cancel calls in
/// bulk when they stall; this still bounds a rapid-reset flood.
const MAX_PENDING_ACCEPT_RESETS: usize = 512;
/// HTTP/2 PING interval on accepted connections, to find dead callers.
const SERVER_KEEPALIVE: Duration = Duration::from_secs(30);

/// The HTTP server settings shared by both listeners.
pub fn builder() -> auto::Builder<TokioExecutor> {
    let mut b = auto::Builder::new(TokioExecutor::new());
    b.http1().timer(TokioTimer::new()).keep_alive(true);
    b.http2()
        .timer(TokioTimer::new())
        .adaptive_window(true)
        .max_concurrent_streams(MAX_CONCURRENT_STREAMS)
        .max_pending_accept_reset_streams(MAX_PENDING_ACCEPT_RESETS)
        .keep_alive_interval(SERVER_KEEPALIVE)
        .keep_alive_timeout(SERVER_KEEPALIVE);
    b
}
