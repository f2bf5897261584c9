//! Connections to one endpoint address: connect (plain TCP or mesh mTLS),
//! then reuse.
//!
//! HTTP/2 uses one multiplexed connection per endpoint, replaced when it
//! closes; concurrent callers wait for a single connect and share its
//! outcome. HTTP/1.1 keeps a bounded stack of idle connections; a connection
//! returns to it when its response body has been read to the end.
//!
//! A request that a pooled connection never took (it closed first) is sent
//! once more on a fresh connection: it never reached the server, so this is
//! always safe. Nothing else is retried here.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::h2_client::{self, Http2Connection};
use super::headers::Wire;
use super::own_socket::OwnSocket;
use super::request_body::{BodyReadTimeout, BodyStall};
use crate::identity::tls::{IdentityMismatch, find_identity_mismatch};
use crate::resilience::bulkhead::{ConnectionGuard, ConnectionLimit};

/// How long a TCP connect (plus TLS handshake) may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// Idle HTTP/1.1 connections kept per endpoint.
const H1_MAX_IDLE: usize = 64;
/// An idle HTTP/1.1 connection older than this is closed instead of reused.
const H1_IDLE_TIMEOUT: Duration = Duration::from_secs(60);

/// TCP keepalive on a plaintext upstream's connection, which gets no
/// HTTP/2 PINGs (ADR 25): the first probe after 20 s of silence, then one
/// every 10 s, and the connection is closed after 3 unanswered; a peer
/// gone silent is found within 50 s, about when a PING's deadline would
/// have found it.
fn upstream_tcp_keepalive() -> TcpKeepalive {
    TcpKeepalive::new()
        .with_time(h2_client::KEEPALIVE)
        .with_interval(Duration::from_secs(10))
        .with_retries(3)
}

/// Marks a response whose request had to wait for a new connection (TCP,
/// TLS, HTTP/2 handshake): its time to answer says little about the
/// endpoint, so the balancer leaves it out of the latency estimate.
#[derive(Clone, Copy, Debug)]
pub struct NewConnection;

/// How connections to an endpoint are made.
#[derive(Clone, Debug)]
pub enum Transport {
    Plain,
    /// mTLS; the config's verifier checks the peer's SPIFFE ID.
    Mesh(Arc<ClientConfig>),
}

impl Transport {
    /// Whether connections made for `other` serve this transport too (the
    /// same TLS config, or both plaintext).
    pub fn same_as(&self, other: &Transport) -> bool {
        match (self, other) {
            (Transport::Plain, Transport::Plain) => true,
            (Transport::Mesh(a), Transport::Mesh(b)) => Arc::ptr_eq(a, b),
            _ => false,
        }
    }
}

/// Why a connection could not be made. Cheap to clone: every caller waiting
/// on one HTTP/2 connect gets the same answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConnectError {
    #[error("connect failed: {0}")]
    Io(Arc<std::io::Error>),
    #[error("connect timed out after {0:?}")]
    Timeout(Duration),
    #[error("TLS handshake failed: {0}")]
    Tls(Arc<std::io::Error>),
    #[error("{0}")]
    Identity(IdentityMismatch),
    #[error("the peer did not negotiate HTTP/2 (ALPN h2)")]
    NoH2,
    #[error("HTTP handshake failed: {0}")]
    Handshake(Arc<dyn std::error::Error + Send + Sync>),
    #[error("the backend's maxConnections are all open")]
    Overflow,
}

/// Why a request failed at this endpoint.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    #[error(transparent)]
    Connect(ConnectError),
    #[error(transparent)]
    Http(UpstreamError),
    /// The caller's request body stalled past the body read timeout while
    /// it was being sent: the caller's fault, not the endpoint's.
    #[error(transparent)]
    RequestBody(BodyReadTimeout),
}

/// A request that failed on an open connection.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error(transparent)]
    Http1(hyper::Error),
    #[error(transparent)]
    Http2(h2::Error),
}

impl UpstreamError {
    /// The HTTP/2 error, if the failure was on an HTTP/2 connection.
    pub fn h2(&self) -> Option<&h2::Error> {
        match self {
            UpstreamError::Http2(e) => Some(e),
            UpstreamError::Http1(_) => None,
        }
    }
}

