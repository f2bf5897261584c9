//! Traces: the sidecar's own spans, W3C trace context, and their export
//! over OTLP/gRPC.
//!
//! Spans are plain records ([`SpanRecord`]) built only for sampled
//! requests; an unsampled request costs a header parse (or, when it came
//! without one, two random IDs and a `traceparent` to pass on) and nothing
//! else. A finished span goes into a bounded queue with `try_send`; a task
//! drains the queue in batches into the OTLP exporter. A full queue or a
//! failed export drops spans and counts them
//! (`pylon_trace_spans_dropped_total`): requests never wait for the
//! collector. See docs/adr/0010-tracing.md.
//!
//! Not here: which spans a request gets and their attributes (`request`,
//! `proxy::stack`).

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use http::{HeaderName, HeaderValue};
use opentelemetry::trace::{
    SpanContext, SpanId, SpanKind, Status, TraceFlags, TraceId, TraceState,
};
use opentelemetry::{InstrumentationScope, KeyValue};
use opentelemetry_otlp::{WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::trace::{SpanData, SpanEvents, SpanExporter, SpanLinks};
use pylon_proto::traceparent::TraceParent as W3cTraceParent;
use tokio::sync::mpsc;

use super::metrics::TraceMetrics;

pub const TRACEPARENT: HeaderName = HeaderName::from_static(pylon_proto::traceparent::TRACEPARENT);

/// Finished spans waiting for export; more are dropped (and counted).
const QUEUE_CAPACITY: usize = 2048;
/// Spans sent in one export call, at most.
const MAX_BATCH: usize = 512;
/// How long the first span of a batch waits for company.
const BATCH_DELAY: Duration = Duration::from_millis(500);
/// How long one export may take before its spans count as dropped.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// A parsed `traceparent` (version 00): whose span the request is a child
/// of, and whether its trace is sampled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TraceParent {
    pub trace_id: TraceId,
    pub span_id: SpanId,
    pub sampled: bool,
}

impl TraceParent {
    /// Parses the header (`pylon_proto::traceparent`: version 00, or the
    /// first four fields of a later version; all-zero IDs are invalid).
    pub fn parse(v: &HeaderValue) -> Option<TraceParent> {
        let p = W3cTraceParent::parse(v.as_bytes())?;
        Some(TraceParent {
            trace_id: TraceId::from(p.trace_id),
            span_id: SpanId::from(p.span_id),
            sampled: p.sampled,
        })
    }

    /// The `traceparent` value naming this span as the parent.
    pub fn header(&self) -> HeaderValue {
        let w3c = W3cTraceParent {
            trace_id: u128::from_be_bytes(self.trace_id.to_bytes()),
            span_id: u64::from_be_bytes(self.span_id.to_bytes()),
            sampled: self.sampled,
        };
        super::request_scope::unique_per_request(
            HeaderValue::from_bytes(&w3c.encode()).unwrap_or(HeaderValue::from_static("")),
        )
    }
}

pub fn new_trace_id() -> TraceId {
    TraceId::from(fastrand::u128(1..))
}

pub fn new_span_id() -> SpanId {
    SpanId::from(fastrand::u64(1..))
}

/// Where spans go and which traces are sampled. Shared by every request.
pub struct Tracer {
    /// Sample a new trace when the low 64 bits of its ID fall below this
    /// (`None`: always).
    threshold: Option<u64>,
    queue: mpsc::Sender<SpanData>,
    metrics: TraceMetrics,
    scope: InstrumentationScope,
}

impl std::fmt::Debug for Tracer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tracer")
            .field("threshold", &self.threshold)
            .finish()
    }
}

impl Tracer {
    /// A tracer exporting to the OTLP/gRPC collector at `endpoint` as
    /// `service`, sampling new traces with probability `ratio`. Must be
    /// called inside a Tokio runtime: it starts the export task.
    pub fn start(
        endpoint: &str,
        service: &str,
        ratio: f64,
        metrics: TraceMetrics,
    ) -> Result<Arc<Tracer>, String> {
        let mut exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .with_endpoint(endpoint)
            .with_timeout(EXPORT_TIMEOUT)
            // A failed batch is dropped and counted; retrying it would hold
            // the queue behind a collector that is down.
            .with_retry_policy(opentelemetry_otlp::RetryPolicy::disabled())
            .build()
            .map_err(|e| format!("telemetry.otlp.endpoint: {e}"))?;
        exporter.set_resource(
            &Resource::builder_empty()
                .with_service_name(service.to_string())
                .build(),
        );
        let (queue, rx) = mpsc::channel(QUEUE_CAPACITY);
        tokio::spawn(export_loop(rx, exporter, metrics.clone()));
        Ok(Arc::new(Tracer::with_queue(queue, ratio, metrics)))
    }

