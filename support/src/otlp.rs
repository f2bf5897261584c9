//! OTLP/gRPC receivers on free loopback ports: [`Collector`] keeps every
//! trace and metrics export it is sent (the tests read them), and
//! [`SpanCounter`] only counts spans (the tracing benchmark, where keeping
//! them would cost more than the proxy). And a way for a test app to export
//! a span of its own.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use opentelemetry_proto::tonic::metrics::v1::{Metric, metric, number_data_point};
use tonic::service::Routes;

use crate::{POLL, eventually, poll_until};

/// A span as the receiver got it, IDs in lower-case hex.
#[derive(Debug, Clone)]
pub struct Span {
    pub service: String,
    pub trace_id: String,
    pub span_id: String,
    /// Empty for a root span.
    pub parent: String,
    pub name: String,
    /// OTLP `SpanKind`: 1 internal, 2 server, 3 client.
    pub kind: i32,
    pub attributes: BTreeMap<String, String>,
    /// Status code ERROR.
    pub error: bool,
}

impl Span {
    pub fn attr(&self, key: &str) -> Option<&str> {
        self.attributes.get(key).map(String::as_str)
    }
}

pub const INTERNAL: i32 = 1;
pub const SERVER: i32 = 2;
pub const CLIENT: i32 = 3;

/// Every export received, as sent.
#[derive(Clone, Default)]
struct Kept {
    traces: Arc<Mutex<Vec<ExportTraceServiceRequest>>>,
    metrics: Arc<Mutex<Vec<ExportMetricsServiceRequest>>>,
}

