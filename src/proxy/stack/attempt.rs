//! One attempt on its endpoint: the request marked for it
//! (`x-pylon-attempt`, the attempt span's `traceparent`, the time that
//! remains as `grpc-timeout` for a gRPC call), counted in flight on the
//! endpoint, and bounded by the attempt timeout (`timeouts.backendRequest`,
//! until the response head) and the call's deadline, whichever comes first.
//!
//! Not tower's `Timeout`: the limit is an instant that moves with the
//! deadline, and which of the two ran out decides the error
//! (`attempt-timeout`, which counts against the endpoint, or
//! `deadline-exceeded`, which does not).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use http::{HeaderValue, Response};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower::{Layer, Service};

use super::{Attempted, Failed, Routed, expired};
use crate::http::body::ProxyBody;
use crate::http::deadline::{GRPC_TIMEOUT, format_grpc_timeout};
use crate::http::error::ProxyError;
use crate::http::pool::NewConnection;
use crate::policy::backend::{Backend, Endpoint};
use crate::policy::routing::Rule;
use crate::resilience::balancer::LoadGuard;
use crate::telemetry::request_scope::unique_per_request;
use crate::telemetry::trace::{SpanRecord, TRACEPARENT};
use std::sync::Arc;

/// Names the attempt (1 for the first try) on every upstream request.
pub const X_PYLON_ATTEMPT: &str = "x-pylon-attempt";

/// The value of `x-pylon-attempt`: a static one for the first attempts
/// (`HeaderValue::from(u32)` allocates, on every request).
fn attempt_value(n: u32) -> HeaderValue {
    const FIRST: [&str; 9] = ["1", "2", "3", "4", "5", "6", "7", "8", "9"];
    match n.checked_sub(1).and_then(|i| FIRST.get(i as usize)) {
        Some(v) => HeaderValue::from_static(v),
        None => HeaderValue::from(n),
    }
}

#[derive(Clone, Copy)]
pub struct AttemptLayer<'a> {
    rule: &'a Rule,
    backend: &'a Backend,
}

impl<'a> AttemptLayer<'a> {
    pub fn new(rule: &'a Rule, backend: &'a Backend) -> Self {
        AttemptLayer { rule, backend }
    }
}

impl<'a, S> Layer<S> for AttemptLayer<'a> {
    type Service = AttemptService<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        AttemptService {
            rule: self.rule,
            backend: self.backend,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct AttemptService<'a, S> {
    rule: &'a Rule,
    backend: &'a Backend,
    inner: S,
}

impl<'a, S> Service<Routed> for AttemptService<'a, S>
where
    S: Service<Routed, Response = Response<ProxyBody>, Error = ProxyError>,
{
    type Response = Attempted;
    type Error = Failed;
    type Future = AttemptFuture<'a, S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        self.inner.poll_ready(cx).map_err(Failed::new)
    }

    fn call(&mut self, mut routed: Routed) -> Self::Future {
        let now = Instant::now();
        let endpoint = routed.endpoint.clone();
        let span = routed
            .ctx
            .trace
            .as_ref()
            .map(|t| t.attempt(routed.n, endpoint.addr()));
        let headers = routed.req.headers_mut();
        headers.insert(X_PYLON_ATTEMPT, attempt_value(routed.n));
        if let Some(span) = &span {
            headers.insert(TRACEPARENT, span.traceparent());
        }
        let deadline = routed.ctx.deadline;
        if let Some(d) = deadline {
            let remaining = d.at.saturating_duration_since(now);
            if remaining.is_zero() {
                return AttemptFuture::Done {
                    failed: Some(Failed {
                        error: expired(self.backend, deadline),
                        endpoint: Some(endpoint),
                        span,
                    }),
                };
            }
            // Only gRPC servers read it; a plain HTTP call carries none.
            // The time left differs at every call: never indexed in HPACK,
            // like the request ID.
            if routed.ctx.grpc {
                headers.insert(
                    GRPC_TIMEOUT,
                    unique_per_request(format_grpc_timeout(remaining)),
                );
            }
        }
        // The earlier of the attempt timeout and the deadline; the deadline
        // when they fall together.
        let limit = match (self.rule.timeouts.and_then(|t| t.backend_request), deadline) {
            (Some(t), Some(d)) if d.at <= now + t => Some((d.at, Limit::Deadline)),
            (Some(t), _) => Some((now + t, Limit::AttemptTimeout(t))),
            (None, Some(d)) => Some((d.at, Limit::Deadline)),
            (None, None) => None,
        };
        let load = endpoint.load.begin();
        AttemptFuture::Sending {
            fut: self.inner.call(routed),
            timer: limit.map(|(at, _)| sleep_until(at)),
            state: Some(Sending {
                backend: self.backend,
                endpoint,
                load,
                span,
                limit: limit.map(|(_, l)| l),
                deadline,
                start: now,
            }),
        }
    }
}

