//! What the control plane tells operators: Prometheus metrics (applies,
//! pushes, ACKs and NACKs, connected sidecars, certificates issued and
//! refused, CA and policy versions, gRPC calls by method and status), served
//! as text on an opt-in HTTP listener (`--metrics-listen`) and exported over
//! OTLP (`--otlp-endpoint`), and a trace span per gRPC call (continuing the
//! caller's `traceparent`) exported over OTLP.
//!
//! Everything hooks in at the service layer ([`RpcLayer`] on the tonic
//! server) or at the points where the server already records what happened;
//! the identity and CA logic know nothing of it.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use opentelemetry::KeyValue;
use opentelemetry::trace::{
    Span as _, SpanContext, SpanId, SpanKind, Status as SpanStatus, TraceContextExt as _,
    TraceFlags, TraceId, TraceState, Tracer as _, TracerProvider as _,
};
use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use pylon_proto::traceparent::{TRACEPARENT, TraceParent};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpListener;

/// Every gRPC method served, as its label value: a path that is not one of
/// these (a made-up method of a real service included) is `other`, so that
/// callers cannot grow the label set.
const METHODS: [&str; 17] = [
    "PolicyAdmin/Apply",
    "PolicyAdmin/Get",
    "PolicyAdmin/List",
    "PolicyAdmin/Delete",
    "PolicyAdmin/Status",
    "PolicyAdmin/Rollback",
    "PolicyAdmin/CreateToken",
    "PolicyAdmin/ListTokens",
    "PolicyAdmin/RevokeToken",
    "PolicyAdmin/CaStatus",
    "PolicyAdmin/CaAddRoot",
    "PolicyAdmin/CaActivate",
    "PolicyAdmin/CaRemoveRoot",
    "Discovery/StreamPolicy",
    "Identity/WhoAmI",
    "Identity/IssueCertificate",
    "Identity/WatchTrustBundle",
];
const OTHER_METHOD: &str = "other";
const ISSUE_CERTIFICATE: &str = "/pylon.v1.Identity/IssueCertificate";
/// At most one log line per listener and kind of refusal in this time; the
/// line says how many were not logged.
const LOG_EVERY: Duration = Duration::from_secs(10);

