//! HTTP/2 from callers on `h2` directly (ADR 23): what `server` runs for a
//! connection that opened with the HTTP/2 preface.
//!
//! The connection's task accepts streams and calls the service for each
//! (its future is small: the service boxes what it does); each stream gets
//! a task that waits for the answer, sends its head, and feeds its body to
//! the stream as the caller's flow control allows. A caller that resets
//! its stream before the answer drops the call, and with it whatever the
//! call was waiting for upstream.
//!
//! (hyper's server did the same with more on the way: a `content-length`
//! parse of every request, a lock per frame for its keepalive and window
//! probing, eleven hashed removes of connection fields from every response
//! head, a wrapper around every request body.)
//!
//! What goes out must be fit for HTTP/2 already: the proxy strips
//! hop-by-hop fields from what it forwards (`headers::response_for_caller`)
//! and makes none itself. `h2` refuses a head that still has one; that
//! stream is reset with INTERNAL_ERROR.

use std::cell::RefCell;
use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use h2::Reason;
use h2::server::SendResponse;
use http::{HeaderValue, Request, Response, header};
use http_body::Body;
use tokio::io::{AsyncRead, AsyncWrite};

use super::body::BoxError;
use super::error::h2_error_in;
use super::h2_client::{CONNECTION_WINDOW, Keepalive, Pipe, RecvBody, STREAM_WINDOW};
use super::request_body::CallerBody;
use crate::config::ConnectionSettings;

/// Response data buffered per stream beyond what the caller's windows
/// allow (hyper's server default).
const MAX_SEND_BUFFER: usize = 400 * 1024;

/// How a connection's serving ended without an HTTP/2 error.
#[derive(Debug, PartialEq, Eq)]
pub enum Ended {
    /// Every stream is done and the connection closed (the caller's
    /// GOAWAY or close, or ours after a graceful shutdown).
    Closed,
    /// A PING went unanswered for the keepalive interval.
    KeepaliveTimeout,
}

/// Serves an HTTP/2 connection over `io` (which replays the preface):
/// each request goes to `call`, whose future answers it. Once `shutdown`
/// is set (and this future polled again: whoever sets it polls it) the
/// caller is sent GOAWAY and the streams open finish.
pub async fn serve<I, C, F, B, E>(
    io: I,
    call: C,
    settings: &ConnectionSettings,
    keepalive: Duration,
    shutdown: &AtomicBool,
) -> Result<Ended, h2::Error>
where
    I: AsyncRead + AsyncWrite + Unpin,
    C: Fn(Request<CallerBody>) -> F,
    F: Future<Output = Result<Response<B>, E>> + Unpin + Send + 'static,
    B: Body<Data = Bytes> + Unpin + Send + 'static,
    B::Error: Into<BoxError>,
    E: Into<BoxError> + Send + 'static,
{
    let mut conn = h2::server::Builder::new()
        .initial_window_size(STREAM_WINDOW)
        .initial_connection_window_size(CONNECTION_WINDOW)
        .max_header_list_size(settings.max_header_bytes)
        .max_send_buffer_size(MAX_SEND_BUFFER)
        .max_concurrent_streams(settings.max_concurrent_streams)
        .max_pending_accept_reset_streams(settings.max_pending_accept_reset_streams)
        .max_local_error_reset_streams(Some(settings.max_local_error_reset_streams))
        .handshake::<_, Bytes>(io)
        .await?;
    let mut keepalive = conn.ping_pong().map(|p| Keepalive::new(p, keepalive));
    let mut closing = false;
    loop {
        let next = poll_fn(|cx| {
            if !closing && shutdown.load(Ordering::Relaxed) {
                closing = true;
                conn.graceful_shutdown();
            }
            if let Some(Poll::Ready(r)) = keepalive.as_mut().map(|k| k.poll(cx)) {
                return Poll::Ready(Err(r));
            }
            conn.poll_accept(cx).map(Ok)
        })
        .await;
        match next {
            Ok(Some(Ok((req, respond)))) => {
                let (parts, recv) = req.into_parts();
                let body = CallerBody::Http2(RecvBody::new(recv));
                let answer = call(Request::from_parts(parts, body));
                tokio::spawn(Reply::new(answer, respond));
            }
            Ok(Some(Err(e))) => return Err(e),
            Ok(None) => return Ok(Ended::Closed),
            Err(Ok(())) => return Ok(Ended::KeepaliveTimeout),
            Err(Err(e)) => return Err(e),
        }
    }
}

