//! Endpoint choice for an attempt (`policy::backend::Backend::pick`): the
//! Backend's `loadBalancer` for a first try; for a retry, least request
//! among the endpoints this call has not tried; ejected endpoints skipped.
//! No endpoint to choose ends the attempt with `no-endpoint` or
//! `no-healthy-endpoint` (and no endpoint named).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use pin_project_lite::pin_project;
use tokio::time::Instant;
use tower::{Layer, Service};

use super::{Attempt, Attempted, Failed, Routed};
use crate::policy::backend::Backend;

#[derive(Clone, Copy)]
pub struct BalanceLayer<'a> {
    backend: &'a Backend,
}

impl<'a> BalanceLayer<'a> {
    pub fn new(backend: &'a Backend) -> Self {
        BalanceLayer { backend }
    }
}

impl<'a, S> Layer<S> for BalanceLayer<'a> {
    type Service = Balance<'a, S>;

    fn layer(&self, inner: S) -> Self::Service {
        Balance {
            backend: self.backend,
            inner,
        }
    }
}

#[derive(Clone)]
pub struct Balance<'a, S> {
    backend: &'a Backend,
    inner: S,
}

impl<S> Service<Attempt> for Balance<'_, S>
where
    S: Service<Routed, Response = Attempted, Error = Failed>,
{
    type Response = Attempted;
    type Error = Failed;
    type Future = BalanceFuture<S::Future>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Failed>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, attempt: Attempt) -> Self::Future {
        match self.backend.pick(Instant::now(), &attempt.tried) {
            Ok(endpoint) => BalanceFuture::Routed {
                fut: self.inner.call(Routed {
                    req: attempt.req,
                    ctx: attempt.ctx,
                    n: attempt.n,
                    endpoint,
                }),
            },
            Err(e) => BalanceFuture::NoEndpoint {
                failed: Some(Failed::new(e)),
            },
        }
    }
}

pin_project! {
    #[project = BalanceProj]
    pub enum BalanceFuture<F> {
        Routed { #[pin] fut: F },
        NoEndpoint { failed: Option<Failed> },
    }
}

impl<F> Future for BalanceFuture<F>
where
    F: Future<Output = Result<Attempted, Failed>>,
{
    type Output = Result<Attempted, Failed>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.project() {
            BalanceProj::Routed { fut } => fut.poll(cx),
            BalanceProj::NoEndpoint { failed } => match failed.take() {
                Some(f) => Poll::Ready(Err(f)),
                None => panic!("BalanceFuture polled after completion"),
            },
        }
    }
}