/// The label value of a request path: `PolicyAdmin/Apply`, or `other`.
fn method_label(path: &str) -> &'static str {
    path.strip_prefix("/pylon.v1.")
        .and_then(|m| METHODS.iter().find(|known| **known == m))
        .copied()
        .unwrap_or(OTHER_METHOD)
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedLabels {
    /// `kubernetes` (a service-account JWT) or `bootstrap` (a token of
    /// `pylon-control token create`).
    kind: &'static str,
    /// Why: `expired`, `audience`, `signature`, … (a fixed set).
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RpcLabels {
    /// `PolicyAdmin/Apply`, or `other`.
    method: &'static str,
    /// The gRPC status name the call ended with (at its response head).
    code: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ListenerLabels {
    /// `grpc` (`--listen`) or `webhook` (`--webhook-listen`).
    listener: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RefusedConnectionLabels {
    listener: &'static str,
    /// A [`Refusal`], as its name.
    reason: &'static str,
}

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct Http2CodeLabels {
    listener: &'static str,
    /// The HTTP/2 error code's name ([`crate::h2_frames::code_name`]).
    code: &'static str,
}

/// Why a listener closed a connection before serving it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// `max_connections` were open.
    Limit,
    /// The TLS handshake did not end within the handshake timeout.
    HandshakeTimeout,
    /// The TLS handshake failed (bad client certificate, no common cipher,
    /// not TLS).
    HandshakeFailed,
    /// The handshake ended, but the first bytes of the protocol did not
    /// come within the handshake timeout.
    FirstBytesTimeout,
    /// The peer read nothing the server wrote for twice the keepalive
    /// interval (a flood whose answers it never reads, a dead peer): the
    /// connection was cut.
    WriteStall,
}

impl Refusal {
    pub fn as_str(self) -> &'static str {
        match self {
            Refusal::Limit => "limit",
            Refusal::HandshakeTimeout => "handshake_timeout",
            Refusal::HandshakeFailed => "handshake_failed",
            Refusal::FirstBytesTimeout => "first_bytes_timeout",
            Refusal::WriteStall => "write_stall",
        }
    }
}

/// One log line per key and [`LOG_EVERY`], with the count of those skipped.
#[derive(Default)]
struct LogGate(std::sync::Mutex<std::collections::HashMap<(&'static str, &'static str), Gate>>);

struct Gate {
    last: std::time::Instant,
    skipped: u64,
}

impl LogGate {
    /// `Some(skipped since the last line)` when a line may be logged now.
    fn pass(&self, key: (&'static str, &'static str)) -> Option<u64> {
        let now = std::time::Instant::now();
        let mut gates = self
            .0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match gates.get_mut(&key) {
            Some(gate) if now.duration_since(gate.last) < LOG_EVERY => {
                gate.skipped += 1;
                None
            }
            Some(gate) => {
                let skipped = gate.skipped;
                *gate = Gate {
                    last: now,
                    skipped: 0,
                };
                Some(skipped)
            }
            None => {
                gates.insert(
                    key,
                    Gate {
                        last: now,
                        skipped: 0,
                    },
                );
                Some(0)
            }
        }
    }
}

/// What one listener counts: connections open and refused, and the HTTP/2
/// resets and GOAWAYs it sent (how h2 tells a peer a limit was hit).
#[derive(Clone)]
pub struct ListenerMetrics {
    metrics: Arc<ControlMetrics>,
    listener: &'static str,
}

impl ListenerMetrics {
    pub fn new(metrics: Arc<ControlMetrics>, listener: &'static str) -> Self {
        ListenerMetrics { metrics, listener }
    }

    pub fn listener(&self) -> &'static str {
        self.listener
    }

    /// Counts a connection closed before it was served, and logs it (at
    /// most once per [`LOG_EVERY`] and reason).
    pub fn refused(&self, why: Refusal, peer: SocketAddr, detail: &dyn std::fmt::Display) {
        let reason = why.as_str();
        self.metrics
            .connections_refused
            .get_or_create(&RefusedConnectionLabels {
                listener: self.listener,
                reason,
            })
            .inc();
        if let Some(skipped) = self.metrics.log_gate.pass((self.listener, reason)) {
            let listener = self.listener;
            match why {
                Refusal::HandshakeFailed => {
                    tracing::info!(listener, reason, %peer, skipped, "connection refused: {detail}");
                }
                _ => {
                    tracing::warn!(listener, reason, %peer, skipped, "connection refused: {detail}");
                }
            }
        }
    }

    /// Sets the number of open connections.
    pub fn set_open(&self, open: usize) {
        self.metrics
            .connections_open
            .get_or_create(&ListenerLabels {
                listener: self.listener,
            })
            .set(i64::try_from(open).unwrap_or(i64::MAX));
    }

    /// Counts a RST_STREAM or GOAWAY the server sent; logs the ones that
    /// mean a limit or a protocol error (at most once per [`LOG_EVERY`]
    /// and code).
    pub fn sent(&self, frame: crate::h2_frames::Sent, peer: SocketAddr) {
        use crate::h2_frames::{Sent, code_name};
        let (family, code, what) = match frame {
            Sent::Reset(c) => (&self.metrics.http2_resets_sent, c, "stream reset"),
            Sent::GoAway(c) => (
                &self.metrics.http2_goaways_sent,
                c,
                "connection closed (GOAWAY)",
            ),
        };
        let code = code_name(code);
        family
            .get_or_create(&Http2CodeLabels {
                listener: self.listener,
                code,
            })
            .inc();
        // NO_ERROR and CANCEL are how streams and connections normally end.
        if matches!(code, "NO_ERROR" | "CANCEL") {
            return;
        }
        let kind = match frame {
            Sent::Reset(_) => "reset",
            Sent::GoAway(_) => "goaway",
        };
        let key = (
            self.listener,
            if kind == "reset" {
                code
            } else {
                goaway_key(code)
            },
        );
        if let Some(skipped) = self.metrics.log_gate.pass(key) {
            tracing::warn!(listener = self.listener, %peer, code, skipped, "HTTP/2 {what}: the peer hit a limit or broke the protocol");
        }
    }
}

