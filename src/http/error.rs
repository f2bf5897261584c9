//! Failures the proxy answers itself, and how each is told to the caller.
//!
//! A gRPC caller gets a trailers-only response (HTTP 200, `grpc-status`,
//! `grpc-message`), an HTTP caller a status with a small JSON body; both carry
//! `x-pylon-error: <code>` so the mesh's own failures can be told apart from
//! the application's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderName, HeaderValue, Response, StatusCode, header};
use pylon_proto::policy::{AbortStatus, GrpcCode};

use super::body::ProxyBody;
use super::pool::{ConnectError, UpstreamError};
use crate::identity::tls::IdentityMismatch;
use crate::telemetry::request_scope::X_REQUEST_ID;

/// The header naming the proxy's own failure.
pub const X_PYLON_ERROR: HeaderName = HeaderName::from_static("x-pylon-error");

// A gRPC call's status and message, in trailers (or a trailers-only head).
// Field names are typed constants: a `&str` key is parsed again at every
// lookup and insert.
pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("no route for {authority}{path}")]
    NoRoute { authority: String, path: String },
    #[error("{route}: every backendRef has weight 0")]
    NoBackend { route: Arc<str> },
    #[error("{backend}: no endpoint to send to")]
    NoEndpoint { backend: Arc<str> },
    #[error("{backend}: connect to {addr} failed: {error}")]
    Connect {
        backend: Arc<str>,
        addr: SocketAddr,
        error: ConnectError,
    },
    #[error("{backend}: connect to {addr} timed out after {timeout:?}")]
    ConnectTimeout {
        backend: Arc<str>,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error("{backend}: {addr}: {error}")]
    Tls {
        backend: Arc<str>,
        addr: SocketAddr,
        error: ConnectError,
    },
    #[error("{backend}: {addr}: {mismatch}")]
    IdentityMismatch {
        backend: Arc<str>,
        addr: SocketAddr,
        mismatch: IdentityMismatch,
    },
    #[error("{backend}: {addr}: {source}")]
    Upstream {
        backend: Arc<str>,
        addr: SocketAddr,
        source: UpstreamError,
    },
    #[error("{backend}: every endpoint is ejected")]
    NoHealthyEndpoint { backend: Arc<str> },
    #[error("deadline of {timeout:?} exceeded{}", on_backend(backend))]
    DeadlineExceeded {
        backend: Option<Arc<str>>,
        timeout: Duration,
    },
    #[error("{backend}: {addr}: no response within the attempt timeout of {timeout:?}")]
    AttemptTimeout {
        backend: Arc<str>,
        addr: SocketAddr,
        timeout: Duration,
    },
    #[error("{backend}: bulkhead full ({what})")]
    Overflow {
        backend: Arc<str>,
        what: &'static str,
    },
    #[error("{backend}: rate limited; retry after {retry_after:?}")]
    RateLimited {
        backend: Arc<str>,
        retry_after: Duration,
    },
    #[error("{route}: fault injected")]
    FaultAbort {
        route: Arc<str>,
        status: AbortStatus,
    },
    /// No AuthorizationPolicy rule allows the call. `call` is the gRPC
    /// method's path, or `METHOD /path` for HTTP.
    #[error("caller {caller} is not allowed to call {call}")]
    Unauthorized { caller: String, call: String },
    /// The caller sent a header the sidecar refuses
    /// (`headers.withUnderscores: reject`).
    #[error("the header {name:?} is not allowed (a name with an underscore)")]
    InvalidHeader { name: String },
    /// The caller's request body stalled longer than
    /// `connections.bodyReadTimeout` between frames.
    #[error("the request body sent nothing for {timeout:?} (connections.bodyReadTimeout)")]
    BodyReadTimeout { timeout: Duration },
}

fn on_backend(backend: &Option<Arc<str>>) -> String {
    backend
        .as_ref()
        .map(|b| format!(" waiting for {b}"))
        .unwrap_or_default()
}

