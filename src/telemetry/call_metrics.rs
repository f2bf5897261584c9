//! Counting a call when it is over: its final status (gRPC status, or HTTP
//! status class) and its duration, from its arrival to the end of its
//! response body, or to the error the proxy answered with.
//!
//! The proxy calls [`CallTimer::start`] when a call arrives and
//! [`CallTimer::finish`] with the call's result; a response is wrapped so
//! that the count happens when its body ends (a gRPC status usually comes in
//! trailers).

use std::time::Instant;

use http::Response;
use pylon_proto::policy::GrpcCode;

use super::metrics::{RequestMetrics, RequestStatus};
use crate::http::body::ProxyBody;
use crate::http::end::{BodyEnd, OnEnd, TrackedBody, grpc_status};
use crate::http::error::{ProxyError, grpc_code_for_http};

/// A call being timed.
pub struct CallTimer {
    metrics: Option<RequestMetrics>,
    grpc: bool,
    start: Instant,
}

impl CallTimer {
    /// Starts timing a call counted in `metrics` (nothing is counted when
    /// `None`).
    pub fn start(metrics: Option<&RequestMetrics>, grpc: bool) -> CallTimer {
        CallTimer {
            metrics: metrics.cloned(),
            grpc,
            start: Instant::now(),
        }
    }

    /// Counts a failed call now, or a response when its body ends; hands the
    /// result back unchanged otherwise.
    pub fn finish(
        self,
        result: Result<Response<ProxyBody>, ProxyError>,
    ) -> Result<Response<ProxyBody>, ProxyError> {
        let Some(metrics) = self.metrics else {
            return result;
        };
        match result {
            Err(e) => {
                let status = if self.grpc {
                    RequestStatus::Grpc(e.grpc_code())
                } else {
                    RequestStatus::Http(e.http_status().as_u16())
                };
                metrics.record(status, self.start.elapsed());
                Err(e)
            }
            Ok(resp) => {
                let http = resp.status().as_u16();
                let head = if !self.grpc {
                    Some(RequestStatus::Http(http))
                } else if let Some(code) = grpc_status(resp.headers()) {
                    Some(RequestStatus::Grpc(code))
                } else if http != 200 {
                    Some(RequestStatus::Grpc(grpc_code_for_http(http)))
                } else {
                    None
                };
                let end: Box<dyn OnEnd> = Box::new(Ending {
                    metrics,
                    head,
                    grpc: self.grpc,
                    start: self.start,
                });
                let grpc = self.grpc;
                Ok(resp.map(|body| {
                    ProxyBody::Tracked(Box::new(TrackedBody::new(
                        body,
                        None,
                        None,
                        grpc,
                        Some(end),
                    )))
                }))
            }
        }
    }
}

/// Counts a response when its body ends.
struct Ending {
    metrics: RequestMetrics,
    /// The status the response head already settled, if it did.
    head: Option<RequestStatus>,
    grpc: bool,
    start: Instant,
}

impl OnEnd for Ending {
    fn on_end(self: Box<Self>, end: BodyEnd) {
        let grpc = |code| RequestStatus::Grpc(code);
        let status = match (end, self.head) {
            (
                BodyEnd::Complete {
                    grpc_status: Some(code),
                },
                _,
            ) if self.grpc => grpc(code),
            (BodyEnd::Complete { .. }, Some(head)) => head,
            // A gRPC response that ended without a status: clients report
            // INTERNAL.
            (BodyEnd::Complete { .. }, None) => grpc(GrpcCode::Internal),
            (BodyEnd::Failed, _) if self.grpc => grpc(GrpcCode::Unavailable),
            (BodyEnd::DeadlineExceeded, _) if self.grpc => grpc(GrpcCode::DeadlineExceeded),
            (BodyEnd::Dropped, _) if self.grpc => grpc(GrpcCode::Cancelled),
            // An HTTP caller already has its status line.
            (_, Some(head)) => head,
            (_, None) => RequestStatus::Http(502),
        };
        self.metrics.record(status, self.start.elapsed());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::telemetry::metrics::Metrics;
    use http_body_util::BodyExt;

    #[tokio::test]
    async fn a_grpc_status_in_trailers_is_counted_when_the_body_ends() {
        let m = Metrics::new();
        let requests = m.inbound_requests();
        let timer = CallTimer::start(Some(&requests), true);
        let resp = Response::new(ProxyBody::full("x"));
        let resp = timer.finish(Ok(resp)).unwrap();
        assert!(!m.encode().contains("pylon_inbound_requests_total{"));
        let body = resp.into_body().collect().await.unwrap();
        drop(body);
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
        let _ = CallTimer::start(Some(&requests), false).finish(Err(err));
        let text = m.encode();
        assert!(
            text.contains("pylon_inbound_requests_total{status=\"5xx\"} 1"),
            "{text}"
        );
    }
}
