//! OTLP metrics export from a Prometheus registry: the registry's text
//! exposition, read back into OTLP data points and sent periodically to an
//! OTLP/gRPC collector. Shared by the sidecar and the control plane.
//!
//! One source of truth: the values exported are the ones `/metrics` shows,
//! read from the same atomics at the same moment. Names are the Prometheus
//! family names (`pylon_retries`); counters become cumulative monotonic
//! sums, gauges gauges, histograms explicit-bucket histograms, so a
//! collector's Prometheus exporter renders the very series `/metrics` serves
//! (`pylon_retries_total`, `..._bucket`). See docs/adr/0011-metrics-export.md.
//!
//! Export never blocks anything: it runs on its own task, each attempt is
//! bounded by a timeout, and a failed export is logged and dropped (the next
//! one carries the cumulative values again).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_client::MetricsServiceClient;
use opentelemetry_proto::tonic::common::v1::{AnyValue, InstrumentationScope, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{
    AggregationTemporality, Gauge, Histogram, HistogramDataPoint, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum, metric, number_data_point,
};
use opentelemetry_proto::tonic::resource::v1::Resource;

/// How one process exports its metrics.
#[derive(Debug, Clone)]
pub struct ExportConfig {
    /// `http://host:4317`.
    pub endpoint: String,
    /// The `service.name` resource attribute.
    pub service_name: String,
    pub interval: Duration,
    /// The longest one export may take.
    pub timeout: Duration,
}

/// Exports `scrape()` (a Prometheus text exposition) every
/// `config.interval`, until the task is dropped or aborted. The first export
/// happens at once. `failed()` is called for every export that did not
/// succeed (refused, unreachable or timed out), so that the caller can count
/// it in the registry it exports.
pub async fn run<F, E>(config: ExportConfig, scrape: F, failed: E)
where
    F: Fn() -> String + Send + 'static,
    E: Fn() + Send + 'static,
{
    let channel = match tonic::transport::Endpoint::from_shared(config.endpoint.clone()) {
        Ok(e) => e.timeout(config.timeout).connect_lazy(),
        Err(e) => {
            tracing::warn!(endpoint = %config.endpoint, error = %e, "OTLP metrics endpoint is not a valid URL; metrics are not exported");
            return;
        }
    };
    let mut client = MetricsServiceClient::new(channel);
    let start = unix_nanos(SystemTime::now());
    let mut tick = tokio::time::interval(config.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut failing = false;
    loop {
        tick.tick().await;
        let request = to_request(&scrape(), &config.service_name, start, SystemTime::now());
        let sent = tokio::time::timeout(config.timeout, client.export(request)).await;
        match sent {
            Ok(Ok(_)) => {
                if failing {
                    tracing::info!(endpoint = %config.endpoint, "OTLP metrics export works again");
                }
                failing = false;
            }
            Ok(Err(status)) => {
                failed();
                if !failing {
                    tracing::warn!(endpoint = %config.endpoint, error = %status.message(), "OTLP metrics export failed; retrying each interval");
                }
                failing = true;
            }
            Err(_) => {
                failed();
                if !failing {
                    tracing::warn!(endpoint = %config.endpoint, "OTLP metrics export timed out; retrying each interval");
                }
                failing = true;
            }
        }
    }
}

fn unix_nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn kv(key: &str, value: &str) -> KeyValue {
    KeyValue {
        key: key.to_string(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.to_string())),
        }),
        ..Default::default()
    }
}

