//! keeperctl's command line: global flags and every subcommand (clap derive).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use clap::Parser;
use clap::Subcommand;

/// Operator CLI for the keeper: raw keys, typed config rollouts, services, members, status.
#[derive(Debug, Parser)]
#[command(name = "keeperctl", version, about)]
pub struct Cli {
    /// Keeper endpoints, comma-separated (host:port or http://host:port).
    #[arg(
        long,
        global = true,
        env = "KEEPER_ENDPOINTS",
        value_delimiter = ',',
        default_value = "127.0.0.1:7379"
    )]
    pub endpoints: Vec<String>,
    /// Machine-readable JSON on stdout instead of tables and text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds any one request may take; with --wait, how long to wait (default 60 s then).
    #[arg(long, global = true, value_parser = parse_seconds)]
    pub timeout: Option<Duration>,
    #[command(subcommand)]
    pub command: Command,
}

/// Per-request bound when --timeout is not given.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// How long --wait waits when --timeout is not given.
pub const DEFAULT_WAIT_TIMEOUT: Duration = Duration::from_secs(60);

impl Cli {
    pub fn request_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_REQUEST_TIMEOUT)
    }

    pub fn wait_timeout(&self) -> Duration {
        self.timeout.unwrap_or(DEFAULT_WAIT_TIMEOUT)
    }
}

fn parse_seconds(s: &str) -> Result<Duration, String> {
    let secs: f64 = s
        .parse()
        .map_err(|_| format!("{s:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{s} s is out of range: give 0 < S <= 86400"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// `Command::Command` is the `keeperctl command` subcommand, so the name stays.
#[allow(clippy::enum_variant_names)]
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Raw keys.
    #[command(subcommand)]
    Kv(KvCommand),
    /// Typed config documents: push, get, history, rollback, promote.
    #[command(subcommand)]
    Config(ConfigCommand),
    /// Registered instances, their addresses, age and applied config version.
    Services {
        /// Only this service.
        service: Option<String>,
    },
    /// Keeper cluster membership.
    #[command(subcommand)]
    Member(MemberCommand),
    /// Per-endpoint health: member id, leader, term, revision, raft index, size.
    Status,
    /// Send a control command to one instance.
    Command(CommandArgs),
}

#[derive(Debug, Subcommand)]
pub enum KvCommand {
    /// Read a key (or every key under a prefix).
    Get {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Write a key.
    Put { key: String, value: String },
    /// Delete a key (or every key under a prefix).
    Del {
        key: String,
        #[arg(long)]
        prefix: bool,
    },
    /// Print changes to a key (or prefix) until Ctrl-C.
    Watch {
        key: String,
        #[arg(long)]
        prefix: bool,
        /// Start from this revision (older events are replayed).
        #[arg(long)]
        rev: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum ConfigCommand {
    /// Validate FILE against the service's schema, show the diff and push it as a new version.
    Push(PushArgs),
    /// Print the current document's body (or version N's); --json prints the whole document.
    Get {
        service: String,
        #[arg(long)]
        version: Option<u64>,
    },
    /// Every version pushed.
    History { service: String },
    /// Withdraw a canary (no N), or push version N's body as a new version.
    Rollback {
        service: String,
        version: Option<u64>,
    },
    /// Roll the canary out to every instance as a new version.
    Promote { service: String },
}

#[derive(Debug, Args)]
pub struct PushArgs {
    pub service: String,
    /// A .toml or .json file.
    pub file: PathBuf,
    /// Validate and show the diff; push nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Wait until every live instance (or every canary instance) reports the new version.
    #[arg(long)]
    pub wait: bool,
    /// Apply the new version only to these instances (a gray release).
    #[arg(long, value_delimiter = ',', conflicts_with = "canary_percent")]
    pub canary: Vec<String>,
    /// Apply the new version only to about P percent of instances (chosen by id hash).
    #[arg(long, value_parser = clap::value_parser!(u8).range(1..=100))]
    pub canary_percent: Option<u8>,
    /// Push even though the service has published no schema (nothing is validated).
    #[arg(long)]
    pub no_schema: bool,
}

#[derive(Debug, Subcommand)]
pub enum MemberCommand {
    /// Every member, voters and learners.
    List,
    /// Add a node as a learner; the keeper issues its id (never a removed member's), which
    /// the new node must be started with.
    Add { addr: String },
    /// Make a caught-up learner a voter.
    Promote { id: u64 },
    /// Remove a member.
    Remove { id: u64 },
}

#[derive(Debug, Args)]
pub struct CommandArgs {
    pub service: String,
    pub instance: String,
    /// drain, reload, dump or any verb the service understands.
    pub verb: String,
    /// An argument, key=value (repeatable).
    #[arg(long = "arg", value_parser = parse_kv)]
    pub args: Vec<(String, String)>,
    /// Wait for the instance's acknowledgement and print it.
    #[arg(long)]
    pub wait: bool,
}

fn parse_kv(s: &str) -> Result<(String, String), String> {
    match s.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), v.to_string())),
        _ => Err(format!("{s:?} is not key=value")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn cli_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn args_and_timeouts_parse() {
        assert_eq!(parse_kv("a=b=c").unwrap(), ("a".into(), "b=c".into()));
        assert!(parse_kv("=x").is_err());
        assert!(parse_seconds("0").is_err());
        assert_eq!(parse_seconds("1.5").unwrap(), Duration::from_millis(1500));
    }
}