impl ProxyError {
    /// The value of `x-pylon-error`.
    pub fn code(&self) -> &'static str {
        match self {
            ProxyError::NoRoute { .. } => "no-route",
            ProxyError::NoBackend { .. } => "no-backend",
            ProxyError::NoEndpoint { .. } => "no-endpoint",
            ProxyError::Connect { .. } => "connect-failed",
            ProxyError::ConnectTimeout { .. } => "connect-timeout",
            ProxyError::Tls { .. } => "tls-failed",
            ProxyError::IdentityMismatch { .. } => "identity-mismatch",
            ProxyError::Upstream { .. } => "upstream-failed",
            ProxyError::NoHealthyEndpoint { .. } => "no-healthy-endpoint",
            ProxyError::DeadlineExceeded { .. } => "deadline-exceeded",
            ProxyError::AttemptTimeout { .. } => "attempt-timeout",
            ProxyError::Overflow { .. } => "overflow",
            ProxyError::RateLimited { .. } => "rate-limited",
            ProxyError::FaultAbort { .. } => "fault-injected",
            ProxyError::Unauthorized { .. } => "unauthorized",
            ProxyError::InvalidHeader { .. } => "invalid-header",
            ProxyError::BodyReadTimeout { .. } => "body-read-timeout",
        }
    }

    /// Every code [`ProxyError::code`] gives, to read one back from a
    /// response header as a static string (a response may carry the code of
    /// a proxy further along the path, e.g. the peer sidecar's).
    const CODES: [&'static str; 17] = [
        "no-route",
        "no-backend",
        "no-endpoint",
        "connect-failed",
        "connect-timeout",
        "tls-failed",
        "identity-mismatch",
        "upstream-failed",
        "no-healthy-endpoint",
        "deadline-exceeded",
        "attempt-timeout",
        "overflow",
        "rate-limited",
        "fault-injected",
        "unauthorized",
        "invalid-header",
        "body-read-timeout",
    ];

    /// The code an `x-pylon-error` value names, if it is one of ours.
    pub fn known_code(v: &[u8]) -> Option<&'static str> {
        Self::CODES.into_iter().find(|c| c.as_bytes() == v)
    }

    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            ProxyError::NoRoute { .. } => GrpcCode::Unimplemented,
            ProxyError::Unauthorized { .. } => GrpcCode::PermissionDenied,
            // What a gRPC client makes of the HTTP 400 an HTTP caller gets.
            ProxyError::InvalidHeader { .. } => GrpcCode::Internal,
            ProxyError::DeadlineExceeded { .. }
            | ProxyError::AttemptTimeout { .. }
            | ProxyError::BodyReadTimeout { .. } => GrpcCode::DeadlineExceeded,
            ProxyError::Overflow { .. } | ProxyError::RateLimited { .. } => {
                GrpcCode::ResourceExhausted
            }
            ProxyError::FaultAbort { status, .. } => match *status {
                AbortStatus::Grpc(code) => code,
                AbortStatus::Http(status) => grpc_code_for_http(status),
            },
            _ => GrpcCode::Unavailable,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            ProxyError::Unauthorized { .. } => StatusCode::FORBIDDEN,
            ProxyError::InvalidHeader { .. } => StatusCode::BAD_REQUEST,
            ProxyError::BodyReadTimeout { .. } => StatusCode::REQUEST_TIMEOUT,
            ProxyError::DeadlineExceeded { .. } | ProxyError::AttemptTimeout { .. } => {
                StatusCode::GATEWAY_TIMEOUT
            }
            ProxyError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ProxyError::FaultAbort { status, .. } => match *status {
                AbortStatus::Http(status) => {
                    StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
                }
                AbortStatus::Grpc(code) => http_status_for_grpc(code),
            },
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// Whether the failure happened before the request could reach any
    /// server, so sending it again is always safe.
    pub fn never_sent(&self) -> bool {
        matches!(
            self,
            ProxyError::Connect { .. }
                | ProxyError::ConnectTimeout { .. }
                | ProxyError::Tls { .. }
                | ProxyError::IdentityMismatch { .. }
        ) || matches!(self, ProxyError::Upstream { source, .. } if refused_stream(source))
    }

    /// The response for a caller that spoke gRPC (`grpc`) or plain HTTP.
    pub fn to_response(&self, grpc: bool) -> Response<ProxyBody> {
        self.to_response_with_id(grpc, None)
    }

    /// The response for a caller, naming the request's `x-request-id` (in
    /// a header, and in the JSON body of an HTTP error).
    pub fn to_response_with_id(
        &self,
        grpc: bool,
        request_id: Option<&HeaderValue>,
    ) -> Response<ProxyBody> {
        let message = format!("pylon: {self}");
        let mut resp = if grpc {
            grpc_status_response(self.grpc_code(), &message, self.code())
        } else {
            let mut error = serde_json::json!({ "code": self.code(), "message": message });
            if let Some(id) = request_id.and_then(|v| v.to_str().ok()) {
                error["requestId"] = id.into();
            }
            json_error_response(
                self.http_status(),
                self.code(),
                serde_json::json!({ "error": error }),
            )
        };
        if let Some(id) = request_id {
            resp.headers_mut().insert(X_REQUEST_ID, id.clone());
        }
        if let ProxyError::RateLimited { retry_after, .. } = self {
            // Whole seconds, rounded up: never invite a caller back early.
            let secs = retry_after.as_secs() + u64::from(retry_after.subsec_nanos() > 0);
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs.max(1)));
        }
        resp
    }
}