/// A log-gate key for GOAWAYs apart from resets of the same code.
fn goaway_key(code: &'static str) -> &'static str {
    match code {
        "ENHANCE_YOUR_CALM" => "goaway ENHANCE_YOUR_CALM",
        "PROTOCOL_ERROR" => "goaway PROTOCOL_ERROR",
        _ => "goaway",
    }
}

/// The control plane's metrics.
pub struct ControlMetrics {
    registry: Registry,
    pub(crate) applies: Counter,
    pub(crate) pushes: Counter,
    pub(crate) acks: Counter,
    pub(crate) nacks: Counter,
    certificates_issued: Counter,
    certificates_refused: Counter,
    credentials_refused: Family<RefusedLabels, Counter>,
    rpcs: Family<RpcLabels, Counter>,
    pub(crate) connected_sidecars: Gauge,
    pub(crate) policy_version: Gauge,
    pub(crate) ca_version: Gauge,
    pub(crate) trust_bundle_roots: Gauge,
    pub(crate) otlp_export_failures: Counter,
    connections_refused: Family<RefusedConnectionLabels, Counter>,
    connections_open: Family<ListenerLabels, Gauge>,
    http2_resets_sent: Family<Http2CodeLabels, Counter>,
    http2_goaways_sent: Family<Http2CodeLabels, Counter>,
    log_gate: LogGate,
}

impl ControlMetrics {
    /// Counts a refused bootstrap credential.
    pub fn credential_refused(&self, kind: &'static str, reason: &'static str) {
        self.credentials_refused
            .get_or_create(&RefusedLabels { kind, reason })
            .inc();
    }

    pub fn new() -> Arc<ControlMetrics> {
        let mut registry = Registry::with_prefix("pylon_control");
        let m = ControlMetrics {
            registry: Registry::default(),
            applies: Counter::default(),
            pushes: Counter::default(),
            acks: Counter::default(),
            nacks: Counter::default(),
            certificates_issued: Counter::default(),
            certificates_refused: Counter::default(),
            credentials_refused: Family::default(),
            rpcs: Family::default(),
            connected_sidecars: Gauge::default(),
            policy_version: Gauge::default(),
            ca_version: Gauge::default(),
            trust_bundle_roots: Gauge::default(),
            otlp_export_failures: Counter::default(),
            connections_refused: Family::default(),
            connections_open: Family::default(),
            http2_resets_sent: Family::default(),
            http2_goaways_sent: Family::default(),
            log_gate: LogGate::default(),
        };
        registry.register(
            "applies",
            "Apply calls that changed or confirmed the store",
            m.applies.clone(),
        );
        registry.register(
            "pushes",
            "Policy snapshots sent to sidecars",
            m.pushes.clone(),
        );
        registry.register("acks", "Snapshots sidecars acknowledged", m.acks.clone());
        registry.register("nacks", "Snapshots sidecars refused", m.nacks.clone());
        registry.register(
            "certificates_issued",
            "Workload certificates signed",
            m.certificates_issued.clone(),
        );
        registry.register(
            "credentials_refused",
            "Bootstrap credentials refused: service-account JWTs and bootstrap tokens, by reason",
            m.credentials_refused.clone(),
        );
        registry.register(
            "certificates_refused",
            "Certificate requests refused (bad token, CSR or identity)",
            m.certificates_refused.clone(),
        );
        registry.register(
            "rpc_requests",
            "gRPC calls by method and status",
            m.rpcs.clone(),
        );
        registry.register(
            "connected_sidecars",
            "Sidecars with an open policy stream",
            m.connected_sidecars.clone(),
        );
        registry.register(
            "policy_version",
            "The policy version being published",
            m.policy_version.clone(),
        );
        registry.register(
            "ca_version",
            "Changes to the mesh CA in this process (from 1)",
            m.ca_version.clone(),
        );
        registry.register(
            "trust_bundle_roots",
            "Certificates in the trust bundle",
            m.trust_bundle_roots.clone(),
        );
        registry.register(
            "otlp_metrics_export_failures",
            "OTLP metric exports that failed (collector refused, unreachable or too slow)",
            m.otlp_export_failures.clone(),
        );
        registry.register(
            "connections_refused",
            "Connections closed before they were served, by listener and reason (limit, handshake_timeout, handshake_failed, first_bytes_timeout)",
            m.connections_refused.clone(),
        );
        registry.register(
            "connections_open",
            "Open connections, handshaking ones included, by listener",
            m.connections_open.clone(),
        );
        registry.register(
            "http2_resets_sent",
            "HTTP/2 streams the server reset, by listener and error code (REFUSED_STREAM: the stream or header-list limit)",
            m.http2_resets_sent.clone(),
        );
        registry.register(
            "http2_goaways_sent",
            "HTTP/2 connections the server closed with GOAWAY, by listener and error code (ENHANCE_YOUR_CALM: a reset or CONTINUATION flood)",
            m.http2_goaways_sent.clone(),
        );
        Arc::new(ControlMetrics { registry, ..m })
    }

    /// Prometheus text of every metric (gauges as last set).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    fn record_rpc(&self, path: &str, code: i32) {
        let method = method_label(path);
        self.rpcs
            .get_or_create(&RpcLabels {
                method,
                code: code_name(code),
            })
            .inc();
        if path == ISSUE_CERTIFICATE {
            if code == 0 {
                self.certificates_issued.inc();
            } else {
                self.certificates_refused.inc();
            }
        }
    }
}

