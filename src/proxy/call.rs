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
use pylon_proto::policy::{GrpcCode, Retry, RetryOn};
use tokio::time::Instant;

use crate::policy::backend::{Backend, Endpoint};
use crate::http::body::ProxyBody;
use crate::http::deadline::{GRPC_TIMEOUT, effective_deadline, format_grpc_timeout, parse_grpc_timeout};
use crate::http::end::{BodyEnd, OnEnd, StreamDeadline, TrackedBody, grpc_status};
use crate::http::error::{ProxyError, grpc_code_for_http, http_status_for_grpc};
use crate::http::replay::ReplayBody;
use crate::resilience::balancer::LoadGuard;
use crate::resilience::bulkhead::BulkheadPermit;
use crate::resilience::outlier::Outcome;
use crate::policy::routing::Rule;
use crate::telemetry::request_scope::{CallTrace, record_error, record_status};
use crate::telemetry::trace::{SpanRecord, TRACEPARENT};
use opentelemetry::KeyValue;

/// Names the attempt (1 for the first try) on every upstream request.
pub const X_PYLON_ATTEMPT: &str = "x-pylon-attempt";
/// A server's request to wait (milliseconds) before retrying, or not to
/// retry at all (negative or malformed).
const GRPC_RETRY_PUSHBACK: &str = "grpc-retry-pushback-ms";
/// How long a call may wait for a bulkhead slot when it has no deadline.
pub const MAX_PENDING_WAIT: Duration = Duration::from_secs(1);
const DEFAULT_BACKOFF_BASE: Duration = Duration::from_millis(25);
const DEFAULT_BACKOFF_MAX: Duration = Duration::from_millis(250);

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

/// Why an attempt's answer may be worth another try.
struct Retryable {
    /// `grpc-retry-pushback-ms`: `Some(None)` means "do not retry".
    pushback: Option<Option<Duration>>,
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
                            record_error(span, &e);
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
        let replay = ReplayBody::new(ProxyBody::Incoming(body), self.replay_limit);
        let max_attempts = retry.attempts.saturating_add(1);
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

            let (retryable, answer) = match self.attempt(&endpoint, req, now).await {
                Ok(attempted) => {
                    self.judge_response(retry, &endpoint, attempted, n < max_attempts, &replay)
                        .await
                }
                Err(e) => {
                    let retryable = match &e {
                        AttemptError::Deadline => None,
                        AttemptError::AttemptTimeout(_) => {
                            retry_on(retry, GrpcCode::DeadlineExceeded, 504)
                                .then_some(Retryable { pushback: None })
                        }
                        AttemptError::Proxy(p) => (p.never_sent()
                            || (endpoint_failure(p)
                                && retry_on(retry, GrpcCode::Unavailable, 503)))
                        .then_some(Retryable { pushback: None }),
                    };
                    (
                        retryable,
                        Answer::Failed(self.attempt_failed(&endpoint, e, now)),
                    )
                }
            };
            if let Some(span) = &mut span {
                match &answer {
                    Answer::Deliver(resp, peeked, ..) => {
                        self.record_head(span, resp, peeked.as_ref());
                    }
                    Answer::Failed(e) => record_error(span, e),
                }
            }
            let Some(retryable) = retryable else {
                return self.settle(answer, endpoint, permit, span);
            };
            if n >= max_attempts {
                backend.metrics.retries_exhausted.inc();
                return self.settle(answer, endpoint, permit, span);
            }

