//! A server that misbehaves on command, for the resilience tests.
//!
//! Each request follows the directives in its `x-chaos` header, or else the
//! server's current mode (`ChaosServer::set_mode`); directives are
//! `;`-separated:
//! - `ok`: gRPC: the request's messages echoed back, then `grpc-status: 0`;
//!   HTTP: 200 `ok from <name>`.
//! - `status=N`: gRPC trailers-only response with status N.
//! - `trailer-status=N`: gRPC headers, no message, then status N in trailers.
//! - `http=N`: HTTP status N (also for gRPC callers).
//! - `fail-first=N;key=K`: the first N requests with key K fail (gRPC status
//!   14, or HTTP 503), later ones succeed.
//! - `pushback=MS`: failures carry `grpc-retry-pushback-ms: MS`.
//! - `hang`: never answer; the server counts it when the caller gives up.
//! - `hang-first=N;key=K`: the first N requests with key K hang.
//! - `reset`: reset the stream.
//! - `delay=MS`: answer after MS milliseconds.
//!
//! Every request is recorded (`seen`): attempt number, `grpc-timeout`, key,
//! `traceparent` and `x-request-id`.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode};
use http_body_util::{BodyExt, Collected};
use hyper::body::{Frame, Incoming};
use hyper_util::rt::{TokioExecutor, TokioIo};

use super::http::{Body, channel_body, empty, full};

#[derive(Debug, Clone, Default)]
pub struct Seen {
    pub path: String,
    pub attempt: Option<String>,
    pub grpc_timeout: Option<String>,
    pub key: Option<String>,
    /// Bytes of request body received (filled in once read to the end).
    pub body_len: Option<usize>,
    pub traceparent: Option<String>,
    pub request_id: Option<String>,
}

#[derive(Default)]
struct State {
    name: String,
    mode: Mutex<String>,
    seen: Mutex<Vec<Seen>>,
    failures_by_key: Mutex<HashMap<String, usize>>,
    hangs_by_key: Mutex<HashMap<String, usize>>,
    cancelled: AtomicUsize,
}

pub struct ChaosServer {
    pub addr: SocketAddr,
    state: Arc<State>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ChaosServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl ChaosServer {
    pub async fn start(name: &str) -> ChaosServer {
        Self::start_on(name, "127.0.0.1:0".parse().unwrap()).await
    }

    /// Starts on `addr` (another loopback address, say, with port 0).
    pub async fn start_on(name: &str, addr: SocketAddr) -> ChaosServer {
        let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(State {
            name: name.to_string(),
            mode: Mutex::new("ok".to_string()),
            ..Default::default()
        });
        let s = state.clone();
        let task = tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let state = s.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| {
                        let state = state.clone();
                        async move { handle(state, req).await }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tcp), svc)
                        .await;
                });
            }
        });
        ChaosServer { addr, state, task }
    }

    /// The directives of requests without an `x-chaos` header.
    pub fn set_mode(&self, mode: &str) {
        *self.state.mode.lock().unwrap() = mode.to_string();
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.state.seen.lock().unwrap().clone()
    }

    pub fn requests(&self) -> usize {
        self.state.seen.lock().unwrap().len()
    }

    /// Requests the caller gave up on while the server held them (`hang`).
    pub fn cancelled(&self) -> usize {
        self.state.cancelled.load(Ordering::SeqCst)
    }
}

fn directive<'a>(spec: &'a str, name: &str) -> Option<&'a str> {
    spec.split(';').map(str::trim).find_map(|d| {
        let (k, v) = d.split_once('=').unwrap_or((d, ""));
        (k == name).then_some(v)
    })
}

fn number(spec: &str, name: &str) -> Option<u64> {
    directive(spec, name).and_then(|v| v.parse().ok())
}

struct CancelGuard(Arc<State>, bool);

