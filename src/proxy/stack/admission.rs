//! Admission of a call to its Backend (`policy::admission::Admission`, the
//! type the inbound path uses too): the rate limit, then a bulkhead slot —
//! at once when one is free, else waiting in line until the deadline (at
//! most `MAX_PENDING_WAIT`) — and the call counted once in the Backend's
//! requests and retry budget, however many attempts it makes. The slot is
//! held until the response body ends.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};
use std::time::Duration;

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Call, Called};
use crate::http::end::observe;
use crate::policy::admission::{Admitted, SlotWait};
use crate::policy::backend::Backend;
use crate::proxy::observe::Held;
use crate::resilience::bulkhead::BulkheadPermit;

/// How long a call may wait for a bulkhead slot when it has no deadline.
pub const MAX_PENDING_WAIT: Duration = Duration::from_secs(1);

#[derive(Clone, Copy)]
pub struct AdmissionLayer<'a> {
    backend: &'a Backend,
}

impl<'a> AdmissionLayer<'a> {
    pub fn new(backend: &'a Backend) -> Self {
        AdmissionLayer { backend }
    }
}

impl<'a, S> Layer<S> for AdmissionLayer<'a> {
    type Service = AdmissionService<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            backend: self.backend,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct AdmissionService<'a, S> {
    backend: &'a Backend,
    inner: S,
}

impl<S> AdmissionService<'_, S> {
    /// The call is in: counted once for its backend.
    fn admitted(&self, now: Instant) {
        self.backend.metrics.requests.inc();
        self.backend.budget.record_request(now);
    }
}

impl<'a, S> Service<Call> for AdmissionService<'a, S>
where
    S: Service<Call, Response = Called, Error = Infallible> + Clone,
{
    type Response = Called;
    type Error = Infallible;
    type Future = AdmissionFuture<'a, S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        // After any injected delay: the wait for a slot starts now.
        let now = Instant::now();
        match self.backend.admission.try_admit(now, true) {
            Err(e) => AdmissionFuture::Refused {
                called: Some(Called::failed(e)),
            },
            Ok(Admitted::Now(permit)) => {
                self.admitted(now);
                AdmissionFuture::Admitted {
                    fut: self.inner.call(call),
                    permit,
                }
            }
            Ok(Admitted::Wait) => {
                let wait_until = match call.ctx.deadline {
                    Some(d) => d.at.min(now + MAX_PENDING_WAIT),
                    None => now + MAX_PENDING_WAIT,
                };
                AdmissionFuture::Waiting {
                    wait: self.backend.admission.wait(wait_until),
                    call: Some(call),
                    service: self.clone(),
                    since: now,
                }
            }
        }
    }
}

pin_project! {
    #[project = AdmissionProj]
    pub enum AdmissionFuture<'a, S: Service<Call>> {
        Admitted { #[pin] fut: S::Future, permit: Option<BulkheadPermit> },
        Waiting { wait: SlotWait, call: Option<Call>, service: AdmissionService<'a, S>, since: Instant },
        Refused { called: Option<Called> },
    }
}

impl<S> Future for AdmissionFuture<'_, S>
where
    S: Service<Call, Response = Called, Error = Infallible>,
{
    type Output = Result<Called, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project() {
                AdmissionProj::Admitted { fut, permit } => {
                    let Ok(mut called) = ready!(fut.poll(cx));
                    // The slot is held until the response body ends.
                    if let Some(permit) = permit.take() {
                        called.result = called
                            .result
                            .map(|resp| observe(resp, Box::new(Held(permit))));
                    }
                    return Poll::Ready(Ok(called));
                }
                AdmissionProj::Refused { called } => {
                    let Some(called) = called.take() else {
                        panic!("AdmissionFuture polled after completion");
                    };
                    return Poll::Ready(Ok(called));
                }
                AdmissionProj::Waiting {
                    wait,
                    call,
                    service,
                    since,
                } => match ready!(wait.as_mut().poll(cx)) {
                    Err(e) => AdmissionFuture::Refused {
                        called: Some(Called::failed(e)),
                    },
                    Ok(permit) => {
                        let Some(call) = call.take() else {
                            panic!("AdmissionFuture polled after completion");
                        };
                        service.admitted(*since);
                        AdmissionFuture::Admitted {
                            fut: service.inner.call(call),
                            permit: Some(permit),
                        }
                    }
                },
            };
            self.set(next);
        }
    }
}
