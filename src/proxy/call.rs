//! One routed call through a backend: the outbound resilience stack, in the
//! order a request meets it:
//!
//! deadline (min of `grpc-timeout` and the route's `timeouts.request`) →
//! fault injection → rate limit → bulkhead → attempts: endpoint choice
//! (balancer, skipping ejected endpoints, preferring untried ones) →
//! per-attempt timeout (`timeouts.backendRequest`, until the response
//! starts) → outcome observed for outlier detection → retry decision
//! (policy codes, never-sent failures, budget, backoff or pushback, body
//! replay, deadline) → the response, whose body keeps the deadline and
//! reports its end (`proxy::end_of_body`).
//!
//! Nothing is retried without a retry policy on the route, and never once
//! response headers have been passed on. The state the stack consults lives
//! in `resilience` (per backend and per endpoint); this module only decides.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::request::Parts;
use http::uri::Authority;
use http::{HeaderValue, Request, Response};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use pylon_proto::policy::{GrpcCode, Retry};
use tokio::time::Instant;

use super::retry::{Answered, Decision, Deliver, Outcome as RetryOutcome, Pushback, RetryPolicy};
use crate::http::body::ProxyBody;
use crate::http::deadline::{
    GRPC_TIMEOUT, effective_deadline, format_grpc_timeout, parse_grpc_timeout,
};
use crate::http::end::{Ending, OnEnd, ResponseEnd, StreamDeadline, grpc_status, observe, watch};
use crate::http::error::ProxyError;
use crate::http::replay::ReplayBody;
use crate::policy::backend::{Backend, Endpoint};
use crate::policy::routing::Rule;
use crate::resilience::balancer::LoadGuard;
use crate::resilience::bulkhead::BulkheadPermit;
use crate::resilience::outlier::Outcome;
use crate::telemetry::request_scope::{CallTrace, record_error, record_status};
use crate::telemetry::trace::{SpanRecord, TRACEPARENT};
use opentelemetry::KeyValue;

/// Names the attempt (1 for the first try) on every upstream request.
pub const X_PYLON_ATTEMPT: &str = "x-pylon-attempt";
/// How long a call may wait for a bulkhead slot when it has no deadline.
pub const MAX_PENDING_WAIT: Duration = Duration::from_secs(1);

/// What the caller asked and how it asked it.
pub struct CallRequest<'a> {
    pub req: Request<Incoming>,
    pub grpc: bool,
    pub authority: Option<&'a Authority>,
    /// The caller accepts trailers (`TE: trailers`).
    pub te_trailers: bool,
    /// Request body bytes kept for replay under a retry policy.
    pub replay_limit: usize,
    /// The call's span when the request is traced: each attempt gets a
    /// child span, and its `traceparent`.
    pub trace: Option<&'a CallTrace>,
}

/// What a call did, for its access record and span.
#[derive(Debug, Default)]
pub struct CallSummary {
    /// Attempts sent (0 when the call failed before the first).
    pub attempts: u32,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
}

/// Runs one call of `rule` on `backend`, noting what it did in `summary`.
pub async fn call(
    rule: &Rule,
    backend: Arc<Backend>,
    input: CallRequest<'_>,
    summary: &mut CallSummary,
) -> Result<Response<ProxyBody>, ProxyError> {
    let start = Instant::now();
    let caller_timeout = input
        .req
        .headers()
        .get(GRPC_TIMEOUT)
        .and_then(parse_grpc_timeout);
    let route_timeout = rule.timeouts.and_then(|t| t.request);
    let deadline = effective_deadline(start, caller_timeout, route_timeout);
    let call = Call {
        rule,
        backend,
        grpc: input.grpc,
        authority: input.authority,
        te_trailers: input.te_trailers,
        replay_limit: input.replay_limit,
        deadline: deadline.map(|at| (at, at - start)),
        trace: input.trace,
    };
    call.run(input.req, summary).await
}

struct Call<'a> {
    rule: &'a Rule,
    backend: Arc<Backend>,
    grpc: bool,
    authority: Option<&'a Authority>,
    te_trailers: bool,
    replay_limit: usize,
    /// When the call must be over, and the timeout that set it.
    deadline: Option<(Instant, Duration)>,
    trace: Option<&'a CallTrace>,
}

/// How one attempt ended before a response could be passed on.
enum AttemptError {
    Proxy(ProxyError),
    AttemptTimeout(Duration),
    Deadline,
}