/// The connections to one endpoint address.
pub struct EndpointPool {
    addr: SocketAddr,
    transport: Transport,
    h2: ArcSwapOption<Http2Connection>,
    /// Held while an HTTP/2 connect is under way; holds the last attempt's
    /// error. `h2_attempts` counts finished attempts, so a caller that waited
    /// on one takes its outcome instead of connecting again.
    h2_connect: tokio::sync::Mutex<Option<ConnectError>>,
    h2_attempts: AtomicU64,
    h1_idle: Arc<IdleH1>,
    /// The backend-wide cap on open connections (`maxConnections`).
    limit: Arc<ConnectionLimit>,
}

impl std::fmt::Debug for EndpointPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointPool")
            .field("addr", &self.addr)
            .finish()
    }
}

impl EndpointPool {
    pub fn new(addr: SocketAddr, transport: Transport, limit: Arc<ConnectionLimit>) -> Arc<Self> {
        Arc::new(EndpointPool {
            limit,
            addr,
            transport,
            h2: ArcSwapOption::empty(),
            h2_connect: tokio::sync::Mutex::new(None),
            h2_attempts: AtomicU64::new(0),
            h1_idle: Arc::new(IdleH1::default()),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Whether this endpoint's connections can serve `addr` over `transport`
    /// (so a policy reload can keep them).
    pub fn reusable_for(&self, addr: SocketAddr, transport: &Transport) -> bool {
        self.addr == addr && self.transport.same_as(transport)
    }

    /// Number of open connections (HTTP/2 plus idle HTTP/1.1).
    pub fn open_connections(&self) -> usize {
        let h2 = self.h2.load().as_ref().is_some_and(|s| !s.is_closed());
        usize::from(h2) + self.h1_idle.len()
    }

    /// Sends `req`, already rewritten for `wire`.
    pub async fn send(
        self: &Arc<Self>,
        req: Request<ProxyBody>,
        wire: Wire,
    ) -> Result<Response<ProxyBody>, SendError> {
        let stall = req.extensions().get::<BodyStall>().cloned();
        let sent = match wire {
            Wire::Http2 => self.send_h2(req).await,
            Wire::Http1 => self.send_h1(req).await,
        };
        // hyper reports a failed request body as a reset (HTTP/2) or a
        // broken connection (HTTP/1): the stall says whose fault it was.
        match (sent, stall.as_ref().and_then(BodyStall::expired)) {
            (Err(SendError::Http(_)), Some(timeout)) => Err(SendError::RequestBody(timeout)),
            (sent, _) => sent,
        }
    }

    async fn send_h2(&self, mut req: Request<ProxyBody>) -> Result<Response<ProxyBody>, SendError> {
        let mut retried = false;
        let mut waited = false;
        loop {
            let (conn, connected) = self.h2_sender().await.map_err(SendError::Connect)?;
            waited |= connected;
            match conn.send(req).await {
                Ok(resp) => return Ok(marked(resp, waited)),
                Err(h2_client::Failed {
                    unsent: Some(unsent),
                    ..
                }) if !retried => {
                    // The connection refuses new streams (GOAWAY, or it
                    // is closing): stop handing it out.
                    self.h2.compare_and_swap(&conn, None::<Arc<_>>);
                    retried = true;
                    req = unsent;
                }
                Err(failed) => return Err(SendError::Http(UpstreamError::Http2(failed.error))),
            }
        }
    }

    /// The connection to send on, and whether this caller waited for it to
    /// be made.
    async fn h2_sender(&self) -> Result<(Arc<Http2Connection>, bool), ConnectError> {
        if let Some(s) = self.h2.load_full()
            && !s.is_closed()
        {
            return Ok((s, false));
        }
        let seen = self.h2_attempts.load(Ordering::Acquire);
        let mut last_error = self.h2_connect.lock().await;
        if let Some(s) = self.h2.load_full()
            && !s.is_closed()
        {
            // Made while we waited for the lock.
            return Ok((s, true));
        }
        if self.h2_attempts.load(Ordering::Acquire) != seen
            && let Some(e) = last_error.as_ref()
        {
            // Someone connected (and failed) while we waited: share that
            // outcome rather than queueing one connect timeout after another.
            return Err(e.clone());
        }
        // Boxed: a connect (TCP, TLS, HTTP/2 handshake) is a large future, and
        // rare; kept inline it would bloat every request's future.
        let result = Box::pin(self.connect_h2()).await;
        *last_error = result.as_ref().err().cloned();
        self.h2_attempts.fetch_add(1, Ordering::Release);
        let sender = Arc::new(result?);
        self.h2.store(Some(sender.clone()));
        Ok((sender, true))
    }

    async fn connect_h2(&self) -> Result<Http2Connection, ConnectError> {
        let (io, guard) = self.connect_io().await?;
        match io {
            // No PINGs to an app or a service outside the mesh (ADR 25): the
            // socket's TCP keepalive finds a peer gone silent instead.
            Io::Plain(tcp) => Http2Connection::handshake(tcp, guard, None).await,
            Io::Tls(tls) => {
                Http2Connection::handshake(*tls, guard, Some(h2_client::KEEPALIVE)).await
            }
        }
        .map_err(|e| ConnectError::Handshake(Arc::new(e)))
    }

    async fn send_h1(
        self: &Arc<Self>,
        mut req: Request<ProxyBody>,
    ) -> Result<Response<ProxyBody>, SendError> {
        let mut waited = false;
        loop {
            let (mut sender, reused) = match self.h1_idle.take().await {
                Some(s) => (s, true),
                None => (
                    Box::pin(self.connect_h1())
                        .await
                        .map_err(SendError::Connect)?,
                    false,
                ),
            };
            waited |= !reused;
            match sender.try_send_request(req).await {
                Ok(resp) => {
                    let (parts, body) = resp.into_parts();
                    let body = PooledBody {
                        body,
                        ret: Some((sender, self.h1_idle.clone())),
                        done: false,
                    };
                    let resp = Response::from_parts(parts, ProxyBody::Pooled(body));
                    return Ok(marked(resp, waited));
                }
                Err(mut e) => match e.take_message() {
                    // A reused connection that closed before taking the
                    // request; a fresh one is tried at most once per idle one.
                    Some(unsent) if reused => req = unsent,
                    _ => return Err(SendError::Http(UpstreamError::Http1(e.into_error()))),
                },
            }
        }
    }

    async fn connect_h1(&self) -> Result<http1::SendRequest<ProxyBody>, ConnectError> {
        let (io, guard) = self.connect_io().await?;
        let tcp = match io {
            Io::Plain(tcp) => tcp,
            // Mesh connections are HTTP/2 only (ALPN h2).
            Io::Tls(_) => return Err(ConnectError::NoH2),
        };
        let (sender, conn) = http1::Builder::new()
            .handshake(TokioIo::new(tcp))
            .await
            .map_err(|e| ConnectError::Handshake(Arc::new(e)))?;
        tokio::spawn(async move {
            let _open = guard;
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "HTTP/1.1 upstream connection ended");
            }
        });
        Ok(sender)
    }

    /// A new connection, counted against the backend's `maxConnections`
    /// for as long as the returned guard lives.
    async fn connect_io(&self) -> Result<(Io, Held), ConnectError> {
        let guard = self.limit.try_open().ok_or(ConnectError::Overflow)?;
        let connect = async {
            let tcp = TcpStream::connect(self.addr)
                .await
                .map_err(|e| ConnectError::Io(Arc::new(e)))?;
            let _ = tcp.set_nodelay(true);
            let own = OwnSocket::register(&tcp);
            let io = match &self.transport {
                Transport::Plain => {
                    let _ = SockRef::from(&tcp).set_tcp_keepalive(&upstream_tcp_keepalive());
                    Ok(Io::Plain(tcp))
                }
                Transport::Mesh(config) => {
                    // The verifier checks the SPIFFE ID; the IP only keeps
                    // SNI out of the ClientHello.
                    let name = ServerName::IpAddress(self.addr.ip().into());
                    let tls = tokio_rustls::TlsConnector::from(config.clone())
                        .connect(name, tcp)
                        .await
                        .map_err(|e| match find_identity_mismatch(&e) {
                            Some(m) => ConnectError::Identity(m.clone()),
                            None => ConnectError::Tls(Arc::new(e)),
                        })?;
                    if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                        return Err(ConnectError::NoH2);
                    }
                    Ok(Io::Tls(Box::new(tls)))
                }
            }?;
            Ok((io, own))
        };
        let (io, own) = tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| ConnectError::Timeout(CONNECT_TIMEOUT))??;
        Ok((io, (guard, own)))
    }
}

