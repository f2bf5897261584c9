//! Inbound: who may call the local app. The caller's SPIFFE ID (none for a
//! plaintext caller in permissive mode) against the AuthorizationPolicies
//! that target this workload (`policy::authz`, through
//! `policy::inbound::InboundLimits`). A call refused here spends none of
//! the app's admission capacity.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::ToApp;
use crate::http::body::ProxyBody;
use crate::http::error::ProxyError;
use crate::policy::authz::{Caller, InboundCall};
use crate::policy::inbound::InboundLimits;

#[derive(Clone, Copy)]
pub struct AuthorizeLayer<'a> {
    limits: &'a InboundLimits,
}

impl<'a> AuthorizeLayer<'a> {
    pub fn new(limits: &'a InboundLimits) -> Self {
        AuthorizeLayer { limits }
    }
}

impl<'a, S> Layer<S> for AuthorizeLayer<'a> {
    type Service = Authorize<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Authorize {
            limits: self.limits,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Authorize<'a, S> {
    limits: &'a InboundLimits,
    inner: S,
}

impl<'a, S> Service<ToApp<'a>> for Authorize<'a, S>
where
    S: Service<ToApp<'a>, Response = Response<ProxyBody>, Error = ProxyError>,
{
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = Refusable<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, to_app: ToApp<'a>) -> Self::Future {
        let caller = match to_app.caller {
            Some(principal) => principal.caller(),
            None => Caller::unauthenticated(),
        };
        let call = InboundCall {
            grpc: to_app.grpc,
            method: to_app.req.method().as_str(),
            path: to_app.req.uri().path(),
        };
        match self.limits.authorize(&caller, &call) {
            Ok(()) => Refusable::Inner {
                fut: self.inner.call(to_app),
            },
            Err(e) => Refusable::Refused { error: Some(e) },
        }
    }
}

pin_project! {
    /// The inner service's future, or a refusal made before calling it.
    #[project = RefusableProj]
    pub enum Refusable<F> {
        Inner { #[pin] fut: F },
        Refused { error: Option<ProxyError> },
    }
}

impl<F> Future for Refusable<F>
where
    F: Future<Output = Result<Response<ProxyBody>, ProxyError>>,
{
    type Output = F::Output;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<F::Output> {
        match self.project() {
            RefusableProj::Inner { fut } => fut.poll(cx),
            RefusableProj::Refused { error } => match error.take() {
                Some(e) => Poll::Ready(Err(e)),
                None => panic!("Refusable polled after completion"),
            },
        }
    }
}
