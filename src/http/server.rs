//! The HTTP server every listener runs (the mesh listeners, the admin port
//! and the probe listener), and the limits of `connections.*` it keeps on
//! each connection. A connection that opens with the HTTP/2 preface is
//! served by `h2_server` (ADR 23), any other by hyper's HTTP/1 server.
//!
//! - a client must speak within `firstBytesTimeout`: a complete HTTP/1
//!   request head, or the HTTP/2 preface and a frame header; one that
//!   dribbles less (slowloris, a pre-preface stall) is closed;
//! - an HTTP/1 request head must arrive within `headerReadTimeout`;
//! - a request body may not stall longer than `bodyReadTimeout` between
//!   its frames (`super::request_body`): every request reaches the service
//!   as a [`RequestBody`], its [`super::request_body::BodyStall`] in the
//!   extensions;
//! - a connection with no request in flight for `idleTimeout` is closed
//!   gracefully (GOAWAY), as is one older than `maxAge`, whose calls still
//!   open get `maxAgeGrace` before it is closed;
//! - HTTP/2: streams per connection, resets before accept (rapid reset) and
//!   resets the server had to send (MadeYouReset) before GOAWAY, and the
//!   size of a header list; HTTP/1: the size of a request head;
//! - a peer that reads nothing the server writes for [`WRITE_STALL_LIMIT`]
//!   is cut off: neither HTTP/2 keepalive, nor the idle timeout, nor the
//!   maximum age can close such a connection, since each must write a
//!   GOAWAY first (a SETTINGS or PING flood whose answers are never read,
//!   a download nobody reads);
//! - on a drain, each connection is told to go away and finishes its calls.
//!
//! Every limit that closes a connection is counted (and logged, throttled)
//! in the listener's [`ListenerLimits`].
//!
//! Not here: accepting (the cap on open connections, TCP keepalive: the
//! listeners' accept loops), TLS.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::error::h2_error_in;
use super::h2_server::{self, Ended};
use super::prefixed::Prefixed;
use super::request_body::{CallerBody, RequestBody};
use crate::config::ConnectionSettings;
use crate::telemetry::metrics::{Limit, ListenerLimits};