fn code_name(code: i32) -> &'static str {
    u8::try_from(code)
        .ok()
        .and_then(pylon_proto::policy::GrpcCode::from_u8)
        .map_or("UNKNOWN", |c| c.as_str())
}

/// Serves `GET /metrics` (Prometheus text from `scrape`) on `listener`
/// until the task is dropped. A deliberately small HTTP/1.1 responder: one
/// request per connection.
pub async fn serve_metrics<F>(listener: TcpListener, scrape: F)
where
    F: Fn() -> String + Send + Sync + 'static,
{
    let scrape = Arc::new(scrape);
    loop {
        let Ok((mut tcp, _)) = listener.accept().await else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            let read = tokio::time::timeout(Duration::from_secs(5), async {
                while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
                    let n = tcp.read(&mut buf).await?;
                    if n == 0 {
                        break;
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                std::io::Result::Ok(())
            })
            .await;
            if !matches!(read, Ok(Ok(()))) {
                return;
            }
            let line = String::from_utf8_lossy(&head);
            let mut words = line.split_whitespace();
            let (status, content_type, body) = match (words.next(), words.next()) {
                (Some("GET"), Some("/metrics")) => (
                    "200 OK",
                    "text/plain; version=0.0.4; charset=utf-8",
                    scrape(),
                ),
                _ => ("404 Not Found", "text/plain", "not found\n".to_string()),
            };
            let response = format!(
                "HTTP/1.1 {status}\r\ncontent-type: {content_type}\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = tcp.write_all(response.as_bytes()).await;
            let _ = tcp.shutdown().await;
        });
    }
}

/// A tracer exporting spans over OTLP/gRPC to `endpoint` in batches.
pub fn tracer_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(Duration::from_secs(5))
        .build()?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name("pylon-control")
                .build(),
        )
        .build())
}

/// Counts every gRPC call and, with a tracer, wraps it in a server span.
#[derive(Clone)]
pub struct RpcLayer {
    metrics: Arc<ControlMetrics>,
    tracer: Option<Arc<SdkTracer>>,
}

