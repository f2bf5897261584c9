//! The attempts of a call. Without a retry rule: one attempt, its answer
//! passed on. With one (`proxy::retry::RetryPolicy` decides): the request
//! body recorded for replay, each answer judged — a gRPC status peeked at
//! in the first body frame when the head has none — and either passed on
//! or discarded for another attempt after the backoff (or the server's
//! pushback), on an endpoint this call has not tried. The answer a retry
//! would replace is kept until the retry is under way, so that the caller
//! gets it if no endpoint is left to try.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::request::Parts;
use http::{Request, Response};
use http_body::{Body, Frame};
use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower::{Layer, Service};

use super::outlier::endpoint_failure;
use super::{Attempt, Attempted, Call, CallCtx, CallSummary, Called, Failed, expired};
use crate::http::body::ProxyBody;
use crate::http::end::grpc_status;
use crate::http::error::ProxyError;
use crate::http::replay::ReplayBody;
use crate::http::request_body::BodyStall;
use crate::policy::backend::Backend;
use crate::policy::routing::Rule;
use crate::proxy::retry::{Answered, Decision, Deliver, Outcome, Pushback, RetryPolicy};
use crate::telemetry::request_scope::{record_error, record_status};
use crate::telemetry::trace::SpanRecord;

#[derive(Clone, Copy)]
pub struct RetryLayer<'a> {
    rule: &'a Rule,
    backend: &'a Arc<Backend>,
}

impl<'a> RetryLayer<'a> {
    pub fn new(rule: &'a Rule, backend: &'a Arc<Backend>) -> Self {
        RetryLayer { rule, backend }
    }
}

impl<'a, S> Layer<S> for RetryLayer<'a> {
    type Service = RetryService<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        RetryService {
            rule: self.rule,
            backend: self.backend,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct RetryService<'a, S> {
    rule: &'a Rule,
    backend: &'a Arc<Backend>,
    inner: S,
}

impl<'a, S> Service<Call> for RetryService<'a, S>
where
    S: Service<Attempt, Response = Attempted, Error = Failed> + Clone,
{
    type Response = Called;
    type Error = Infallible;
    type Future = RetryFuture<'a, S>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let (parts, body) = call.req.into_parts();
        let policy = self.rule.retry.as_ref().map(RetryPolicy::new);
        let (body, replay) = match policy {
            None => (Some(body), None),
            Some(_) => (None, Some(ReplayBody::new(body, call.ctx.replay_limit))),
        };
        RetryFuture {
            state: State::Start,
            timer: None,
            inner: self.inner.clone(),
            backend: self.backend,
            policy,
            parts: Some(parts),
            body,
            replay,
            ctx: call.ctx,
            n: 1,
            tried: Vec::new(),
            previous: None,
            peeking: None,
            judged: None,
            summary: CallSummary::default(),
        }
    }
}

/// What an attempt produced: a response that could be passed on (with a
/// frame read while judging it), or the caller's error. Held in place (one
/// per call, two while a retry replaces one): boxing the larger variant
/// would cost an allocation per attempt.
#[allow(clippy::large_enum_variant)]
enum Answer {
    Deliver(Attempted, Option<Frame<Bytes>>),
    Failed(Failed),
}

impl Answer {
    fn endpoint(&self) -> Option<std::net::SocketAddr> {
        match self {
            Answer::Deliver(a, _) => Some(a.endpoint.addr()),
            Answer::Failed(f) => f.endpoint.as_ref().map(|e| e.addr()),
        }
    }
}

pin_project! {
    #[project = StateProj]
    enum State<F> {
        Start,
        Sending { #[pin] fut: F, first: bool },
        Peeking,
        Backoff,
        // An answer is in `judged`: pass it on, or retry.
        Judging,
    }
}

pin_project! {
    pub struct RetryFuture<'a, S: Service<Attempt>> {
        #[pin]
        state: State<S::Future>,
        #[pin]
        timer: Option<Sleep>,
        inner: S,
        backend: &'a Arc<Backend>,
        policy: Option<RetryPolicy<'a>>,
        parts: Option<Parts>,
        body: Option<ProxyBody>,
        replay: Option<ReplayBody<ProxyBody>>,
        ctx: CallCtx,
        n: u32,
        tried: Vec<std::net::SocketAddr>,
        previous: Option<Answer>,
        peeking: Option<Attempted>,
        judged: Option<(Outcome, Option<Pushback>, Answer)>,
        summary: CallSummary,
    }
}

