//! A routed call's way through the sidecar, outbound, as a tower stack:
//! one mechanism per layer, each a `Layer` + `Service` in its own file,
//! composed in [`outbound`] in the order a request meets them:
//!
//! ```text
//! deadline        min(grpc-timeout, the route's timeouts.request)
//! fault           delay, abort (faultInjection)
//! admission       rate limit, bulkhead slot (policy::admission), retry-budget count
//! retry           attempts under proxy::retry::RetryPolicy; replay; peeking
//!   ── per attempt ──
//! balance         endpoint choice (least request / round robin, ejected skipped, tried avoided)
//! outlier         the attempt's outcome told to outlier detection; its end observed
//! attempt         x-pylon-attempt, traceparent, remaining grpc-timeout;
//!                 per-attempt timeout (timeouts.backendRequest) within the deadline
//! endpoint        the request on the endpoint's pooled connection
//! ```
//!
//! The stack is built per call from the rule and the backend it was routed
//! to (references: building it costs nothing), and every layer's future is
//! a concrete, pin-projected type; the boxes are the stack's future as a
//! whole (made in `Outbound::route`, so the request's future does not carry
//! it inline), the endpoint's send (hyper's future cannot be named) and,
//! off the fast path, a wait for a bulkhead slot. The layers above `retry`
//! take a [`Call`] and answer [`Called`] (the result and what the call
//! did); the layers below take an [`Attempt`] and answer [`Attempted`] or
//! [`Failed`].
//!
//! Inbound, [`inbound`] composes the local app's protection the same way:
//!
//! ```text
//! authorize       the caller's SPIFFE ID against the AuthorizationPolicies
//! limit           the app's admission: rate limit, slot under its cap (no waiting line)
//! app             the request to the local app over the caller's protocol
//! ```

pub mod admission;
pub mod app;
pub mod attempt;
pub mod authorize;
pub mod balance;
pub mod deadline;
pub mod endpoint;
pub mod fault;
pub mod limit;
pub mod outlier;
pub mod retry;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::uri::Authority;
use http::{Request, Response};
use tokio::time::Instant;
use tower::{Service, ServiceBuilder};

use crate::http::body::ProxyBody;
use crate::http::error::ProxyError;
use crate::http::headers::Wire;
use crate::http::request_body::BodyStall;
use crate::http::upstream::PlainUpstream;
use crate::policy::authz::Principal;
use crate::policy::backend::{Backend, Endpoint};
use crate::policy::inbound::InboundLimits;
use crate::policy::routing::Rule;
use crate::resilience::balancer::LoadGuard;
use crate::telemetry::request_scope::AttemptTrace;
use crate::telemetry::trace::SpanRecord;

/// The outbound stack of one call of `rule` on `backend`.
pub fn outbound<'a>(
    rule: &'a Rule,
    backend: &'a Arc<Backend>,
) -> impl Service<Call, Response = Called, Error = Infallible, Future: Send> + 'a {
    ServiceBuilder::new()
        .layer(deadline::DeadlineLayer::new(rule))
        .layer(fault::FaultLayer::new(rule, backend))
        .layer(admission::AdmissionLayer::new(backend))
        .layer(retry::RetryLayer::new(rule, backend))
        .layer(balance::BalanceLayer::new(backend))
        .layer(outlier::OutlierLayer::new(backend))
        .layer(attempt::AttemptLayer::new(rule, backend))
        .service(endpoint::EndpointService::new(backend))
}

/// The inbound stack (named: its futures stay `Send` for every lifetime
/// of the caller's ID they carry).
pub type Inbound<'a> = authorize::Authorize<'a, limit::AppLimit<'a, app::AppService<'a>>>;

/// The inbound stack of one call to the local app `app`.
pub fn inbound<'a>(limits: &'a InboundLimits, app: &'a PlainUpstream) -> Inbound<'a> {
    ServiceBuilder::new()
        .layer(authorize::AuthorizeLayer::new(limits))
        .layer(limit::AppLimitLayer::new(limits))
        .service(app::AppService::new(app))
}

