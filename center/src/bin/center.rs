//! The `center` binary: flags -> [`center::CenterConfig`] -> [`center::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use center::CenterConfig;
use clap::Parser;

/// mimalloc instead of glibc malloc: every push allocates and frees JSON, HTTP and gRPC buffers
/// across threads; measured in docs/benchmarks.md ("center end-to-end").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// center: Longlink's senders' API (HTTP JSON + gRPC), dispatcher and webhook coordinator.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Read settings from this TOML file (see config/center.toml); flags override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Instance id in discovery (unique among live centers).
    #[arg(long)]
    id: Option<String>,
    /// HTTP API listen address [default 127.0.0.1:8080].
    #[arg(long)]
    http: Option<SocketAddr>,
    /// gRPC API listen address [default 127.0.0.1:8081].
    #[arg(long)]
    grpc: Option<SocketAddr>,
    /// Keeper endpoints, comma-separated [default 127.0.0.1:7379].
    #[arg(long, env = "KEEPER_ENDPOINTS", value_delimiter = ',')]
    keeper: Option<Vec<String>>,
    #[command(flatten)]
    telemetry: telemetry::Flags,
}

fn load(cli: &Cli) -> anyhow::Result<CenterConfig> {
    let mut config = match &cli.config {
        Some(path) => telemetry::read_config(path).map_err(anyhow::Error::msg)?,
        None => CenterConfig::default(),
    };
    if let Some(id) = &cli.id {
        config.id = id.clone();
    }
    if let Some(http) = cli.http {
        config.http = http;
    }
    if let Some(grpc) = cli.grpc {
        config.grpc = grpc;
    }
    if let Some(keeper) = &cli.keeper {
        config.keeper = keeper.clone();
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    // `--metrics` serves the same recorder that center's own `GET /metrics` renders.
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("center: {e}");
        return ExitCode::FAILURE;
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("center: {e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::run_until_signal("center", |shutdown| center::run(config, shutdown)).await
}