/// A copy of a request head for another attempt. Of the extensions only
/// the body's stall is carried (the pool reads it to tell a caller's
/// stalled body from an endpoint's failure); nothing else upstream reads
/// them.
fn clone_parts(parts: &Parts) -> Parts {
    let mut head = Request::new(());
    *head.method_mut() = parts.method.clone();
    *head.uri_mut() = parts.uri.clone();
    *head.version_mut() = parts.version;
    *head.headers_mut() = parts.headers.clone();
    if let Some(stall) = parts.extensions.get::<BodyStall>() {
        head.extensions_mut().insert(stall.clone());
    }
    head.into_parts().0
}

/// Records on an attempt's span what its response head (and a frame read
/// early) says.
fn record_head(
    span: &mut SpanRecord,
    grpc: bool,
    resp: &Response<ProxyBody>,
    peeked: Option<&Frame<Bytes>>,
) {
    let status = if grpc {
        grpc_status(resp.headers())
            .or_else(|| peeked.and_then(|f| f.trailers_ref()).and_then(grpc_status))
    } else {
        None
    };
    record_status(span, false, Some(resp.status().as_u16()), status);
}

/// How a failure reads to the retry policy.
fn failure_outcome(e: &ProxyError) -> Outcome {
    match e {
        ProxyError::DeadlineExceeded { .. } => Outcome::Final,
        ProxyError::AttemptTimeout { .. } => Outcome::AttemptTimeout,
        e if e.never_sent() => Outcome::NeverSent,
        e if endpoint_failure(e) => Outcome::Failed,
        _ => Outcome::Final,
    }
}

impl<S> RetryFuture<'_, S>
where
    S: Service<Attempt, Response = Attempted, Error = Failed>,
{
    /// The caller's outcome of a final answer.
    fn settle(self: Pin<&mut Self>, answer: Answer) -> Called {
        let this = self.project();
        let result = match answer {
            Answer::Deliver(attempted, peeked) => {
                Ok(attempted.deliver(this.backend, peeked, this.ctx.deadline, this.ctx.grpc))
            }
            Answer::Failed(f) => Err(f.error),
        };
        Called {
            result,
            summary: *this.summary,
        }
    }
}