/// `resp`, marked [`NewConnection`] when its request waited for one.
fn marked(mut resp: Response<ProxyBody>, waited: bool) -> Response<ProxyBody> {
    if waited {
        resp.extensions_mut().insert(NewConnection);
    }
    resp
}

enum Io {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// What a connection holds while it is open: its place under the
/// backend's cap, and its address in the registry of the sidecar's own
/// sockets (redirect-loop detection).
type Held = (ConnectionGuard, OwnSocket);

/// Idle HTTP/1.1 connections of one endpoint, most recently used on top.
#[derive(Default)]
struct IdleH1 {
    stack: Mutex<Vec<(Instant, http1::SendRequest<ProxyBody>)>>,
}

impl IdleH1 {
    fn len(&self) -> usize {
        self.stack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    fn put(&self, sender: http1::SendRequest<ProxyBody>) {
        let mut stack = self.stack.lock().unwrap_or_else(PoisonError::into_inner);
        if stack.len() < H1_MAX_IDLE {
            stack.push((Instant::now(), sender));
        }
    }

    fn pop(&self) -> Option<(Instant, http1::SendRequest<ProxyBody>)> {
        self.stack
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
    }

    /// An idle connection ready for a request, if any is left.
    async fn take(&self) -> Option<http1::SendRequest<ProxyBody>> {
        while let Some((since, mut sender)) = self.pop() {
            if sender.is_closed() || since.elapsed() > H1_IDLE_TIMEOUT {
                continue;
            }
            if sender.ready().await.is_ok() {
                return Some(sender);
            }
        }
        None
    }
}

/// An HTTP/1.1 response body; its connection goes back to the idle stack
/// once the body has been read to the end (not if it is dropped early).
pub struct PooledBody {
    body: Incoming,
    ret: Option<(http1::SendRequest<ProxyBody>, Arc<IdleH1>)>,
    done: bool,
}

impl std::fmt::Debug for PooledBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PooledBody")
            .field("done", &self.done)
            .finish()
    }
}

