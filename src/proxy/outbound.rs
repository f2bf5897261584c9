//! The outbound path: a request from the local app, routed by policy.
//!
//! The route comes from the request's authority, or from the original
//! destination when iptables redirected the connection and the authority
//! names no route. One `ArcSwap` load per request; the chosen backend's
//! `Arc` keeps its snapshot's state alive until the request is done.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use http::uri::Authority;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use hyper_util::server::graceful::Watcher;
use tokio::net::TcpStream;

use super::body::ProxyBody;
use super::call::{CallRequest, CallSummary, call};
use super::error::{ProxyError, is_grpc};
use super::headers::{request_authority, response_for_caller, strip_hop_by_hop};
use super::{http_server, original_dst};
use crate::policy::PolicyStore;
use crate::routing::RequestView;
use crate::telemetry::Telemetry;
use crate::telemetry::request::{RequestScope, Side};
use crate::telemetry::requests::CallTimer;

pub struct Outbound {
    policy: Arc<PolicyStore>,
    retry_buffer_bytes: usize,
    telemetry: Arc<Telemetry>,
    server: hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
}

impl Outbound {
    pub fn new(
        policy: Arc<PolicyStore>,
        retry_buffer_bytes: usize,
        telemetry: Arc<Telemetry>,
    ) -> Arc<Self> {
        Arc::new(Outbound {
            policy,
            retry_buffer_bytes,
            telemetry,
            server: http_server(),
        })
    }

    /// Serves one accepted connection until it closes.
    pub async fn serve(self: Arc<Self>, tcp: TcpStream, peer: SocketAddr, watcher: Watcher) {
        let dst = original_dst(&tcp);
        let this = self.clone();
        let svc = service_fn(move |req| {
            let this = this.clone();
            async move { Ok::<_, Infallible>(this.handle(req, dst).await) }
        });
        let conn = self.server.serve_connection(TokioIo::new(tcp), svc);
        if let Err(e) = watcher.watch(conn).await {
            tracing::debug!(%peer, error = %e, "outbound connection ended with an error");
        }
    }

    async fn handle(
        &self,
        mut req: Request<Incoming>,
        dst: Option<SocketAddr>,
    ) -> Response<ProxyBody> {
        let grpc = is_grpc(req.headers());
        let mut scope = RequestScope::begin(&self.telemetry, Side::Outbound, &mut req, grpc, None);
        let result = self.route(req, grpc, dst, &mut scope).await;
        scope.finish(result)
    }

    async fn route(
        &self,
        mut req: Request<Incoming>,
        grpc: bool,
        dst: Option<SocketAddr>,
        scope: &mut RequestScope,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let authority = request_authority(&req)
            .or_else(|| dst.and_then(|d| Authority::try_from(d.to_string()).ok()));
        let (rule, backend) = {
            let snapshot = self.policy.load();
            let view = RequestView {
                method: req.method(),
                path: req.uri().path(),
                headers: req.headers(),
                grpc,
            };
            let rule = snapshot
                .routes
                .find(authority.as_ref().map(Authority::as_str), dst, &view)
                .ok_or_else(|| ProxyError::NoRoute {
                    authority: authority
                        .as_ref()
                        .map_or_else(String::new, |a| a.to_string()),
                    path: req.uri().path().to_string(),
                })?;
            let backend = rule
                .pick_backend()
                .cloned()
                .ok_or_else(|| ProxyError::NoBackend {
                    route: rule.route.clone(),
                })?;
            (rule.clone(), backend)
        };
        scope.set_backend(&backend.name);
        let te_trailers = strip_hop_by_hop(req.headers_mut());
        let input = CallRequest {
            req,
            grpc,
            authority: authority.as_ref(),
            te_trailers,
            replay_limit: self.retry_buffer_bytes,
            trace: scope.call_trace(),
        };
        let mut summary = CallSummary::default();
        let timer = CallTimer::start(rule.requests_to(&backend), grpc);
        let result = timer.finish(call(&rule, backend, input, &mut summary).await);
        scope.set_attempts(summary.attempts, summary.endpoint);
        let mut resp = result?;
        response_for_caller(&mut resp);
        Ok(resp)
    }
}
