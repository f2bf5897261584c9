//! HTTP/2 to upstreams on `h2` directly (ADR 22).
//!
//! A request is sent from the caller's own task: it opens a stream on the
//! shared connection, sends what its body has ready, and waits there for
//! the response head. Only a request body still to come after that (an
//! upload, a client stream) gets a task of its own, reset if the caller
//! gives up before the answer.
//! (hyper's client hands every request to a dispatch task over a channel,
//! spawns a task per request to wait for the response, and answers over a
//! second channel: three more wake-ups and a spawn per request.)
//!
//! Each connection has one task: it drives the connection and, on a
//! connection to another sidecar, sends a PING every [`KEEPALIVE`] and
//! closes the connection when no PONG comes back within [`KEEPALIVE`]. A
//! plaintext upstream (the app, or a service outside the mesh) gets no
//! PINGs (ADR 25): gRPC servers count a PING on a connection without calls,
//! or more often than every 5 minutes, as abuse and answer GOAWAY
//! `too_many_pings`. The connection's flow-control windows are fixed (see
//! [`STREAM_WINDOW`]).
//!
//! Requests reach here with their hop-by-hop fields already removed
//! (`headers::strip_hop_by_hop`); `h2` refuses a request that still has one.

use std::future::{Future, poll_fn};
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use h2::client::SendRequest;
use h2::{Ping, Reason, RecvStream, SendStream};
use http::{HeaderValue, Method, Request, Response, header};
use http_body::{Body, Frame, SizeHint};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::oneshot;
use tokio::time::{Instant, sleep};

use super::body::{BoxError, ProxyBody};
use super::error::h2_error_in;

/// How often a connection to another sidecar is pinged, and how long a
/// PONG may take before the connection is given up as dead.
pub const KEEPALIVE: Duration = Duration::from_secs(20);
/// The receive window of each stream. Fixed rather than grown by
/// bandwidth-delay probing: inside a cluster a round trip takes well under
/// a millisecond, and 1 MiB per round trip is over 1 GB/s per stream.
pub const STREAM_WINDOW: u32 = 1024 * 1024;
/// The receive window of a connection: the most a connection's upstream
/// can have sent that the callers have not read yet.
pub const CONNECTION_WINDOW: u32 = 4 * 1024 * 1024;
/// The largest response head accepted (hyper's client default).
const MAX_HEADER_LIST_SIZE: u32 = 16 * 1024;
/// Request data buffered per connection beyond what the peer's windows
/// allow (hyper's client default).
const MAX_SEND_BUFFER: usize = 1024 * 1024;
/// Streams opened before the peer's SETTINGS say how many it allows
/// (hyper's client default).
const INITIAL_MAX_SEND_STREAMS: usize = 100;
/// Streams reset because of a local error (such as a malformed response)
/// before the connection is closed (hyper's client default).
const MAX_LOCAL_ERROR_RESETS: usize = 1024;

/// A handshaken HTTP/2 connection to an upstream.
pub struct Http2Connection {
    send: SendRequest<Bytes>,
    /// Set when the connection's task has ended. (Dropping the last
    /// handle wakes the task, which closes the connection once its streams
    /// are done.)
    closed: Arc<AtomicBool>,
}

/// Why a request failed, and the request back when it was never sent (the
/// connection was already closed or going away).
pub struct Failed {
    pub error: h2::Error,
    pub unsent: Option<Request<ProxyBody>>,
}

impl Http2Connection {
    /// Handshakes over `io` and starts the connection's task, which holds
    /// `held` for as long as the connection is open and, with `keepalive`,
    /// pings the peer that often.
    pub async fn handshake<T, H>(
        io: T,
        held: H,
        keepalive: Option<Duration>,
    ) -> Result<Http2Connection, h2::Error>
    where
        T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
        H: Send + 'static,
    {
        let (send, mut conn) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .max_header_list_size(MAX_HEADER_LIST_SIZE)
            .max_send_buffer_size(MAX_SEND_BUFFER)
            .max_local_error_reset_streams(Some(MAX_LOCAL_ERROR_RESETS))
            .initial_max_send_streams(INITIAL_MAX_SEND_STREAMS)
            .enable_push(false)
            .handshake::<_, Bytes>(io)
            .await?;
        let closed = Arc::new(AtomicBool::new(false));
        let ping = keepalive.and_then(|interval| Some((conn.ping_pong()?, interval)));
        let ended = closed.clone();
        tokio::spawn(async move {
            let _held = held;
            let mut keepalive = ping.map(|(p, interval)| Keepalive::new(p, interval));
            let result = poll_fn(|cx| {
                if let Poll::Ready(r) = Pin::new(&mut conn).poll(cx) {
                    return Poll::Ready(r);
                }
                match keepalive.as_mut().map(|k| k.poll(cx)) {
                    Some(Poll::Ready(r)) => Poll::Ready(r),
                    _ => Poll::Pending,
                }
            })
            .await;
            ended.store(true, Ordering::Release);
            if let Err(e) = result {
                tracing::debug!(error = %e, "HTTP/2 upstream connection ended");
            }
        });
        Ok(Http2Connection { send, closed })
    }