    /// A tracer sampling new traces by `ratio` whose spans go nowhere.
    #[cfg(test)]
    pub(crate) fn discarding(ratio: f64) -> Tracer {
        Tracer::with_queue(mpsc::channel(1).0, ratio, TraceMetrics::default())
    }

    fn with_queue(queue: mpsc::Sender<SpanData>, ratio: f64, metrics: TraceMetrics) -> Tracer {
        // The trace ID's low 64 bits are random (W3C level 2), so this
        // is the same ratio decision any other sampler would make.
        let threshold = (ratio < 1.0).then(|| (ratio.max(0.0) * 2f64.powi(64)) as u64);
        Tracer {
            threshold,
            queue,
            metrics,
            scope: InstrumentationScope::builder("pylon")
                .with_version(env!("CARGO_PKG_VERSION"))
                .build(),
        }
    }

    /// Whether a new trace (no sampled parent to follow) is recorded.
    pub fn sample(&self, trace_id: TraceId) -> bool {
        match self.threshold {
            None => true,
            Some(t) => (u128::from_be_bytes(trace_id.to_bytes()) as u64) < t,
        }
    }

    /// Hands a finished span to the export task, or drops it (counted) when
    /// the queue is full.
    fn submit(&self, span: SpanData) {
        if self.queue.try_send(span).is_err() {
            self.metrics.spans_dropped.inc();
        }
    }
}

async fn export_loop(
    mut rx: mpsc::Receiver<SpanData>,
    exporter: opentelemetry_otlp::SpanExporter,
    metrics: TraceMetrics,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = Vec::with_capacity(64);
        batch.push(first);
        let until = tokio::time::Instant::now() + BATCH_DELAY;
        while batch.len() < MAX_BATCH {
            match tokio::time::timeout_at(until, rx.recv()).await {
                Ok(Some(span)) => batch.push(span),
                _ => break,
            }
        }
        let n = batch.len() as u64;
        match tokio::time::timeout(EXPORT_TIMEOUT, exporter.export(batch)).await {
            Ok(Ok(())) => {
                metrics.spans_exported.inc_by(n);
            }
            Ok(Err(e)) => {
                metrics.spans_dropped.inc_by(n);
                tracing::debug!(error = %e, spans = n, "span export failed; spans dropped");
            }
            Err(_) => {
                metrics.spans_dropped.inc_by(n);
                tracing::debug!(spans = n, "span export timed out; spans dropped");
            }
        }
    }
}

/// Starts children of one span (see [`SpanRecord::children`]).
#[derive(Clone)]
pub struct ChildSpans {
    tracer: Arc<Tracer>,
    trace_id: TraceId,
    parent: SpanId,
}

impl ChildSpans {
    pub fn start(
        &self,
        kind: SpanKind,
        name: Cow<'static, str>,
        attributes: Vec<KeyValue>,
    ) -> SpanRecord {
        SpanRecord::start(
            &self.tracer,
            self.trace_id,
            self.parent,
            false,
            kind,
            name,
            attributes,
        )
    }
}

/// One span being recorded; exported when dropped.
pub struct SpanRecord {
    tracer: Arc<Tracer>,
    pub trace_id: TraceId,
    pub span_id: SpanId,
    parent: SpanId,
    parent_remote: bool,
    kind: SpanKind,
    name: Cow<'static, str>,
    start: SystemTime,
    attributes: Vec<KeyValue>,
    error: Option<Cow<'static, str>>,
}

impl std::fmt::Debug for SpanRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SpanRecord")
            .field("trace_id", &self.trace_id)
            .field("span_id", &self.span_id)
            .field("name", &self.name)
            .finish()
    }
}

impl SpanRecord {
    /// Starts a span now. `parent` is `SpanId::INVALID` for a root span;
    /// `parent_remote` says whether it came from another process.
    pub fn start(
        tracer: &Arc<Tracer>,
        trace_id: TraceId,
        parent: SpanId,
        parent_remote: bool,
        kind: SpanKind,
        name: Cow<'static, str>,
        attributes: Vec<KeyValue>,
    ) -> SpanRecord {
        SpanRecord {
            tracer: tracer.clone(),
            trace_id,
            span_id: new_span_id(),
            parent,
            parent_remote,
            kind,
            name,
            start: SystemTime::now(),
            attributes,
            error: None,
        }
    }

