//! What one request leaves behind: its `x-request-id`, its span (the
//! inbound server span, or the outbound logical call span whose attempts
//! `proxy::stack` records), and its access-log record.
//!
//! [`RequestScope::begin`] reads the request head (request ID, trace
//! context) and decides the sampling; [`RequestScope::failed`] notes a
//! failure of the proxy's own, and [`RequestScope::end`] completes the span
//! and the access record from how the response ended (the proxy calls it
//! from the end of the response body, `http::end`), when
//! [`RequestScope::observes`] says there is anything to complete. Otherwise
//! nothing is allocated beyond the request ID.
//!
//! Like the rest of `telemetry`, it knows nothing of the proxy's bodies or
//! errors: it is told plain values.

use std::borrow::Cow;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use http::uri::Authority;
use http::{HeaderMap, HeaderName, HeaderValue, Request};
use opentelemetry::KeyValue;
use opentelemetry::trace::{SpanId, SpanKind};
use pylon_proto::policy::GrpcCode;

use super::Telemetry;
use super::trace::{ChildSpans, SpanRecord, TRACEPARENT, TraceParent, new_span_id, new_trace_id};

pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// From the local app, routed to a backend: a logical call span.
    Outbound,
    /// From a mesh peer, to the local app: a server span.
    Inbound,
}

impl Side {
    fn as_str(self) -> &'static str {
        match self {
            Side::Outbound => "outbound",
            Side::Inbound => "inbound",
        }
    }
}

/// A new request ID: 128 random bits as a UUID (version 4).
pub fn new_request_id() -> HeaderValue {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut bits = fastrand::u128(..);
    bits = (bits & !(0xf << 76)) | (0x4 << 76);
    bits = (bits & !(0x3 << 62)) | (0x2 << 62);
    let mut out = [0u8; 36];
    let mut i = 0;
    for (n, byte) in bits.to_be_bytes().iter().enumerate() {
        if matches!(n, 4 | 6 | 8 | 10) {
            out[i] = b'-';
            i += 1;
        }
        out[i] = HEX[usize::from(byte >> 4)];
        out[i + 1] = HEX[usize::from(byte & 15)];
        i += 2;
    }
    HeaderValue::from_bytes(&out).unwrap_or(HeaderValue::from_static("0"))
}

/// The longest `x-request-id` kept; a longer one is replaced.
pub const MAX_REQUEST_ID: usize = 128;

/// Whether a caller's request ID may go into logs, spans and answers as it
/// is: one to [`MAX_REQUEST_ID`] visible ASCII characters.
fn usable_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= MAX_REQUEST_ID && b.iter().all(u8::is_ascii_graphic)
}

/// The request ID of `headers`; generated and inserted (replacing what the
/// caller sent) when absent, repeated, or not [`usable_request_id`].
///
/// The field sent on is marked never-indexed ([`unique_per_request`]).
fn request_id(headers: &mut HeaderMap) -> HeaderValue {
    let mut ids = headers.get_all(X_REQUEST_ID).iter();
    match (ids.next(), ids.next()) {
        (Some(v), None) if usable_request_id(v) => {
            let id = v.clone();
            if let Some(sent) = headers.get_mut(X_REQUEST_ID) {
                sent.set_sensitive(true);
            }
            id
        }
        _ => {
            let id = new_request_id();
            headers.insert(X_REQUEST_ID, unique_per_request(id.clone()));
            id
        }
    }
}

/// A header value that differs on every request (`x-request-id`,
/// `traceparent`), marked so that HPACK sends it as a never-indexed
/// literal. Indexed, each one would be added to both ends' dynamic tables
/// only to push out the fields that do repeat (`:authority`,
/// `content-type`, ...), which then go out in full again; and every
/// request's lookup would walk the chain of earlier IDs under the same
/// name, comparing values. (The flag only changes the HTTP/2 encoding:
/// HTTP/1 writes the value as it is.)
pub fn unique_per_request(mut value: HeaderValue) -> HeaderValue {
    value.set_sensitive(true);
    value
}

/// The service and method of a gRPC path (`/pkg.Service/Method`).
fn grpc_method(path: &str) -> Option<(&str, &str)> {
    path.strip_prefix('/')?.split_once('/')
}

