//! What the sidecar tells operators: Prometheus metrics and their OTLP
//! export (`metrics`, `export`, `call_metrics`: RED per route and backend),
//! process logs (`logging`), traces exported over OTLP (`trace`), and
//! per-request telemetry — request IDs, spans, access logs
//! (`request_scope`).

pub mod export;
pub mod logging;
pub mod metrics;
pub mod request_scope;
pub mod trace;

use std::sync::Arc;

use trace::Tracer;

/// The sampling ratio of new traces when `telemetry.sampling` is not set.
pub const DEFAULT_SAMPLING: f64 = 0.01;

/// The request path's view of telemetry settings, fixed at start.
#[derive(Debug, Default)]
pub struct Telemetry {
    /// `None`: tracing off (no collector configured); trace context passes
    /// through unchanged.
    pub tracer: Option<Arc<Tracer>>,
    /// One `pylon::access` record per request (`telemetry.accessLog`).
    pub access_log: bool,
    /// Whether the sampled flag of a caller from outside the mesh decides
    /// (`telemetry.externalSampling: follow`) or only hints.
    pub follow_external_sampling: bool,
}

impl Telemetry {
    /// Telemetry as configured; starts the span export task when a
    /// collector is set. `spiffe_id` names the service when
    /// `telemetry.serviceName` does not.
    pub fn start(
        config: Option<&crate::config::TelemetryConfig>,
        spiffe_id: &str,
        metrics: &metrics::Metrics,
    ) -> Result<Arc<Telemetry>, String> {
        let Some(config) = config else {
            return Ok(Arc::default());
        };
        let tracer = match &config.otlp_endpoint {
            None => None,
            Some(endpoint) => {
                let service = config
                    .service_name
                    .clone()
                    .unwrap_or_else(|| service_account(spiffe_id).to_string());
                let ratio = config.sampling.unwrap_or(DEFAULT_SAMPLING);
                tracing::info!(%endpoint, %service, ratio, "exporting traces");
                Some(Tracer::start(endpoint, &service, ratio, metrics.trace())?)
            }
        };
        Ok(Arc::new(Telemetry {
            tracer,
            access_log: config.access_log,
            follow_external_sampling: config.external_sampling
                == crate::config::ExternalSampling::Follow,
        }))
    }
}

/// The service account of a SPIFFE ID (`spiffe://td/ns/N/sa/NAME` →
/// `NAME`), or the whole ID when it has another shape.
pub fn service_account(spiffe_id: &str) -> &str {
    pylon_proto::spiffe::parse_shape(spiffe_id).map_or(spiffe_id, |w| w.service_account)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_name_defaults_to_the_service_account() {
        assert_eq!(
            service_account("spiffe://pylon.local/ns/default/sa/greeter"),
            "greeter"
        );
        assert_eq!(service_account("spiffe://x/other"), "spiffe://x/other");
    }
}