#[tonic::async_trait]
impl TraceService for Kept {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.traces.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

#[tonic::async_trait]
impl MetricsService for Kept {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        self.metrics.lock().unwrap().push(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// The spans of one export, IDs in hex and attribute values as text.
fn spans_of(request: &ExportTraceServiceRequest) -> Vec<Span> {
    let mut out = Vec::new();
    for rs in &request.resource_spans {
        let service = rs
            .resource
            .iter()
            .flat_map(|r| &r.attributes)
            .find(|kv| kv.key == "service.name")
            .and_then(|kv| kv.value.as_ref())
            .map(text)
            .unwrap_or_default();
        for ss in &rs.scope_spans {
            for s in &ss.spans {
                out.push(Span {
                    service: service.clone(),
                    trace_id: hex(&s.trace_id),
                    span_id: hex(&s.span_id),
                    parent: hex(&s.parent_span_id),
                    name: s.name.clone(),
                    kind: s.kind,
                    attributes: s
                        .attributes
                        .iter()
                        .map(|kv| {
                            (
                                kv.key.clone(),
                                kv.value.as_ref().map(text).unwrap_or_default(),
                            )
                        })
                        .collect(),
                    error: s.status.as_ref().is_some_and(|st| st.code == 2),
                });
            }
        }
    }
    out
}

fn text(v: &opentelemetry_proto::tonic::common::v1::AnyValue) -> String {
    match &v.value {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Serves `routes` on a free loopback port until the task is aborted.
async fn serve(routes: Routes) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?;
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener);
    let task = tokio::spawn(async move {
        if let Err(e) = tonic::transport::Server::builder()
            .add_routes(routes)
            .serve_with_incoming(incoming)
            .await
        {
            eprintln!("OTLP receiver: {e}");
        }
    });
    Ok((addr, task))
}

/// A running receiver of traces and metrics that keeps every export; stops
/// on drop.
pub struct Collector {
    pub addr: SocketAddr,
    kept: Kept,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Collector {
    pub async fn start() -> Collector {
        let kept = Kept::default();
        let routes = Routes::new(TraceServiceServer::new(kept.clone()))
            .add_service(MetricsServiceServer::new(kept.clone()));
        let (addr, task) = serve(routes).await.unwrap();
        Collector { addr, kept, task }
    }

    /// `http://ADDR`, the value of `telemetry.otlp.endpoint`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every span received so far.
    pub fn spans(&self) -> Vec<Span> {
        self.trace_exports().iter().flat_map(spans_of).collect()
    }

    /// Every trace export received so far, as sent.
    pub fn trace_exports(&self) -> Vec<ExportTraceServiceRequest> {
        self.kept.traces.lock().unwrap().clone()
    }

    /// Every metrics export received so far, as sent.
    pub fn metric_exports(&self) -> Vec<ExportMetricsServiceRequest> {
        self.kept.metrics.lock().unwrap().clone()
    }

    /// The spans of `trace_id`, once `done` says they are all in.
    pub async fn wait_trace(&self, trace_id: &str, done: impl Fn(&[Span]) -> bool) -> Vec<Span> {
        let look = async || {
            let spans: Vec<Span> = self
                .spans()
                .into_iter()
                .filter(|s| s.trace_id == trace_id)
                .collect();
            if done(&spans) {
                Ok(spans)
            } else {
                Err(format!("{spans:#?}"))
            }
        };
        eventually(format_args!("trace {trace_id} complete"), look).await
    }

    /// The newest export's metric called `name`, if any export had one.
    pub fn latest(&self, name: &str) -> Option<Metric> {
        let got = self.kept.metrics.lock().unwrap();
        got.iter().rev().find_map(|req| {
            req.resource_metrics
                .iter()
                .flat_map(|rm| &rm.scope_metrics)
                .flat_map(|sm| &sm.metrics)
                .find(|m| m.name == name)
                .cloned()
        })
    }

    /// Every metric name of the newest export.
    pub fn names(&self) -> Vec<String> {
        let got = self.kept.metrics.lock().unwrap();
        got.last()
            .map(|req| {
                req.resource_metrics
                    .iter()
                    .flat_map(|rm| &rm.scope_metrics)
                    .flat_map(|sm| &sm.metrics)
                    .map(|m| m.name.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Polls until `check` holds of the exports received, or panics.
    pub async fn wait_for(&self, what: &str, check: impl Fn(&Collector) -> bool) {
        let look = async || {
            if check(self) {
                Ok(())
            } else {
                Err(format!("it has: {:?}", self.names()))
            }
        };
        if let Err(gave_up) = poll_until(POLL, look).await {
            panic!("the receiver never got {what}{gave_up}");
        }
    }

    /// The sum of the newest `name` metric's points (see [`total`]) whose
    /// attributes include every `(key, value)` of `with`; 0 if none.
    pub fn count(&self, name: &str, with: &[(&str, &str)]) -> u64 {
        self.latest(name).map_or(0, |m| total(&m, with))
    }
}

/// The sum of a counter's points, or of a histogram's counts, whose
/// attributes include every `(key, value)` of `with`.
pub fn total(metric: &Metric, with: &[(&str, &str)]) -> u64 {
    let matches = |attrs: &[opentelemetry_proto::tonic::common::v1::KeyValue]| {
        with.iter().all(|(k, v)| {
            attrs.iter().any(|kv| {
                kv.key == *k
                    && matches!(
                        kv.value.as_ref().and_then(|a| a.value.as_ref()),
                        Some(Value::StringValue(s)) if s == v
                    )
            })
        })
    };
    let number = |p: &opentelemetry_proto::tonic::metrics::v1::NumberDataPoint| match p.value {
        Some(number_data_point::Value::AsInt(n)) => n as u64,
        Some(number_data_point::Value::AsDouble(d)) => d as u64,
        None => 0,
    };
    match &metric.data {
        Some(metric::Data::Sum(sum)) => sum
            .data_points
            .iter()
            .filter(|p| matches(&p.attributes))
            .map(number)
            .sum(),
        Some(metric::Data::Gauge(g)) => g
            .data_points
            .iter()
            .filter(|p| matches(&p.attributes))
            .map(number)
            .sum(),
        Some(metric::Data::Histogram(h)) => h
            .data_points
            .iter()
            .filter(|p| matches(&p.attributes))
            .map(|p| p.count)
            .sum(),
        _ => 0,
    }
}

/// A trace receiver that counts the spans it is sent and keeps nothing;
/// stops on drop.
pub struct SpanCounter {
    pub addr: SocketAddr,
    spans: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

struct Count(Arc<AtomicU64>);

#[tonic::async_trait]
impl TraceService for Count {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let n: usize = request
            .into_inner()
            .resource_spans
            .iter()
            .flat_map(|r| &r.scope_spans)
            .map(|s| s.spans.len())
            .sum();
        self.0.fetch_add(n as u64, Ordering::Relaxed);
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

impl SpanCounter {
    pub async fn start() -> std::io::Result<SpanCounter> {
        let spans = Arc::new(AtomicU64::new(0));
        let routes = Routes::new(TraceServiceServer::new(Count(spans.clone())));
        let (addr, task) = serve(routes).await?;
        Ok(SpanCounter { addr, spans, task })
    }

    /// Spans received so far.
    pub fn spans(&self) -> u64 {
        self.spans.load(Ordering::Relaxed)
    }
}

impl Drop for SpanCounter {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Exports one SERVER span named `name` of service `app`, child of the span
/// named by `traceparent`, to the collector at `endpoint` — what an app's
/// own tracing does with the context the sidecar passes it.
pub async fn export_app_span(endpoint: &str, traceparent: &str, name: &'static str) {
    use opentelemetry::trace::{
        SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
    };
    use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
    use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};

    let fields: Vec<&str> = traceparent.split('-').collect();
    let trace_id = TraceId::from_hex(fields[1]).unwrap();
    let parent = SpanId::from_hex(fields[2]).unwrap();
    let mut exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
        .build()
        .unwrap();
    exporter.set_resource(
        &opentelemetry_sdk::Resource::builder_empty()
            .with_service_name("app")
            .build(),
    );
    let now = SystemTime::now();
    let span = SpanData {
        span_context: SpanContext::new(
            trace_id,
            SpanId::from(fastrand::u64(1..)),
            TraceFlags::SAMPLED,
            false,
            TraceState::default(),
        ),
        parent_span_id: parent,
        parent_span_is_remote: true,
        span_kind: SpanKind::Server,
        name: name.into(),
        start_time: now,
        end_time: now,
        attributes: Vec::new(),
        dropped_attributes_count: 0,
        events: SpanEvents::default(),
        links: SpanLinks::default(),
        status: Status::Unset,
        instrumentation_scope: opentelemetry::InstrumentationScope::builder("test-app").build(),
    };
    exporter.export(vec![span]).await.unwrap();
}