/// The OTLP request carrying every metric of a text exposition. `start` is
/// when the counters started (the process start), `now` the time of the
/// points.
pub fn to_request(
    text: &str,
    service_name: &str,
    start: u64,
    now: SystemTime,
) -> ExportMetricsServiceRequest {
    let now = unix_nanos(now);
    let metrics = parse(text)
        .into_iter()
        .filter_map(|f| f.into_metric(start, now))
        .collect();
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: Some(Resource {
                attributes: vec![kv("service.name", service_name)],
                ..Default::default()
            }),
            scope_metrics: vec![ScopeMetrics {
                scope: Some(InstrumentationScope {
                    name: "pylon".to_string(),
                    version: env!("CARGO_PKG_VERSION").to_string(),
                    ..Default::default()
                }),
                metrics,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
    Other,
}

type Labels = Vec<(String, String)>;

#[derive(Debug)]
struct Family {
    name: String,
    help: String,
    kind: Kind,
    /// Samples: name suffix (`_total`, `_bucket`, ...), labels, value.
    samples: Vec<(String, Labels, f64)>,
}

/// Reads the families of a text exposition (Prometheus or OpenMetrics, as
/// prometheus-client writes it).
fn parse(text: &str) -> Vec<Family> {
    let mut families: Vec<Family> = Vec::new();
    for line in text.lines() {
        let line = line.trim_end();
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            let (Some(name), Some(kind)) = (parts.next(), parts.next()) else {
                continue;
            };
            let kind = match kind {
                "counter" => Kind::Counter,
                "gauge" => Kind::Gauge,
                "histogram" => Kind::Histogram,
                _ => Kind::Other,
            };
            match families.iter_mut().find(|f| f.name == name) {
                Some(f) => f.kind = kind,
                None => families.push(Family {
                    name: name.to_string(),
                    help: String::new(),
                    kind,
                    samples: Vec::new(),
                }),
            }
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, help) = rest.split_once(' ').unwrap_or((rest, ""));
            match families.iter_mut().find(|f| f.name == name) {
                Some(f) => f.help = help.to_string(),
                None => families.push(Family {
                    name: name.to_string(),
                    help: help.to_string(),
                    kind: Kind::Other,
                    samples: Vec::new(),
                }),
            }
        } else if line.is_empty() || line.starts_with('#') {
            continue;
        } else if let Some((sample, labels, value)) = parse_sample(line) {
            // The family is the longest declared name the sample starts with.
            let family = families
                .iter_mut()
                .filter(|f| sample.starts_with(f.name.as_str()))
                .max_by_key(|f| f.name.len());
            if let Some(f) = family {
                let suffix = sample[f.name.len()..].to_string();
                f.samples.push((suffix, labels, value));
            }
        }
    }
    families
}

/// `name{a="b",c="d"} 1.5` (an optional timestamp after the value is
/// ignored).
fn parse_sample(line: &str) -> Option<(&str, Labels, f64)> {
    let (name, labels, rest) = match line.find('{') {
        Some(open) => {
            let (labels, after) = parse_labels(&line[open + 1..])?;
            (&line[..open], labels, after)
        }
        None => {
            let (name, rest) = line.split_once(' ')?;
            (name, Vec::new(), rest)
        }
    };
    let value = rest.split_whitespace().next()?;
    let value = match value {
        "+Inf" => f64::INFINITY,
        "-Inf" => f64::NEG_INFINITY,
        v => v.parse().ok()?,
    };
    Some((name, labels, value))
}

/// Parses `a="b",c="d"}` and returns the labels and what follows the `}`.
fn parse_labels(s: &str) -> Option<(Labels, &str)> {
    let mut labels = Vec::new();
    let mut rest = s;
    loop {
        rest = rest.trim_start_matches(',');
        if let Some(after) = rest.strip_prefix('}') {
            return Some((labels, after));
        }
        let eq = rest.find('=')?;
        let key = rest[..eq].trim().to_string();
        rest = rest[eq + 1..].strip_prefix('"')?;
        let mut value = String::new();
        let mut chars = rest.char_indices();
        let end = loop {
            let (i, c) = chars.next()?;
            match c {
                '\\' => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                '"' => break i,
                c => value.push(c),
            }
        };
        labels.push((key, value));
        rest = &rest[end + 1..];
    }
}

fn attributes(labels: &Labels) -> Vec<KeyValue> {
    labels.iter().map(|(k, v)| kv(k, v)).collect()
}

fn number(value: f64) -> number_data_point::Value {
    if value.fract() == 0.0 && value.abs() < 9.0e15 {
        number_data_point::Value::AsInt(value as i64)
    } else {
        number_data_point::Value::AsDouble(value)
    }
}

impl Family {
    fn into_metric(self, start: u64, now: u64) -> Option<Metric> {
        let point = |labels: &Labels, value: f64| NumberDataPoint {
            attributes: attributes(labels),
            start_time_unix_nano: start,
            time_unix_nano: now,
            value: Some(number(value)),
            ..Default::default()
        };
        let data = match self.kind {
            Kind::Counter => metric::Data::Sum(Sum {
                data_points: self
                    .samples
                    .iter()
                    .filter(|(suffix, _, _)| suffix == "_total")
                    .map(|(_, labels, v)| point(labels, *v))
                    .collect(),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
                is_monotonic: true,
            }),
            Kind::Gauge => metric::Data::Gauge(Gauge {
                data_points: self
                    .samples
                    .iter()
                    .filter(|(suffix, _, _)| suffix.is_empty())
                    .map(|(_, labels, v)| point(labels, *v))
                    .collect(),
            }),
            Kind::Histogram => metric::Data::Histogram(Histogram {
                data_points: histogram_points(&self.samples, start, now),
                aggregation_temporality: AggregationTemporality::Cumulative as i32,
            }),
            Kind::Other => return None,
        };
        Some(Metric {
            name: self.name,
            description: self.help,
            data: Some(data),
            ..Default::default()
        })
    }
}

