//! The backend of the side-by-side benchmark (`benches/peers/run.py`): a
//! plaintext HTTP server that answers every request with `200` and a
//! 6-byte body, over h2c (prior knowledge) and HTTP/1.1 on one port.
//!
//! It is meant to cost as little as possible next to the proxies in front of
//! it: no routing, no logging, one static body. Two paths serve the bulk
//! benchmark (`benches/peers/bulk.py`) instead: `/bytes/N` answers with N
//! bytes, in 1 MiB chunks; `/upload` reads the request body to its end and
//! answers with its length. A gRPC call (`content-type: application/grpc`,
//! as `profile.py --grpc` sends) gets a gRPC answer: one 6-byte message and
//! the trailer `grpc-status: 0`.
//!
//! ```text
//! peers-backend [ADDR] [WORKER_THREADS]      # defaults 127.0.0.1:0 and 1
//! ```
//!
//! It prints `listening on ADDR` on stdout once bound, and runs until killed.

#![forbid(unsafe_code)]

use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body::Frame;
use http_body_util::{BodyExt, Either, Full, StreamBody};
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const BODY: &[u8] = b"hello\n";
/// The chunk `/bytes/N` answers in.
const CHUNK: usize = 1024 * 1024;

type Chunks = tokio_stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>;
type AnyBody = Either<Full<Bytes>, StreamBody<Chunks>>;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let addr: SocketAddr = match args.next() {
        Some(a) => a.parse()?,
        None => SocketAddr::from(([127, 0, 0, 1], 0)),
    };
    let threads: usize = match args.next() {
        Some(t) => t.parse()?,
        None => 1,
    };
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .enable_all()
        .build()?
        .block_on(serve(addr))
}

async fn serve(addr: SocketAddr) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    {
        let mut out = std::io::stdout().lock();
        writeln!(out, "listening on {}", listener.local_addr()?)?;
        out.flush()?;
    }
    loop {
        let (stream, _) = listener.accept().await?;
        stream.set_nodelay(true)?;
        tokio::spawn(async move {
            let service = service_fn(|req: Request<hyper::body::Incoming>| async move {
                let path = req.uri().path();
                let grpc = req
                    .headers()
                    .get(hyper::header::CONTENT_TYPE)
                    .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"));
                let body: AnyBody = if grpc {
                    Either::Right(grpc_answer())
                } else if let Some(n) = path.strip_prefix("/bytes/") {
                    Either::Right(chunks(n.parse().unwrap_or(0)))
                } else if path == "/upload" {
                    let mut body = req.into_body();
                    let mut len = 0;
                    while let Some(Ok(frame)) = body.frame().await {
                        len += frame.data_ref().map_or(0, Bytes::len);
                    }
                    Either::Left(Full::new(Bytes::from(format!("{len}\n"))))
                } else {
                    Either::Left(Full::new(Bytes::from_static(BODY)))
                };
                let mut response = Response::new(body);
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static(if grpc {
                        "application/grpc"
                    } else {
                        "text/plain"
                    }),
                );
                Ok::<_, Infallible>(response)
            });
            // A connection that ends badly (a client reset) is not our concern.
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

/// `len` bytes in chunks of [`CHUNK`], sharing one buffer.
fn chunks(len: usize) -> StreamBody<Chunks> {
    static ZEROS: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let zeros = ZEROS.get_or_init(|| Bytes::from(vec![0u8; CHUNK]));
    let frames: Vec<_> = (0..len.div_ceil(CHUNK))
        .map(|i| Ok(Frame::data(zeros.slice(..(len - i * CHUNK).min(CHUNK)))))
        .collect();
    StreamBody::new(tokio_stream::iter(frames))
}

/// A unary gRPC answer: [`BODY`] as one length-prefixed message, then the
/// trailer `grpc-status: 0`.
fn grpc_answer() -> StreamBody<Chunks> {
    static MESSAGE: std::sync::OnceLock<Bytes> = std::sync::OnceLock::new();
    let message = MESSAGE.get_or_init(|| {
        let mut m = vec![0u8];
        m.extend_from_slice(&(BODY.len() as u32).to_be_bytes());
        m.extend_from_slice(BODY);
        Bytes::from(m)
    });
    let mut trailers = hyper::HeaderMap::new();
    trailers.insert("grpc-status", hyper::header::HeaderValue::from_static("0"));
    let frames = vec![
        Ok(Frame::data(message.clone())),
        Ok(Frame::trailers(trailers)),
    ];
    StreamBody::new(tokio_stream::iter(frames))
}
