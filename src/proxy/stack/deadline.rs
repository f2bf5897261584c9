//! The call's deadline: the earlier of the caller's `grpc-timeout` and the
//! route's `timeouts.request`, stamped on the call for the layers below.
//! Each of them bounds its own waiting by it (a fault delay, the wait for a
//! bulkhead slot, an attempt, a peek at trailers, a backoff), so the call
//! always ends with what it did; the response body keeps it while it
//! streams (`http::end`).

use std::task::{Context, Poll};

use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Call, Deadline};
use crate::http::deadline::{GRPC_TIMEOUT, effective_deadline, parse_grpc_timeout};
use crate::policy::routing::Rule;

#[derive(Clone, Copy)]
pub struct DeadlineLayer<'a> {
    rule: &'a Rule,
}

impl<'a> DeadlineLayer<'a> {
    pub fn new(rule: &'a Rule) -> Self {
        DeadlineLayer { rule }
    }
}

impl<'a, S> Layer<S> for DeadlineLayer<'a> {
    type Service = DeadlineService<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        DeadlineService {
            rule: self.rule,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct DeadlineService<'a, S> {
    rule: &'a Rule,
    inner: S,
}

/// The deadline of a request arriving `now` under `rule`.
pub fn deadline_of(rule: &Rule, req: &http::Request<impl Sized>, now: Instant) -> Option<Deadline> {
    let caller = req.headers().get(GRPC_TIMEOUT).and_then(parse_grpc_timeout);
    let route = rule.timeouts.and_then(|t| t.request);
    effective_deadline(now, caller, route).map(|at| Deadline {
        at,
        timeout: at - now,
    })
}

impl<S: Service<Call>> Service<Call> for DeadlineService<'_, S> {
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut call: Call) -> S::Future {
        call.ctx.deadline = deadline_of(self.rule, &call.req, Instant::now());
        self.inner.call(call)
    }
}
