//! A plain HTTP test application (HTTP/1.1 and h2c on one port) and raw
//! HTTP clients on a single connection.
//!
//! Paths of the app:
//! - `/headers`: replies with the protocol version and request headers, one
//!   `name: value` line each.
//! - `/echo`: streams the request body back as it arrives.
//! - `/big?bytes=N`: N bytes generated as they are read.
//! - `/gate`: sends `first`, then waits for the test to open the gate
//!   (`HttpApp::gate`) before sending `second`.
//! - `/trailers`: a body followed by trailers `x-checksum: abc`.
//! - `/status/N`: an empty response with status N.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::sync::Notify;

pub type Body = BoxBody<Bytes, Box<dyn std::error::Error + Send + Sync>>;

pub fn full(b: impl Into<Bytes>) -> Body {
    Full::new(b.into()).map_err(|e| match e {}).boxed()
}

pub fn empty() -> Body {
    full(Bytes::new())
}

/// A body fed by the returned sender, frame by frame.
pub fn channel_body() -> (tokio::sync::mpsc::Sender<Frame<Bytes>>, Body) {
    let (tx, rx) = tokio::sync::mpsc::channel::<Frame<Bytes>>(1);
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx)
        .map(Ok::<_, Box<dyn std::error::Error + Send + Sync>>);
    (tx, BodyExt::boxed(StreamBody::new(stream)))
}

use futures_util::StreamExt;

pub struct HttpApp {
    pub addr: SocketAddr,
    pub gate: Arc<Notify>,
    /// Bytes of `/big` bodies handed to the server so far: how far a
    /// response got before flow control stopped it.
    pub produced: Arc<AtomicUsize>,
    _task: tokio::task::JoinHandle<()>,
}

pub async fn start_http_app() -> HttpApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let gate = Arc::new(Notify::new());
    let produced = Arc::new(AtomicUsize::new(0));
    let (g, p) = (gate.clone(), produced.clone());
    let task = tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                continue;
            };
            let (gate, produced) = (g.clone(), p.clone());
            tokio::spawn(async move {
                let svc = hyper::service::service_fn(move |req| {
                    let (gate, produced) = (gate.clone(), produced.clone());
                    async move { Ok::<_, Infallible>(app(req, gate, produced).await) }
                });
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tcp), svc)
                    .await;
            });
        }
    });
    HttpApp {
        addr,
        gate,
        produced,
        _task: task,
    }
}

async fn app(
    req: Request<Incoming>,
    gate: Arc<Notify>,
    produced: Arc<AtomicUsize>,
) -> Response<Body> {
    let path = req.uri().path().to_string();
    match path.as_str() {
        "/headers" => {
            let mut lines = vec![format!("version: {:?}", req.version())];
            for (k, v) in req.headers() {
                lines.push(format!("{}: {}", k, v.to_str().unwrap_or("<bin>")));
            }
            Response::new(full(lines.join("\n")))
        }
        "/echo" => Response::new(req.into_body().map_err(std::convert::Into::into).boxed()),
        "/big" => {
            let n: usize = req
                .uri()
                .query()
                .and_then(|q| q.strip_prefix("bytes="))
                .and_then(|n| n.parse().ok())
                .unwrap_or(0);
            const CHUNK: usize = 64 * 1024;
            let chunks = futures_util::stream::iter((0..n).step_by(CHUNK).map(move |start| {
                let len = CHUNK.min(n - start);
                produced.fetch_add(len, Ordering::Relaxed);
                Ok::<_, Box<dyn std::error::Error + Send + Sync>>(Frame::data(Bytes::from(
                    vec![b'x'; len],
                )))
            }));
            let mut resp = Response::new(BodyExt::boxed(StreamBody::new(chunks)));
            resp.headers_mut().insert("content-length", n.into());
            resp
        }
        "/gate" => {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(Bytes::from_static(b"first"))).await;
                gate.notified().await;
                let _ = tx.send(Frame::data(Bytes::from_static(b"second"))).await;
            });
            Response::new(body)
        }
        "/trailers" => {
            let (tx, body) = channel_body();
            tokio::spawn(async move {
                let _ = tx.send(Frame::data(Bytes::from_static(b"payload"))).await;
                let mut t = http::HeaderMap::new();
                t.insert("x-checksum", "abc".parse().unwrap());
                let _ = tx.send(Frame::trailers(t)).await;
            });
            Response::new(body)
        }
        p if p.starts_with("/status/") => {
            let code: u16 = p["/status/".len()..].parse().unwrap_or(500);
            let mut resp = Response::new(empty());
            *resp.status_mut() =
                StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
            resp
        }
        _ => {
            let mut resp = Response::new(full("not found"));
            *resp.status_mut() = StatusCode::NOT_FOUND;
            resp
        }
    }
}

/// An HTTP/1.1 client on one connection to `addr`.
pub async fn http1(addr: SocketAddr) -> hyper::client::conn::http1::SendRequest<Body> {
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp))
        .await
        .unwrap();
    tokio::spawn(conn);
    sender
}

/// An h2c client on one connection to `addr`.
pub async fn h2c(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Body> {
    try_h2c(addr).await.unwrap()
}

/// [`h2c`], or why there is no connection.
pub async fn try_h2c(
    addr: SocketAddr,
) -> anyhow::Result<hyper::client::conn::http2::SendRequest<Body>> {
    let tcp = tokio::net::TcpStream::connect(addr).await?;
    Ok(h2_over(tcp).await?)
}

/// An HTTP/2 client over `io` (plaintext or TLS), its connection driven
/// by a task of its own.
pub async fn h2_over<IO>(io: IO) -> hyper::Result<hyper::client::conn::http2::SendRequest<Body>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(io)).await?;
    tokio::spawn(conn);
    Ok(sender)
}

/// A `/gate` response of the [`HttpApp`] in flight through `outbound`
/// (authority `web.test`): its first chunk (`first`) has arrived, the rest
/// waits for the app's gate. Returns the connection (keep it) and the body.
pub async fn gated_response(
    outbound: SocketAddr,
) -> (hyper::client::conn::http1::SendRequest<Body>, Incoming) {
    let mut conn = http1(outbound).await;
    let req = Request::get("/gate")
        .header("host", "web.test")
        .body(empty())
        .unwrap();
    let resp = conn.send_request(req).await.unwrap();
    let mut body = resp.into_body();
    let first = body.frame().await.unwrap().unwrap().into_data().unwrap();
    assert_eq!(first, Bytes::from_static(b"first"));
    (conn, body)
}

/// Reads a whole response body as a string.
pub async fn text(resp: Response<Incoming>) -> String {
    let bytes = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8_lossy(&bytes).to_string()
}