/// A call to the local app on its way down the inbound stack.
pub struct ToApp<'a> {
    pub req: Request<ProxyBody>,
    pub grpc: bool,
    /// The caller's verified SPIFFE ID; none for a plaintext caller.
    pub caller: Option<&'a Principal>,
    pub authority: Option<Authority>,
    /// The protocol to the app: the caller's.
    pub wire: Wire,
    /// The caller accepts trailers (`TE: trailers`).
    pub te_trailers: bool,
}

/// When a call must be over, and the timeout that set it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Deadline {
    pub at: Instant,
    pub timeout: Duration,
}

/// What the layers of a call share about it.
#[derive(Clone)]
pub struct CallCtx {
    /// The caller speaks gRPC.
    pub grpc: bool,
    /// The authority the request is sent with.
    pub authority: Option<Authority>,
    /// The caller accepts trailers (`TE: trailers`).
    pub te_trailers: bool,
    /// Request body bytes kept for replay under a retry policy.
    pub replay_limit: usize,
    /// Set by the deadline layer.
    pub deadline: Option<Deadline>,
    /// Each attempt's span starts here when the call is traced.
    pub trace: Option<AttemptTrace>,
}

/// A routed call on its way down the stack.
pub struct Call {
    pub req: Request<ProxyBody>,
    pub ctx: CallCtx,
}

/// What a call did, for its access record and span.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct CallSummary {
    /// Attempts sent (0 when the call failed before the first).
    pub attempts: u32,
    /// The endpoint of the last attempt.
    pub endpoint: Option<SocketAddr>,
}

/// A call's outcome and what it did.
pub struct Called {
    pub result: Result<Response<ProxyBody>, ProxyError>,
    pub summary: CallSummary,
}

impl Called {
    /// A call that ended before any attempt.
    pub fn failed(e: ProxyError) -> Called {
        Called {
            result: Err(e),
            summary: CallSummary::default(),
        }
    }
}

/// One attempt of a call on its way down.
pub struct Attempt {
    pub req: Request<ProxyBody>,
    pub ctx: CallCtx,
    /// 1 for the first try.
    pub n: u32,
    /// Endpoints this call has already tried.
    pub tried: Vec<SocketAddr>,
}

/// An attempt with its endpoint chosen.
pub struct Routed {
    pub req: Request<ProxyBody>,
    pub ctx: CallCtx,
    pub n: u32,
    pub endpoint: Arc<Endpoint>,
}

/// An attempt whose response head arrived.
pub struct Attempted {
    pub resp: Response<ProxyBody>,
    pub endpoint: Arc<Endpoint>,
    /// The attempt counts as in flight on its endpoint while this lives.
    pub load: LoadGuard,
    /// The attempt's span, when traced.
    pub span: Option<SpanRecord>,
    /// Outlier detection waits for a gRPC status in trailers.
    pub pending_status: bool,
    /// The caller's request body, whose stall (not the endpoint) is to
    /// blame if the response then breaks off.
    pub stall: Option<BodyStall>,
}

/// An attempt that ended without a response head.
pub struct Failed {
    pub error: ProxyError,
    /// Absent when no endpoint could be chosen.
    pub endpoint: Option<Arc<Endpoint>>,
    pub span: Option<SpanRecord>,
}

impl Failed {
    pub fn new(error: ProxyError) -> Failed {
        Failed {
            error,
            endpoint: None,
            span: None,
        }
    }
}

/// The deadline error of a call, counted on its backend.
pub fn expired(backend: &Backend, deadline: Option<Deadline>) -> ProxyError {
    backend.metrics.request_timeouts.inc();
    ProxyError::DeadlineExceeded {
        backend: Some(backend.name.clone()),
        timeout: deadline.map_or(Duration::ZERO, |d| d.timeout),
    }
}

#[cfg(test)]
mod tests;
