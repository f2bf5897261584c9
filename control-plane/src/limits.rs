//! What the control plane's listeners (the gRPC API on `--listen` and the
//! injection webhook) allow a peer before it has proved anything: how many
//! connections, how long a TLS handshake and the first protocol bytes may
//! take, the HTTP/2 limits (streams, resets, header lists, keepalive), and
//! how large a message each gRPC service decodes.
//!
//! The values and their defaults live here; [`crate::tls`] enforces the
//! connection-level ones, hyper/h2 the HTTP/2 ones (configured in
//! [`crate::server`] and the webhook), tonic the decode limits. What was
//! refused is counted by [`crate::telemetry::ListenerMetrics`].
//!
//! Not here: authentication (a limit applies to everyone alike), per-peer
//! quotas.

use std::time::Duration;

/// Every limit of `pylon-control serve`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServeLimits {
    /// The gRPC API (`--listen`).
    pub grpc: ListenerLimits,
    /// The injection webhook (`--webhook-listen`).
    pub webhook: ListenerLimits,
    /// The largest admin API message decoded (an `apply`'s YAML).
    pub admin_max_message: usize,
    /// The gRPC API's connections live at most this long (`None`: for
    /// ever): then the server sends GOAWAY, new calls go to a new
    /// connection, and the calls in flight have
    /// [`ServeLimits::max_connection_age_grace`] to finish before the
    /// connection is closed. A sidecar's policy stream outlives any age; it
    /// is cut at the end of the grace and the sidecar reconnects. Bounds how
    /// long any one peer holds a connection, and spreads clients over
    /// replicas that came up after them.
    pub max_connection_age: Option<Duration>,
    /// How long calls in flight on an aged connection may go on.
    pub max_connection_age_grace: Duration,
}

impl Default for ServeLimits {
    fn default() -> Self {
        ServeLimits {
            grpc: ListenerLimits::default(),
            webhook: ListenerLimits {
                max_connections: DEFAULT_WEBHOOK_MAX_CONNECTIONS,
                ..ListenerLimits::default()
            },
            admin_max_message: DEFAULT_ADMIN_MAX_MESSAGE,
            max_connection_age: Some(DEFAULT_MAX_CONNECTION_AGE),
            max_connection_age_grace: DEFAULT_MAX_CONNECTION_AGE_GRACE,
        }
    }
}

/// A connection to the gRPC API is replaced after an hour: long enough that
/// a mesh of thousands of sidecars reconnects a few per second, short
/// enough that no peer holds one for days.
pub const DEFAULT_MAX_CONNECTION_AGE: Duration = Duration::from_secs(60 * 60);

/// A renewal or an apply takes well under a minute; a policy stream is cut
/// and resumed.
pub const DEFAULT_MAX_CONNECTION_AGE_GRACE: Duration = Duration::from_secs(60);

/// The limits of one listener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerLimits {
    /// Open connections, handshaking ones included; more are closed at
    /// once (after `accept`), and counted.
    pub max_connections: usize,
    /// From `accept` to the end of the TLS handshake and the first bytes
    /// that tell the protocol (the HTTP/2 preface or an HTTP/1 request
    /// line): a peer that dribbles is cut off.
    pub handshake_timeout: Duration,
    /// SETTINGS_MAX_CONCURRENT_STREAMS: streams beyond it are refused
    /// (`REFUSED_STREAM`), the connection's other streams go on.
    pub max_concurrent_streams: u32,
    /// Streams a client opens and resets before the server accepts them
    /// (rapid reset, CVE-2023-44487) before the connection is closed
    /// (`GOAWAY ENHANCE_YOUR_CALM`).
    pub max_pending_accept_reset_streams: usize,
    /// Streams the server had to reset because of the client's errors
    /// (MadeYouReset, CVE-2025-8671) before the connection is closed.
    pub max_local_error_reset_streams: usize,
    /// SETTINGS_MAX_HEADER_LIST_SIZE (bytes, decoded): a larger request
    /// head is refused (431, `REFUSED_STREAM`).
    pub max_header_list_size: u32,
    /// HTTP/2 PING interval; a peer that does not answer within twice this
    /// is disconnected (dead sidecars, half-open connections), as is one
    /// that reads nothing the server writes for twice this (a flood whose
    /// answers it never reads).
    pub keepalive_interval: Duration,
}

