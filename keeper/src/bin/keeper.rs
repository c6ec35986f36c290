//! The `keeper` binary: flags -> [`keeper::KeeperConfig`] -> [`keeper::run`].

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use keeper::KeeperConfig;
use keeper::config::ClusterState;
use keeper::config::parse_initial_cluster;

/// mimalloc instead of glibc malloc: request, Raft and apply paths allocate and free many small
/// buffers across threads; measured in docs/benchmarks.md ("keeper").
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// A keeper node: Raft-replicated configuration and coordination store (etcd v3 API).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Read settings from this TOML file; flags given on the command line override it.
    #[arg(long)]
    config: Option<PathBuf>,
    /// This node's id (1, 2, 3, ...).
    #[arg(long)]
    id: Option<u64>,
    /// Client and peer address (etcd v3 gRPC and Raft RPCs share it).
    #[arg(long)]
    listen: Option<SocketAddr>,
    /// Address others use to reach this node, if not the listen address.
    #[arg(long)]
    advertise: Option<String>,
    /// Directory for the node's RocksDB.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Founding members: 1=HOST:PORT,2=HOST:PORT,3=HOST:PORT.
    #[arg(long)]
    initial_cluster: Option<String>,
    /// `new` forms the cluster on first start; `existing` joins one (after `member add`).
    #[arg(long, value_enum)]
    initial_cluster_state: Option<ClusterState>,
    /// Test-only fault for jepsen-tests (see `keeper::faults`): reads skip ReadIndex.
    #[cfg(feature = "unsafe-stale-reads")]
    #[arg(long, hide = true)]
    unsafe_stale_reads: bool,
    #[command(flatten)]
    telemetry: telemetry::Flags,
}

fn load(cli: &Cli) -> anyhow::Result<KeeperConfig> {
    let mut config = match &cli.config {
        Some(path) => telemetry::read_config(path).map_err(anyhow::Error::msg)?,
        None => KeeperConfig::default(),
    };
    if let Some(id) = cli.id {
        config.id = id;
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
    if let Some(members) = &cli.initial_cluster {
        config.initial_cluster = parse_initial_cluster(members)
            .map_err(|e| anyhow::anyhow!("--initial-cluster: {e}"))?;
    }
    if let Some(state) = cli.initial_cluster_state {
        config.initial_cluster_state = state;
    }
    config
        .validate()
        .map_err(|e| anyhow::anyhow!("invalid config: {e}"))?;
    Ok(config)
}

/// Turns transparent huge pages off for this process. mimalloc asks for them on its arenas; it
/// also hands freed memory back to the kernel, so the next allocation there faults in and zeroes a
/// whole 2 MiB page. Under a put load that zeroing was 3-7% of the machine's CPU; without huge
/// pages keeper used ~5% less CPU per put (docs/benchmarks.md, session 10). The flag covers every
/// mapping of the process, whenever it was made, and is only a hint: failing to set it is harmless.
fn no_transparent_huge_pages() {
    // SAFETY: PR_SET_THP_DISABLE takes plain integers and touches no memory of ours.
    let set = unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
    if set != 0 {
        tracing::debug!(
            error = %std::io::Error::last_os_error(),
            "transparent huge pages stay on"
        );
    }
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("keeper: {e}");
        return ExitCode::FAILURE;
    }
    no_transparent_huge_pages();
    #[cfg(feature = "unsafe-stale-reads")]
    if cli.unsafe_stale_reads {
        tracing::warn!(
            "--unsafe-stale-reads: linearizable reads skip ReadIndex (jepsen-tests only)"
        );
        keeper::faults::enable_stale_reads();
    }
    let config = match load(&cli) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("keeper: {e}");
            return ExitCode::FAILURE;
        }
    };
    telemetry::run_until_signal("keeper", |shutdown| keeper::run(config, shutdown)).await
}