/// Answers one stream: waits for the call's response (or the caller's
/// reset, which drops the call), sends its head, then its body.
///
/// A state machine by hand, as small as its larger state: an `async fn`
/// kept every local of both steps, and a future is copied whole as it is
/// spawned and as its task ends.
enum Reply<F, B> {
    Waiting {
        answer: F,
        respond: SendResponse<Bytes>,
    },
    Sending(Pipe<B>),
    Done,
}

impl<F, B, E> Reply<F, B>
where
    F: Future<Output = Result<Response<B>, E>> + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    fn new(answer: F, respond: SendResponse<Bytes>) -> Reply<F, B> {
        Reply::Waiting { answer, respond }
    }

    /// Sends the head of `answered`; the body still to send, if any.
    fn head(
        answered: Result<Response<B>, E>,
        respond: &mut SendResponse<Bytes>,
    ) -> Option<Pipe<B>> {
        let resp = match answered {
            Ok(resp) => resp,
            Err(e) => {
                let e: BoxError = e.into();
                tracing::debug!(error = %e, "a call over HTTP/2 failed without an answer");
                let reason = h2_error_in(&*e).and_then(h2::Error::reason);
                respond.send_reset(reason.unwrap_or(Reason::INTERNAL_ERROR));
                return None;
            }
        };
        let (mut parts, body) = resp.into_parts();
        let eos = body.is_end_stream();
        if !eos
            && let Some(len) = body.size_hint().exact()
            && !parts.headers.contains_key(header::CONTENT_LENGTH)
        {
            parts
                .headers
                .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
        }
        // `date` never indexed (RFC 7541 §6.2.3): h2's encoder would add a
        // new entry each second, chained behind the older ones under the
        // same name, and walk that chain from the oldest on every response:
        // after a minute, the table is ~60 dates and each answer compares
        // them all (~3,000 instructions on the server sidecar). The app's
        // date and the sidecar's alike.
        parts
            .headers
            .entry(header::DATE)
            .or_insert_with(date)
            .set_sensitive(true);
        match respond.send_response(Response::from_parts(parts, ()), eos) {
            Ok(tx) if !eos => Some(Pipe::new(body, tx)),
            Ok(_) => None,
            Err(e) => {
                tracing::debug!(error = %e, "could not send a response head over HTTP/2");
                respond.send_reset(Reason::INTERNAL_ERROR);
                None
            }
        }
    }
}

impl<F, B, E> Future for Reply<F, B>
where
    F: Future<Output = Result<Response<B>, E>> + Unpin,
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
    E: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Reply::Waiting { answer, respond } = this {
            let answered = match Pin::new(answer).poll(cx) {
                Poll::Ready(answered) => answered,
                Poll::Pending => {
                    // Registered only while the answer is pending: a reset
                    // drops the call.
                    if respond.poll_reset(cx).is_ready() {
                        *this = Reply::Done;
                        return Poll::Ready(());
                    }
                    return Poll::Pending;
                }
            };
            *this = match Self::head(answered, respond) {
                Some(pipe) => Reply::Sending(pipe),
                None => Reply::Done,
            };
        }
        match this {
            Reply::Sending(pipe) => Pin::new(pipe).poll(cx),
            _ => Poll::Ready(()),
        }
    }
}