impl Default for ListenerLimits {
    fn default() -> Self {
        ListenerLimits {
            max_connections: DEFAULT_MAX_CONNECTIONS,
            handshake_timeout: Duration::from_secs(10),
            max_concurrent_streams: 100,
            max_pending_accept_reset_streams: 20,
            max_local_error_reset_streams: 100,
            max_header_list_size: 16 * 1024,
            keepalive_interval: Duration::from_secs(10),
        }
    }
}

/// A control plane serves one connection per sidecar (the policy stream,
/// the trust-bundle watch and renewals share it) plus the CLI's: a mesh of a
/// few thousand pods fits; file descriptors beyond it stay free.
pub const DEFAULT_MAX_CONNECTIONS: usize = 4096;

/// The webhook is called by the API server alone, over a handful of
/// connections.
pub const DEFAULT_WEBHOOK_MAX_CONNECTIONS: usize = 256;

/// The largest gRPC message the Identity service decodes: a CSR (under
/// 1 KiB for the P-256, P-384 and Ed25519 keys it signs) and nothing else.
/// Decoded before the caller is authenticated, so kept small.
pub const IDENTITY_MAX_MESSAGE: usize = 16 * 1024;

/// The largest message of the policy stream: a sidecar's ACK or NACK (the
/// NACK carries its compile errors, a few lines). Decoded before the
/// caller is authenticated.
pub const DISCOVERY_MAX_MESSAGE: usize = 64 * 1024;

/// The default largest admin API message: an `apply` carries a whole
/// policy as YAML. The admin token is checked before any message is
/// decoded.
pub const DEFAULT_ADMIN_MAX_MESSAGE: usize = 16 * 1024 * 1024;

/// The message tonic gives a message over the decode limit (as
/// `OUT_OF_RANGE`).
const TONIC_TOO_LARGE: &str = "Error, decoded message length too large";

/// Whether `status` is tonic's refusal of a message over the decode limit.
pub fn is_too_large(code: i32, message: &str) -> bool {
    code == tonic::Code::OutOfRange as i32 && message.starts_with(TONIC_TOO_LARGE)
}

/// `status` as gRPC says a message over the limit is answered:
/// `RESOURCE_EXHAUSTED` (tonic says `OUT_OF_RANGE`).
pub fn too_large_status(status: tonic::Status) -> tonic::Status {
    if is_too_large(status.code() as i32, status.message()) {
        tonic::Status::resource_exhausted(status.message().to_string())
    } else {
        status
    }
}

/// Answers a message over a decode limit with `RESOURCE_EXHAUSTED`, as the
/// gRPC status codes prescribe, where tonic says `OUT_OF_RANGE`: rewrites
/// the `grpc-status` of such a trailers-only response.
#[derive(Debug, Clone, Copy, Default)]
pub struct TooLargeLayer;

impl<S> tower::Layer<S> for TooLargeLayer {
    type Service = TooLarge<S>;

    fn layer(&self, inner: S) -> TooLarge<S> {
        TooLarge(inner)
    }
}

#[derive(Debug, Clone)]
pub struct TooLarge<S>(S);

impl<S, B, RB> tower::Service<http::Request<B>> for TooLarge<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let call = self.0.call(req);
        Box::pin(async move {
            let mut resp = call.await?;
            rewrite_too_large(resp.headers_mut());
            Ok(resp)
        })
    }
}

fn rewrite_too_large(headers: &mut http::HeaderMap) {
    let status = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok());
    let message = headers
        .get("grpc-message")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    // grpc-message is percent-encoded; the prefix has spaces.
    let message = message.replace("%20", " ");
    if status.is_some_and(|code| is_too_large(code, &message)) {
        headers.insert(
            "grpc-status",
            http::HeaderValue::from(tonic::Code::ResourceExhausted as i32),
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_tonics_too_large_refusal_becomes_resource_exhausted() {
        let too_large = tonic::Status::out_of_range(format!(
            "{TONIC_TOO_LARGE}: found 1073741824 bytes, the limit is: 16384 bytes"
        ));
        let mut headers = http::HeaderMap::new();
        too_large.add_header(&mut headers).unwrap();
        rewrite_too_large(&mut headers);
        assert_eq!(headers["grpc-status"], "8");
        assert_eq!(
            too_large_status(too_large).code(),
            tonic::Code::ResourceExhausted
        );

        let other = tonic::Status::out_of_range("version 9 is past the end");
        let mut headers = http::HeaderMap::new();
        other.add_header(&mut headers).unwrap();
        rewrite_too_large(&mut headers);
        assert_eq!(headers["grpc-status"], "11");
        assert_eq!(too_large_status(other).code(), tonic::Code::OutOfRange);
    }
}