/// HTTP/2 PING interval on accepted connections, to find dead callers.
const SERVER_KEEPALIVE: Duration = Duration::from_secs(30);
/// How long a write may wait for the peer to read: twice
/// [`SERVER_KEEPALIVE`], the time a silent HTTP/2 peer is given too.
pub const WRITE_STALL_LIMIT: Duration = Duration::from_secs(60);
/// The HTTP/1 read buffer is never smaller than this (hyper's minimum).
const MIN_H1_BUFFER: usize = 8192;
const H2_PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The preface and one frame header (the client's SETTINGS): an HTTP/2
/// client that sent this much has spoken.
const H2_FIRST_BYTES: usize = H2_PREFACE.len() + 9;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// One listener's HTTP server. Cheap to clone.
#[derive(Clone)]
pub struct HttpServer {
    /// HTTP/1 connections' settings (HTTP/2: `h2_server`).
    http1: Arc<http1::Builder>,
    settings: Arc<ConnectionSettings>,
    limits: ListenerLimits,
}

impl HttpServer {
    pub fn new(settings: &ConnectionSettings, limits: ListenerLimits) -> HttpServer {
        HttpServer {
            http1: Arc::new(http1_builder(settings)),
            settings: Arc::new(settings.clone()),
            limits,
        }
    }

    /// Where this listener counts the limits it hits.
    pub fn limits(&self) -> &ListenerLimits {
        &self.limits
    }

    /// Serves one connection with `service` until it ends or a limit
    /// closes it; when `drain` turns true (or its sender is gone) the
    /// connection is told to go away and finishes its calls.
    pub async fn serve<I, S, B>(
        &self,
        io: I,
        service: S,
        mut drain: Option<watch::Receiver<bool>>,
    ) -> Result<(), BoxError>
    where
        I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>> + Send + 'static,
        S::Future: Send + 'static,
        S::Error: Into<BoxError> + Send + 'static,
        B: Body<Data = Bytes> + Unpin + Send + 'static,
        B::Error: Into<BoxError>,
    {
        let settings = &*self.settings;
        let start = Instant::now();
        let activity = Arc::new(Activity::new(start));
        let mut io = FirstBytes {
            io,
            activity: activity.clone(),
            read: 0,
            stall: WriteStall::new(WRITE_STALL_LIMIT, self.limits.clone()),
        };
        let service = Tracked {
            inner: service,
            activity: activity.clone(),
            body_read_timeout: settings.body_read_timeout,
            limits: self.limits.clone(),
        };
        let first_bytes_by = start + settings.first_bytes_timeout;
        let (prefix, http2) = tokio::select! {
            sniffed = sniff(&mut io) => sniffed?,
            () = sleep_until(Some(first_bytes_by)) => {
                self.first_bytes_timeout();
                return Ok(());
            }
            () = stopped(drain.as_mut()), if drain.is_some() => return Ok(()),
        };
        let io = Prefixed::new(prefix, io);
        let shutdown = AtomicBool::new(false);
        let mut conn = if http2 {
            Conn::Http2(Box::pin(async {
                match h2_server::serve(
                    io,
                    |req| service.call_with(req),
                    settings,
                    SERVER_KEEPALIVE,
                    &shutdown,
                )
                .await
                {
                    Ok(Ended::Closed) => Ok(()),
                    Ok(Ended::KeepaliveTimeout) => {
                        tracing::debug!(
                            "closed an HTTP/2 connection whose caller answered no PING within {SERVER_KEEPALIVE:?}"
                        );
                        Ok(())
                    }
                    Err(e) => Err(BoxError::from(e)),
                }
            }))
        } else {
            Conn::Http1(Box::pin(
                self.http1.serve_connection(TokioIo::new(io), &service),
            ))
        };
        let old_at = settings.max_age.map(|age| start + age);
        // Tells the caller to go away (GOAWAY, or `connection: close` on
        // the next HTTP/1 response); the calls in flight finish.
        macro_rules! go_away {
            () => {
                match &mut conn {
                    Conn::Http1(c) => c.as_mut().graceful_shutdown(),
                    // Seen when the loop polls the connection next.
                    Conn::Http2(_) => shutdown.store(true, Ordering::Relaxed),
                }
            };
        }
        let mut going_away = false;
        let mut close_at: Option<Instant> = None;
        loop {
            let spoke = activity.spoke.load(Ordering::Acquire);
            let idle_at = match (settings.idle_timeout, activity.idle_since()) {
                (Some(timeout), Some(since)) if spoke && !going_away => Some(since + timeout),
                _ => None,
            };
            let changed = activity.changed.notified();
            tokio::select! {
                result = &mut conn => return result.inspect_err(|e| self.count_error(e)),
                () = changed => {}
                () = sleep_until(Some(first_bytes_by)), if !spoke => {
                    self.first_bytes_timeout();
                    return Ok(());
                }
                () = sleep_until(idle_at), if idle_at.is_some() => {
                    self.limits.hit(Limit::IdleTimeout, &"closing an idle connection");
                    go_away!();
                    going_away = true;
                    close_at = Some(Instant::now() + settings.max_age_grace);
                }
                () = sleep_until(old_at), if old_at.is_some() && !going_away => {
                    self.limits.hit(Limit::MaxAge, &"a connection reached its maximum age");
                    go_away!();
                    going_away = true;
                    close_at = Some(Instant::now() + settings.max_age_grace);
                }
                () = stopped(drain.as_mut()), if drain.is_some() && !going_away => {
                    go_away!();
                    going_away = true;
                }
                () = sleep_until(close_at), if close_at.is_some() => {
                    tracing::debug!("closed a connection whose calls outlasted maxAgeGrace");
                    return Ok(());
                }
            }
        }
    }

    fn first_bytes_timeout(&self) {
        self.limits.hit(
            Limit::FirstBytesTimeout,
            &format_args!(
                "closed a connection that sent no request within {:?}",
                self.settings.first_bytes_timeout
            ),
        );
    }

    /// Counts the limits an ended connection's error says it hit.
    fn count_error(&self, e: &BoxError) {
        match h2_error_in(e.as_ref()) {
            Some(h2) if h2.reason() == Some(h2::Reason::ENHANCE_YOUR_CALM) => self.limits.hit(
                Limit::Http2Resets,
                &format_args!("closed an HTTP/2 connection: {h2}"),
            ),
            Some(_) => {}
            None => {
                if e.downcast_ref::<hyper::Error>()
                    .is_some_and(hyper::Error::is_timeout)
                {
                    self.limits.hit(
                        Limit::HeaderReadTimeout,
                        &format_args!(
                            "closed an HTTP/1 connection whose request head took longer than {:?}",
                            self.settings.header_read_timeout
                        ),
                    );
                }
            }
        }
    }
}

/// The HTTP/1 settings of `settings`.
fn http1_builder(settings: &ConnectionSettings) -> http1::Builder {
    let mut b = http1::Builder::new();
    b.timer(TokioTimer::new())
        .keep_alive(true)
        .header_read_timeout(settings.header_read_timeout)
        .max_buf_size((settings.max_header_bytes as usize).max(MIN_H1_BUFFER));
    b
}

/// Reads a connection's first bytes, up to the length of the HTTP/2
/// preface: the bytes read, and whether they are the preface. (Short of
/// it, at the first byte that differs or at the end of the stream: HTTP/1,
/// whose server gets the bytes and judges them.)
async fn sniff<I: AsyncRead + Unpin>(io: &mut I) -> std::io::Result<(Bytes, bool)> {
    let mut buf = [0u8; H2_PREFACE.len()];
    let mut n = 0;
    loop {
        let read = io.read(&mut buf[n..]).await?;
        n += read;
        if read == 0 || buf[..n] != H2_PREFACE[..n] {
            return Ok((Bytes::copy_from_slice(&buf[..n]), false));
        }
        if n == buf.len() {
            return Ok((Bytes::from_static(H2_PREFACE), true));
        }
    }
}

/// A connection being served, by hyper (HTTP/1) or `h2_server`.
enum Conn<H1, H2> {
    Http1(Pin<Box<H1>>),
    Http2(Pin<Box<H2>>),
}

impl<H1, H2> Future for Conn<H1, H2>
where
    H1: Future<Output = Result<(), hyper::Error>>,
    H2: Future<Output = Result<(), BoxError>>,
{
    type Output = Result<(), BoxError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            Conn::Http1(c) => c.as_mut().poll(cx).map_err(BoxError::from),
            Conn::Http2(c) => c.as_mut().poll(cx),
        }
    }
}