/// The `date` field for now, formatted once a second per thread.
fn date() -> HeaderValue {
    thread_local! {
        static CACHED: RefCell<Option<(u64, HeaderValue)>> = const { RefCell::new(None) };
    }
    let now = SystemTime::now();
    let secs = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    CACHED.with_borrow_mut(|cached| match cached {
        Some((at, value)) if *at == secs => value.clone(),
        _ => {
            let value = HeaderValue::from_str(&httpdate::fmt_http_date(now))
                .unwrap_or(HeaderValue::from_static(""));
            *cached = Some((secs, value.clone()));
            value
        }
    })
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::Arc;

    use http_body_util::{BodyExt, Full};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::oneshot;

    use super::*;

    /// Serves one connection on a loopback listener with `call`; the
    /// caller's side is a plain `h2` client.
    async fn connected<C, F>(
        call: C,
        shutdown: Arc<AtomicBool>,
    ) -> (
        h2::client::SendRequest<Bytes>,
        tokio::task::JoinHandle<Result<Ended, h2::Error>>,
    )
    where
        C: Fn(Request<CallerBody>) -> F + Send + 'static,
        F: Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let settings = ConnectionSettings::default();
            // Boxed, as `server::Tracked` boxes the service's future.
            let call = move |req| Box::pin(call(req));
            serve(tcp, call, &settings, Duration::from_secs(30), &shutdown).await
        });
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (send, conn) = h2::client::handshake(tcp).await.unwrap();
        tokio::spawn(conn);
        (send, served)
    }

    fn get() -> Request<()> {
        Request::get("http://pod/").body(()).unwrap()
    }

    #[tokio::test]
    async fn a_caller_that_resets_its_stream_drops_the_call() {
        let (called_tx, called) = oneshot::channel::<oneshot::Sender<()>>();
        let called_tx = std::sync::Mutex::new(Some(called_tx));
        let call = move |_req: Request<CallerBody>| {
            // The call holds `held` until it is dropped; it never answers.
            let (held, dropped) = oneshot::channel::<()>();
            if let Some(tx) = called_tx.lock().unwrap().take() {
                let _ = tx.send(held);
            }
            async move {
                let _ = dropped.await;
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::new())))
            }
        };
        let (mut send, _served) = connected(call, Arc::new(AtomicBool::new(false))).await;
        send = send.ready().await.unwrap();
        let (response, mut body) = send.send_request(get(), false).unwrap();
        let mut held = called.await.unwrap();
        body.send_reset(Reason::CANCEL);
        drop(response);
        // The call's future was dropped: its end of `held` is gone.
        held.closed().await;
    }

    #[tokio::test]
    async fn shutdown_sends_goaway_and_lets_open_streams_finish() {
        let (answer_tx, answer_rx) = oneshot::channel::<()>();
        let answer_rx = std::sync::Mutex::new(Some(answer_rx));
        let (called_tx, called) = oneshot::channel::<()>();
        let called_tx = std::sync::Mutex::new(Some(called_tx));
        let call = move |_req: Request<CallerBody>| {
            let wait = answer_rx.lock().unwrap().take();
            if let Some(tx) = called_tx.lock().unwrap().take() {
                let _ = tx.send(());
            }
            async move {
                if let Some(wait) = wait {
                    let _ = wait.await;
                }
                Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"done"))))
            }
        };
        let shutdown = Arc::new(AtomicBool::new(false));
        let (send, served) = connected(call, shutdown.clone()).await;
        let mut send = send.ready().await.unwrap();
        let (response, _) = send.send_request(get(), true).unwrap();
        called.await.unwrap();
        // Seen at the connection's next wake-up: the answer's.
        shutdown.store(true, Ordering::Relaxed);
        answer_tx.send(()).unwrap();
        let resp = response.await.unwrap();
        assert_eq!(resp.status(), 200);
        let body = RecvBody::new(resp.into_body())
            .collect()
            .await
            .unwrap()
            .to_bytes();
        assert_eq!(&body[..], b"done");
        // GOAWAY was sent: the connection ends once the stream is done, and
        // a new request is refused.
        assert_eq!(served.await.unwrap().unwrap(), Ended::Closed);
        let refused = send
            .ready()
            .await
            .and_then(|mut s| s.send_request(get(), true));
        assert!(refused.is_err(), "a request after GOAWAY was accepted");
    }

    /// How the fields of an HPACK block whose name is the static table's
    /// entry `name` are represented: `'L'` literal with incremental
    /// indexing, `'W'` without indexing, `'N'` never indexed. (A field
    /// indexed whole from a table names no entry and is not listed.)
    fn representations(block: &[u8], name: usize) -> Vec<char> {
        fn int(block: &[u8], at: &mut usize, prefix: u32) -> usize {
            let mask = (1usize << prefix) - 1;
            let mut v = usize::from(block[*at]) & mask;
            *at += 1;
            if v < mask {
                return v;
            }
            let mut shift = 0;
            loop {
                let b = block[*at];
                *at += 1;
                v += usize::from(b & 0x7f) << shift;
                shift += 7;
                if b & 0x80 == 0 {
                    return v;
                }
            }
        }
        let mut found = Vec::new();
        let mut at = 0;
        while at < block.len() {
            let first = block[at];
            let (kind, prefix) = match first {
                f if f & 0x80 != 0 => {
                    int(block, &mut at, 7);
                    continue;
                }
                f if f & 0x40 != 0 => ('L', 6),
                f if f & 0x20 != 0 => {
                    int(block, &mut at, 5);
                    continue;
                }
                f if f & 0x10 != 0 => ('N', 4),
                _ => ('W', 4),
            };
            let index = int(block, &mut at, prefix);
            if index == 0 {
                let len = int(block, &mut at, 7);
                at += len;
            }
            let len = int(block, &mut at, 7);
            at += len;
            if index == name {
                found.push(kind);
            }
        }
        found
    }

    #[tokio::test]
    async fn every_response_sends_its_date_never_indexed() {
        use tokio::io::AsyncWriteExt;
        const DATE: usize = 33; // HPACK's static table
        // The app's own date on odd calls, none (the sidecar's) on even ones.
        let calls = std::sync::atomic::AtomicUsize::new(0);
        let call = move |_req: Request<CallerBody>| {
            let n = calls.fetch_add(1, Ordering::Relaxed);
            async move {
                let mut resp = Response::new(Full::new(Bytes::from_static(b"hi")));
                if n.is_multiple_of(2) {
                    resp.headers_mut().insert(
                        header::DATE,
                        HeaderValue::from_static("Thu, 03 Dec 2026 12:00:00 GMT"),
                    );
                }
                Ok::<_, Infallible>(resp)
            }
        };
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let shutdown = Arc::new(AtomicBool::new(false));
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let call = move |req| Box::pin(call(req));
            let settings = ConnectionSettings::default();
            serve(tcp, call, &settings, Duration::from_secs(30), &shutdown).await
        });
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
            .await
            .unwrap();
        // GET http://pod/: :method GET, :scheme http, :path / from the
        // static table, :authority as a literal.
        let request = [0x82, 0x86, 0x84, 0x01, 3, b'p', b'o', b'd'];
        let mut dates = Vec::new();
        for stream in [1u8, 3, 5, 7] {
            let mut frame = vec![0, 0, request.len() as u8, 0x1, 0x5, 0, 0, 0, stream];
            frame.extend_from_slice(&request);
            tcp.write_all(&frame).await.unwrap();
            // Up to this stream's response head.
            loop {
                let (head, payload) = crate::http::h2_client::read_frame(&mut tcp).await;
                if head[3] == 0x1 && head[8] == stream {
                    dates.push(representations(&payload, DATE));
                    break;
                }
            }
        }
        // Indexed, the second answer with the app's date (and every one in
        // the same second as an earlier one) would refer to the table.
        assert_eq!(dates, vec![vec!['N']; 4]);
    }

    #[tokio::test]
    async fn a_response_of_known_size_carries_its_length_and_a_date() {
        let call = |_req: Request<CallerBody>| async {
            Ok::<_, Infallible>(Response::new(Full::new(Bytes::from_static(b"hello"))))
        };
        let (send, _served) = connected(call, Arc::new(AtomicBool::new(false))).await;
        let mut send = send.ready().await.unwrap();
        let (response, _) = send.send_request(get(), true).unwrap();
        let resp = response.await.unwrap();
        assert_eq!(resp.headers()[header::CONTENT_LENGTH], "5");
        assert!(httpdate::parse_http_date(resp.headers()[header::DATE].to_str().unwrap()).is_ok());
    }
}