/// How an attempt's answer reads to the retry policy.
struct Judged {
    outcome: RetryOutcome,
    pushback: Option<Pushback>,
}

impl Call<'_> {
    fn expired(&self) -> ProxyError {
        self.backend.metrics.request_timeouts.inc();
        ProxyError::DeadlineExceeded {
            backend: Some(self.backend.name.clone()),
            timeout: self.deadline.map_or(Duration::ZERO, |(_, t)| t),
        }
    }

    async fn run(
        &self,
        req: Request<Incoming>,
        summary: &mut CallSummary,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        self.inject_faults().await?;
        let backend = &self.backend;
        // After any injected delay: the wait for a slot starts now.
        let now = Instant::now();
        backend.admit(now)?;
        let wait_until = match self.deadline {
            Some((at, _)) => at.min(now + MAX_PENDING_WAIT),
            None => now + MAX_PENDING_WAIT,
        };
        let permit = backend.bulkhead.acquire(wait_until).await.map_err(|_| {
            backend.metrics.overflow.inc();
            ProxyError::Overflow {
                backend: backend.name.clone(),
                what: "parallel requests",
            }
        })?;
        backend.metrics.requests.inc();
        backend.budget.record_request(now);

        let (parts, body) = req.into_parts();
        match &self.rule.retry {
            None => {
                let now = Instant::now();
                let endpoint = backend.pick(now, &[])?;
                let mut span = self.trace.map(|t| t.attempt(1, endpoint.addr()));
                let req =
                    self.attempt_request(parts, ProxyBody::Incoming(body), 1, now, span.as_ref())?;
                summary.attempts = 1;
                summary.endpoint = Some(endpoint.addr());
                match self.attempt(&endpoint, req, now).await {
                    Ok(Attempted { resp, load }) => {
                        let pending = self.observe_headers(&endpoint, &resp, Instant::now());
                        if let Some(span) = &mut span {
                            self.record_head(span, &resp, None);
                        }
                        Ok(self.deliver(resp, None, endpoint, permit, (load, pending), span))
                    }
                    Err(e) => {
                        let e = self.attempt_failed(&endpoint, e, now);
                        if let Some(span) = &mut span {
                            record_error(span, e.code(), &e);
                        }
                        Err(e)
                    }
                }
            }
            Some(retry) => {
                self.run_with_retries(retry, parts, body, permit, summary)
                    .await
            }
        }
    }

    async fn inject_faults(&self) -> Result<(), ProxyError> {
        let Some(fault) = &self.rule.fault_injection else {
            return Ok(());
        };
        // Delay, then abort, as Envoy does: both may apply to one call.
        if let Some(delay) = &fault.delay
            && chance(delay.percent)
        {
            self.rule.fault_delays.inc();
            let wake = Instant::now() + delay.fixed_delay;
            match self.deadline {
                Some((at, _)) if at <= wake => {
                    tokio::time::sleep_until(at).await;
                    return Err(self.expired());
                }
                _ => tokio::time::sleep_until(wake).await,
            }
        }
        if let Some(abort) = &fault.abort
            && chance(abort.percent)
        {
            self.rule.fault_aborts.inc();
            return Err(ProxyError::FaultAbort {
                route: self.rule.route.clone(),
                status: abort.status,
            });
        }
        Ok(())
    }

    /// The request of attempt `n`: the caller's, marked with the attempt
    /// number and the time that remains, and the child of the attempt's
    /// span when traced.
    fn attempt_request(
        &self,
        parts: Parts,
        body: ProxyBody,
        n: u32,
        now: Instant,
        span: Option<&SpanRecord>,
    ) -> Result<Request<ProxyBody>, ProxyError> {
        let mut req = Request::from_parts(parts, body);
        let headers = req.headers_mut();
        headers.insert(X_PYLON_ATTEMPT, HeaderValue::from(n));
        if let Some(span) = span {
            headers.insert(TRACEPARENT, span.traceparent());
        }
        if let Some((at, _)) = self.deadline {
            let remaining = at.saturating_duration_since(now);
            if remaining.is_zero() {
                return Err(self.expired());
            }
            // Only gRPC servers read it; a plain HTTP call carries none.
            if self.grpc {
                headers.insert(GRPC_TIMEOUT, format_grpc_timeout(remaining));
            }
        }
        Ok(req)
    }

    /// Sends one attempt and waits for its response to start, within the
    /// attempt timeout and the deadline.
    async fn attempt(
        &self,
        endpoint: &Arc<Endpoint>,
        req: Request<ProxyBody>,
        now: Instant,
    ) -> Result<Attempted, AttemptError> {
        let load = endpoint.load.begin();
        let per_try = self
            .rule
            .timeouts
            .and_then(|t| t.backend_request)
            .map(|t| now + t);
        let deadline = self.deadline.map(|(at, _)| at);
        let limit = match (per_try, deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let send = self
            .backend
            .send(endpoint, req, self.authority, self.te_trailers);
        let result = match limit {
            None => send.await,
            Some(limit) => match tokio::time::timeout_at(limit, send).await {
                Ok(r) => r,
                Err(_) if Some(limit) == deadline => return Err(AttemptError::Deadline),
                Err(_) => {
                    let t = self.rule.timeouts.and_then(|t| t.backend_request);
                    return Err(AttemptError::AttemptTimeout(t.unwrap_or_default()));
                }
            },
        };
        let resp = result.map_err(AttemptError::Proxy)?;
        let end = Instant::now();
        load.record_latency(end - now, end);
        Ok(Attempted { resp, load })
    }

    /// Turns an attempt's failure into the caller's error, after telling
    /// outlier detection what the endpoint did.
    fn attempt_failed(&self, endpoint: &Endpoint, e: AttemptError, now: Instant) -> ProxyError {
        match e {
            AttemptError::Deadline => self.expired(),
            AttemptError::AttemptTimeout(timeout) => {
                self.backend.metrics.attempt_timeouts.inc();
                self.backend.observe(endpoint, GATEWAY_FAILURE, now);
                ProxyError::AttemptTimeout {
                    backend: self.backend.name.clone(),
                    addr: endpoint.addr(),
                    timeout,
                }
            }
            AttemptError::Proxy(e) => {
                if endpoint_failure(&e) {
                    self.backend.observe(endpoint, GATEWAY_FAILURE, now);
                }
                e
            }
        }
    }

    async fn run_with_retries(
        &self,
        retry: &Retry,
        parts: Parts,
        body: Incoming,
        permit: BulkheadPermit,
        summary: &mut CallSummary,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let backend = &self.backend;
        let policy = RetryPolicy::new(retry);
        let replay = ReplayBody::new(ProxyBody::Incoming(body), self.replay_limit);
        let mut tried: Vec<SocketAddr> = Vec::new();
        // The answer a retry would replace, kept until the retry is sent so
        // that the caller gets it if no endpoint is left to try.
        let mut previous: Option<(Answer, Arc<Endpoint>, Option<SpanRecord>)> = None;
        let mut n = 1;
        loop {
            let now = Instant::now();
            let endpoint = match (backend.pick(now, &tried), previous.take()) {
                (Ok(endpoint), superseded) => {
                    if superseded.is_some() {
                        backend.metrics.retries.inc();
                    }
                    // Dropping a superseded answer resets its stream upstream.
                    drop(superseded);
                    endpoint
                }
                (Err(_), Some((answer, endpoint, span))) => {
                    return self.settle(answer, endpoint, permit, span);
                }
                (Err(e), None) => return Err(e),
            };
            let mut span = self.trace.map(|t| t.attempt(n, endpoint.addr()));
            let req = self.attempt_request(
                clone_parts(&parts),
                ProxyBody::Replay(replay.retry()),
                n,
                now,
                span.as_ref(),
            )?;
            summary.attempts = n;
            summary.endpoint = Some(endpoint.addr());

            let (judged, answer) = match self.attempt(&endpoint, req, now).await {
                Ok(attempted) => {
                    self.judge_response(&policy, &endpoint, attempted, n, &replay)
                        .await
                }
                Err(e) => {
                    let outcome = match &e {
                        AttemptError::Deadline => RetryOutcome::Final,
                        AttemptError::AttemptTimeout(_) => RetryOutcome::AttemptTimeout,
                        AttemptError::Proxy(p) if p.never_sent() => RetryOutcome::NeverSent,
                        AttemptError::Proxy(p) if endpoint_failure(p) => RetryOutcome::Failed,
                        AttemptError::Proxy(_) => RetryOutcome::Final,
                    };
                    let judged = Judged {
                        outcome,
                        pushback: None,
                    };
                    (
                        judged,
                        Answer::Failed(self.attempt_failed(&endpoint, e, now)),
                    )
                }
            };
            if let Some(span) = &mut span {
                match &answer {
                    Answer::Deliver(resp, peeked, ..) => {
                        self.record_head(span, resp, peeked.as_ref());
                    }
                    Answer::Failed(e) => record_error(span, e.code(), e),
                }
            }
            let now = Instant::now();
            let answered = Answered {
                outcome: judged.outcome,
                pushback: judged.pushback,
                attempts: n,
                replayable: replay.replayable(),
                now,
                deadline: self.deadline.map(|(at, _)| at),
            };
            let decision = policy.decide(&answered, || backend.budget.try_withdraw(now));
            let delay = match decision {
                Decision::Retry { after } => after,
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
                    return self.settle(answer, endpoint, permit, span);
                }
            };
            tokio::time::sleep(delay).await;
            tried.push(endpoint.addr());
            previous = Some((answer, endpoint, span));
            n += 1;
        }
    }

    /// The caller's outcome of a final answer.
    fn settle(
        &self,
        answer: Answer,
        endpoint: Arc<Endpoint>,
        permit: BulkheadPermit,
        span: Option<SpanRecord>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        match answer {
            Answer::Deliver(resp, peeked, load, pending) => {
                Ok(self.deliver(resp, peeked, endpoint, permit, (load, pending), span))
            }
            Answer::Failed(e) => Err(e),
        }
    }

    /// Records on an attempt's span what its response head (and a frame
    /// read early) says.
    fn record_head(
        &self,
        span: &mut SpanRecord,
        resp: &Response<ProxyBody>,
        peeked: Option<&http_body::Frame<bytes::Bytes>>,
    ) {
        let grpc = if self.grpc {
            grpc_status(resp.headers())
                .or_else(|| peeked.and_then(|f| f.trailers_ref()).and_then(grpc_status))
        } else {
            None
        };
        record_status(span, false, Some(resp.status().as_u16()), grpc);
    }

    /// Looks at an attempt's response: how does it read to the retry
    /// policy? A gRPC response whose status may still come in trailers is
    /// peeked at (one frame) when the policy says so.
    async fn judge_response(
        &self,
        policy: &RetryPolicy<'_>,
        endpoint: &Endpoint,
        attempted: Attempted,
        n: u32,
        replay: &ReplayBody,
    ) -> (Judged, Answer) {
        let Attempted { resp, load } = attempted;
        let now = Instant::now();
        let head = RetryOutcome::Response {
            http: resp.status().as_u16(),
            grpc: self.grpc.then(|| grpc_status(resp.headers())).flatten(),
        };
        if !policy.peeks(self.grpc, head, n, replay.replayable()) {
            let pending = self.observe_headers(endpoint, &resp, now);
            let judged = Judged {
                outcome: head,
                pushback: Pushback::of(resp.headers()),
            };
            return (judged, Answer::Deliver(resp, None, load, pending));
        }

        let (parts, mut body) = resp.into_parts();
        let first = match self.deadline {
            Some((at, _)) => match tokio::time::timeout_at(at, body.frame()).await {
                Ok(f) => f,
                Err(_) => {
                    let judged = Judged {
                        outcome: RetryOutcome::Final,
                        pushback: None,
                    };
                    return (judged, Answer::Failed(self.expired()));
                }
            },
            None => body.frame().await,
        };
        let resp = Response::from_parts(parts, body);
        match first {
            Some(Ok(frame)) => {
                let trailers = frame.trailers_ref();
                let status = trailers.and_then(grpc_status);
                if let Some(code) = status {
                    self.backend.observe(endpoint, grpc_outcome(code), now);
                }
                let judged = Judged {
                    outcome: match status {
                        Some(code) => RetryOutcome::Response {
                            http: 200,
                            grpc: Some(code),
                        },
                        None => RetryOutcome::Streaming,
                    },
                    pushback: trailers.and_then(Pushback::of),
                };
                let pending = status.is_none();
                (judged, Answer::Deliver(resp, Some(frame), load, pending))
            }
            // The body ended or failed before anything came: let the
            // response tell it as it is.
            _ => {
                let judged = Judged {
                    outcome: RetryOutcome::Final,
                    pushback: None,
                };
                (judged, Answer::Deliver(resp, None, load, true))
            }
        }
    }

    /// Tells outlier detection what the response head says. Returns whether
    /// the verdict waits for trailers (a gRPC status not in the headers).
    fn observe_headers(
        &self,
        endpoint: &Endpoint,
        resp: &Response<ProxyBody>,
        now: Instant,
    ) -> bool {
        let http = resp.status().as_u16();
        let outcome = match self.grpc.then(|| grpc_status(resp.headers())).flatten() {
            Some(code) => grpc_outcome(code),
            None if self.grpc && http == 200 => return true,
            None => http_outcome(http),
        };
        self.backend.observe(endpoint, outcome, now);
        false
    }

    /// Wraps the response for the caller: the deadline keeps applying, and
    /// the end of the body settles the attempt.
    fn deliver(
        &self,
        resp: Response<ProxyBody>,
        peeked: Option<http_body::Frame<bytes::Bytes>>,
        endpoint: Arc<Endpoint>,
        permit: BulkheadPermit,
        (load, pending_status): (LoadGuard, bool),
        span: Option<SpanRecord>,
    ) -> Response<ProxyBody> {
        let guard = AttemptGuard {
            backend: self.backend.clone(),
            endpoint,
            _load: load,
            _permit: permit,
            pending_status,
            span,
        };
        let deadline = self.deadline.map(|(at, timeout)| StreamDeadline {
            sleep: Box::pin(tokio::time::sleep_until(at)),
            timeout,
        });
        observe(watch(resp, peeked, deadline, self.grpc), Box::new(guard))
    }
}