/// What an outbound call span's attempts share: their name and the
/// attributes that describe the call.
pub struct CallTrace {
    pub span: SpanRecord,
    name: Cow<'static, str>,
    attributes: Vec<KeyValue>,
}

/// Starts the CLIENT spans of a traced call's attempts; owned, so that it
/// travels down the request path with the call.
#[derive(Clone)]
pub struct AttemptTrace {
    children: ChildSpans,
    name: Cow<'static, str>,
    attributes: Vec<KeyValue>,
}

impl AttemptTrace {
    /// The span of attempt `n` to `endpoint`, a child of the call.
    pub fn attempt(&self, n: u32, endpoint: SocketAddr) -> SpanRecord {
        let mut attributes = Vec::with_capacity(self.attributes.len() + 4);
        attributes.extend_from_slice(&self.attributes);
        attributes.extend([
            KeyValue::new("pylon.attempt", i64::from(n)),
            KeyValue::new("pylon.endpoint", endpoint.to_string()),
            KeyValue::new("network.peer.address", endpoint.ip().to_string()),
            KeyValue::new("network.peer.port", i64::from(endpoint.port())),
        ]);
        self.children
            .start(SpanKind::Client, self.name.clone(), attributes)
    }
}

/// The access-log fields known only when the request arrives.
struct AccessFields {
    method: http::Method,
    authority: String,
    path: String,
}

/// One request's telemetry, from its head to the end of its response.
pub struct RequestScope {
    side: Side,
    start: Instant,
    pub request_id: HeaderValue,
    /// The trace this request belongs to, as logs name it: the sidecar's
    /// own span when sampled, else the context passed on (if any).
    context: Option<TraceParent>,
    /// This sidecar's span of the request when sampled: the server span
    /// inbound; outbound the call span, with what its attempts share.
    span: Option<CallTrace>,
    access: Option<Box<AccessFields>>,
    backend: Option<Arc<str>>,
    endpoint: Option<SocketAddr>,
    attempts: u32,
    peer: Option<Arc<str>>,
}