    /// What starts children of this span (in this process), without
    /// borrowing it.
    pub fn children(&self) -> ChildSpans {
        ChildSpans {
            tracer: self.tracer.clone(),
            trace_id: self.trace_id,
            parent: self.span_id,
        }
    }

    /// The `traceparent` that makes the next hop a child of this span.
    pub fn traceparent(&self) -> HeaderValue {
        TraceParent {
            trace_id: self.trace_id,
            span_id: self.span_id,
            sampled: true,
        }
        .header()
    }

    /// Sets an attribute, replacing an earlier value of the same key (a
    /// status may be seen in the head and again in the trailers).
    pub fn set(&mut self, kv: KeyValue) {
        match self.attributes.iter_mut().find(|a| a.key == kv.key) {
            Some(a) => *a = kv,
            None => self.attributes.push(kv),
        }
    }

    /// Marks the span failed (status error) with `description`.
    pub fn fail(&mut self, description: impl Into<Cow<'static, str>>) {
        self.error = Some(description.into());
    }

    pub fn failed(&self) -> bool {
        self.error.is_some()
    }
}

impl Drop for SpanRecord {
    fn drop(&mut self) {
        let status = match self.error.take() {
            Some(description) => Status::error(description),
            None => Status::Unset,
        };
        let span = SpanData {
            span_context: SpanContext::new(
                self.trace_id,
                self.span_id,
                TraceFlags::SAMPLED,
                false,
                TraceState::default(),
            ),
            parent_span_id: self.parent,
            parent_span_is_remote: self.parent_remote,
            span_kind: self.kind.clone(),
            name: std::mem::take(&mut self.name),
            start_time: self.start,
            end_time: SystemTime::now(),
            attributes: std::mem::take(&mut self.attributes),
            dropped_attributes_count: 0,
            events: SpanEvents::default(),
            links: SpanLinks::default(),
            status,
            instrumentation_scope: self.tracer.scope.clone(),
        };
        self.tracer.submit(span);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn traceparent_round_trips() {
        let v = HeaderValue::from_static("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let p = TraceParent::parse(&v).unwrap();
        assert_eq!(
            p.trace_id,
            TraceId::from(0x4bf92f3577b34da6a3ce929d0e0e4736u128)
        );
        assert_eq!(p.span_id, SpanId::from(0x00f067aa0ba902b7u64));
        assert!(p.sampled);
        assert_eq!(p.header(), v);
        assert!(p.header().is_sensitive(), "never indexed: new on every hop");
        let unsampled = TraceParent {
            sampled: false,
            ..p
        };
        assert!(unsampled.header().to_str().unwrap().ends_with("-00"));
    }

    #[test]
    fn ratio_sampling_follows_the_trace_id() {
        let (tx, _rx) = mpsc::channel(1);
        let m = TraceMetrics::default();
        let always = Tracer::with_queue(tx.clone(), 1.0, m.clone());
        let never = Tracer::with_queue(tx.clone(), 0.0, m.clone());
        let tenth = Tracer::with_queue(tx, 0.1, m);
        fastrand::seed(7);
        let ids: Vec<TraceId> = (0..10_000).map(|_| new_trace_id()).collect();
        assert!(ids.iter().all(|id| always.sample(*id)));
        assert!(!ids.iter().any(|id| never.sample(*id)));
        let n = ids.iter().filter(|id| tenth.sample(**id)).count();
        assert!((800..1200).contains(&n), "{n}");
    }

    #[tokio::test]
    async fn a_full_queue_drops_and_counts() {
        let (tx, mut rx) = mpsc::channel(1);
        let m = TraceMetrics::default();
        let tracer = Arc::new(Tracer::with_queue(tx, 1.0, m.clone()));
        for _ in 0..3 {
            drop(SpanRecord::start(
                &tracer,
                new_trace_id(),
                SpanId::INVALID,
                false,
                SpanKind::Server,
                "x".into(),
                Vec::new(),
            ));
        }
        assert_eq!(m.spans_dropped.get(), 2);
        assert_eq!(rx.recv().await.unwrap().name, "x");
    }
}