/// A copy of a request head for another attempt (extensions are not
/// carried: nothing upstream reads them).
fn clone_parts(parts: &Parts) -> Parts {
    let mut head = Request::new(());
    *head.method_mut() = parts.method.clone();
    *head.uri_mut() = parts.uri.clone();
    *head.version_mut() = parts.version;
    *head.headers_mut() = parts.headers.clone();
    head.into_parts().0
}

struct Attempted {
    resp: Response<ProxyBody>,
    load: LoadGuard,
}

/// What an attempt produced: a response that could be passed on (with a
/// frame read while judging it, its in-flight guard, and whether its gRPC
/// status is still to come), or the caller's error.
enum Answer {
    Deliver(
        Response<ProxyBody>,
        Option<http_body::Frame<bytes::Bytes>>,
        LoadGuard,
        bool,
    ),
    Failed(ProxyError),
}

/// Holds what an attempt occupies until its response body ends, then tells
/// outlier detection the status that came in trailers.
struct AttemptGuard {
    backend: Arc<Backend>,
    endpoint: Arc<Endpoint>,
    _load: LoadGuard,
    _permit: BulkheadPermit,
    /// The gRPC status is still to come, in trailers.
    pending_status: bool,
    /// The attempt's span, ended (exported) with the body.
    span: Option<SpanRecord>,
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
            Ending::Failed => self.backend.observe(&self.endpoint, GATEWAY_FAILURE, now),
            Ending::DeadlineExceeded => {
                self.backend.metrics.request_timeouts.inc();
            }
            Ending::Complete | Ending::Dropped => {}
        }
    }
}

