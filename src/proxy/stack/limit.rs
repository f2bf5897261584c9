//! Inbound: the local app's admission (`policy::admission::Admission`, the
//! type the outbound stack uses too, here with no waiting line): its rate
//! limit, then a slot under its cap on calls in flight, held until the
//! response body ends.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll, ready};

use http::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::ToApp;
use super::authorize::Refusable;
use crate::http::body::ProxyBody;
use crate::http::end::observe;
use crate::http::error::ProxyError;
use crate::policy::inbound::InboundLimits;
use crate::proxy::observe::Held;
use crate::resilience::bulkhead::BulkheadPermit;

#[derive(Clone, Copy)]
pub struct AppLimitLayer<'a> {
    limits: &'a InboundLimits,
}

impl<'a> AppLimitLayer<'a> {
    pub fn new(limits: &'a InboundLimits) -> Self {
        AppLimitLayer { limits }
    }
}

impl<'a, S> Layer<S> for AppLimitLayer<'a> {
    type Service = AppLimit<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        AppLimit {
            limits: self.limits,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct AppLimit<'a, S> {
    limits: &'a InboundLimits,
    inner: S,
}

impl<'a, S> Service<ToApp<'a>> for AppLimit<'a, S>
where
    S: Service<ToApp<'a>, Response = Response<ProxyBody>, Error = ProxyError>,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Refusable<Holding<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, to_app: ToApp<'a>) -> Self::Future {
        match self.limits.admit() {
            Ok(permit) => Refusable::Inner {
                fut: Holding {
                    fut: self.inner.call(to_app),
                    permit,
                },
            },
            Err(e) => Refusable::Refused { error: Some(e) },
        }
    }
}

pin_project! {
    /// The app's answer, holding the call's slot until its body ends.
    pub struct Holding<F> {
        #[pin]
        fut: F,
        permit: Option<BulkheadPermit>,
    }
}

impl<F> Future for Holding<F>
where
    F: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        let this = self.project();
        let result = ready!(this.fut.poll(cx));
        Poll::Ready(match this.permit.take() {
            Some(permit) => result.map(|resp| observe(resp, Box::new(Held(permit)))),
            None => result,
        })
    }
}