impl RequestScope {
    /// Reads and readies the request head: `x-request-id` (generated when
    /// absent) and the trace context (continued, or started; the span of
    /// this sidecar is made the next hop's parent where the caller of
    /// [`RequestScope::traceparent`] puts it).
    pub fn begin<B>(
        telemetry: &Telemetry,
        side: Side,
        req: &mut Request<B>,
        grpc: bool,
        authority: Option<&Authority>,
        remote: Option<(SocketAddr, &Arc<str>)>,
    ) -> RequestScope {
        let start = Instant::now();
        let request_id = request_id(req.headers_mut());
        let access = telemetry.access_log.then(|| {
            Box::new(AccessFields {
                method: req.method().clone(),
                authority: authority.map_or_else(String::new, ToString::to_string),
                path: req.uri().path().to_string(),
            })
        });
        let mut scope = RequestScope {
            side,
            start,
            request_id,
            context: None,
            span: None,
            access,
            backend: None,
            endpoint: None,
            attempts: 0,
            peer: remote
                .filter(|_| telemetry.access_log)
                .map(|(_, id)| id.clone()),
        };
        let parent = req.headers().get(TRACEPARENT).and_then(TraceParent::parse);
        let Some(tracer) = &telemetry.tracer else {
            // Tracing off: whatever context came in goes on unchanged.
            scope.context = parent;
            return scope;
        };
        // Parent-based: the decision of the local app or a mesh peer is
        // followed; a caller from outside the mesh only hints (unless
        // `telemetry.externalSampling: follow`), and the trace is sampled
        // by ratio as a new one is.
        let trusted =
            side == Side::Outbound || remote.is_some() || telemetry.follow_external_sampling;
        let (trace_id, parent_span, sampled) = match parent {
            Some(p) if trusted => (p.trace_id, p.span_id, p.sampled),
            Some(p) => (p.trace_id, p.span_id, tracer.sample(p.trace_id)),
            None => {
                let id = new_trace_id();
                (id, SpanId::INVALID, tracer.sample(id))
            }
        };
        if !sampled {
            // Tell the next hop the decision, so that it does not start a
            // trace of its own: an unsampled context with a new span ID
            // (or the caller's, its sampled flag overruled).
            match parent {
                Some(p) if !p.sampled => scope.context = parent,
                _ => {
                    let context = TraceParent {
                        trace_id,
                        span_id: parent.map_or_else(new_span_id, |p| p.span_id),
                        sampled: false,
                    };
                    req.headers_mut().insert(TRACEPARENT, context.header());
                    scope.context = Some(context);
                }
            }
            return scope;
        }
        let path = req.uri().path();
        let mut attributes = Vec::with_capacity(16);
        let name: Cow<'static, str> = match grpc.then(|| grpc_method(path)).flatten() {
            Some((service, method)) => {
                attributes.extend([
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", service.to_string()),
                    KeyValue::new("rpc.method", method.to_string()),
                ]);
                Cow::Owned(format!("{service}/{method}"))
            }
            None => Cow::Owned(req.method().as_str().to_string()),
        };
        attributes.push(KeyValue::new(
            "http.request.method",
            req.method().as_str().to_string(),
        ));
        if let Some(a) = authority {
            attributes.push(KeyValue::new("server.address", a.host().to_string()));
        }
        // Attempts (outbound) share the request's attributes.
        let (kind, mut own, shared) = match side {
            Side::Outbound => (SpanKind::Internal, attributes.clone(), attributes),
            Side::Inbound => (SpanKind::Server, attributes, Vec::new()),
        };
        if let Some((addr, id)) = remote {
            own.push(KeyValue::new("network.peer.address", addr.ip().to_string()));
            own.push(KeyValue::new("pylon.peer.identity", id.to_string()));
        }
        own.push(KeyValue::new(
            "pylon.request_id",
            String::from_utf8_lossy(scope.request_id.as_bytes()).into_owned(),
        ));
        let span = SpanRecord::start(
            tracer,
            trace_id,
            parent_span,
            parent.is_some(),
            kind,
            name.clone(),
            own,
        );
        scope.context = Some(TraceParent {
            trace_id,
            span_id: span.span_id,
            sampled: true,
        });
        scope.span = Some(CallTrace {
            span,
            name,
            attributes: shared,
        });
        scope
    }

    /// The `traceparent` for the next hop when this sidecar has a span of
    /// its own (the inbound server span); `None` leaves the header as is.
    pub fn traceparent(&self) -> Option<HeaderValue> {
        self.span.as_ref().map(|c| c.span.traceparent())
    }

    /// What the outbound call's attempts need to start their spans, when
    /// the call is traced.
    pub fn attempt_trace(&self) -> Option<AttemptTrace> {
        self.span.as_ref().map(|c| AttemptTrace {
            children: c.span.children(),
            name: c.name.clone(),
            attributes: c.attributes.clone(),
        })
    }

    /// The backend the call was routed to.
    pub fn set_backend(&mut self, backend: &Arc<str>) {
        if let Some(c) = &mut self.span {
            c.span
                .set(KeyValue::new("pylon.backend", backend.to_string()));
            c.attributes
                .push(KeyValue::new("pylon.backend", backend.to_string()));
        }
        self.backend = Some(backend.clone());
    }

    /// How many attempts the call made, and the endpoint of the last.
    pub fn set_attempts(&mut self, attempts: u32, endpoint: Option<SocketAddr>) {
        self.attempts = attempts;
        self.endpoint = endpoint;
        if let (Some(c), Some(e)) = (&mut self.span, endpoint) {
            c.span.set(KeyValue::new("pylon.endpoint", e.to_string()));
        }
    }

    /// Notes a failure of the proxy's own (`code` is its `x-pylon-error`):
    /// logged at debug level with the request's IDs, and the span failed.
    pub fn failed(&mut self, code: &'static str, message: &dyn std::fmt::Display) {
        let ctx = self.context;
        // Under the proxy's target: `pylon::proxy=debug` shows its failures.
        tracing::debug!(
            target: "pylon::proxy",
            error = %message,
            code,
            request_id = %String::from_utf8_lossy(self.request_id.as_bytes()),
            trace_id = ctx.map(|c| c.trace_id.to_string()),
            span_id = ctx.map(|c| c.span_id.to_string()),
            "request failed in the proxy"
        );
        if let Some(c) = &mut self.span {
            record_error(&mut c.span, code, message);
        }
    }

    /// Whether [`RequestScope::end`] has anything to complete (a span or an
    /// access record); when not, the scope may simply be dropped.
    pub fn observes(&self) -> bool {
        self.span.is_some() || self.access.is_some()
    }

    /// Completes the span and the access record with how the response
    /// ended. Dropping the scope ends (exports) the span.
    pub fn end(mut self, end: &RequestEnd) {
        let scope = &mut self;
        if let Some(call) = &mut scope.span {
            let span = &mut call.span;
            record_status(
                span,
                scope.side == Side::Inbound,
                Some(end.status),
                end.grpc_status,
            );
            if let Some(e) = end.error
                && !span.failed()
            {
                span.set(KeyValue::new("pylon.error", e));
                span.fail(e);
            }
            if scope.side == Side::Outbound {
                span.set(KeyValue::new("pylon.attempts", i64::from(scope.attempts)));
            }
            match end.ending {
                Ending::Complete => {}
                Ending::Failed => span.fail("response stream failed"),
                Ending::Dropped => span.set(KeyValue::new("pylon.cancelled", true)),
            }
        }
        if let Some(access) = &scope.access {
            let ctx = scope.context;
            tracing::info!(
                target: "pylon::access",
                side = scope.side.as_str(),
                method = %access.method,
                authority = %access.authority,
                path = %access.path,
                status = end.status,
                grpc_status = end.grpc_status.map(GrpcCode::as_u8),
                duration_ms = scope.start.elapsed().as_secs_f64() * 1000.0,
                bytes = end.bytes,
                backend = scope.backend.as_deref(),
                endpoint = scope.endpoint.map(|e| e.to_string()),
                attempts = scope.attempts,
                error = end.error,
                request_id = %String::from_utf8_lossy(scope.request_id.as_bytes()),
                trace_id = ctx.map(|c| c.trace_id.to_string()),
                span_id = ctx.map(|c| c.span_id.to_string()),
                peer = scope.peer.as_deref(),
                ending = ?end.ending,
                "access"
            );
        }
    }
}

