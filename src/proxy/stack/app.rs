//! Inbound, the bottom of the stack: the request to the local app over the
//! protocol the caller spoke (HTTP/2 as h2c; HTTP/1.1, including HTTP/1.1
//! carried over the mesh's HTTP/2 and marked `x-pylon-orig-proto`), on the
//! app's pooled plaintext connections. hyper's send cannot be named: one
//! box per call.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::Response;
use http::uri::Scheme;
use tower::Service;

use super::ToApp;
use crate::http::body::ProxyBody;
use crate::http::error::ProxyError;
use crate::http::headers::{response_for_caller, rewrite_for};
use crate::http::upstream::PlainUpstream;

#[derive(Clone, Copy)]
pub struct AppService<'a> {
    app: &'a PlainUpstream,
}

impl<'a> AppService<'a> {
    pub fn new(app: &'a PlainUpstream) -> Self {
        AppService { app }
    }
}

pub type AppFuture<'a> =
    Pin<Box<dyn Future<Output = Result<Response<ProxyBody>, ProxyError>> + Send + 'a>>;

impl<'a> Service<ToApp<'a>> for AppService<'a> {
    type Response = Response<ProxyBody>;
    type Error = ProxyError;
    type Future = AppFuture<'a>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), ProxyError>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, to_app: ToApp<'a>) -> AppFuture<'a> {
        let app = self.app;
        Box::pin(async move {
            let ToApp {
                mut req,
                authority,
                wire,
                te_trailers,
                ..
            } = to_app;
            rewrite_for(
                &mut req,
                wire,
                Scheme::HTTP,
                authority.as_ref(),
                te_trailers,
            );
            let mut resp = app.send(req, wire).await?;
            response_for_caller(&mut resp);
            Ok(resp)
        })
    }
}
