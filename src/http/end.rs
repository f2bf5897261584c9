//! The end of a response: the one place the proxy watches a response body
//! until it is over, and tells whoever needs to know how it ended.
//!
//! A response is wrapped once ([`EndBody`]), however many observers it has:
//! the attempt that produced it (in-flight load, bulkhead permit, outlier
//! detection, the attempt's span), the call's RED metrics, the request's
//! span and access record, a permit held for the local app. Each frame is
//! read once: data is counted, trailers give the gRPC status and the
//! proxy's error code. When the body ends (its last frame, a failure, the
//! deadline, or the caller dropping it) every observer gets the same
//! [`ResponseEnd`], in the order they were added.
//!
//! The wrapper also enforces a call's deadline while the response streams
//! (a gRPC caller gets `DEADLINE_EXCEEDED` in trailers, an HTTP caller a
//! reset stream), ends a gRPC response whose upstream fails mid-stream with
//! `UNAVAILABLE` in trailers (an HTTP caller gets the broken body), and
//! replays a frame read early to decide on a retry.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response};
use http_body::{Body, Frame, SizeHint};
use pylon_proto::policy::GrpcCode;
use tokio::time::Sleep;

use super::body::{BoxError, ProxyBody};
use super::error::{
    GRPC_MESSAGE, GRPC_STATUS, ProxyError, X_PYLON_ERROR, is_grpc, percent_encode_grpc_message,
};

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// Its last frame was read.
    Complete,
    /// The upstream failed mid-stream (reset, connection lost).
    Failed,
    /// The call's deadline passed while the response was streaming.
    DeadlineExceeded,
    /// The caller went away first.
    Dropped,
}

/// What the end of a response says, read once for every observer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResponseEnd {
    pub ending: Ending,
    /// The response head's HTTP status.
    pub status: u16,
    /// `grpc-status` of the head (a trailers-only response).
    pub head_grpc: Option<GrpcCode>,
    /// `grpc-status` of the trailers, or the one the deadline wrote.
    pub trailers_grpc: Option<GrpcCode>,
    /// The proxy's error code (`x-pylon-error`) of the head or trailers.
    pub error: Option<&'static str>,
    /// Data bytes passed on.
    pub bytes: u64,
}

impl ResponseEnd {
    /// The response's gRPC status: the trailers', else the head's.
    pub fn grpc_status(&self) -> Option<GrpcCode> {
        self.trailers_grpc.or(self.head_grpc)
    }
}

/// Told how a response ended, once.
pub trait OnEnd: Send + Sync {
    fn on_end(self: Box<Self>, end: &ResponseEnd);
}

/// A deadline that applies while the response streams.
pub struct StreamDeadline {
    pub sleep: Pin<Box<Sleep>>,
    pub timeout: Duration,
}

/// Observers a response usually has at most (attempt, metrics, request);
/// more still work.
const OBSERVERS: usize = 3;

/// A response body watched to its end.
pub struct EndBody {
    inner: ProxyBody,
    peeked: Option<Frame<Bytes>>,
    deadline: Option<StreamDeadline>,
    /// The request is gRPC: a deadline is told in trailers.
    grpc: bool,
    end: ResponseEnd,
    observers: Vec<Box<dyn OnEnd>>,
    finished: bool,
}

impl std::fmt::Debug for EndBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndBody")
            .field("grpc", &self.grpc)
            .field("end", &self.end)
            .field("observers", &self.observers.len())
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// The gRPC status in a header block (a head or trailers).
pub fn grpc_status(headers: &HeaderMap) -> Option<GrpcCode> {
    let v = headers.get(GRPC_STATUS)?.to_str().ok()?;
    GrpcCode::from_u8(v.parse().ok()?)
}

/// The proxy's error code in a header block, when it is one it knows.
fn error_code(headers: &HeaderMap) -> Option<&'static str> {
    headers
        .get(X_PYLON_ERROR)
        .and_then(|v| ProxyError::known_code(v.as_bytes()))
}