/// Records the status of a response (head or trailers) on a span, and
/// marks it failed as the semantic conventions ask for its kind: a server
/// fails on 5xx and on server-side gRPC codes, a client on any 4xx/5xx or
/// non-OK gRPC status.
pub fn record_status(
    span: &mut SpanRecord,
    server: bool,
    http: Option<u16>,
    grpc: Option<GrpcCode>,
) {
    if let Some(http) = http {
        span.set(KeyValue::new("http.response.status_code", i64::from(http)));
        if http >= 500 || (!server && http >= 400) {
            span.fail(format!("HTTP {http}"));
        }
    }
    if let Some(code) = grpc {
        span.set(KeyValue::new(
            "rpc.grpc.status_code",
            i64::from(code.as_u8()),
        ));
        let failed = if server {
            matches!(
                code,
                GrpcCode::Unknown
                    | GrpcCode::DeadlineExceeded
                    | GrpcCode::Unimplemented
                    | GrpcCode::Internal
                    | GrpcCode::Unavailable
                    | GrpcCode::DataLoss
            )
        } else {
            code != GrpcCode::Ok
        };
        if failed {
            span.fail(format!("gRPC status {}", code.as_u8()));
        }
    }
}

/// Records a failure of the proxy's own (`code`, its `x-pylon-error`) on a
/// span.
pub fn record_error(span: &mut SpanRecord, code: &'static str, message: &dyn std::fmt::Display) {
    span.set(KeyValue::new("pylon.error", code));
    span.fail(message.to_string());
}

/// How a request's response ended, as its span and access record tell it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RequestEnd {
    pub ending: Ending,
    /// The response's HTTP status.
    pub status: u16,
    pub grpc_status: Option<GrpcCode>,
    /// The proxy's error code, when the proxy answered.
    pub error: Option<&'static str>,
    /// Body bytes sent.
    pub bytes: u64,
}