impl RpcLayer {
    pub fn new(metrics: Arc<ControlMetrics>, tracer: Option<&SdkTracerProvider>) -> Self {
        RpcLayer {
            metrics,
            tracer: tracer.map(|p| Arc::new(p.tracer("pylon-control"))),
        }
    }
}

impl<S> tower::Layer<S> for RpcLayer {
    type Service = RpcService<S>;

    fn layer(&self, inner: S) -> RpcService<S> {
        RpcService {
            inner,
            layer: self.clone(),
        }
    }
}

#[derive(Clone)]
pub struct RpcService<S> {
    inner: S,
    layer: RpcLayer,
}

/// The caller's span as the parent of ours: `traceparent` as the sidecar
/// reads it (`pylon_proto::traceparent`), with its `tracestate`.
fn remote_parent(headers: &http::HeaderMap) -> opentelemetry::Context {
    let current = opentelemetry::Context::current();
    let Some(parent) = headers
        .get(TRACEPARENT)
        .and_then(|v| TraceParent::parse(v.as_bytes()))
    else {
        return current;
    };
    let state = headers
        .get("tracestate")
        .and_then(|v| v.to_str().ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let flags = if parent.sampled {
        TraceFlags::SAMPLED
    } else {
        TraceFlags::default()
    };
    current.with_remote_span_context(SpanContext::new(
        TraceId::from(parent.trace_id),
        SpanId::from(parent.span_id),
        flags,
        true,
        state,
    ))
}

/// The gRPC status of a response head: `grpc-status` when the call ended
/// there (an error), else OK (a unary success sends it in trailers; a
/// stream is counted when it starts).
fn head_status<B>(resp: &http::Response<B>) -> i32 {
    resp.headers()
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .unwrap_or(if resp.status() == http::StatusCode::OK {
            0
        } else {
            2
        })
}

impl<S, B, RB> tower::Service<http::Request<B>> for RpcService<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
    S::Error: Send + 'static,
    RB: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: http::Request<B>) -> Self::Future {
        let path = req.uri().path().to_string();
        let span = self.layer.tracer.as_ref().map(|tracer| {
            let parent = remote_parent(req.headers());
            let label = method_label(&path);
            let (service, method) = label.split_once('/').unwrap_or((label, ""));
            let service = format!("pylon.v1.{service}");
            tracer
                .span_builder(format!("/{service}/{method}"))
                .with_kind(SpanKind::Server)
                .with_attributes([
                    KeyValue::new("rpc.system", "grpc"),
                    KeyValue::new("rpc.service", service.to_string()),
                    KeyValue::new("rpc.method", method.to_string()),
                ])
                .start_with_context(tracer.as_ref(), &parent)
        });
        let metrics = self.layer.metrics.clone();
        let call = self.inner.call(req);
        Box::pin(async move {
            let result = call.await;
            let code = match &result {
                Ok(resp) => head_status(resp),
                Err(_) => 2,
            };
            metrics.record_rpc(&path, code);
            if let Some(mut span) = span {
                span.set_attribute(KeyValue::new("rpc.grpc.status_code", i64::from(code)));
                if code != 0 {
                    span.set_status(SpanStatus::error(code_name(code)));
                }
                span.end();
            }
            result
        })
    }
}

/// The labelled values of a text exposition, by sample name, for tests.
#[cfg(test)]
fn samples(text: &str) -> std::collections::HashMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (name, value) = l.rsplit_once(' ')?;
            Some((name.to_string(), value.parse().ok()?))
        })
        .collect()
}

