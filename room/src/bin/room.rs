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

fn main() -> ExitCode {
    one_malloc_arena();
    match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime.block_on(serve()),
        Err(e) => {
            eprintln!("room: cannot start the async runtime: {e}");
            ExitCode::FAILURE
        }
    }
}

/// glibc gives threads their own malloc arenas; a room's many small long-lived allocations per
/// connection (task, connection state, index entries) then fragment across them. One arena
/// measured ~70 B less RSS per idle connection (docs/benchmarks.md); threads keep their
/// lock-free tcache for small allocations. Set before the runtime's threads exist.
fn one_malloc_arena() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only changes allocator parameters; no allocation is in flight from other
    // threads here, as none has been started yet.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

async fn serve() -> ExitCode {
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