/// How the response body ended, for the record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    Complete,
    Failed,
    Dropped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_ids_are_uuid_v4() {
        let id = new_request_id();
        let s = id.to_str().unwrap();
        assert_eq!(s.len(), 36);
        let groups: Vec<&str> = s.split('-').collect();
        assert_eq!(
            groups.iter().map(|g| g.len()).collect::<Vec<_>>(),
            [8, 4, 4, 4, 12]
        );
        assert!(groups[2].starts_with('4'), "{s}");
        assert!(matches!(&groups[3][..1], "8" | "9" | "a" | "b"), "{s}");
        assert_ne!(new_request_id(), id);
    }

    #[test]
    fn a_present_request_id_is_kept() {
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc"));
        let kept = request_id(&mut h);
        assert_eq!(kept, "abc");
        let mut h2 = HeaderMap::new();
        let id = request_id(&mut h2);
        assert_eq!(h2[X_REQUEST_ID], id);
        // Sent on as never-indexed (HPACK); the scope's copy, which logs
        // and error answers show, is a plain value.
        for (sent, own) in [(&h[X_REQUEST_ID], &kept), (&h2[X_REQUEST_ID], &id)] {
            assert!(sent.is_sensitive());
            assert!(!own.is_sensitive());
        }
    }

    #[test]
    fn a_request_id_too_long_repeated_or_unprintable_is_replaced() {
        for bad in [
            "x".repeat(MAX_REQUEST_ID + 1),
            "a b".to_string(),
            "a\tb".to_string(),
        ] {
            let mut h = HeaderMap::new();
            h.insert(X_REQUEST_ID, HeaderValue::from_str(&bad).unwrap());
            let id = request_id(&mut h);
            assert_eq!(id.len(), 36, "{bad:?} replaced by a new ID");
            assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
            assert_eq!(h[X_REQUEST_ID], id);
        }
        let mut h = HeaderMap::new();
        h.append(X_REQUEST_ID, HeaderValue::from_static("a"));
        h.append(X_REQUEST_ID, HeaderValue::from_static("b"));
        let id = request_id(&mut h);
        assert_eq!(id.len(), 36);
        assert_eq!(h.get_all(X_REQUEST_ID).iter().count(), 1);
        let longest = "x".repeat(MAX_REQUEST_ID);
        let mut h = HeaderMap::new();
        h.insert(X_REQUEST_ID, HeaderValue::from_str(&longest).unwrap());
        assert_eq!(request_id(&mut h), longest.as_str());
    }

    #[test]
    fn a_sampled_flag_from_outside_the_mesh_is_only_a_hint() {
        let telemetry = |follow_external_sampling| Telemetry {
            // Samples no new trace.
            tracer: Some(Arc::new(super::super::trace::Tracer::discarding(0.0))),
            access_log: false,
            follow_external_sampling,
        };
        let caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
        let begin = |t: &Telemetry, side, remote: Option<(SocketAddr, &Arc<str>)>| {
            let mut req = Request::get("/")
                .header(TRACEPARENT, caller)
                .body(())
                .unwrap();
            let sampled = RequestScope::begin(t, side, &mut req, false, None, remote)
                .traceparent()
                .is_some();
            (sampled, req.headers()[TRACEPARENT].clone())
        };
        // A plaintext caller's flag is overruled, and the next hop told so.
        let (sampled, passed_on) = begin(&telemetry(false), Side::Inbound, None);
        assert!(!sampled);
        assert_eq!(
            passed_on,
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00"
        );
        // Unless told to follow it.
        assert!(begin(&telemetry(true), Side::Inbound, None).0);
        // The local app and mesh peers are followed.
        assert!(begin(&telemetry(false), Side::Outbound, None).0);
        let peer: Arc<str> = "spiffe://t/ns/default/sa/client".into();
        let addr: SocketAddr = "127.0.0.1:1".parse().unwrap();
        assert!(begin(&telemetry(false), Side::Inbound, Some((addr, &peer))).0);
    }

    #[test]
    fn grpc_methods_split() {
        assert_eq!(
            grpc_method("/helloworld.Greeter/SayHello"),
            Some(("helloworld.Greeter", "SayHello"))
        );
        assert_eq!(grpc_method("/plain"), None);
    }
}
