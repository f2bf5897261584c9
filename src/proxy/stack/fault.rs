//! Fault injection (`faultInjection`): a delay, then an abort, as Envoy
//! applies them (both may hit one call). A delay that would outlast the
//! call's deadline ends the call at the deadline instead.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use pin_project_lite::pin_project;
use tokio::time::{Instant, Sleep, sleep_until};
use tower::{Layer, Service};

use super::{Call, Called, expired};
use crate::http::error::ProxyError;
use crate::policy::backend::Backend;
use crate::policy::routing::Rule;

#[derive(Clone, Copy)]
pub struct FaultLayer<'a> {
    rule: &'a Rule,
    backend: &'a Backend,
}

impl<'a> FaultLayer<'a> {
    pub fn new(rule: &'a Rule, backend: &'a Backend) -> Self {
        FaultLayer { rule, backend }
    }
}

impl<'a, S> Layer<S> for FaultLayer<'a> {
    type Service = Fault<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Fault {
            rule: self.rule,
            backend: self.backend,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Fault<'a, S> {
    rule: &'a Rule,
    backend: &'a Backend,
    inner: S,
}

/// True with probability `percent` / 100.
fn chance(percent: f64) -> bool {
    percent >= 100.0 || (percent > 0.0 && fastrand::f64() * 100.0 < percent)
}

impl<'a, S> Fault<'a, S> {
    /// The abort for this call, if one is drawn.
    fn abort(&self) -> Option<ProxyError> {
        let faults = self.rule.faults.as_ref()?;
        let abort = faults.injection.abort.as_ref()?;
        chance(abort.percent).then(|| {
            faults.counters.aborts.inc();
            ProxyError::FaultAbort {
                route: self.rule.route.clone(),
                status: abort.status,
            }
        })
    }
}

impl<'a, S> Service<Call> for Fault<'a, S>
where
    S: Service<Call, Response = Called, Error = Infallible> + Clone,
{
    type Response = Called;
    type Error = Infallible;
    type Future = FaultFuture<'a, S>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, call: Call) -> Self::Future {
        let Some(faults) = &self.rule.faults else {
            return FaultFuture::Inner {
                fut: self.inner.call(call),
            };
        };
        if let Some(delay) = &faults.injection.delay
            && chance(delay.percent)
        {
            faults.counters.delays.inc();
            let wake = Instant::now() + delay.fixed_delay;
            let (until, expires) = match call.ctx.deadline {
                Some(d) if d.at <= wake => (d.at, true),
                _ => (wake, false),
            };
            return FaultFuture::Delay {
                sleep: sleep_until(until),
                expires,
                call: Some(call),
                fault: Fault {
                    rule: self.rule,
                    backend: self.backend,
                    inner: self.inner.clone(),
                },
            };
        }
        match self.abort() {
            Some(e) => FaultFuture::Ready {
                called: Some(Called::failed(e)),
            },
            None => FaultFuture::Inner {
                fut: self.inner.call(call),
            },
        }
    }
}

pin_project! {
    #[project = FaultProj]
    pub enum FaultFuture<'a, S: Service<Call>> {
        Inner { #[pin] fut: S::Future },
        Delay {
            #[pin] sleep: Sleep,
            expires: bool,
            call: Option<Call>,
            fault: Fault<'a, S>,
        },
        Ready { called: Option<Called> },
    }
}

impl<S> Future for FaultFuture<'_, S>
where
    S: Service<Call, Response = Called, Error = Infallible>,
{
    type Output = Result<Called, Infallible>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let next = match self.as_mut().project() {
                FaultProj::Inner { fut } => return fut.poll(cx),
                FaultProj::Ready { called } => {
                    let Some(called) = called.take() else {
                        panic!("FaultFuture polled after completion");
                    };
                    return Poll::Ready(Ok(called));
                }
                FaultProj::Delay {
                    sleep,
                    expires,
                    call,
                    fault,
                } => {
                    ready!(sleep.poll(cx));
                    let call = call.take();
                    match (call, *expires) {
                        (Some(call), false) => match fault.abort() {
                            Some(e) => FaultFuture::Ready {
                                called: Some(Called::failed(e)),
                            },
                            None => FaultFuture::Inner {
                                fut: fault.inner.call(call),
                            },
                        },
                        (call, _) => {
                            let deadline = call.and_then(|c| c.ctx.deadline);
                            FaultFuture::Ready {
                                called: Some(Called::failed(expired(fault.backend, deadline))),
                            }
                        }
                    }
                }
            };
            self.set(next);
        }
    }
}
