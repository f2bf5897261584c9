//! What the proxy does when a request is over, in both directions: the
//! observers it adds to the end of the caller's response (`http::end`) and
//! the one place a failure of its own becomes the caller's response.
//!
//! - [`CallTimer`]: the call's RED metrics (final status, duration).
//! - [`ScopeEnd`]: the request's span and access record.
//! - [`Held`]: a permit held until the response is over.
//!
//! Each is told the same [`ResponseEnd`], read once from the one wrapper.

use std::time::Instant;

use http::Response;
use pylon_proto::policy::GrpcCode;

use crate::http::body::ProxyBody;
use crate::http::end::{Ending, OnEnd, ResponseEnd, observe};
use crate::http::error::{ProxyError, grpc_code_for_http};
use crate::resilience::bulkhead::BulkheadPermit;
use crate::telemetry::metrics::{RequestMetrics, RequestStatus};
use crate::telemetry::request_scope::{self, RequestEnd, RequestScope};

/// The caller's response to the outcome of a request: a failure of the
/// proxy's own is rendered here, a response gets the request's span and
/// access record as an observer of its end.
pub fn respond(
    mut scope: RequestScope,
    grpc: bool,
    result: Result<Response<ProxyBody>, ProxyError>,
) -> Response<ProxyBody> {
    let mut resp = match result {
        Ok(resp) => resp,
        Err(e) => {
            scope.failed(e.code(), &e);
            e.to_response_with_id(grpc, Some(&scope.request_id))
        }
    };
    if scope.observes() {
        resp = observe(resp, Box::new(ScopeEnd { scope, grpc }));
    }
    resp
}

/// A call being timed for its RED metrics: from its arrival to the end of
/// its response body, or to the error the proxy answered with.
pub struct CallTimer {
    metrics: RequestMetrics,
    grpc: bool,
    start: Instant,
}

impl CallTimer {
    /// Starts timing a call counted in `metrics` (none when `None`).
    pub fn start(metrics: Option<&RequestMetrics>, grpc: bool) -> Option<CallTimer> {
        metrics.map(|metrics| CallTimer {
            metrics: metrics.clone(),
            grpc,
            start: Instant::now(),
        })
    }

    /// Counts a failed call now, or a response when its body ends; hands
    /// the result back otherwise unchanged.
    pub fn finish(
        timer: Option<CallTimer>,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(timer) = timer else {
            return result;
        };
        match result {
            Ok(resp) => Ok(observe(resp, Box::new(timer))),
            Err(e) => {
                timer.failed(&e);
                Err(e)
            }
        }
    }

    /// Counts a call the proxy failed, now.
    fn failed(self, e: &ProxyError) {
        let status = if self.grpc {
            RequestStatus::Grpc(e.grpc_code())
        } else {
            RequestStatus::Http(e.http_status().as_u16())
        };
        self.metrics.record(status, self.start.elapsed());
    }
}

/// A call's final status for its metrics: a gRPC call's status (trailers,
/// else head; a non-200 head as gRPC maps it; none at all is INTERNAL, as
/// clients report it; a stream that failed, timed out or was dropped is
/// UNAVAILABLE, DEADLINE_EXCEEDED or CANCELLED); an HTTP call's status line.
pub fn call_status(grpc: bool, end: &ResponseEnd) -> RequestStatus {
    if !grpc {
        return RequestStatus::Http(end.status);
    }
    let code = match end.ending {
        Ending::Complete => match end.grpc_status() {
            Some(code) => code,
            None if end.status != 200 => grpc_code_for_http(end.status),
            None => GrpcCode::Internal,
        },
        Ending::Failed => GrpcCode::Unavailable,
        Ending::DeadlineExceeded => GrpcCode::DeadlineExceeded,
        Ending::Dropped => GrpcCode::Cancelled,
    };
    RequestStatus::Grpc(code)
}

impl OnEnd for CallTimer {
    fn on_end(self: Box<Self>, end: &ResponseEnd) {
        self.metrics
            .record(call_status(self.grpc, end), self.start.elapsed());
    }
}