/// Groups `_bucket` (cumulative, by `le`), `_sum` and `_count` samples into
/// one point per label set.
fn histogram_points(
    samples: &[(String, Labels, f64)],
    start: u64,
    now: u64,
) -> Vec<HistogramDataPoint> {
    #[derive(Default)]
    struct Acc {
        buckets: Vec<(f64, f64)>,
        sum: f64,
        count: f64,
    }
    let mut by_labels: BTreeMap<Labels, Acc> = BTreeMap::new();
    for (suffix, labels, value) in samples {
        let mut labels = labels.clone();
        let le = labels
            .iter()
            .position(|(k, _)| k == "le")
            .map(|i| labels.remove(i).1);
        let acc = by_labels.entry(labels).or_default();
        match (suffix.as_str(), le) {
            ("_bucket", Some(le)) => {
                let bound = if le == "+Inf" {
                    f64::INFINITY
                } else {
                    le.parse().unwrap_or(f64::INFINITY)
                };
                acc.buckets.push((bound, *value));
            }
            ("_sum", None) => acc.sum = *value,
            ("_count", None) => acc.count = *value,
            _ => {}
        }
    }
    by_labels
        .into_iter()
        .map(|(labels, mut acc)| {
            acc.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
            let mut previous = 0.0;
            let bucket_counts = acc
                .buckets
                .iter()
                .map(|(_, cumulative)| {
                    let n = (cumulative - previous).max(0.0) as u64;
                    previous = *cumulative;
                    n
                })
                .collect();
            HistogramDataPoint {
                attributes: attributes(&labels),
                start_time_unix_nano: start,
                time_unix_nano: now,
                count: acc.count as u64,
                sum: Some(acc.sum),
                bucket_counts,
                explicit_bounds: acc
                    .buckets
                    .iter()
                    .map(|(b, _)| *b)
                    .filter(|b| b.is_finite())
                    .collect(),
                ..Default::default()
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const TEXT: &str = r#"# HELP pylon_retries Retry attempts sent.
# TYPE pylon_retries counter
pylon_retries_total{backend="Backend/greeter"} 2
pylon_retries_total{backend="Backend/q\"x"} 1
# HELP pylon_policy_version The version.
# TYPE pylon_policy_version gauge
pylon_policy_version 7
# HELP pylon_d Durations.
# TYPE pylon_d histogram
pylon_d_sum{route="r"} 0.5
pylon_d_count{route="r"} 3
pylon_d_bucket{le="0.1",route="r"} 1
pylon_d_bucket{le="1.0",route="r"} 3
pylon_d_bucket{le="+Inf",route="r"} 3
# EOF
"#;

    fn attr(p: &[KeyValue], key: &str) -> Option<String> {
        p.iter().find(|kv| kv.key == key).and_then(|kv| {
            match kv.value.as_ref()?.value.as_ref()? {
                any_value::Value::StringValue(s) => Some(s.clone()),
                _ => None,
            }
        })
    }

    #[test]
    fn counters_gauges_and_histograms_become_otlp_points() {
        let req = to_request(TEXT, "web", 1, UNIX_EPOCH + Duration::from_secs(2));
        let rm = &req.resource_metrics[0];
        let resource = rm.resource.as_ref().unwrap();
        assert_eq!(
            attr(&resource.attributes, "service.name").as_deref(),
            Some("web")
        );
        let metrics = &rm.scope_metrics[0].metrics;
        assert_eq!(metrics.len(), 3);

        let Some(metric::Data::Sum(sum)) = &metrics[0].data else {
            panic!("a sum: {:?}", metrics[0])
        };
        assert_eq!(metrics[0].name, "pylon_retries");
        assert!(sum.is_monotonic);
        assert_eq!(sum.data_points.len(), 2);
        assert_eq!(
            sum.data_points[0].value,
            Some(number_data_point::Value::AsInt(2))
        );
        assert_eq!(
            attr(&sum.data_points[1].attributes, "backend").as_deref(),
            Some("Backend/q\"x")
        );
        assert_eq!(sum.data_points[0].time_unix_nano, 2_000_000_000);

        let Some(metric::Data::Gauge(g)) = &metrics[1].data else {
            panic!("a gauge")
        };
        assert_eq!(
            g.data_points[0].value,
            Some(number_data_point::Value::AsInt(7))
        );

        let Some(metric::Data::Histogram(h)) = &metrics[2].data else {
            panic!("a histogram")
        };
        let p = &h.data_points[0];
        assert_eq!(attr(&p.attributes, "route").as_deref(), Some("r"));
        assert!(attr(&p.attributes, "le").is_none());
        assert_eq!(p.count, 3);
        assert_eq!(p.sum, Some(0.5));
        assert_eq!(p.explicit_bounds, vec![0.1, 1.0]);
        assert_eq!(p.bucket_counts, vec![1, 2, 0]);
    }
}