impl<S> Future for RetryFuture<'_, S>
where
    S: Service<Attempt, Response = Attempted, Error = Failed>,
{
    type Output = Result<Called, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let mut this = self.as_mut().project();
            match this.state.as_mut().project() {
                StateProj::Start => {
                    let (parts, body) = match (this.policy, this.replay.as_ref()) {
                        (Some(_), Some(replay)) => (
                            this.parts.as_ref().map(clone_parts),
                            Some(ProxyBody::Replay(replay.retry())),
                        ),
                        _ => (this.parts.take(), this.body.take()),
                    };
                    let (Some(parts), Some(body)) = (parts, body) else {
                        panic!("RetryFuture polled after completion");
                    };
                    let fut = this.inner.call(Attempt {
                        req: Request::from_parts(parts, body),
                        ctx: this.ctx.clone(),
                        n: *this.n,
                        tried: this.tried.clone(),
                    });
                    this.state.set(State::Sending { fut, first: true });
                }
                StateProj::Sending { fut, first } => {
                    let polled = fut.poll(cx);
                    if std::mem::take(first) {
                        // The retry's endpoint is chosen: the answer it
                        // replaces goes (its upstream stream reset), unless
                        // no endpoint was left, when the caller gets it.
                        let no_endpoint =
                            matches!(&polled, Poll::Ready(Err(f)) if f.endpoint.is_none());
                        if let Some(previous) = this.previous.take() {
                            if no_endpoint {
                                this.state.set(State::Judging);
                                return Poll::Ready(Ok(self.settle(previous)));
                            }
                            this.backend.metrics.retries.inc();
                            drop(previous);
                        }
                    }
                    let Poll::Ready(result) = polled else {
                        return Poll::Pending;
                    };
                    let grpc = this.ctx.grpc;
                    match (result, this.policy.as_ref()) {
                        (Ok(attempted), Some(policy)) => {
                            let head = Outcome::Response {
                                http: attempted.resp.status().as_u16(),
                                grpc: grpc
                                    .then(|| grpc_status(attempted.resp.headers()))
                                    .flatten(),
                            };
                            let replayable =
                                this.replay.as_ref().is_some_and(ReplayBody::replayable);
                            if policy.peeks(grpc, head, *this.n, replayable) {
                                *this.peeking = Some(attempted);
                                this.timer.set(this.ctx.deadline.map(|d| sleep_until(d.at)));
                                this.state.set(State::Peeking);
                            } else {
                                let pushback = Pushback::of(attempted.resp.headers());
                                *this.judged =
                                    Some((head, pushback, Answer::Deliver(attempted, None)));
                                this.state.set(State::Judging);
                            }
                        }
                        (Ok(attempted), None) => {
                            *this.judged =
                                Some((Outcome::Final, None, Answer::Deliver(attempted, None)));
                            this.state.set(State::Judging);
                        }
                        (Err(failed), _) => {
                            let outcome = failure_outcome(&failed.error);
                            *this.judged = Some((outcome, None, Answer::Failed(failed)));
                            this.state.set(State::Judging);
                        }
                    }
                }
                StateProj::Peeking => {
                    let Some(attempted) = this.peeking.as_mut() else {
                        panic!("RetryFuture polled after completion");
                    };
                    let frame = match Pin::new(attempted.resp.body_mut()).poll_frame(cx) {
                        Poll::Ready(frame) => frame,
                        Poll::Pending => match this.timer.as_mut().as_pin_mut().map(|t| t.poll(cx))
                        {
                            Some(Poll::Ready(())) => {
                                // The deadline passed while waiting: the
                                // attempt is reset, the caller told.
                                let attempted = this.peeking.take();
                                let failed = Failed {
                                    error: expired(this.backend, this.ctx.deadline),
                                    endpoint: attempted.as_ref().map(|a| a.endpoint.clone()),
                                    span: attempted.and_then(|a| a.span),
                                };
                                *this.judged = Some((Outcome::Final, None, Answer::Failed(failed)));
                                this.state.set(State::Judging);
                                continue;
                            }
                            _ => return Poll::Pending,
                        },
                    };
                    let Some(mut attempted) = this.peeking.take() else {
                        panic!("RetryFuture polled after completion");
                    };
                    let judged = match frame {
                        Some(Ok(frame)) => {
                            let trailers = frame.trailers_ref();
                            let status = trailers.and_then(grpc_status);
                            let pushback = trailers.and_then(Pushback::of);
                            let outcome = match status {
                                Some(code) => {
                                    attempted.trailers_status(this.backend, code);
                                    Outcome::Response {
                                        http: 200,
                                        grpc: Some(code),
                                    }
                                }
                                None => Outcome::Streaming,
                            };
                            (outcome, pushback, Answer::Deliver(attempted, Some(frame)))
                        }
                        // The body ended or failed before anything came:
                        // let the response tell it as it is.
                        _ => (Outcome::Final, None, Answer::Deliver(attempted, None)),
                    };
                    *this.judged = Some(judged);
                    this.state.set(State::Judging);
                }
                StateProj::Backoff => {
                    if let Some(timer) = this.timer.as_mut().as_pin_mut()
                        && timer.poll(cx).is_pending()
                    {
                        return Poll::Pending;
                    }
                    *this.n += 1;
                    this.state.set(State::Start);
                }
                StateProj::Judging => {
                    let Some((outcome, pushback, mut answer)) = this.judged.take() else {
                        panic!("RetryFuture polled after completion");
                    };
                    record(&mut answer, this.ctx.grpc);
                    if let Some(endpoint) = answer.endpoint() {
                        this.summary.attempts = *this.n;
                        this.summary.endpoint = Some(endpoint);
                    }
                    let Some(policy) = this.policy.as_ref() else {
                        return Poll::Ready(Ok(self.settle(answer)));
                    };
                    let now = Instant::now();
                    let answered = Answered {
                        outcome,
                        pushback,
                        attempts: *this.n,
                        replayable: this.replay.as_ref().is_some_and(ReplayBody::replayable),
                        now,
                        deadline: this.ctx.deadline.map(|d| d.at),
                    };
                    let backend = this.backend;
                    match policy.decide(&answered, || backend.budget.try_withdraw(now)) {
                        Decision::Retry { after } => {
                            if let Some(endpoint) = answer.endpoint() {
                                this.tried.push(endpoint);
                            }
                            *this.previous = Some(answer);
                            this.timer.set(Some(sleep_until(now + after)));
                            this.state.set(State::Backoff);
                        }
                        Decision::Deliver(why) => {
                            match why {
                                Deliver::Exhausted => {
                                    backend.metrics.retries_exhausted.inc();
                                }
                                Deliver::BudgetSpent => {
                                    backend.metrics.retries_budget_denied.inc();
                                }
                                _ => {}
                            }
                            return Poll::Ready(Ok(self.settle(answer)));
                        }
                    }
                }
            }
        }
    }
}

/// Records on the attempt's span what its answer says.
fn record(answer: &mut Answer, grpc: bool) {
    match answer {
        Answer::Deliver(attempted, peeked) => {
            if let Some(span) = attempted.span.as_mut() {
                record_head(span, grpc, &attempted.resp, peeked.as_ref());
            }
        }
        Answer::Failed(f) => {
            if let Some(span) = f.span.as_mut() {
                record_error(span, f.error.code(), &f.error);
            }
        }
    }
}