/// The HTTP/2 error in `e`'s chain of sources, `e` included: hyper and
/// tower wrap the `h2::Error` that says which reason a stream or
/// connection ended with.
pub fn h2_error_in<'a>(e: &'a (dyn std::error::Error + 'static)) -> Option<&'a h2::Error> {
    let mut cur = Some(e);
    while let Some(err) = cur {
        if let Some(h2) = err.downcast_ref::<h2::Error>() {
            return Some(h2);
        }
        cur = err.source();
    }
    None
}

/// Whether the server said it did not process the request: the stream was
/// refused (REFUSED_STREAM), or a graceful GOAWAY named a last stream below
/// it (h2 fails such streams with the GOAWAY at once).
fn refused_stream(e: &UpstreamError) -> bool {
    e.h2().is_some_and(|h2| {
        let graceful_go_away =
            h2.is_go_away() && h2.is_remote() && h2.reason() == Some(h2::Reason::NO_ERROR);
        h2.reason() == Some(h2::Reason::REFUSED_STREAM) || graceful_go_away
    })
}

/// The gRPC status a gRPC client derives from an HTTP status (gRPC's
/// HTTP-to-gRPC mapping).
pub fn grpc_code_for_http(status: u16) -> GrpcCode {
    match status {
        400 => GrpcCode::Internal,
        401 => GrpcCode::Unauthenticated,
        403 => GrpcCode::PermissionDenied,
        404 => GrpcCode::Unimplemented,
        429 | 502 | 503 | 504 => GrpcCode::Unavailable,
        _ => GrpcCode::Unknown,
    }
}

/// An HTTP status for a gRPC code, for HTTP callers of a gRPC-only fault.
pub fn http_status_for_grpc(code: GrpcCode) -> StatusCode {
    match code {
        GrpcCode::Ok => StatusCode::OK,
        GrpcCode::InvalidArgument | GrpcCode::OutOfRange | GrpcCode::FailedPrecondition => {
            StatusCode::BAD_REQUEST
        }
        GrpcCode::Unauthenticated => StatusCode::UNAUTHORIZED,
        GrpcCode::PermissionDenied => StatusCode::FORBIDDEN,
        GrpcCode::NotFound => StatusCode::NOT_FOUND,
        GrpcCode::AlreadyExists | GrpcCode::Aborted => StatusCode::CONFLICT,
        GrpcCode::ResourceExhausted => StatusCode::TOO_MANY_REQUESTS,
        GrpcCode::Unimplemented => StatusCode::NOT_IMPLEMENTED,
        GrpcCode::Unavailable => StatusCode::SERVICE_UNAVAILABLE,
        GrpcCode::DeadlineExceeded => StatusCode::GATEWAY_TIMEOUT,
        GrpcCode::Cancelled => StatusCode::from_u16(499).unwrap_or(StatusCode::BAD_REQUEST),
        _ => StatusCode::INTERNAL_SERVER_ERROR,
    }
}

/// A trailers-only gRPC response: HTTP 200 whose single HEADERS frame ends
/// the stream and carries the status.
pub fn grpc_status_response(
    code: GrpcCode,
    message: &str,
    error: &'static str,
) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody::Empty);
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(GRPC_STATUS, HeaderValue::from(u16::from(code.as_u8())));
    if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(message)) {
        h.insert(GRPC_MESSAGE, v);
    }
    h.insert(X_PYLON_ERROR, HeaderValue::from_static(error));
    resp
}

/// An HTTP error with body `{"error": {"code": ..., "message": ...}}`.
pub fn http_error_response(
    status: StatusCode,
    error: &'static str,
    message: &str,
) -> Response<ProxyBody> {
    json_error_response(
        status,
        error,
        serde_json::json!({ "error": { "code": error, "message": message } }),
    )
}

fn json_error_response(
    status: StatusCode,
    error: &'static str,
    body: serde_json::Value,
) -> Response<ProxyBody> {
    let body = body.to_string();
    let mut resp = Response::new(ProxyBody::full(body));
    *resp.status_mut() = status;
    let h = resp.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    h.insert(X_PYLON_ERROR, HeaderValue::from_static(error));
    resp
}

