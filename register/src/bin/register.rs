//! The `register` binary: flags (or `--config FILE`) -> [`register::ProcessConfig`] ->
//! [`register::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use register::ProcessConfig;

/// mimalloc instead of glibc malloc: every request allocates and frees thousands of small
/// strings and keys across threads; measured in docs/benchmarks.md ("register").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A register: the global session store, sharded into slots assigned through the keeper.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Read settings from this TOML file; flags given on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// Instance id (stable across restarts), e.g. r1.
    #[arg(long)]
    id: Option<String>,
    /// gRPC listen address.
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address published in discovery, if not the listen address.
    #[arg(long)]
    advertise: Option<String>,
    /// RocksDB directory (kept across restarts).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keeper endpoints, comma-separated (HOST:PORT,...).
    #[arg(long, value_delimiter = ',', env = "KEEPER_ENDPOINTS")]
    keeper: Option<Vec<String>>,
    /// Instance lease TTL in seconds (bounds failover time).
    #[arg(long)]
    lease_ttl_s: Option<u64>,
    #[command(flatten)]
    telemetry: telemetry::Flags,
}

fn load(cli: &Cli) -> anyhow::Result<ProcessConfig> {
    let mut config = match &cli.config {
        Some(path) => telemetry::read_config(path).map_err(anyhow::Error::msg)?,
        None => ProcessConfig::default(),
    };
    if let Some(id) = &cli.id {
        config.id = id.clone();
    }
    if let Some(listen) = cli.listen {
        config.listen = listen;
    }
    if let Some(advertise) = &cli.advertise {
        config.advertise = Some(advertise.clone());
    }
    if let Some(dir) = &cli.data_dir {
        config.data_dir = dir.clone();
    }
    if let Some(keeper) = &cli.keeper {
        config.keeper = keeper.clone();
    }
    if let Some(ttl) = cli.lease_ttl_s {
        config.lease_ttl_s = ttl;
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    Ok(config)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("register: {e}");
        return ExitCode::FAILURE;
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("register: {e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::run_until_signal("register", |shutdown| register::run(config, shutdown)).await
}
