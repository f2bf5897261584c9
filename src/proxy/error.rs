//! Failures the proxy answers itself, and how each is told to the caller.
//!
//! A gRPC caller gets a trailers-only response (HTTP 200, `grpc-status`,
//! `grpc-message`), an HTTP caller a status with a small JSON body; both carry
//! `x-pylon-error: <code>` so the mesh's own failures can be told apart from
//! the application's.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::{HeaderValue, Response, StatusCode, header};
use pylon_proto::policy::GrpcCode;

use super::body::ProxyBody;
use super::pool::ConnectError;
use crate::identity::tls::IdentityMismatch;

/// The header naming the proxy's own failure.
pub const X_PYLON_ERROR: &str = "x-pylon-error";

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
        source: hyper::Error,
    },
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
        }
    }

    pub fn grpc_code(&self) -> GrpcCode {
        match self {
            ProxyError::NoRoute { .. } => GrpcCode::Unimplemented,
            _ => GrpcCode::Unavailable,
        }
    }

    pub fn http_status(&self) -> StatusCode {
        match self {
            ProxyError::NoRoute { .. } => StatusCode::NOT_FOUND,
            _ => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    /// The response for a caller that spoke gRPC (`grpc`) or plain HTTP.
    pub fn to_response(&self, grpc: bool) -> Response<ProxyBody> {
        let message = format!("pylon: {self}");
        if grpc {
            grpc_status_response(self.grpc_code(), &message, self.code())
        } else {
            http_error_response(self.http_status(), self.code(), &message)
        }
    }
}

/// The caller's response: the upstream's, or the proxy's own answer to the
/// failure, as gRPC (`grpc`) or HTTP.
pub fn respond(result: Result<Response<ProxyBody>, ProxyError>, grpc: bool) -> Response<ProxyBody> {
    result.unwrap_or_else(|e| {
        tracing::debug!(error = %e, code = e.code(), "request failed in the proxy");
        e.to_response(grpc)
    })
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
    h.insert("grpc-status", HeaderValue::from(u16::from(code.as_u8())));
    if let Ok(v) = HeaderValue::from_str(&percent_encode_grpc_message(message)) {
        h.insert("grpc-message", v);
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
    let body = serde_json::json!({ "error": { "code": error, "message": message } }).to_string();
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
    }
}