/// Percent-encodes a status message as the gRPC spec asks: every byte
/// outside printable ASCII, and `%` itself.
pub fn percent_encode_grpc_message(msg: &str) -> String {
    let mut out = String::with_capacity(msg.len());
    for &b in msg.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Whether a request is a gRPC call, by its content type.
pub fn is_grpc(headers: &http::HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|ct| ct.strip_prefix("application/grpc"))
        .is_some_and(|rest| rest.is_empty() || rest.starts_with('+') || rest.starts_with(';'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_messages_are_percent_encoded() {
        assert_eq!(percent_encode_grpc_message("plain text"), "plain text");
        assert_eq!(percent_encode_grpc_message("100% é\n"), "100%25 %C3%A9%0A");
    }

    #[test]
    fn grpc_content_types() {
        let mut h = http::HeaderMap::new();
        for (ct, want) in [
            ("application/grpc", true),
            ("application/grpc+proto", true),
            ("application/grpc;charset=utf-8", true),
            ("application/grpc-web", false),
            ("application/json", false),
        ] {
            h.insert(header::CONTENT_TYPE, HeaderValue::from_static(ct));
            assert_eq!(is_grpc(&h), want, "{ct}");
        }
    }

    #[test]
    fn no_route_is_unimplemented_or_404() {
        let e = ProxyError::NoRoute {
            authority: "greeter".into(),
            path: "/helloworld.Greeter/SayHello".into(),
        };
        let r = e.to_response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "12");
        assert_eq!(r.headers()[X_PYLON_ERROR], "no-route");
        assert_eq!(
            r.headers()["grpc-message"],
            "pylon: no route for greeter/helloworld.Greeter/SayHello"
        );
        let r = e.to_response(false);
        assert_eq!(r.status(), StatusCode::NOT_FOUND);
        assert_eq!(r.headers()[X_PYLON_ERROR], "no-route");
        assert_eq!(ProxyError::known_code(b"no-route"), Some(e.code()));
        assert_eq!(ProxyError::known_code(b"not-ours"), None);
    }

    #[test]
    fn error_responses_name_the_request_id() {
        let e = ProxyError::NoRoute {
            authority: "greeter".into(),
            path: "/x".into(),
        };
        let id = HeaderValue::from_static("req-1");
        let r = e.to_response_with_id(true, Some(&id));
        assert_eq!(r.headers()[X_REQUEST_ID], "req-1");
        let r = e.to_response_with_id(false, Some(&id));
        assert_eq!(r.headers()[X_REQUEST_ID], "req-1");
        let ProxyBody::Full(Some(body)) = r.body() else {
            panic!("a JSON body")
        };
        let v: serde_json::Value = serde_json::from_slice(body).unwrap();
        assert_eq!(v["error"]["requestId"], "req-1");
        assert_eq!(v["error"]["code"], "no-route");
    }

    #[test]
    fn a_stalled_request_body_is_408_or_deadline_exceeded_and_the_callers_fault() {
        let e = ProxyError::BodyReadTimeout {
            timeout: Duration::from_secs(30),
        };
        let r = e.to_response(false);
        assert_eq!(r.status(), StatusCode::REQUEST_TIMEOUT);
        assert_eq!(r.headers()[X_PYLON_ERROR], "body-read-timeout");
        let r = e.to_response(true);
        assert_eq!(r.headers()["grpc-status"], "4");
        assert_eq!(
            r.headers()["grpc-message"],
            "pylon: the request body sent nothing for 30s (connections.bodyReadTimeout)"
        );
        assert!(!e.never_sent());
        assert!(!crate::proxy::stack::outlier::endpoint_failure(&e));
        assert_eq!(ProxyError::known_code(b"body-read-timeout"), Some(e.code()));
    }

    #[test]
    fn unauthorized_is_permission_denied_or_403() {
        let e = ProxyError::Unauthorized {
            caller: "spiffe://pylon.test/ns/default/sa/b".into(),
            call: "/helloworld.Greeter/SayHello".into(),
        };
        let r = e.to_response(true);
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()["grpc-status"], "7");
        assert_eq!(r.headers()[X_PYLON_ERROR], "unauthorized");
        assert_eq!(
            r.headers()["grpc-message"],
            "pylon: caller spiffe://pylon.test/ns/default/sa/b is not allowed to call /helloworld.Greeter/SayHello"
        );
        let r = e.to_response(false);
        assert_eq!(r.status(), StatusCode::FORBIDDEN);
        assert_eq!(r.headers()[X_PYLON_ERROR], "unauthorized");
    }
}
