//! Outlier detection's view of an attempt: a failure of the endpoint (it
//! could not be reached, it reset the stream, the attempt timeout ran out)
//! and the status of its answer — from the response head, from trailers
//! read early by the retry layer, or, once the response is passed on, from
//! the trailers at the end of its body (the attempt's observer of
//! `http::end`, which also releases its in-flight count and ends its span).
//! The call's deadline never counts against the endpoint, nor does a
//! response broken off because the caller's request body stalled past the
//! body read timeout.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use http::Response;
use http_body::Frame;
use opentelemetry::KeyValue;
use pin_project_lite::pin_project;
use pylon_proto::policy::GrpcCode;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Attempted, Deadline, Failed, Routed};
use crate::http::body::ProxyBody;
use crate::http::end::{Ending, OnEnd, ResponseEnd, StreamDeadline, grpc_status, observe, watch};
use crate::http::error::ProxyError;
use crate::http::request_body::BodyStall;
use crate::policy::backend::{Backend, Endpoint};
use crate::resilience::balancer::LoadGuard;
use crate::resilience::outlier::Outcome;
use crate::telemetry::request_scope::record_status;
use crate::telemetry::trace::SpanRecord;

#[derive(Clone, Copy)]
pub struct OutlierLayer<'a> {
    backend: &'a Backend,
}

impl<'a> OutlierLayer<'a> {
    pub fn new(backend: &'a Backend) -> Self {
        OutlierLayer { backend }
    }
}

impl<'a, S> Layer<S> for OutlierLayer<'a> {
    type Service = OutlierService<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        OutlierService {
            backend: self.backend,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct OutlierService<'a, S> {
    backend: &'a Backend,
    inner: S,
}

impl<'a, S> Service<Routed> for OutlierService<'a, S>
where
    S: Service<Routed, Response = Attempted, Error = Failed>,
{
    type Response = Attempted;
    type Error = Failed;
    type Future = OutlierFuture<'a, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, routed: Routed) -> Self::Future {
        OutlierFuture {
            grpc: routed.ctx.grpc,
            stall: routed.req.extensions().get::<BodyStall>().cloned(),
            fut: self.inner.call(routed),
            backend: self.backend,
        }
    }
}

pin_project! {
    pub struct OutlierFuture<'a, F> {
        #[pin]
        fut: F,
        backend: &'a Backend,
        grpc: bool,
        stall: Option<BodyStall>,
    }
}

impl<F> Future for OutlierFuture<'_, F>
where
    F: Future<Output = Result<Attempted, Failed>>,
{
    type Output = Result<Attempted, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        let result = ready!(this.fut.poll(cx));
        let now = Instant::now();
        Poll::Ready(match result {
            Ok(mut attempted) => {
                let http = attempted.resp.status().as_u16();
                let outcome = match this
                    .grpc
                    .then(|| grpc_status(attempted.resp.headers()))
                    .flatten()
                {
                    Some(code) => Some(grpc_outcome(code)),
                    // The status comes in trailers.
                    None if *this.grpc && http == 200 => None,
                    None => Some(http_outcome(http)),
                };
                match outcome {
                    Some(outcome) => this.backend.observe(&attempted.endpoint, outcome, now),
                    None => attempted.pending_status = true,
                }
                attempted.stall = this.stall.take();
                Ok(attempted)
            }
            Err(failed) => {
                if let Some(endpoint) = &failed.endpoint
                    && endpoint_failure(&failed.error)
                {
                    this.backend.observe(endpoint, GATEWAY_FAILURE, now);
                }
                Err(failed)
            }
        })
    }
}

impl Attempted {
    /// A gRPC status read early from the trailers (the retry layer's peek):
    /// told to outlier detection now, not again at the end of the body.
    pub fn trailers_status(&mut self, backend: &Backend, code: GrpcCode) {
        backend.observe(&self.endpoint, grpc_outcome(code), Instant::now());
        self.pending_status = false;
    }