    /// Whether the connection has ended.
    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Sends `req` and waits for the response head.
    pub async fn send(&self, req: Request<ProxyBody>) -> Result<Response<ProxyBody>, Failed> {
        let mut send = self.send.clone();
        if let Err(error) = poll_fn(|cx| send.poll_ready(cx)).await {
            return Err(Failed {
                error,
                unsent: Some(req),
            });
        }
        let (parts, body) = req.into_parts();
        let mut head = Request::from_parts(parts, ());
        set_content_length(&mut head, &body);
        let eos = body.is_end_stream();
        let (response, tx) = send.send_request(head, eos).map_err(|error| Failed {
            error,
            unsent: None,
        })?;
        drop(send);
        let mut streaming = None;
        if !eos {
            let mut pipe = Pipe::new(body, tx);
            // Usually the whole body is here already (a unary call's one
            // message): sent now, with no task for it.
            let done = poll_fn(|cx| Poll::Ready(Pin::new(&mut pipe).poll(cx).is_ready())).await;
            if !done {
                let (cancel, cancelled) = oneshot::channel();
                pipe.cancelled = Some(cancelled);
                tokio::spawn(pipe);
                streaming = Some(CancelOnDrop(Some(cancel)));
            }
        }
        let resp = response.await;
        if let Some(mut c) = streaming {
            // Answered: the body streams on, whatever becomes of the answer.
            c.disarm();
        }
        match resp {
            Ok(resp) => {
                let (parts, recv) = resp.into_parts();
                Ok(Response::from_parts(
                    parts,
                    ProxyBody::H2(RecvBody::new(recv)),
                ))
            }
            Err(error) => Err(Failed {
                error,
                unsent: None,
            }),
        }
    }
}

/// Resets a streaming request whose caller gave up before the answer came
/// (a timeout, a cancelled call): its body's task would otherwise go on
/// sending it.
struct CancelOnDrop(Option<oneshot::Sender<()>>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(cancel) = self.0.take() {
            let _ = cancel.send(());
        }
    }
}

/// `content-length` for a request body of known size, as hyper's client
/// sets it: unless the body is empty and the method gives a body no
/// meaning.
fn set_content_length(head: &mut Request<()>, body: &ProxyBody) {
    let Some(len) = body.size_hint().exact() else {
        return;
    };
    let no_payload = matches!(
        *head.method(),
        Method::GET | Method::HEAD | Method::DELETE | Method::CONNECT
    );
    if (len != 0 || !no_payload) && !head.headers().contains_key(header::CONTENT_LENGTH) {
        head.headers_mut()
            .insert(header::CONTENT_LENGTH, HeaderValue::from(len));
    }
}

/// Pings a connection (either side's) every `interval`; ready when a PONG
/// has not come back within `interval` (`Ok`), or the PING could not be
/// sent (`Err`).
pub(super) struct Keepalive {
    ping: h2::PingPong,
    interval: Duration,
    timer: Pin<Box<tokio::time::Sleep>>,
    awaiting_pong: bool,
}

impl Keepalive {
    pub(super) fn new(ping: h2::PingPong, interval: Duration) -> Keepalive {
        Keepalive {
            ping,
            interval,
            timer: Box::pin(sleep(interval)),
            awaiting_pong: false,
        }
    }