const GATEWAY_FAILURE: Outcome = Outcome::Failure {
    server_error: true,
    gateway_error: true,
};
const SERVER_FAILURE: Outcome = Outcome::Failure {
    server_error: true,
    gateway_error: false,
};

/// How a gRPC status counts for outlier detection.
fn grpc_outcome(code: GrpcCode) -> Outcome {
    match code {
        GrpcCode::Unavailable => GATEWAY_FAILURE,
        GrpcCode::Unknown | GrpcCode::Internal | GrpcCode::DataLoss => SERVER_FAILURE,
        _ => Outcome::Success,
    }
}

/// How an HTTP status counts for outlier detection.
fn http_outcome(status: u16) -> Outcome {
    match status {
        502..=504 => GATEWAY_FAILURE,
        500..=599 => SERVER_FAILURE,
        _ => Outcome::Success,
    }
}

/// Whether a failure is the endpoint's (rather than the proxy's or policy's).
fn endpoint_failure(e: &ProxyError) -> bool {
    matches!(
        e,
        ProxyError::Connect { .. }
            | ProxyError::ConnectTimeout { .. }
            | ProxyError::Tls { .. }
            | ProxyError::IdentityMismatch { .. }
            | ProxyError::Upstream { .. }
    )
}

/// True with probability `percent` / 100.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
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

    #[test]
    fn chance_edges() {
        assert!(chance(100.0));
        assert!(!chance(0.0));
        fastrand::seed(5);
        let hits = (0..10_000).filter(|_| chance(25.0)).count();
        assert!((2_200..2_800).contains(&hits), "{hits}");
    }
}