/// Resolves at `at`; never when `None`.
async fn sleep_until(at: Option<Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Resolves once `drain` is true (or its sender is gone); never without one.
async fn stopped(drain: Option<&mut watch::Receiver<bool>>) {
    match drain {
        Some(rx) => {
            let _ = rx.wait_for(|stop| *stop).await;
        }
        None => std::future::pending().await,
    }
}

/// What the connection's loop watches: whether the client has spoken, and
/// whether a request is in flight (and since when none is).
struct Activity {
    spoke: AtomicBool,
    in_flight: AtomicUsize,
    /// When the last request in flight ended (or the connection began).
    idle_since: Mutex<Instant>,
    /// Woken when the client first speaks and when the connection turns
    /// busy or idle.
    changed: Notify,
}

impl Activity {
    fn new(start: Instant) -> Activity {
        Activity {
            spoke: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            idle_since: Mutex::new(start),
            changed: Notify::new(),
        }
    }

    fn spoken(&self) {
        if !self.spoke.swap(true, Ordering::AcqRel) {
            self.changed.notify_one();
        }
    }

    /// Since when no request has been in flight; `None` while one is.
    fn idle_since(&self) -> Option<Instant> {
        let since = *self
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        (self.in_flight.load(Ordering::Acquire) == 0).then_some(since)
    }

    fn begin(self: &Arc<Self>) -> InFlight {
        self.spoken();
        if self.in_flight.fetch_add(1, Ordering::AcqRel) == 0 {
            self.changed.notify_one();
        }
        InFlight(self.clone())
    }
}

/// A request in flight on its connection, until its response body ends or
/// is dropped.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let activity = &self.0;
        let mut since = activity
            .idle_since
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if activity.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            *since = Instant::now();
            activity.changed.notify_one();
        }
    }
}