/// Which limit an attempt is under.
#[derive(Clone, Copy)]
enum Limit {
    Deadline,
    AttemptTimeout(Duration),
}

pub struct Sending<'a> {
    backend: &'a Backend,
    endpoint: Arc<Endpoint>,
    load: LoadGuard,
    span: Option<SpanRecord>,
    limit: Option<Limit>,
    deadline: Option<super::Deadline>,
    start: Instant,
}

pin_project! {
    #[project = AttemptProj]
    pub enum AttemptFuture<'a, F> {
        Sending {
            #[pin] fut: F,
            #[pin] timer: Option<Sleep>,
            state: Option<Sending<'a>>,
        },
        Done { failed: Option<Failed> },
    }
}

impl<F> Future for AttemptFuture<'_, F>
where
    F: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
{
    type Output = Result<Attempted, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            AttemptProj::Done { failed } => match failed.take() {
                Some(f) => Poll::Ready(Err(f)),
                None => panic!("AttemptFuture polled after completion"),
            },
            AttemptProj::Sending { fut, timer, state } => {
                let sent = match fut.poll(cx) {
                    Poll::Ready(result) => Ok(result),
                    Poll::Pending => match timer.as_pin_mut().map(|t| t.poll(cx)) {
                        Some(Poll::Ready(())) => Err(()),
                        _ => return Poll::Pending,
                    },
                };
                let Some(s) = state.take() else {
                    panic!("AttemptFuture polled after completion");
                };
                Poll::Ready(match sent {
                    Ok(Ok(resp)) => {
                        // A connect's handshakes are not the endpoint's
                        // latency: counted, one slow first answer would
                        // price it out of the balancer's picks for tens
                        // of seconds.
                        if resp.extensions().get::<NewConnection>().is_none() {
                            let end = Instant::now();
                            s.load.record_latency(end - s.start, end);
                        }
                        Ok(Attempted {
                            resp,
                            endpoint: s.endpoint,
                            load: s.load,
                            span: s.span,
                            pending_status: false,
                            stall: None,
                        })
                    }
                    Ok(Err(error)) => Err(Failed {
                        error,
                        endpoint: Some(s.endpoint),
                        span: s.span,
                    }),
                    // The limit ran out: dropping the send resets the attempt.
                    Err(()) => {
                        let error = match s.limit {
                            Some(Limit::AttemptTimeout(timeout)) => {
                                s.backend.metrics.attempt_timeouts.inc();
                                ProxyError::AttemptTimeout {
                                    backend: s.backend.name.clone(),
                                    addr: s.endpoint.addr(),
                                    timeout,
                                }
                            }
                            _ => expired(s.backend, s.deadline),
                        };
                        Err(Failed {
                            error,
                            endpoint: Some(s.endpoint),
                            span: s.span,
                        })
                    }
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn attempt_values_are_the_attempt_number() {
        for n in [1, 2, 9, 10, 11, 123] {
            assert_eq!(attempt_value(n), HeaderValue::from(n), "{n}");
        }
    }
}