/// Completes a request's span and access record when its response ends.
struct ScopeEnd {
    scope: RequestScope,
    grpc: bool,
}

impl OnEnd for ScopeEnd {
    fn on_end(self: Box<Self>, end: &ResponseEnd) {
        let ending = match end.ending {
            Ending::Complete => request_scope::Ending::Complete,
            // A gRPC caller was told the deadline in trailers; an HTTP
            // caller saw its stream fail.
            Ending::DeadlineExceeded if self.grpc => request_scope::Ending::Complete,
            Ending::Failed | Ending::DeadlineExceeded => request_scope::Ending::Failed,
            Ending::Dropped => request_scope::Ending::Dropped,
        };
        let grpc_status = if self.grpc {
            end.grpc_status()
        } else {
            end.trailers_grpc
        };
        self.scope.end(&RequestEnd {
            ending,
            status: end.status,
            grpc_status,
            error: end.error,
            bytes: end.bytes,
        });
    }
}

/// A permit held until the response is over.
pub struct Held(pub BulkheadPermit);

impl OnEnd for Held {
    fn on_end(self: Box<Self>, _end: &ResponseEnd) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;
    use http_body_util::BodyExt;

    fn end(
        ending: Ending,
        status: u16,
        head: Option<GrpcCode>,
        trailers: Option<GrpcCode>,
    ) -> ResponseEnd {
        ResponseEnd {
            ending,
            status,
            head_grpc: head,
            trailers_grpc: trailers,
            error: None,
            bytes: 0,
        }
    }

    #[test]
    fn grpc_calls_count_the_status_clients_see() {
        use GrpcCode::*;
        let grpc = |e| call_status(true, &e);
        let status = |c| RequestStatus::Grpc(c);
        assert_eq!(
            grpc(end(Ending::Complete, 200, None, Some(NotFound))),
            status(NotFound)
        );
        assert_eq!(
            grpc(end(Ending::Complete, 200, Some(Unavailable), None)),
            status(Unavailable)
        );
        assert_eq!(
            grpc(end(Ending::Complete, 200, None, None)),
            status(Internal)
        );
        assert_eq!(
            grpc(end(Ending::Complete, 503, None, None)),
            status(Unavailable)
        );
        assert_eq!(
            grpc(end(Ending::Failed, 200, None, None)),
            status(Unavailable)
        );
        assert_eq!(
            grpc(end(Ending::DeadlineExceeded, 200, None, None)),
            status(DeadlineExceeded)
        );
        assert_eq!(
            grpc(end(Ending::Dropped, 200, None, None)),
            status(Cancelled)
        );
        assert_eq!(
            call_status(false, &end(Ending::Failed, 404, None, None)),
            RequestStatus::Http(404)
        );
    }

    #[tokio::test]
    async fn a_response_is_counted_when_its_body_ends() {
        let m = Metrics::new();
        let requests = m.inbound_requests();
        let timer = CallTimer::start(Some(&requests), true);
        let resp = CallTimer::finish(timer, Ok(Response::new(ProxyBody::full("x")))).unwrap();
        assert!(!m.encode().contains("pylon_inbound_requests_total{"));
        drop(resp.into_body().collect().await.unwrap());
        let text = m.encode();
        // The body carried no trailers: INTERNAL, as a client would say.
        assert!(
            text.contains("pylon_inbound_requests_total{status=\"INTERNAL\"} 1"),
            "{text}"
        );
    }

    #[test]
    fn a_proxy_error_is_counted_at_once_with_its_status() {
        let m = Metrics::new();
        let requests = m.inbound_requests();
        let err = ProxyError::NoBackend {
            route: "GRPCRoute/x".into(),
        };
        let _ = CallTimer::finish(CallTimer::start(Some(&requests), false), Err(err));
        let text = m.encode();
        assert!(
            text.contains("pylon_inbound_requests_total{status=\"5xx\"} 1"),
            "{text}"
        );
    }
}