/// The connection's bytes, watched until the client has sent the HTTP/2
/// preface and a frame header (an HTTP/1 client has spoken once a request
/// head reached the service); its writes under the write-stall limit.
struct FirstBytes<I> {
    io: I,
    activity: Arc<Activity>,
    /// Bytes read so far, up to [`H2_FIRST_BYTES`]; `usize::MAX` once the
    /// bytes are not an HTTP/2 preface.
    read: usize,
    stall: WriteStall,
}

/// The clock of a blocked write: it runs only while a write waits for the
/// peer to read, and cuts the connection at the limit.
struct WriteStall {
    limit: Duration,
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
    limits: ListenerLimits,
}

impl WriteStall {
    fn new(limit: Duration, limits: ListenerLimits) -> WriteStall {
        WriteStall {
            limit,
            sleep: None,
            limits,
        }
    }

    /// `polled`, or an error once the write has waited for the limit.
    fn check<T>(
        &mut self,
        polled: Poll<std::io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<std::io::Result<T>> {
        if polled.is_ready() {
            self.sleep = None;
            return polled;
        }
        let limit = self.limit;
        let sleep = self
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if sleep.as_mut().poll(cx).is_pending() {
            return Poll::Pending;
        }
        self.limits.hit(
            Limit::WriteStall,
            &format_args!("cut off a connection whose peer read nothing for {limit:?}"),
        );
        Poll::Ready(Err(std::io::Error::new(
            std::io::ErrorKind::TimedOut,
            format!("the peer read nothing for {limit:?}"),
        )))
    }
}

impl<I> FirstBytes<I> {
    fn watch(&mut self, new: &[u8]) {
        for &byte in new {
            if self.read >= H2_FIRST_BYTES {
                break;
            }
            if self.read < H2_PREFACE.len() && H2_PREFACE[self.read] != byte {
                self.read = usize::MAX;
                return;
            }
            self.read += 1;
        }
        if self.read == H2_FIRST_BYTES {
            self.activity.spoken();
        }
    }
}

impl<I: AsyncRead + Unpin> AsyncRead for FirstBytes<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let result = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.read < H2_FIRST_BYTES && matches!(result, Poll::Ready(Ok(()))) {
            this.watch(&buf.filled()[before..]);
        }
        result
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for FirstBytes<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write(cx, buf);
        this.stall.check(polled, cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_write_vectored(cx, bufs);
        this.stall.check(polled, cx)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_flush(cx);
        this.stall.check(polled, cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let polled = Pin::new(&mut this.io).poll_shutdown(cx);
        this.stall.check(polled, cx)
    }
}

/// The service, counting each request in flight until its response body
/// ends, its request body read under the body read timeout.
struct Tracked<S> {
    inner: S,
    activity: Arc<Activity>,
    body_read_timeout: Option<Duration>,
    limits: ListenerLimits,
}

impl<S, B> hyper::service::Service<Request<Incoming>> for Tracked<S>
where
    S: hyper::service::Service<Request<RequestBody>, Response = Response<B>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
{
    type Response = Response<TrackedBody<B>>;
    type Error = S::Error;
    type Future = TrackedFuture<S::Future>;

    fn call(&self, req: Request<Incoming>) -> Self::Future {
        self.call_with(req.map(CallerBody::Http1))
    }
}

impl<S> Tracked<S> {
    /// Calls the service with `req` (of either protocol), counted in
    /// flight, its body under the body read timeout.
    fn call_with<B>(&self, req: Request<CallerBody>) -> TrackedFuture<S::Future>
    where
        S: hyper::service::Service<Request<RequestBody>, Response = Response<B>>,
    {
        let in_flight = self.activity.begin();
        let (mut parts, body) = req.into_parts();
        let (body, stall) = RequestBody::new(body, self.body_read_timeout, &self.limits);
        if let Some(stall) = stall {
            parts.extensions.insert(stall);
        }
        TrackedFuture {
            in_flight: Some(in_flight),
            response: Box::pin(self.inner.call(Request::from_parts(parts, body))),
        }
    }
}

/// A request's answer on its way, counted in flight.
///
/// The service's future (a whole request's state, several KiB outbound) is
/// boxed once, where it is made: hyper keeps this small future in the
/// stream task it spawns, and nothing moves the large one again. (An
/// `async` block around it was a second copy of the same bytes, made
/// before the box: `memmove` was the top entry of the outbound profile.)
pub struct TrackedFuture<F> {
    response: Pin<Box<F>>,
    in_flight: Option<InFlight>,
}

impl<F, B, E> Future for TrackedFuture<F>
where
    F: Future<Output = Result<Response<B>, E>>,
{
    type Output = Result<Response<TrackedBody<B>>, E>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let resp = std::task::ready!(this.response.as_mut().poll(cx))?;
        Poll::Ready(Ok(resp.map(|body| TrackedBody {
            body,
            in_flight: this.in_flight.take(),
        })))
    }
}