    pub(super) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), h2::Error>> {
        let interval = self.interval;
        loop {
            if self.awaiting_pong {
                match self.ping.poll_pong(cx) {
                    Poll::Ready(Ok(_)) => {
                        self.awaiting_pong = false;
                        self.timer.as_mut().reset(Instant::now() + interval);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                    Poll::Pending => {}
                }
            }
            ready!(self.timer.as_mut().poll(cx));
            if self.awaiting_pong {
                tracing::debug!("HTTP/2 connection: no PONG within {interval:?}");
                return Poll::Ready(Ok(()));
            }
            self.ping.send_ping(Ping::opaque())?;
            self.awaiting_pong = true;
            self.timer.as_mut().reset(Instant::now() + interval);
        }
    }
}

/// Plays an HTTP/2 server that never answers on `tcp` (the client's
/// side already connected): whether a PING came from the client within
/// `limit`. For tests of who gets PINGs.
#[cfg(test)]
pub(crate) async fn pinged_within(mut tcp: tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const SETTINGS: u8 = 0x4;
    const PING: u8 = 0x6;
    const ACK: u8 = 0x1;
    let mut preface = [0u8; 24];
    tcp.read_exact(&mut preface).await.unwrap();
    assert_eq!(&preface, b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n");
    // Our SETTINGS (none), and the ACK of the client's.
    let mut settings = [0u8; 18];
    settings[3] = SETTINGS;
    settings[12] = SETTINGS;
    settings[13] = ACK;
    tcp.write_all(&settings).await.unwrap();
    let frames = async {
        loop {
            let (head, _) = read_frame(&mut tcp).await;
            if head[3] == PING && head[4] & ACK == 0 {
                return;
            }
        }
    };
    tokio::time::timeout(limit, frames).await.is_ok()
}

/// Reads one HTTP/2 frame from `tcp`: its 9-byte header and its payload.
/// For tests that play a peer frame by frame.
#[cfg(test)]
pub(crate) async fn read_frame(tcp: &mut tokio::net::TcpStream) -> ([u8; 9], Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut head = [0u8; 9];
    tcp.read_exact(&mut head).await.unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
    let mut payload = vec![0u8; len];
    tcp.read_exact(&mut payload).await.unwrap();
    (head, payload)
}

/// Feeds a body to its stream, as the peer's flow control allows: a
/// request's here, a response's in `h2_server`.
pub(super) struct Pipe<B = ProxyBody> {
    body: B,
    tx: SendStream<Bytes>,
    /// A chunk taken from the body, waiting for send capacity.
    chunk: Option<(Bytes, bool)>,
    /// Once the pipe has a task of its own: fires when the caller gave up
    /// on the answer.
    cancelled: Option<oneshot::Receiver<()>>,
}

impl<B> Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    pub(super) fn new(body: B, tx: SendStream<Bytes>) -> Pipe<B> {
        Pipe {
            body,
            tx,
            chunk: None,
            cancelled: None,
        }
    }

    fn step(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), BoxError>> {
        loop {
            // Registered before waiting on the body or on capacity: a reset
            // from the peer ends the pipe.
            if let Poll::Ready(reason) = self.tx.poll_reset(cx) {
                return Poll::Ready(Err(reason
                    .map(h2::Error::from)
                    .unwrap_or_else(|e| e)
                    .into()));
            }
            if let Some((data, eos)) = self.chunk.take() {
                while self.tx.capacity() == 0 {
                    match self.tx.poll_capacity(cx) {
                        Poll::Ready(Some(Ok(0))) => {}
                        Poll::Ready(Some(Ok(_))) => break,
                        Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(e.into())),
                        Poll::Ready(None) => {
                            return Poll::Ready(Err("the stream closed while sending".into()));
                        }
                        Poll::Pending => {
                            self.chunk = Some((data, eos));
                            return Poll::Pending;
                        }
                    }
                }
                self.tx.send_data(data, eos)?;
                if eos {
                    return Poll::Ready(Ok(()));
                }
                continue;
            }
            // The next frame is read before any capacity is claimed: a
            // claim held while the body is idle could starve other streams
            // of the connection's window.
            match ready!(Pin::new(&mut self.body).poll_frame(cx)) {
                Some(Ok(frame)) => match frame.into_data() {
                    Ok(data) => {
                        let eos = self.body.is_end_stream();
                        if data.is_empty() {
                            if eos {
                                self.tx.send_data(data, true)?;
                                return Poll::Ready(Ok(()));
                            }
                            continue;
                        }
                        // h2 raises the claim to what is buffered as it
                        // sends; one byte is enough to be woken.
                        self.tx.reserve_capacity(1);
                        self.chunk = Some((data, eos));
                    }
                    Err(frame) => {
                        if let Ok(trailers) = frame.into_trailers() {
                            self.tx.reserve_capacity(0);
                            self.tx.send_trailers(trailers)?;
                            return Poll::Ready(Ok(()));
                        }
                    }
                },
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    // The reason of the stream whose reset ended this
                    // body (a caller's or an upstream's); ours otherwise.
                    let reason = h2_error_in(&*e).and_then(h2::Error::reason);
                    self.tx.send_reset(reason.unwrap_or(Reason::INTERNAL_ERROR));
                    return Poll::Ready(Err(e));
                }
                None => {
                    self.tx.send_data(Bytes::new(), true)?;
                    return Poll::Ready(Ok(()));
                }
            }
        }
    }
}

