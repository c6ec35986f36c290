//! keeperctl: the operator's CLI for the keeper. Exit codes: 0 ok, 1 failure, 2 usage.

mod cli;
mod client;
mod command;
mod config;
mod diff;
mod kv;
mod member;
mod output;
mod schema;
mod services;

use std::process::ExitCode;

use clap::Parser;

use crate::cli::Cli;
use crate::cli::Command;
use crate::client::Client;
use crate::output::Out;

fn main() -> ExitCode {
    // Like other Unix filters, end quietly when the reader goes away (`keeperctl ... | head`)
    // instead of panicking on a failed print.
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL installs no handler.
    unsafe {
        let _ = nix::sys::signal::signal(
            nix::sys::signal::Signal::SIGPIPE,
            nix::sys::signal::SigHandler::SigDfl,
        );
    }
    // clap exits with 2 on usage errors (and 0 for --help / --version).
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            let message = format!("{e:#}").replace('\n', " ");
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let out = Out::new(cli.json);
    let endpoints: Vec<String> = cli
        .endpoints
        .iter()
        .map(|e| e.trim().to_string())
        .filter(|e| !e.is_empty())
        .collect();
    if endpoints.is_empty() {
        anyhow::bail!("no keeper endpoint given (--endpoints or KEEPER_ENDPOINTS)");
    }
    let request_timeout = cli.request_timeout();
    let wait_timeout = cli.wait_timeout();
    if let Command::Status = cli.command {
        return member::status(&endpoints, request_timeout, out).await;
    }
    let client = Client::connect(&endpoints, request_timeout).await?;
    match cli.command {
        Command::Kv(cmd) => kv::run(&client, out, cmd).await,
        Command::Config(cmd) => config::run(&client, out, cmd, wait_timeout).await,
        Command::Services { service } => services::run(&client, out, service).await,
        Command::Member(cmd) => member::run(&client, out, cmd).await,
        Command::Command(args) => command::run(&client, out, args, wait_timeout).await,
        Command::Status => unreachable!("handled above"),
    }
}
