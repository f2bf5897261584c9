//! The bottom of the stack: an attempt's request on its endpoint's pooled
//! connection, rewritten for the next hop (`policy::backend::Backend::send`).
//! Its future is hyper's, which cannot be named: the one box per attempt.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use http::Response;
use tower::Service;

use super::Routed;
use crate::http::body::ProxyBody;
use crate::http::error::ProxyError;
use crate::policy::backend::Backend;

#[derive(Clone, Copy)]
pub struct EndpointService<'a> {
    backend: &'a Arc<Backend>,
}

impl<'a> EndpointService<'a> {
    pub fn new(backend: &'a Arc<Backend>) -> Self {
        EndpointService { backend }
    }
}

pub type SendFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a>>;

impl<'a> Service<Routed> for EndpointService<'a> {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = SendFuture<'a>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, routed: Routed) -> SendFuture<'a> {
        let backend = self.backend;
        Box::pin(async move {
            let Routed {
                req, ctx, endpoint, ..
            } = routed;
            backend
                .send(&endpoint, req, ctx.authority.as_ref(), ctx.te_trailers)
                .await
        })
    }
}
