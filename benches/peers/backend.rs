//! The backend of the side-by-side benchmark (`benches/peers/run.py`): a
//! plaintext HTTP server that answers every request with `200` and a
//! 6-byte body, over h2c (prior knowledge) and HTTP/1.1 on one port.
//!
//! It is meant to cost as little as possible next to the proxies in front of
//! it: no routing, no logging, one static body.
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
use http_body_util::Full;
use hyper::service::service_fn;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;

const BODY: &[u8] = b"hello\n";

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
            let service = service_fn(|_req: Request<hyper::body::Incoming>| async {
                let mut response = Response::new(Full::new(Bytes::from_static(BODY)));
                response.headers_mut().insert(
                    hyper::header::CONTENT_TYPE,
                    hyper::header::HeaderValue::from_static("text/plain"),
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
