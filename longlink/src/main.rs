//! `longlink`: the all-in-one binary. `longlink dev` runs a whole Longlink (keeper, register,
//! room, center) in one process on loopback defaults; `token`, `listen` and `push` are the
//! quickest way to see a message travel through it.

mod dev;
mod listen;
mod push;
mod seed;
mod token;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::Parser;
use clap::Subcommand;

/// Loopback defaults of `longlink dev` (DESIGN.md §8); the other subcommands default to them.
pub(crate) mod defaults {
    pub const KEEPER: &str = "127.0.0.1:7379";
    pub const REGISTER: &str = "127.0.0.1:7300";
    pub const ROOM_TCP: &str = "127.0.0.1:7100";
    pub const ROOM_WS: &str = "127.0.0.1:7101";
    pub const ROOM_GRPC: &str = "127.0.0.1:7102";
    pub const CENTER_HTTP: &str = "127.0.0.1:8080";
    pub const CENTER_GRPC: &str = "127.0.0.1:8081";
}

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
    /// Run keeper, register, room and center in this one process on loopback defaults.
    Dev {
        /// Where all state is kept; a restart with the same directory keeps the data.
        #[arg(long, default_value = "./data")]
        data_dir: PathBuf,
    },
    /// Mint a device token (JWT) signed with the app's secret from the keeper.
    Token {
        #[arg(long)]
        app: String,
        #[arg(long)]
        user: String,
        /// Device id (the `dev` claim).
        #[arg(long)]
        device: Option<String>,
        /// Lifetime, e.g. 30s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h", value_parser = parse_ttl)]
        ttl: Duration,
        #[arg(long, env = "KEEPER_ENDPOINTS", default_value = defaults::KEEPER, value_delimiter = ',')]
        keeper: Vec<String>,
    },
    /// Connect as a device (room chosen by center's dispatch), print and ack every message.
    Listen {
        #[arg(long)]
        app: String,
        #[arg(long)]
        user: String,
        #[arg(long, default_value = "cli")]
        device: String,
        /// center's HTTP address.
        #[arg(long, default_value = defaults::CENTER_HTTP)]
        center: String,
        #[arg(long, env = "KEEPER_ENDPOINTS", default_value = defaults::KEEPER, value_delimiter = ',')]
        keeper: Vec<String>,
        /// Print each message as one JSON object per line.
        #[arg(long)]
        json: bool,
        /// Exit after this many messages (default: run until Ctrl-C).
        #[arg(long)]
        count: Option<u64>,
    },
    /// Push a JSON payload through center's API (what the README's curl does).
    Push {
        #[arg(long)]
        app: String,
        /// Recipient; repeat for several users.
        #[arg(long = "user", required_unless_present = "all")]
        users: Vec<String>,
        /// Every connection of the app (broadcast).
        #[arg(long, conflicts_with = "users")]
        all: bool,
        /// The payload: any JSON value.
        payload: String,
        /// 0 = at most once, 1 = at least once.
        #[arg(long, default_value_t = 1)]
        qos: u8,
        #[arg(long, default_value = defaults::CENTER_HTTP)]
        center: String,
        /// API key (default: the app's first key, read from the keeper).
        #[arg(long, env = "LONGLINK_API_KEY")]
        api_key: Option<String>,
        #[arg(long, env = "KEEPER_ENDPOINTS", default_value = defaults::KEEPER, value_delimiter = ',')]
        keeper: Vec<String>,
    },
}

/// Parses `90s`, `15m`, `1h`, `7d` or plain seconds.
fn parse_ttl(s: &str) -> Result<Duration, String> {
    let (digits, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = digits
        .parse()
        .map_err(|_| format!("{s:?}: expected a number with s, m, h or d"))?;
    let secs = match unit {
        "" | "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        other => return Err(format!("{s:?}: unknown unit {other:?} (use s, m, h or d)")),
    };
    if secs == 0 {
        return Err("the ttl must be at least one second".into());
    }
    Ok(Duration::from_secs(secs))
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Err(e) = telemetry::init(&cli.telemetry) {
        eprintln!("longlink: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Cmd::Dev { data_dir } => dev::run(data_dir, telemetry::shutdown_on_signal()).await,
        Cmd::Token {
            app,
            user,
            device,
            ttl,
            keeper,
        } => token::run(&keeper, &app, &user, device.as_deref(), ttl).await,
        Cmd::Listen {
            app,
            user,
            device,
            center,
            keeper,
            json,
            count,
        } => {
            let args = listen::Args {
                app,
                user,
                device,
                center,
                keeper,
                json,
                count,
            };
            listen::run(args, telemetry::shutdown_on_signal()).await
        }
        Cmd::Push {
            app,
            users,
            all,
            payload,
            qos,
            center,
            api_key,
            keeper,
        } => {
            let args = push::Args {
                app,
                users,
                all,
                payload,
                qos,
                center,
                api_key,
                keeper,
            };
            push::run(args).await
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("longlink: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ttl_units() {
        assert_eq!(parse_ttl("90").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_ttl("15m").unwrap(), Duration::from_secs(900));
        assert_eq!(parse_ttl("1h").unwrap(), Duration::from_secs(3600));
        assert_eq!(parse_ttl("7d").unwrap(), Duration::from_secs(604_800));
        assert!(parse_ttl("1w").unwrap_err().contains("unknown unit"));
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("0s").is_err());
    }

    #[test]
    fn cli_is_well_formed() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
