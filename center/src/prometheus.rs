//! The process's Prometheus recorder, installed once and rendered at `GET /metrics` (and on
//! `--metrics ADDR` when given).

use std::sync::OnceLock;

use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_exporter_prometheus::PrometheusHandle;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the global recorder on first call and returns its handle; `None` when another
/// recorder was installed first (then `/metrics` answers 503).
pub fn install() -> Option<PrometheusHandle> {
    HANDLE
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!("no /metrics: {e}");
                None
            }
        })
        .clone()
}