            // Another try is warranted: is it allowed?
            let delay = match retryable.pushback {
                Some(None) => None,
                Some(Some(ms)) => Some(ms),
                None => Some(backoff(retry, n)),
            };
            let now = Instant::now();
            let allowed = delay.filter(|d| {
                replay.replayable() && self.deadline.is_none_or(|(at, _)| now + *d < at)
            });
            let Some(delay) = allowed.filter(|_| {
                let ok = backend.budget.try_withdraw(now);
                if !ok {
                    backend.metrics.retries_budget_denied.inc();
                }
                ok
            }) else {
                return self.settle(answer, endpoint, permit, span);
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

    /// Looks at an attempt's response: is it a failure the policy retries?
    /// A gRPC response whose status may still come in trailers is peeked at
    /// (one frame) when a retry would be possible.
    async fn judge_response(
        &self,
        retry: &Retry,
        endpoint: &Endpoint,
        attempted: Attempted,
        may_retry: bool,
        replay: &ReplayBody,
    ) -> (Option<Retryable>, Answer) {
        let Attempted { resp, load } = attempted;
        let now = Instant::now();
        let http = resp.status().as_u16();
        let headers_status = self.grpc.then(|| grpc_status(resp.headers())).flatten();
        let peek = self.grpc
            && http == 200
            && headers_status.is_none()
            && may_retry
            && replay.replayable()
            && retry.codes.iter().any(|c| matches!(c, RetryOn::Grpc(_)));
        if !peek {
            let pending = self.observe_headers(endpoint, &resp, now);
            let retryable = match headers_status {
                Some(code) => retry_on(retry, code, http_status_for_grpc(code).as_u16()),
                None => http != 200 && retry_on(retry, grpc_code_for_http(http), http),
            };
            let pushback = pushback(resp.headers());
            return (
                retryable.then_some(Retryable { pushback }),
                Answer::Deliver(resp, None, load, pending),
            );
        }

        let (parts, mut body) = resp.into_parts();
        let first = match self.deadline {
            Some((at, _)) => match tokio::time::timeout_at(at, body.frame()).await {
                Ok(f) => f,
                Err(_) => return (None, Answer::Failed(self.expired())),
            },
            None => body.frame().await,
        };
        let resp = Response::from_parts(parts, body);
        match first {
            Some(Ok(frame)) => {
                let trailers_status = frame.trailers_ref().and_then(grpc_status);
                let pushback = frame.trailers_ref().and_then(pushback);
                let retryable = match trailers_status {
                    Some(code) => {
                        self.backend.observe(endpoint, grpc_outcome(code), now);
                        retry_on(retry, code, http_status_for_grpc(code).as_u16())
                    }
                    None => false,
                };
                let pending = trailers_status.is_none();
                (
                    retryable.then_some(Retryable { pushback }),
                    Answer::Deliver(resp, Some(frame), load, pending),
                )
            }
            // The body ended or failed before anything came: let the
            // response tell it as it is.
            _ => (None, Answer::Deliver(resp, None, load, true)),
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
        let (parts, body) = resp.into_parts();
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
        let tracked = TrackedBody::new(body, peeked, deadline, self.grpc, Some(Box::new(guard)));
        Response::from_parts(parts, ProxyBody::Tracked(Box::new(tracked)))
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
    fn on_end(mut self: Box<Self>, end: BodyEnd) {
        let now = Instant::now();
        if let Some(span) = &mut self.span {
            match end {
                BodyEnd::Complete {
                    grpc_status: Some(code),
                } => record_status(span, false, None, Some(code)),
                BodyEnd::Failed => span.fail("response stream failed"),
                BodyEnd::DeadlineExceeded => {
                    span.set(KeyValue::new("pylon.error", "deadline-exceeded"));
                    span.fail("deadline exceeded while the response streamed");
                }
                BodyEnd::Dropped => span.set(KeyValue::new("pylon.cancelled", true)),
                BodyEnd::Complete { grpc_status: None } => {}
            }
        }
        match end {
            BodyEnd::Complete {
                grpc_status: Some(code),
            } if self.pending_status => {
                self.backend
                    .observe(&self.endpoint, grpc_outcome(code), now);
            }
            // A gRPC response without a status: clients report INTERNAL.
            BodyEnd::Complete { grpc_status: None } if self.pending_status => {
                self.backend.observe(&self.endpoint, SERVER_FAILURE, now);
            }
            BodyEnd::Failed => self.backend.observe(&self.endpoint, GATEWAY_FAILURE, now),
            BodyEnd::DeadlineExceeded => {
                self.backend.metrics.request_timeouts.inc();
            }
            BodyEnd::Complete { .. } | BodyEnd::Dropped => {}
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

/// Whether the policy retries an answer that reads as `grpc` to gRPC
/// callers and `http` to HTTP callers: a policy may name either, for either
/// kind of caller (`UNAVAILABLE` and `503` are the same failure).
fn retry_on(retry: &Retry, grpc: GrpcCode, http: u16) -> bool {
    retry.codes.contains(&RetryOn::Grpc(grpc)) || retry.codes.contains(&RetryOn::Http(http))
}

/// `grpc-retry-pushback-ms`: `None` if absent, `Some(None)` for "do not
/// retry" (negative or malformed), else the delay the server asks for.
fn pushback(headers: &http::HeaderMap) -> Option<Option<Duration>> {
    let v = headers.get(GRPC_RETRY_PUSHBACK)?;
    Some(
        v.to_str()
            .ok()
            .and_then(|s| s.trim().parse::<i64>().ok())
            .and_then(|ms| u64::try_from(ms).ok())
            .map(Duration::from_millis),
    )
}

/// Exponential backoff with full jitter before retry `n` (1-based count of
/// attempts made so far): a uniform draw from zero to
/// `min(max, base × 2^(n-1))`.
fn backoff(retry: &Retry, n: u32) -> Duration {
    let (base, max) = retry
        .backoff
        .map_or((DEFAULT_BACKOFF_BASE, DEFAULT_BACKOFF_MAX), |b| {
            (b.base, b.max)
        });
    pylon_proto::backoff::Backoff::full_jitter(base, max).delay(n.saturating_sub(1))
}

/// True with probability `percent` / 100.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use pylon_proto::policy::Backoff;

    fn retry(codes: Vec<RetryOn>) -> Retry {
        Retry {
            attempts: 3,
            codes,
            backoff: Some(Backoff {
                base: Duration::from_millis(10),
                max: Duration::from_millis(100),
            }),
        }
    }

    #[test]
    fn backoff_is_full_jitter_under_an_exponential_capped_ceiling() {
        let r = retry(vec![]);
        fastrand::seed(3);
        for (n, ceiling) in [(1, 10), (2, 20), (3, 40), (4, 80), (5, 100), (40, 100)] {
            let draws: Vec<Duration> = (0..500).map(|_| backoff(&r, n)).collect();
            let max = draws.iter().max().unwrap();
            let min = draws.iter().min().unwrap();
            assert!(
                *max <= Duration::from_millis(ceiling),
                "attempt {n}: {max:?}"
            );
            assert!(
                *max > Duration::from_millis(ceiling) * 9 / 10,
                "attempt {n}: {max:?}"
            );
            assert!(
                *min < Duration::from_millis(ceiling) / 10,
                "attempt {n}: {min:?}"
            );
        }
    }

    #[test]
    fn pushback_values() {
        let mut h = http::HeaderMap::new();
        assert_eq!(pushback(&h), None);
        h.insert(GRPC_RETRY_PUSHBACK, HeaderValue::from_static("250"));
        assert_eq!(pushback(&h), Some(Some(Duration::from_millis(250))));
        for stop in ["-1", "soon", "1.5", ""] {
            h.insert(GRPC_RETRY_PUSHBACK, HeaderValue::from_static(stop));
            assert_eq!(pushback(&h), Some(None), "{stop:?}");
        }
    }

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