/// Adds `observer` to the end of `resp`: its body is wrapped the first time
/// and only then; a later observer joins the same wrapper.
pub fn observe(mut resp: Response<ProxyBody>, observer: Box<dyn OnEnd>) -> Response<ProxyBody> {
    if let ProxyBody::End(body) = resp.body_mut()
        && !body.finished
    {
        body.observers.push(observer);
        return resp;
    }
    // The observer does not know the request; a gRPC response says so.
    let grpc = is_grpc(resp.headers());
    let mut resp = watch(resp, None, None, grpc);
    if let ProxyBody::End(body) = resp.body_mut() {
        body.observers.push(observer);
    }
    resp
}

/// Wraps `resp` to watch it to its end: `peeked` (a frame read early) is
/// passed on first, and `deadline` applies while it streams; when `grpc`,
/// the deadline and an upstream failure are told in trailers. Observers are
/// added with [`observe`].
pub fn watch(
    resp: Response<ProxyBody>,
    peeked: Option<Frame<Bytes>>,
    deadline: Option<StreamDeadline>,
    grpc: bool,
) -> Response<ProxyBody> {
    let (parts, inner) = resp.into_parts();
    let end = ResponseEnd {
        ending: Ending::Complete,
        status: parts.status.as_u16(),
        head_grpc: grpc_status(&parts.headers),
        trailers_grpc: None,
        error: error_code(&parts.headers),
        bytes: 0,
    };
    let body = EndBody {
        inner,
        peeked,
        deadline,
        grpc,
        end,
        observers: Vec::with_capacity(OBSERVERS),
        finished: false,
    };
    Response::from_parts(parts, ProxyBody::End(Box::new(body)))
}

impl EndBody {
    fn finish(&mut self, ending: Ending) {
        if self.finished {
            return;
        }
        self.finished = true;
        self.end.ending = ending;
        for observer in self.observers.drain(..) {
            observer.on_end(&self.end);
        }
    }

    /// Reads what a frame says, once.
    fn note(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            self.end.bytes += data.len() as u64;
        } else if let Some(t) = frame.trailers_ref() {
            self.end.trailers_grpc = grpc_status(t);
            if self.end.error.is_none() {
                self.end.error = error_code(t);
            }
        }
    }

    fn deadline_trailers(timeout: Duration) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(
            GRPC_STATUS,
            HeaderValue::from(u16::from(GrpcCode::DeadlineExceeded.as_u8())),
        );
        let message =
            format!("pylon: deadline of {timeout:?} exceeded while the response streamed");
        if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(&message)) {
            t.insert(GRPC_MESSAGE, v);
        }
        t.insert(X_PYLON_ERROR, HeaderValue::from_static(DEADLINE_EXCEEDED));
        t
    }

    fn failure_trailers(error: &BoxError) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(
            GRPC_STATUS,
            HeaderValue::from(u16::from(GrpcCode::Unavailable.as_u8())),
        );
        let message = format!("pylon: the upstream failed while the response streamed: {error}");
        if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(&message)) {
            t.insert(GRPC_MESSAGE, v);
        }
        t.insert(X_PYLON_ERROR, HeaderValue::from_static(UPSTREAM_FAILED));
        t
    }
}

const DEADLINE_EXCEEDED: &str = "deadline-exceeded";
const UPSTREAM_FAILED: &str = "upstream-failed";

