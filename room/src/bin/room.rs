//! The `room` binary: flags -> [`room::RoomConfig`] -> [`room::run`].

use std::net::SocketAddr;
use std::process::ExitCode;

use clap::Parser;

/// A room: holds device connections (TCP and WebSocket) and delivers pushes to them.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Instance id in discovery and in register sessions (unique among live rooms).
    #[arg(long, default_value = "room-1")]
    id: String,
    /// Device TCP listener.
    #[arg(long, default_value = "127.0.0.1:7100")]
    tcp: SocketAddr,
    /// Device WebSocket listener (path /ws).
    #[arg(long, default_value = "127.0.0.1:7101")]
    ws: SocketAddr,
    /// Internal gRPC listener (center, operators).
    #[arg(long, default_value = "127.0.0.1:7102")]
    grpc: SocketAddr,
    /// Keeper endpoints, comma-separated.
    #[arg(
        long,
        env = "KEEPER_ENDPOINTS",
        default_value = "127.0.0.1:7379",
        value_delimiter = ','
    )]
    keeper: Vec<String>,
    /// Host advertised in discovery for listeners bound to 0.0.0.0.
    #[arg(long)]
    advertise_host: Option<String>,
    #[command(flatten)]
    telemetry: telemetry::Flags,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("room: {e}");
        return ExitCode::FAILURE;
    }
    let config = room::RoomConfig {
        id: cli.id,
        tcp: cli.tcp,
        ws: cli.ws,
        grpc: cli.grpc,
        keeper: cli.keeper,
        advertise_host: cli.advertise_host,
    };
    telemetry::run_until_signal("room", |shutdown| room::run(config, shutdown)).await
}