/// Where the control plane's telemetry goes.
#[derive(Debug, Clone, Default)]
pub struct TelemetryConfig {
    /// Serve Prometheus text at `http://ADDR/metrics`.
    pub metrics_listen: Option<SocketAddr>,
    /// Export metrics and traces over OTLP/gRPC (`http://collector:4317`).
    pub otlp_endpoint: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rpc_labels_are_bounded_and_issuance_is_counted_from_the_status() {
        let m = ControlMetrics::new();
        m.record_rpc("/pylon.v1.PolicyAdmin/Apply", 0);
        m.record_rpc(ISSUE_CERTIFICATE, 0);
        m.record_rpc(ISSUE_CERTIFICATE, 7);
        m.record_rpc("/evil.Service/x1", 12);
        m.record_rpc("/pylon.v1.Identity/x2", 12);
        let s = samples(&m.encode());
        let get = |k: &str| s.get(k).copied().unwrap_or(-1.0);
        assert_eq!(
            get("pylon_control_rpc_requests_total{method=\"PolicyAdmin/Apply\",code=\"OK\"}"),
            1.0
        );
        assert_eq!(
            get("pylon_control_rpc_requests_total{method=\"other\",code=\"UNIMPLEMENTED\"}"),
            2.0
        );
        assert_eq!(get("pylon_control_certificates_issued_total"), 1.0);
        assert_eq!(get("pylon_control_certificates_refused_total"), 1.0);
    }

    #[test]
    fn every_method_of_the_protos_has_its_label() {
        let proto = include_str!("../../proto/proto/pylon/v1/control.proto");
        let mut service = "";
        let mut served = Vec::new();
        for line in proto.lines().map(str::trim) {
            if let Some(rest) = line.strip_prefix("service ") {
                service = rest.trim_end_matches(['{', ' ']);
            } else if let Some(rest) = line.strip_prefix("rpc ") {
                let method = rest.split('(').next().unwrap_or_default().trim();
                served.push(format!("{service}/{method}"));
            }
        }
        let known: Vec<String> = METHODS.iter().map(ToString::to_string).collect();
        assert_eq!(served, known);
        for m in &known {
            assert_eq!(method_label(&format!("/pylon.v1.{m}")), m.as_str());
        }
        for other in [
            "",
            "/",
            "/pylon.v1.Identity/",
            "/pylon.v1.Identity/WhoAmI/x",
            "/x/y",
        ] {
            assert_eq!(method_label(other), "other", "{other:?}");
        }
    }

    #[test]
    fn listener_refusals_and_h2_frames_are_counted_by_bounded_labels() {
        let m = ControlMetrics::new();
        let grpc = ListenerMetrics::new(m.clone(), "grpc");
        let peer: SocketAddr = "127.0.0.1:1".parse().unwrap();
        for _ in 0..3 {
            grpc.refused(Refusal::Limit, peer, &"full");
        }
        grpc.sent(crate::h2_frames::Sent::Reset(7), peer);
        grpc.sent(crate::h2_frames::Sent::GoAway(11), peer);
        grpc.sent(crate::h2_frames::Sent::GoAway(0xbad), peer);
        grpc.set_open(2);
        let s = samples(&m.encode());
        let get = |k: &str| s.get(k).copied().unwrap_or(-1.0);
        assert_eq!(
            get("pylon_control_connections_refused_total{listener=\"grpc\",reason=\"limit\"}"),
            3.0
        );
        assert_eq!(
            get("pylon_control_http2_resets_sent_total{listener=\"grpc\",code=\"REFUSED_STREAM\"}"),
            1.0
        );
        assert_eq!(
            get(
                "pylon_control_http2_goaways_sent_total{listener=\"grpc\",code=\"ENHANCE_YOUR_CALM\"}"
            ),
            1.0
        );
        assert_eq!(
            get("pylon_control_http2_goaways_sent_total{listener=\"grpc\",code=\"other\"}"),
            1.0
        );
        assert_eq!(
            get("pylon_control_connections_open{listener=\"grpc\"}"),
            2.0
        );
    }

    #[test]
    fn the_log_gate_lets_one_line_through_per_period_and_counts_the_rest() {
        let gate = LogGate::default();
        assert_eq!(gate.pass(("grpc", "limit")), Some(0));
        assert_eq!(gate.pass(("grpc", "limit")), None);
        assert_eq!(gate.pass(("grpc", "limit")), None);
        assert_eq!(gate.pass(("webhook", "limit")), Some(0), "its own key");
    }
}
