//! The response body of a routed call, watched until its end.
//!
//! It enforces the call's deadline while the response streams (a gRPC
//! caller gets `DEADLINE_EXCEEDED` in trailers, an HTTP caller a reset
//! stream), replays a frame read early to decide on a retry, and when the
//! body ends hands the outcome (the gRPC status in the trailers, a failure, a
//! timeout, or the caller going away) to whoever tracks the attempt: the
//! in-flight count, the bulkhead permit and outlier detection.

use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, HeaderValue};
use http_body::{Body, Frame, SizeHint};
use pylon_proto::policy::GrpcCode;
use tokio::time::Sleep;

use super::body::{BoxError, ProxyBody};
use super::error::{X_PYLON_ERROR, percent_encode_grpc_message};

/// How a response body ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyEnd {
    /// The upstream finished; the gRPC status of its trailers, if any.
    Complete { grpc_status: Option<GrpcCode> },
    /// The upstream failed mid-stream (reset, connection lost).
    Failed,
    /// The call's deadline passed while the response was streaming.
    DeadlineExceeded,
    /// The caller went away first.
    Dropped,
}

/// Told how the body ended, once.
pub trait OnEnd: Send + Sync {
    fn on_end(self: Box<Self>, end: BodyEnd);
}

/// A deadline that applies while the response streams.
pub struct StreamDeadline {
    pub sleep: Pin<Box<Sleep>>,
    pub timeout: Duration,
}

pub struct TrackedBody {
    inner: ProxyBody,
    peeked: Option<Frame<Bytes>>,
    deadline: Option<StreamDeadline>,
    grpc: bool,
    on_end: Option<Box<dyn OnEnd>>,
    finished: bool,
}

impl std::fmt::Debug for TrackedBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedBody")
            .field("grpc", &self.grpc)
            .field("finished", &self.finished)
            .finish()
    }
}

impl TrackedBody {
    pub fn new(
        inner: ProxyBody,
        peeked: Option<Frame<Bytes>>,
        deadline: Option<StreamDeadline>,
        grpc: bool,
        on_end: Option<Box<dyn OnEnd>>,
    ) -> Self {
        TrackedBody {
            inner,
            peeked,
            deadline,
            grpc,
            on_end,
            finished: false,
        }
    }

    fn end(&mut self, end: BodyEnd) {
        self.finished = true;
        if let Some(on_end) = self.on_end.take() {
            on_end.on_end(end);
        }
    }

    fn deadline_trailers(timeout: Duration) -> HeaderMap {
        let mut t = HeaderMap::new();
        t.insert(
            "grpc-status",
            HeaderValue::from(u16::from(GrpcCode::DeadlineExceeded.as_u8())),
        );
        let message =
            format!("pylon: deadline of {timeout:?} exceeded while the response streamed");
        if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(&message)) {
            t.insert("grpc-message", v);
        }
        t.insert(X_PYLON_ERROR, HeaderValue::from_static("deadline-exceeded"));
        t
    }
}

/// The gRPC status in a trailers frame.
pub fn grpc_status(headers: &HeaderMap) -> Option<GrpcCode> {
    let v = headers.get("grpc-status")?.to_str().ok()?;
    GrpcCode::from_u8(v.parse().ok()?)
}

impl Body for TrackedBody {
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
            if let Some(t) = frame.trailers_ref() {
                let status = grpc_status(t);
                this.end(BodyEnd::Complete {
                    grpc_status: status,
                });
            }
            return Poll::Ready(Some(Ok(frame)));
        }
        if let Some(deadline) = this.deadline.as_mut()
            && deadline.sleep.as_mut().poll(cx).is_ready()
        {
            let timeout = deadline.timeout;
            // Dropping the upstream body resets the upstream stream.
            this.inner = ProxyBody::Empty;
            this.end(BodyEnd::DeadlineExceeded);
            return Poll::Ready(Some(if this.grpc {
                Ok(Frame::trailers(Self::deadline_trailers(timeout)))
            } else {
                Err(format!("deadline of {timeout:?} exceeded while the response streamed").into())
            }));
        }
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(None) => {
                this.end(BodyEnd::Complete { grpc_status: None });
                Poll::Ready(None)
            }
            Poll::Ready(Some(Err(e))) => {
                this.end(BodyEnd::Failed);
                Poll::Ready(Some(Err(e)))
            }
            Poll::Ready(Some(Ok(frame))) => {
                if let Some(t) = frame.trailers_ref() {
                    let status = grpc_status(t);
                    this.end(BodyEnd::Complete {
                        grpc_status: status,
                    });
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

impl Drop for TrackedBody {
    fn drop(&mut self) {
        if !self.finished {
            let end = if self.inner.is_end_stream() && self.peeked.is_none() {
                BodyEnd::Complete { grpc_status: None }
            } else {
                BodyEnd::Dropped
            };
            self.end(end);
        }
    }
}