    /// The caller's response: the deadline keeps applying while it streams,
    /// a frame read early goes first, and the end of its body settles the
    /// attempt.
    pub fn deliver(
        self,
        backend: &Arc<Backend>,
        peeked: Option<Frame<Bytes>>,
        deadline: Option<Deadline>,
        grpc: bool,
    ) -> Response<ProxyBody> {
        let Attempted {
            resp,
            endpoint,
            load,
            span,
            pending_status,
            stall,
        } = self;
        let guard = AttemptGuard {
            backend: backend.clone(),
            endpoint,
            _load: load,
            pending_status,
            span,
            stall,
        };
        let deadline = deadline.map(|d| StreamDeadline {
            sleep: Box::pin(tokio::time::sleep_until(d.at)),
            timeout: d.timeout,
        });
        observe(watch(resp, peeked, deadline, grpc), Box::new(guard))
    }
}

/// What an attempt occupies until its response body ends; then tells
/// outlier detection a status that came in trailers.
struct AttemptGuard {
    backend: Arc<Backend>,
    endpoint: Arc<Endpoint>,
    _load: LoadGuard,
    /// The gRPC status is still to come, in trailers.
    pending_status: bool,
    /// The attempt's span, ended (exported) with the body.
    span: Option<SpanRecord>,
    stall: Option<BodyStall>,
}

impl OnEnd for AttemptGuard {
    fn on_end(mut self: Box<Self>, end: &ResponseEnd) {
        let now = Instant::now();
        if let Some(span) = &mut self.span {
            match end.ending {
                Ending::Complete => {
                    if let Some(code) = end.trailers_grpc {
                        record_status(span, false, None, Some(code));
                    }
                }
                Ending::Failed => span.fail("response stream failed"),
                Ending::DeadlineExceeded => {
                    span.set(KeyValue::new("pylon.error", "deadline-exceeded"));
                    span.fail("deadline exceeded while the response streamed");
                }
                Ending::Dropped => span.set(KeyValue::new("pylon.cancelled", true)),
            }
        }
        match end.ending {
            Ending::Complete if self.pending_status => {
                // A gRPC response without a status: clients report INTERNAL.
                let outcome = end.trailers_grpc.map_or(SERVER_FAILURE, grpc_outcome);
                self.backend.observe(&self.endpoint, outcome, now);
            }
            // The caller's body stalled and the exchange was cut for it.
            Ending::Failed if self.stall.as_ref().and_then(BodyStall::expired).is_some() => {}
            Ending::Failed => self.backend.observe(&self.endpoint, GATEWAY_FAILURE, now),
            Ending::DeadlineExceeded => {
                self.backend.metrics.request_timeouts.inc();
            }
            Ending::Complete | Ending::Dropped => {}
        }
    }
}

pub const GATEWAY_FAILURE: Outcome = Outcome::Failure {
    server_error: true,
    gateway_error: true,
};
pub const SERVER_FAILURE: Outcome = Outcome::Failure {
    server_error: true,
    gateway_error: false,
};

/// How a gRPC status counts for outlier detection.
pub fn grpc_outcome(code: GrpcCode) -> Outcome {
    match code {
        GrpcCode::Unavailable => GATEWAY_FAILURE,
        GrpcCode::Unknown | GrpcCode::Internal | GrpcCode::DataLoss => SERVER_FAILURE,
        _ => Outcome::Success,
    }
}

/// How an HTTP status counts for outlier detection.
pub fn http_outcome(status: u16) -> Outcome {
    match status {
        502..=504 => GATEWAY_FAILURE,
        500..=599 => SERVER_FAILURE,
        _ => Outcome::Success,
    }
}

/// Whether a failure is the endpoint's (rather than the proxy's, the
/// policy's or the call's deadline).
pub fn endpoint_failure(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::Tls { .. }
            | ProxyError::IdentityMismatch { .. }
            | ProxyError::Upstream { .. }
            | ProxyError::AttemptTimeout { .. }
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outcomes_for_outlier_detection() {
        assert_eq!(grpc_outcome(GrpcCode::Unavailable), GATEWAY_FAILURE);
        assert_eq!(grpc_outcome(GrpcCode::Internal), SERVER_FAILURE);
        assert_eq!(grpc_outcome(GrpcCode::NotFound), Outcome::Success);
        assert_eq!(http_outcome(503), GATEWAY_FAILURE);
        assert_eq!(http_outcome(500), SERVER_FAILURE);
        assert_eq!(http_outcome(404), Outcome::Success);
    }
}