impl Body for EndBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = self.get_mut();
        if this.finished {
            return Poll::Ready(None);
        }
        if let Some(frame) = this.peeked.take() {
            this.note(&frame);
            if frame.is_trailers() {
                this.finish(Ending::Complete);
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.sleep.as_mut().poll(cx).is_ready()
        {
            let timeout = deadline.timeout;
            // Dropping the upstream body resets the upstream stream.
            this.inner = ProxyBody::Empty;
            this.end.error = Some(DEADLINE_EXCEEDED);
            if this.grpc {
                this.end.trailers_grpc = Some(GrpcCode::DeadlineExceeded);
            }
            this.finish(Ending::DeadlineExceeded);
            return Poll::Ready(Some(if this.grpc {
                Ok(Frame::trailers(Self::deadline_trailers(timeout)))
            } else {
                Err(format!("deadline of {timeout:?} exceeded while the response streamed").into())
            }));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.finish(Ending::Complete);
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) if this.grpc => {
                // A gRPC caller always gets a status: a reset stream would
                // reach it as INTERNAL or CANCELLED, not as the
                // unavailability it is.
                this.inner = ProxyBody::Empty;
                this.end.trailers_grpc = Some(GrpcCode::Unavailable);
                this.end.error = Some(UPSTREAM_FAILED);
                this.finish(Ending::Failed);
                Poll::Ready(Some(Ok(Frame::trailers(Self::failure_trailers(&e)))))
            }
            Poll::Ready(Some(Err(e))) => {
                this.finish(Ending::Failed);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.note(&frame);
                if frame.is_trailers() || this.inner.is_end_stream() {
                    this.finish(Ending::Complete);
                }
                Poll::Ready(Some(Ok(frame)))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished || (self.peeked.is_none() && self.inner.is_end_stream())
    }

    fn size_hint(&self) -> SizeHint {
        let mut hint = self.inner.size_hint();
        if let Some(data) = self.peeked.as_ref().and_then(Frame::data_ref) {
            let n = data.len() as u64;
            hint.set_lower(hint.lower() + n);
            if let Some(u) = hint.upper() {
                hint.set_upper(u + n);
            }
        }
        hint
    }
}

impl Drop for EndBody {
    fn drop(&mut self) {
        let ending = if self.inner.is_end_stream() && self.peeked.is_none() {
            Ending::Complete
        } else {
            Ending::Dropped
        };
        self.finish(ending);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;
    use std::sync::{Arc, Mutex};

    struct Record(Arc<Mutex<Vec<(usize, ResponseEnd)>>>, usize);

    impl OnEnd for Record {
        fn on_end(self: Box<Self>, end: &ResponseEnd) {
            self.0.lock().unwrap().push((self.1, *end));
        }
    }

    fn recorded() -> Arc<Mutex<Vec<(usize, ResponseEnd)>>> {
        Arc::new(Mutex::new(Vec::new()))
    }

    /// Frames, then the end; or never anything when `pending`.
    struct Frames {
        frames: std::collections::VecDeque<Frame<Bytes>>,
        pending: bool,
    }

    impl Body for Frames {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if self.pending {
                return Poll::Pending;
            }
            Poll::Ready(self.frames.pop_front().map(Ok))
        }
    }

    /// A message, then the upstream fails.
    struct Failing(bool);

    impl Body for Failing {
        type Data = Bytes;
        type Error = BoxError;

        fn poll_frame(
            mut self: Pin<&mut Self>,
            _cx: &mut Context<'_>,
        ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
            if std::mem::replace(&mut self.0, true) {
                Poll::Ready(Some(Err("connection reset".into())))
            } else {
                Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"msg")))))
            }
        }
    }

    fn grpc_body() -> ProxyBody {
        let mut t = HeaderMap::new();
        t.insert("grpc-status", HeaderValue::from_static("14"));
        ProxyBody::boxed(Frames {
            frames: [
                Frame::data(Bytes::from_static(b"hello")),
                Frame::trailers(t),
            ]
            .into(),
            pending: false,
        })
    }

    #[tokio::test]
    async fn every_observer_hears_the_same_end_once_from_one_wrapper() {
        let seen = recorded();
        let resp = Response::new(grpc_body());
        let resp = observe(resp, Box::new(Record(seen.clone(), 1)));
        let resp = observe(resp, Box::new(Record(seen.clone(), 2)));
        let ProxyBody::End(body) = resp.body() else {
            panic!("not wrapped")
        };
        assert!(matches!(body.inner, ProxyBody::Boxed(_)), "wrapped twice");
        assert!(seen.lock().unwrap().is_empty());
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(
            collected.trailers().and_then(grpc_status),
            Some(GrpcCode::Unavailable)
        );
        let seen = seen.lock().unwrap();
        assert_eq!(seen.len(), 2);
        assert_eq!((seen[0].0, seen[1].0), (1, 2));
        let end = seen[0].1;
        assert_eq!(end, seen[1].1);
        assert_eq!(end.ending, Ending::Complete);
        assert_eq!(end.status, 200);
        assert_eq!(end.grpc_status(), Some(GrpcCode::Unavailable));
        assert_eq!(end.bytes, 5);
    }

    #[tokio::test]
    async fn a_body_dropped_early_is_told_as_dropped() {
        let seen = recorded();
        let resp = observe(
            Response::new(grpc_body()),
            Box::new(Record(seen.clone(), 1)),
        );
        drop(resp);
        assert_eq!(seen.lock().unwrap()[0].1.ending, Ending::Dropped);
    }

    #[tokio::test]
    async fn a_trailers_only_error_of_the_proxy_is_read_from_the_head() {
        let seen = recorded();
        let e = ProxyError::NoBackend {
            route: "GRPCRoute/x".into(),
        };
        let resp = observe(e.to_response(true), Box::new(Record(seen.clone(), 1)));
        drop(resp.into_body().collect().await.unwrap());
        let end = seen.lock().unwrap()[0].1;
        assert_eq!(end.ending, Ending::Complete);
        assert_eq!(end.head_grpc, Some(e.grpc_code()));
        assert_eq!(end.error, Some(e.code()));
    }

    #[tokio::test]
    async fn an_upstream_failure_mid_stream_ends_a_grpc_response_with_unavailable() {
        let seen = recorded();
        let mut resp = Response::new(ProxyBody::boxed(Failing(false)));
        resp.headers_mut().insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/grpc+proto"),
        );
        let resp = observe(resp, Box::new(Record(seen.clone(), 1)));
        let collected = resp.into_body().collect().await.unwrap();
        let trailers = collected.trailers().unwrap().clone();
        assert_eq!(grpc_status(&trailers), Some(GrpcCode::Unavailable));
        assert_eq!(trailers[X_PYLON_ERROR], "upstream-failed");
        assert!(
            trailers["grpc-message"]
                .to_str()
                .unwrap()
                .contains("connection reset"),
            "{trailers:?}"
        );
        assert_eq!(collected.to_bytes(), Bytes::from_static(b"msg"));
        let end = seen.lock().unwrap()[0].1;
        assert_eq!(end.ending, Ending::Failed);
        assert_eq!(end.grpc_status(), Some(GrpcCode::Unavailable));
        assert_eq!(end.error, Some("upstream-failed"));
    }

    #[tokio::test]
    async fn an_upstream_failure_mid_stream_breaks_an_http_body() {
        let seen = recorded();
        let resp = observe(
            Response::new(ProxyBody::boxed(Failing(false))),
            Box::new(Record(seen.clone(), 1)),
        );
        assert!(resp.into_body().collect().await.is_err());
        let end = seen.lock().unwrap()[0].1;
        assert_eq!(end.ending, Ending::Failed);
        assert_eq!(end.grpc_status(), None);
    }

    #[tokio::test(start_paused = true)]
    async fn the_deadline_ends_a_grpc_response_with_trailers() {
        let seen = recorded();
        let body = Frames {
            frames: Default::default(),
            pending: true,
        };
        let deadline = StreamDeadline {
            sleep: Box::pin(tokio::time::sleep(Duration::from_millis(50))),
            timeout: Duration::from_millis(50),
        };
        let resp = watch(
            Response::new(ProxyBody::boxed(body)),
            None,
            Some(deadline),
            true,
        );
        let resp = observe(resp, Box::new(Record(seen.clone(), 1)));
        let collected = resp.into_body().collect().await.unwrap();
        assert_eq!(
            collected.trailers().and_then(grpc_status),
            Some(GrpcCode::DeadlineExceeded)
        );
        let end = seen.lock().unwrap()[0].1;
        assert_eq!(end.ending, Ending::DeadlineExceeded);
        assert_eq!(end.grpc_status(), Some(GrpcCode::DeadlineExceeded));
        assert_eq!(end.error, Some("deadline-exceeded"));
    }
}