/// A response body that holds its request's [`InFlight`] until it ends.
pub struct TrackedBody<B> {
    body: B,
    in_flight: Option<InFlight>,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        let this = self.get_mut();
        let frame = Pin::new(&mut this.body).poll_frame(cx);
        if matches!(frame, Poll::Ready(None) | Poll::Ready(Some(Err(_)))) {
            this.in_flight = None;
        }
        frame
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;

    #[tokio::test(start_paused = true)]
    async fn a_peer_that_reads_nothing_for_the_limit_is_cut_off_and_counted() {
        let metrics = Metrics::new();
        let limit = Duration::from_secs(60);
        let mut stall = WriteStall::new(limit, metrics.listener_limits("inbound"));
        let mut check = |polled: Poll<std::io::Result<usize>>| {
            let mut cx = Context::from_waker(std::task::Waker::noop());
            stall.check(polled, &mut cx)
        };
        assert!(check(Poll::Pending).is_pending());
        tokio::time::advance(limit - Duration::from_secs(1)).await;
        assert!(check(Poll::Pending).is_pending());
        // The peer read something: the clock starts again.
        assert!(matches!(check(Poll::Ready(Ok(5))), Poll::Ready(Ok(5))));
        assert!(check(Poll::Pending).is_pending());
        tokio::time::advance(limit - Duration::from_secs(1)).await;
        assert!(check(Poll::Pending).is_pending());
        tokio::time::advance(Duration::from_secs(1)).await;
        let Poll::Ready(Err(e)) = check(Poll::Pending) else {
            panic!("not cut off")
        };
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(
            metrics.encode().contains(
                "pylon_connection_limits_total{listener=\"inbound\",limit=\"write_stall\"} 1"
            ),
            "{}",
            metrics.encode()
        );
    }

    /// A connection's first-bytes watch over no I/O, reporting to `activity`.
    fn first_bytes(activity: &Arc<Activity>) -> FirstBytes<()> {
        FirstBytes {
            io: (),
            activity: activity.clone(),
            read: 0,
            stall: WriteStall::new(
                WRITE_STALL_LIMIT,
                Metrics::new().listener_limits("outbound"),
            ),
        }
    }

    #[test]
    fn the_h2_preface_and_a_frame_header_count_as_speaking() {
        let activity = Arc::new(Activity::new(Instant::now()));
        let mut io = first_bytes(&activity);
        io.watch(&H2_PREFACE[..10]);
        io.watch(&H2_PREFACE[10..]);
        assert!(!activity.spoke.load(Ordering::Acquire), "a preface alone");
        io.watch(&[0, 0, 0, 4, 0, 0, 0, 0, 0, 1]);
        assert!(activity.spoke.load(Ordering::Acquire));

        let activity = Arc::new(Activity::new(Instant::now()));
        let mut io = first_bytes(&activity);
        io.watch(b"GET / HTTP/1.1\r\nhost: a\r\n\r\n0123456789");
        assert_eq!(io.read, usize::MAX);
        assert!(
            !activity.spoke.load(Ordering::Acquire),
            "HTTP/1 speaks when a request reaches the service"
        );
    }

    #[test]
    fn a_connection_is_idle_only_with_no_request_in_flight() {
        let start = Instant::now();
        let activity = Arc::new(Activity::new(start));
        assert_eq!(activity.idle_since(), Some(start));
        let a = activity.begin();
        let b = activity.begin();
        assert!(activity.spoke.load(Ordering::Acquire));
        assert_eq!(activity.idle_since(), None);
        drop(a);
        assert_eq!(activity.idle_since(), None);
        drop(b);
        assert!(activity.idle_since().is_some_and(|t| t >= start));
    }
}