impl Drop for CancelGuard {
    fn drop(&mut self) {
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

async fn handle(
    state: Arc<State>,
    req: Request<Incoming>,
) -> Result<Response<Body>, std::io::Error> {
    let header = |name: &str| {
        req.headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    };
    let spec = header("x-chaos").unwrap_or_else(|| state.mode.lock().unwrap().clone());
    let grpc = header("content-type").is_some_and(|c| c.starts_with("application/grpc"));
    let key = directive(&spec, "key").map(str::to_string);
    state.seen.lock().unwrap().push(Seen {
        path: req.uri().path().to_string(),
        attempt: header("x-pylon-attempt"),
        grpc_timeout: header("grpc-timeout"),
        key: key.clone(),
        body_len: None,
        traceparent: header("traceparent"),
        request_id: header("x-request-id"),
    });

    // The whole request is read first, as a server that fails after doing
    // its work would.
    let index = state.seen.lock().unwrap().len() - 1;
    let request = req
        .into_body()
        .collect()
        .await
        .map(Collected::to_bytes)
        .unwrap_or_default();
    state.seen.lock().unwrap()[index].body_len = Some(request.len());

    if let Some(ms) = number(&spec, "delay") {
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let hang_first = number(&spec, "hang-first").is_some_and(|n| {
        let mut by_key = state.hangs_by_key.lock().unwrap();
        let count = by_key.entry(key.clone().unwrap_or_default()).or_default();
        *count += 1;
        (*count as u64) <= n
    });
    if directive(&spec, "hang").is_some() || hang_first {
        let _guard = CancelGuard(state.clone(), false);
        std::future::pending::<()>().await;
    }
    if directive(&spec, "reset").is_some() {
        // A service error: hyper resets the stream (HTTP/2) or closes the
        // connection (HTTP/1.1) without an answer.
        return Err(std::io::Error::other("chaos reset"));
    }

    let mut fail = false;
    if let Some(n) = number(&spec, "fail-first") {
        let mut by_key = state.failures_by_key.lock().unwrap();
        let count = by_key.entry(key.clone().unwrap_or_default()).or_default();
        if (*count as u64) < n {
            *count += 1;
            fail = true;
        }
    }
    let pushback = directive(&spec, "pushback").map(str::to_string);
    let failure_trailers = |code: u64| {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from(code));
        t.insert("grpc-message", HeaderValue::from_static("chaos"));
        if let Some(p) = &pushback {
            t.insert("grpc-retry-pushback-ms", HeaderValue::from_str(p).unwrap());
        }
        t
    };
    let status = number(&spec, "status")
        .or(fail.then_some(14))
        .filter(|_| grpc);
    let http = number(&spec, "http").or((fail && !grpc).then_some(503));

    if let Some(code) = http {
        let mut resp = Response::new(full(format!("{code} from {}", state.name)));
        *resp.status_mut() = StatusCode::from_u16(code as u16).unwrap();
        return Ok(resp);
    }
    if let Some(code) = status {
        // Trailers-only: the status rides in the one HEADERS frame.
        let mut resp = Response::new(empty());
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        resp.headers_mut().extend(failure_trailers(code));
        return Ok(resp);
    }
    if let Some(code) = number(&spec, "trailer-status") {
        let (tx, body) = channel_body();
        let trailers = failure_trailers(code);
        tokio::spawn(async move {
            let _ = tx.send(Frame::trailers(trailers)).await;
        });
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        return Ok(resp);
    }

    let name = state.name.clone();
    if grpc {
        // Echo the last gRPC message of the request (an EchoRequest with only
        // a payload reads as an EchoReply with that payload).
        let request = last_grpc_message(&request);
        let (tx, body) = channel_body();
        tokio::spawn(async move {
            let _ = tx.send(Frame::data(request)).await;
            let mut t = HeaderMap::new();
            t.insert("grpc-status", HeaderValue::from_static("0"));
            let _ = tx.send(Frame::trailers(t)).await;
        });
        let mut resp = Response::new(body);
        resp.headers_mut()
            .insert("content-type", HeaderValue::from_static("application/grpc"));
        resp.headers_mut()
            .insert("x-served-by", HeaderValue::from_str(&name).unwrap());
        return Ok(resp);
    }
    let mut resp = Response::new(full(format!("ok from {name}")));
    resp.headers_mut()
        .insert("x-served-by", HeaderValue::from_str(&name).unwrap());
    Ok(resp)
}

/// The last length-prefixed message of a gRPC body.
fn last_grpc_message(body: &bytes::Bytes) -> bytes::Bytes {
    let mut at = 0;
    let mut last = bytes::Bytes::new();
    while body.len() >= at + 5 {
        let len =
            u32::from_be_bytes([body[at + 1], body[at + 2], body[at + 3], body[at + 4]]) as usize;
        let end = (at + 5 + len).min(body.len());
        last = body.slice(at..end);
        at = end;
    }
    last
}