impl<B> Future for Pipe<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if let Some(cancelled) = this.cancelled.as_mut() {
            match Pin::new(cancelled).poll(cx) {
                Poll::Ready(Ok(())) => {
                    this.tx.send_reset(Reason::CANCEL);
                    return Poll::Ready(());
                }
                // Answered: nothing more to watch.
                Poll::Ready(Err(_)) => this.cancelled = None,
                Poll::Pending => {}
            }
        }
        this.step(cx).map(|r| {
            if let Err(e) = r {
                tracing::debug!(error = %e, "a body sent over HTTP/2 ended early");
            }
        })
    }
}

/// A body received over HTTP/2: a response's from an upstream, or a
/// request's from a caller (`h2_server`). Read data is handed back to the
/// connection's window at once. Its size is not hinted: a `content-length`
/// the peer sent goes on as a field, and `h2` checks the body against it.
#[derive(Debug)]
pub struct RecvBody {
    recv: RecvStream,
    data_done: bool,
}

impl RecvBody {
    pub(super) fn new(recv: RecvStream) -> RecvBody {
        RecvBody {
            recv,
            data_done: false,
        }
    }
}

impl Body for RecvBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if !this.data_done {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                // RST_STREAM(NO_ERROR) after a complete response: the
                // server needs no more of the request (RFC 9113 §8.1).
                Some(Err(e)) if e.reason() == Some(Reason::NO_ERROR) => return Poll::Ready(None),
                Some(Err(e)) => return Poll::Ready(Some(Err(e))),
                None => this.data_done = true,
            }
        }
        match ready!(this.recv.poll_trailers(cx)) {
            Ok(trailers) => Poll::Ready(trailers.map(|t| Ok(Frame::trailers(t)))),
            Err(e) if e.reason() == Some(Reason::NO_ERROR) => Poll::Ready(None),
            Err(e) => Poll::Ready(Some(Err(e))),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.recv.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        if self.recv.is_end_stream() {
            SizeHint::with_exact(0)
        } else {
            SizeHint::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use http::HeaderMap;
    use http_body_util::{BodyExt, StreamBody};
    use tokio::net::{TcpListener, TcpStream};

    use super::*;

    /// A connected pair: our client connection (pinging as a connection to
    /// another sidecar does) and the server side's handshaken `h2`
    /// connection.
    async fn pair() -> (Http2Connection, h2::server::Connection<TcpStream, Bytes>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = async {
            let (tcp, _) = listener.accept().await.unwrap();
            h2::server::handshake(tcp).await.unwrap()
        };
        let client = async {
            let tcp = TcpStream::connect(addr).await.unwrap();
            Http2Connection::handshake(tcp, (), Some(KEEPALIVE))
                .await
                .unwrap()
        };
        tokio::join!(client, server)
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_with_keepalive_is_pinged_with_a_call_open() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let client = Http2Connection::handshake(tcp, (), Some(KEEPALIVE))
            .await
            .unwrap();
        let open = tokio::spawn(async move {
            let _ = client.send(request(ProxyBody::Empty)).await;
        });
        let (server, _) = listener.accept().await.unwrap();
        assert!(pinged_within(server, Duration::from_secs(600)).await);
        open.abort();
    }

    fn request(body: ProxyBody) -> Request<ProxyBody> {
        Request::builder()
            .method(Method::POST)
            .uri("http://upstream/echo")
            .body(body)
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_body_still_streaming_when_the_head_arrives_is_sent_to_its_end() {
        let (client, mut server) = pair().await;
        let (chunks, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let sent = tokio::spawn(async move {
            client
                .send(request(ProxyBody::boxed(body)))
                .await
                .map_err(|f| f.error)
        });
        // The server answers at once, before the body's first byte.
        let served = tokio::spawn(async move {
            let (req, mut respond) = server.accept().await.unwrap().unwrap();
            let mut resp_body = respond.send_response(Response::new(()), false).unwrap();
            let mut received = Vec::new();
            let mut recv = req.into_body();
            let mut driving = std::pin::pin!(std::future::poll_fn(|cx| server.poll_closed(cx)));
            loop {
                tokio::select! {
                    data = recv.data() => match data {
                        Some(data) => {
                            let data = data.unwrap();
                            let _ = recv.flow_control().release_capacity(data.len());
                            received.extend_from_slice(&data);
                        }
                        None => break,
                    },
                    _ = &mut driving => panic!("connection closed"),
                }
            }
            let trailers = recv.trailers().await.unwrap();
            resp_body
                .send_data(Bytes::from_static(b"done"), true)
                .unwrap();
            // Until the client, its handle gone and the stream done, closes.
            driving.await.unwrap();
            (received, trailers)
        });
        let resp = sent.await.unwrap().unwrap();
        for chunk in [&b"one "[..], b"two"] {
            chunks
                .send(Ok(Frame::data(Bytes::from(chunk))))
                .await
                .unwrap();
        }
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        chunks.send(Ok(Frame::trailers(trailers))).await.unwrap();
        drop(chunks);
        let answer = resp.into_body().collect().await.unwrap().to_bytes();
        assert_eq!(answer, "done");
        let (received, trailers) = served.await.unwrap();
        assert_eq!(received, b"one two");
        assert_eq!(trailers.unwrap()["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_streaming_request_whose_caller_gives_up_is_reset() {
        let (client, mut server) = pair().await;
        let (chunks, rx) = tokio::sync::mpsc::channel::<Result<Frame<Bytes>, BoxError>>(4);
        let body = StreamBody::new(tokio_stream::wrappers::ReceiverStream::new(rx));
        let (accepted, on_accept) = oneshot::channel();
        let served = tokio::spawn(async move {
            let (req, _respond) = server.accept().await.unwrap().unwrap();
            accepted.send(()).unwrap();
            let mut recv = req.into_body();
            let driving = std::future::poll_fn(|cx| server.poll_closed(cx));
            tokio::select! {
                data = recv.data() => data,
                _ = driving => panic!("connection closed"),
            }
        });
        // The request is open and its body's task waits for data; the
        // caller stops waiting for the answer.
        tokio::select! {
            _ = client.send(request(ProxyBody::boxed(body))) => panic!("answered"),
            _ = on_accept => {}
        }
        let error = served.await.unwrap().unwrap().unwrap_err();
        assert_eq!(error.reason(), Some(Reason::CANCEL));
        drop(chunks);
    }

    #[tokio::test]
    async fn dropping_the_last_handle_closes_an_idle_connection() {
        let (client, mut server) = pair().await;
        assert!(!client.is_closed());
        drop(client);
        // The server sees the connection end (GOAWAY, then EOF).
        assert!(server.accept().await.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn a_connection_whose_peer_stops_answering_pings_is_closed() {
        let (client, mut server) = pair().await;
        // Served: PINGs come back, and the connection stays.
        let (stop, mut stopped) = oneshot::channel::<()>();
        let serving = tokio::spawn(async move {
            loop {
                tokio::select! {
                    r = server.accept() => if r.is_none() { break },
                    _ = &mut stopped => break,
                }
            }
            server
        });
        tokio::time::sleep(KEEPALIVE * 3).await;
        assert!(!client.is_closed());
        // Kept open but no longer read: the next PING goes unanswered.
        stop.send(()).unwrap();
        let _unread = serving.await.unwrap();
        // One interval to the PING, one to its deadline; time is virtual.
        for _ in 0..4 {
            if client.is_closed() {
                break;
            }
            tokio::time::sleep(KEEPALIVE).await;
        }
        assert!(client.is_closed());
    }
}