impl Body for PooledBody {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.done = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

impl Drop for PooledBody {
    fn drop(&mut self) {
        if (self.done || self.body.is_end_stream())
            && let Some((sender, idle)) = self.ret.take()
        {
            idle.put(sender);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Empty};
    use hyper::service::service_fn;
    use hyper_util::rt::TokioExecutor;
    use tokio::net::TcpListener;

    use super::*;

    /// An h2c or HTTP/1.1 server answering every request with 200.
    async fn server(h2: bool) -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            loop {
                let (tcp, _) = listener.accept().await.unwrap();
                let io = TokioIo::new(tcp);
                let ok = service_fn(|_req| async {
                    Ok::<_, Infallible>(Response::new(Empty::<Bytes>::new()))
                });
                tokio::spawn(async move {
                    if h2 {
                        let builder =
                            hyper::server::conn::http2::Builder::new(TokioExecutor::new());
                        let _ = builder.serve_connection(io, ok).await;
                    } else {
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, ok)
                            .await;
                    }
                });
            }
        });
        addr
    }

    #[tokio::test(start_paused = true)]
    async fn an_app_is_never_pinged_with_a_call_open_or_not() {
        // A gRPC server's default policy takes a PING without a call open,
        // or more than one per 5 minutes, as abuse (GOAWAY
        // `too_many_pings`). (h2_client's tests show the check sees the
        // PINGs a sidecar's connection gets.)
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let pool = EndpointPool::new(addr, Transport::Plain, Arc::new(ConnectionLimit::new(None)));
        let mut req = Request::new(ProxyBody::Empty);
        *req.version_mut() = http::Version::HTTP_2;
        *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
        // Never answered: the call stays open throughout.
        let open = tokio::spawn(async move { pool.send(req, Wire::Http2).await.map(|_| ()) });
        let (server, _) = listener.accept().await.unwrap();
        let ten_minutes = Duration::from_secs(600);
        assert!(!h2_client::pinged_within(server, ten_minutes).await);
        assert!(!open.is_finished());
        open.abort();
    }

    #[tokio::test]
    async fn only_an_answer_that_waited_for_its_connection_is_marked_new() {
        for (wire, h2) in [(Wire::Http2, true), (Wire::Http1, false)] {
            let addr = server(h2).await;
            let limit = Arc::new(ConnectionLimit::new(None));
            let pool = EndpointPool::new(addr, Transport::Plain, limit);
            let mut marks = Vec::new();
            for _ in 0..2 {
                let mut req = Request::new(ProxyBody::Empty);
                if h2 {
                    *req.version_mut() = http::Version::HTTP_2;
                    *req.uri_mut() = format!("http://{addr}/").parse().unwrap();
                }
                let resp = pool.send(req, wire).await.unwrap();
                marks.push(resp.extensions().get::<NewConnection>().is_some());
                // Read to the end: an HTTP/1.1 connection goes back to the
                // pool only then.
                resp.into_body().collect().await.unwrap();
            }
            assert_eq!(marks, [true, false], "{wire:?}");
        }
    }
}
