//! `longlink`: the all-in-one binary. `longlink dev` runs a whole Longlink on one machine with
//! embedded defaults.
//!
//! Today the keeper is the only part that exists; `dev` runs a single-node keeper on the
//! default port (7379). register, room and center join `dev` as they are built.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use clap::Subcommand;

#[derive(Debug, Parser)]
#[command(version, about = "Longlink long-connection push system")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
    #[command(flatten)]
    telemetry: telemetry::Flags,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// Run every Longlink process in this one process on loopback defaults.
    Dev {
        /// Where all state is kept; a restart with the same directory keeps the data.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
}

async fn dev(
    data_dir: PathBuf,
    shutdown: tokio_util::sync::CancellationToken,
) -> anyhow::Result<()> {
    let keeper = keeper::KeeperConfig {
        id: 1,
        data_dir: data_dir.join("keeper"),
        ..Default::default()
    };
    println!("longlink dev: data in {}", data_dir.display());
    println!(
        "  keeper   {}   (etcd v3 API: try `etcdctl --endpoints={} put hello world`)",
        keeper.listen, keeper.listen
    );
    println!("Ctrl-C stops everything; a restart keeps the data.");
    keeper::run(keeper, shutdown).await?;
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("longlink: {e}");
        return ExitCode::FAILURE;
    }
    let shutdown = telemetry::shutdown_on_signal();
    let result = match cli.command {
        Cmd::Dev { data_dir } => dev(data_dir, shutdown).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("longlink: {e}");
            ExitCode::FAILURE
        }
    }
}
