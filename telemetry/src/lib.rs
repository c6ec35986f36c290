//! What every Longlink binary sets up the same way: logs (`LONGLINK_LOG`, `--log-format`),
//! Prometheus metrics (`--metrics ADDR`), signals (SIGTERM/SIGINT -> graceful shutdown) and
//! a panic policy (a panic anywhere aborts the process: no half-alive nodes).

use std::net::SocketAddr;
use std::sync::OnceLock;

use metrics_exporter_prometheus::PrometheusBuilder;
use metrics_exporter_prometheus::PrometheusHandle;

use tokio_util::sync::CancellationToken;

/// Flags shared by every binary; `#[command(flatten)]` them into the binary's own flags.
#[derive(Debug, Clone, clap::Args)]
pub struct Flags {
    /// Log format: `text` for people, `json` for machines. Levels come from LONGLINK_LOG
    /// (an env-filter such as `info,keeper=debug`).
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Serve Prometheus metrics on this address (e.g. 127.0.0.1:9100).
    #[arg(long, global = true)]
    pub metrics: Option<SocketAddr>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid LONGLINK_LOG filter: {0}")]
    Filter(String),
    #[error("cannot serve metrics on {addr}: {reason}")]
    Metrics { addr: SocketAddr, reason: String },
}

/// Installs logging, the metrics exporter and the abort-on-panic hook. Call once, from `main`,
/// inside the Tokio runtime.
pub fn init(flags: &Flags) -> Result<(), Error> {
    let filter = match std::env::var("LONGLINK_LOG") {
        Ok(spec) => tracing_subscriber::EnvFilter::try_new(&spec)
            .map_err(|e| Error::Filter(e.to_string()))?,
        // openraft narrates every election at info; its warnings are what operators need.
        Err(_) => tracing_subscriber::EnvFilter::new("info,openraft=warn"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match flags.log_format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
    if let Some(addr) = flags.metrics {
        serve_metrics(addr)?;
    }
    abort_on_panic();
    Ok(())
}

/// The process's one Prometheus recorder, if installed through this crate.
static PROMETHEUS: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// Installs the process's Prometheus recorder with an HTTP listener on `addr` (`--metrics`).
fn serve_metrics(addr: SocketAddr) -> Result<(), Error> {
    let failed = |e: &dyn std::fmt::Display| Error::Metrics {
        addr,
        reason: e.to_string(),
    };
    let (recorder, exporter) = PrometheusBuilder::new()
        .with_http_listener(addr)
        .build()
        .map_err(|e| failed(&e))?;
    let handle = recorder.handle();
    metrics::set_global_recorder(recorder).map_err(|e| failed(&e))?;
    tokio::spawn(exporter);
    let _ = PROMETHEUS.set(Some(handle));
    Ok(())
}

/// A handle that renders the process's metrics (for a service that also serves `/metrics` on its
/// own port, like center). Installs a recorder on first use when `--metrics` did not; `None` when
/// some other recorder was installed first.
pub fn prometheus() -> Option<PrometheusHandle> {
    PROMETHEUS
        .get_or_init(|| match PrometheusBuilder::new().install_recorder() {
            Ok(handle) => Some(handle),
            Err(e) => {
                tracing::warn!("no Prometheus recorder: {e}");
                None
            }
        })
        .clone()
}

/// Makes a panic in any thread or task print its message and abort the process, instead of
/// leaving a node running with a dead task.
pub fn abort_on_panic() {
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        default_hook(info);
        std::process::abort();
    }));
}

/// A token cancelled on the first SIGTERM or SIGINT.
pub fn shutdown_on_signal() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("install SIGTERM handler");
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: shutting down"),
        }
        cancel.cancel();
    });
    token
}

/// Reads a process's TOML config file into `T`; the error names the file.
pub fn read_config<T: serde::de::DeserializeOwned>(path: &std::path::Path) -> Result<T, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))
}

/// Runs a process until SIGTERM/SIGINT and turns the outcome into its exit code, printing
/// `name: reason` when it fails: the tail every binary's `main` shares.
pub async fn run_until_signal<F, Fut, E>(name: &str, run: F) -> std::process::ExitCode
where
    F: FnOnce(CancellationToken) -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    match run(shutdown_on_signal()).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
