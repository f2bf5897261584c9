//! The sidecar's OTLP metrics export: every `telemetry.otlp.metricsInterval`
//! the registry behind `/metrics` is refreshed, encoded and sent to
//! `telemetry.otlp.endpoint` (see `pylon_proto::otlp_metrics` and
//! docs/adr/0011-metrics-export.md). Runs on its own task; a slow or absent
//! collector delays nothing but the next export.

use std::sync::Arc;
use std::time::Duration;

use pylon_proto::otlp_metrics::{self, ExportConfig};

use super::metrics::Metrics;

/// The longest one export may take.
const EXPORT_TIMEOUT: Duration = Duration::from_secs(5);

/// Starts exporting the sidecar's metrics to `endpoint`, calling `refresh`
/// (which updates the gauges read from state) before each encoding.
pub fn spawn(
    endpoint: String,
    service_name: String,
    interval: Duration,
    metrics: Arc<Metrics>,
    refresh: impl Fn() + Send + Sync + 'static,
) -> tokio::task::JoinHandle<()> {
    let interval = interval.max(Duration::from_millis(100));
    tracing::info!(%endpoint, ?interval, "exporting metrics over OTLP");
    let config = ExportConfig {
        endpoint,
        service_name,
        interval,
        timeout: EXPORT_TIMEOUT.min(interval),
    };
    let failures = metrics.otlp_export_failures();
    tokio::spawn(otlp_metrics::run(
        config,
        move || {
            refresh();
            metrics.encode()
        },
        move || {
            failures.inc();
        },
    ))
}
