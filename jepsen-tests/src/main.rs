//! `jepsen-tests`: runs fault-injection tests against real Longlink processes and checks the
//! recorded histories. Exit 0 = every run valid, 1 = an anomaly or error, 2 = usage.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;
use jepsen_tests::guard;
use jepsen_tests::history;
use jepsen_tests::nemesis::Fault;
use jepsen_tests::nemesis::Schedule;
use jepsen_tests::net;
use jepsen_tests::report::RunReport;
use jepsen_tests::report::summary;
use jepsen_tests::run;
use jepsen_tests::run_push;
use jepsen_tests::run_register;
use jepsen_tests::svc::ServiceRunConfig;
use jepsen_tests::workload;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Parser)]
#[command(
    version,
    about = "Fault injection against real Longlink processes (needs root)."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Debug, Subcommand)]
enum Cmd {
    /// keeper: register (linearizability), watch and durability workloads under faults.
    Keeper(KeeperArgs),
    /// register failover (R1-R3): test rooms and lookups against 3 registers under faults.
    Register(RegisterArgs),
    /// push delivery (P1-P2): devices and pushes through center under faults.
    Push(PushArgs),
    /// Remove namespaces, links, rules and processes left by harnesses that are gone.
    Cleanup {
        /// Also remove those of harnesses that look alive.
        #[arg(long)]
        all: bool,
        /// Remove exactly this prefix (e.g. `ll-1234-`).
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Re-check a recorded history.jsonl for linearizability of the register keys.
    Check {
        history: PathBuf,
        #[arg(long, default_value_t = 60)]
        checker_timeout_s: u64,
    },
}

/// Flags every workload takes (same names and defaults).
#[derive(Debug, clap::Args)]
struct RunArgs {
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Seconds between nemesis actions: MIN-MAX.
    #[arg(long, default_value = "5-10")]
    interval: String,
    /// Output directory (a subdirectory per invocation is created inside).
    #[arg(long, default_value = "/var/tmp/longlink-jepsen")]
    out: PathBuf,
    /// Keep the processes' data dirs after each run.
    #[arg(long)]
    keep_data: bool,
    /// Seed of the first run (run i uses seed + i); default from the clock.
    #[arg(long)]
    seed: Option<u64>,
}

/// Flags of the keeper workload.
#[derive(Debug, clap::Args)]
struct KeeperArgs {
    /// Seconds of workload and faults per run.
    #[arg(long, default_value_t = 60)]
    time: u64,
    /// Faults: partition,kill,pause,member (or all / none).
    #[arg(long, default_value = "partition,kill,pause,member")]
    nemesis: String,
    /// Keeper nodes (each in its own network namespace).
    #[arg(long, default_value_t = 3)]
    nodes: usize,
    /// Register clients (bound round-robin to nodes).
    #[arg(long, default_value_t = 6)]
    clients: usize,
    /// Durability writers.
    #[arg(long, default_value_t = 2)]
    writers: usize,
    #[arg(long, default_value_t = 2)]
    watchers: usize,
    /// Register keys.
    #[arg(long, default_value_t = 5)]
    keys: usize,
    /// The keeper binary; default: `keeper` next to this executable (the same workspace build).
    #[arg(long)]
    keeper_bin: Option<PathBuf>,
    /// Start the keepers with `--unsafe-stale-reads` (reads skip ReadIndex); the run is
    /// expected to find anomalies. Needs a keeper from the workspace's test build
    /// (`cargo build --workspace --all-targets`), which compiles that flag in.
    #[arg(long)]
    broken_keeper: bool,
    /// The keepers' `snapshot_every` for the run: small, so that snapshots, log purges and
    /// snapshot installs (a member that rejoins behind the purged log) happen under the faults.
    /// 0 keeps the keeper's default (100 000: no snapshot in a short run).
    #[arg(long, default_value_t = 500)]
    snapshot_every: u64,
    /// Invert the exit code: 0 only if some run found a linearizability violation.
    #[arg(long)]
    expect_anomaly: bool,
    /// Milliseconds before a client gives up on a request (outcome `unknown`).
    #[arg(long, default_value_t = 5000)]
    op_timeout_ms: u64,
    /// Upper bound of the random pause between a client's operations, in milliseconds.
    #[arg(long, default_value_t = 20)]
    think_ms: u64,
    /// Time limit of the linearizability search per run; running out counts as a failure.
    #[arg(long, default_value_t = 120)]
    checker_timeout_s: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// Flags shared by the register and push workloads.
#[derive(Debug, clap::Args)]
struct ServiceArgs {
    /// Seconds of workload and faults per run.
    #[arg(long, default_value_t = 20)]
    time: u64,
    /// Faults: partition,kill,pause (or all / none).
    #[arg(long, default_value = "partition,kill,pause")]
    nemesis: String,
    /// Keeper nodes (1 or 3; never faulted by these workloads).
    #[arg(long, default_value_t = 1)]
    keepers: usize,
    /// Directory holding the keeper, register, room and center binaries; default: this
    /// executable's directory (the same workspace build).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Milliseconds before a client gives up on a request (outcome `unknown`).
    #[arg(long, default_value_t = 2000)]
    op_timeout_ms: u64,
    /// Registers' instance lease TTL in seconds (bounds failover).
    #[arg(long, default_value_t = 3)]
    lease_ttl_s: u64,
    /// Users the clients pick from.
    #[arg(long, default_value_t = 50)]
    users: usize,
    /// Seconds after healing within which the system must have converged.
    #[arg(long, default_value_t = 30)]
    recovery_s: u64,
    #[command(flatten)]
    run: RunArgs,
}

/// Flags of the register workload.
#[derive(Debug, clap::Args)]
struct RegisterArgs {
    #[command(flatten)]
    common: ServiceArgs,
    /// Open connections each of the two test rooms keeps, roughly.
    #[arg(long, default_value_t = 40)]
    sessions_per_room: usize,
    /// Lookup clients.
    #[arg(long, default_value_t = 3)]
    lookup_clients: usize,
    /// R2: seconds a closed connection's session may still be found.
    #[arg(long, default_value_t = 10)]
    r2_window_s: u64,
}

/// Flags of the push workload.
#[derive(Debug, clap::Args)]
struct PushArgs {
    #[command(flatten)]
    common: ServiceArgs,
    /// Clients pushing QoS 1 messages through center.
    #[arg(long, default_value_t = 2)]
    pushers: usize,
}

/// The seed of the first run: `seed`, or else the clock's seconds.
fn seed_or_clock(seed: Option<u64>) -> u64 {
    seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    })
}

/// Creates the output directory `<out>/<kind>-<time>-<pid>`.
fn out_dir(out: &std::path::Path, kind: &str) -> anyhow::Result<PathBuf> {
    let stamp = seed_or_clock(None);
    let dir = out.join(format!("{kind}-{stamp}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    Ok(dir)
}

/// Says what an invocation of workload `kind` does and where its files go.
fn announce(kind: &str, time: u64, nemesis: &str, out: &std::path::Path) {
    eprintln!(
        "jepsen-tests {kind}: {time}s per run, nemesis {nemesis}, output {}",
        out.display()
    );
}

/// Runs `runs` runs in one network of `nodes` namespaces, prints each verdict and the summary,
/// and returns the reports (fewer than `runs` if interrupted). `one(network, run, seed)` runs
/// one run. Namespaces or links that survive the network are an error.
async fn run_many<F, Fut>(
    kind: &str,
    nodes: usize,
    runs: usize,
    seed: u64,
    cancel: &CancellationToken,
    one: F,
) -> anyhow::Result<Vec<RunReport>>
where
    F: Fn(Arc<net::Network>, usize, u64) -> Fut,
    Fut: std::future::Future<Output = RunReport>,
{
    let prefix = net::own_prefix();
    guard::register(&prefix);
    let network = Arc::new(net::Network::create(&prefix, nodes)?);
    eprintln!("jepsen-tests {kind}: {runs} runs, {nodes} namespaces {prefix}n*");
    let mut reports = Vec::new();
    for r in 1..=runs {
        if cancel.is_cancelled() {
            break;
        }
        let run_seed = seed.wrapping_add(r as u64);
        eprintln!("--- run {r}/{runs} (seed {run_seed}) ---");
        network.heal().ok();
        let report = one(network.clone(), r, run_seed).await;
        print_verdict(&report);
        reports.push(report);
    }
    drop(network);
    let leftovers = net::namespaces(&prefix)?.len() + net::links(&prefix)?.len();
    println!("{}", summary(&reports));
    anyhow::ensure!(
        leftovers == 0,
        "{leftovers} namespaces/links named {prefix}* survived cleanup"
    );
    Ok(reports)
}

/// Prints one run's error, anomalies and verdict line.
fn print_verdict(report: &RunReport) {
    let r = report.run;
    if let Some(e) = &report.error {
        eprintln!("run {r}: ERROR: {e}");
    }
    for a in &report.anomalies {
        eprintln!("run {r}: ANOMALY: {a}");
    }
    eprintln!(
        "run {r}: {} ({} ops, {} faults) in {:.1}s; files in {}",
        report.verdict(),
        report.ops,
        report.faults,
        report.seconds,
        report.dir.display()
    );
}

/// Success only if all `runs` runs were carried out and every one was valid.
fn exit_code(reports: &[RunReport], runs: usize) -> ExitCode {
    if reports.len() < runs || reports.iter().any(RunReport::bad) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}

/// For `--expect-anomaly`: success only if some run found a linearizability violation.
fn expected_anomaly(reports: &[RunReport]) -> ExitCode {
    let caught = reports.iter().any(|r| r.linearizability_violated);
    println!(
        "expected a linearizability anomaly: {}",
        if caught { "caught" } else { "NOT caught" }
    );
    if caught {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}

/// The nemesis schedule from `--nemesis` and `--interval`.
fn schedule(nemesis: &str, interval: &str, seed: u64) -> anyhow::Result<Schedule> {
    Ok(Schedule {
        faults: Fault::parse_list(nemesis).map_err(anyhow::Error::msg)?,
        interval: parse_interval(interval)?,
        seed,
    })
}

/// The schedule of a register or push run, after checking the flags those workloads share.
fn service_schedule(a: &ServiceArgs, seed: u64) -> anyhow::Result<Schedule> {
    let schedule = schedule(&a.nemesis, &a.run.interval, seed)?;
    anyhow::ensure!(
        !schedule.faults.contains(&Fault::Member),
        "the member nemesis only applies to the keeper workload"
    );
    anyhow::ensure!(a.keepers == 1 || a.keepers == 3, "--keepers must be 1 or 3");
    anyhow::ensure!(a.users >= 1, "--users must be at least 1");
    Ok(schedule)
}

/// The settings register and push runs share, from their flags; creates the output directory.
fn service_config(a: &ServiceArgs, kind: &str, seed: u64) -> anyhow::Result<ServiceRunConfig> {
    Ok(ServiceRunConfig {
        time: Duration::from_secs(a.time),
        keepers: a.keepers,
        bin_dir: a.bin_dir.clone().unwrap_or_else(own_dir),
        schedule: service_schedule(a, seed)?,
        op_timeout: Duration::from_millis(a.op_timeout_ms),
        lease_ttl_s: a.lease_ttl_s,
        users: a.users,
        recovery_limit: Duration::from_secs(a.recovery_s),
        out: out_dir(&a.run.out, kind)?,
        keep_data: a.run.keep_data,
    })
}

/// Announces and carries out the runs of service workload `kind` (`services` namespaces
/// after the keepers'); the exit code over all of them.
async fn service_runs<F, Fut>(
    kind: &str,
    a: &ServiceArgs,
    cfg: &ServiceRunConfig,
    services: usize,
    seed: u64,
    cancel: &CancellationToken,
    one: F,
) -> anyhow::Result<ExitCode>
where
    F: Fn(Arc<net::Network>, usize, u64) -> Fut,
    Fut: std::future::Future<Output = RunReport>,
{
    announce(kind, a.time, &a.nemesis, &cfg.out);
    let nodes = a.keepers + services;
    let reports = run_many(kind, nodes, a.run.runs, seed, cancel, one).await?;
    Ok(exit_code(&reports, a.run.runs))
}

/// `jepsen-tests register`.
async fn register(args: RegisterArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let a = &args.common;
    let seed = seed_or_clock(a.run.seed);
    let cfg = &run_register::RegisterRunConfig {
        common: service_config(a, "register", seed)?,
        sessions_per_room: args.sessions_per_room,
        lookup_clients: args.lookup_clients,
        r2_window: Duration::from_secs(args.r2_window_s),
    };
    let services = run_register::REGISTERS;
    service_runs(
        "register",
        a,
        &cfg.common,
        services,
        seed,
        &cancel,
        |net, r, s| run_register::register_run(cfg, net, r, s, cancel.clone()),
    )
    .await
}

/// `jepsen-tests push`.
async fn push(args: PushArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let a = &args.common;
    let seed = seed_or_clock(a.run.seed);
    let cfg = &run_push::PushRunConfig {
        common: service_config(a, "push", seed)?,
        pushers: args.pushers,
    };
    let services = run_push::SERVICES;
    service_runs(
        "push",
        a,
        &cfg.common,
        services,
        seed,
        &cancel,
        |net, r, s| run_push::push_run(cfg, net, r, s, cancel.clone()),
    )
    .await
}

/// Parses `--interval MIN-MAX` (or a single number) in seconds.
fn parse_interval(s: &str) -> anyhow::Result<(Duration, Duration)> {
    let (lo, hi) = s.split_once('-').unwrap_or((s, s));
    let lo: f64 = lo.trim().parse().context("--interval MIN-MAX in seconds")?;
    let hi: f64 = hi.trim().parse().context("--interval MIN-MAX in seconds")?;
    anyhow::ensure!(
        lo > 0.0 && hi >= lo,
        "--interval needs 0 < MIN <= MAX, got {s}"
    );
    Ok((Duration::from_secs_f64(lo), Duration::from_secs_f64(hi)))
}

/// The directory of this executable: the workspace build puts keeper, register, room and center
/// next to it.
fn own_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `jepsen-tests keeper`.
async fn keeper(args: KeeperArgs, cancel: CancellationToken) -> anyhow::Result<ExitCode> {
    let seed = seed_or_clock(args.run.seed);
    let schedule = schedule(&args.nemesis, &args.run.interval, seed)?;
    anyhow::ensure!(
        (1..=9).contains(&args.nodes),
        "--nodes {} out of range 1..=9",
        args.nodes
    );
    anyhow::ensure!(args.keys >= 1, "--keys must be at least 1");
    let keeper_bin = args
        .keeper_bin
        .clone()
        .unwrap_or_else(|| own_dir().join("keeper"));
    let out = out_dir(&args.run.out, "keeper")?;
    let mut keeper_args = if args.broken_keeper {
        // clap rejects the flag before `--version` when it was not compiled in.
        let probe = std::process::Command::new(&keeper_bin)
            .args(["--unsafe-stale-reads", "--version"])
            .output()
            .with_context(|| format!("cannot run {}", keeper_bin.display()))?;
        anyhow::ensure!(
            probe.status.success(),
            "--broken-keeper: {} has no --unsafe-stale-reads flag; use the keeper of the \
             workspace's test build (`cargo build --workspace --all-targets`)",
            keeper_bin.display()
        );
        vec!["--unsafe-stale-reads".to_string()]
    } else {
        Vec::new()
    };
    if args.snapshot_every > 0 {
        let config = out.join("keeper.toml");
        std::fs::write(
            &config,
            format!("snapshot_every = {}\n", args.snapshot_every),
        )
        .with_context(|| format!("cannot write {}", config.display()))?;
        keeper_args.extend(["--config".to_string(), config.display().to_string()]);
    }
    let cfg = run::KeeperRunConfig {
        time: Duration::from_secs(args.time),
        clients: args.clients,
        writers: args.writers,
        watchers: args.watchers,
        keys: args.keys,
        keeper_bin,
        keeper_args,
        schedule,
        op_timeout: Duration::from_millis(args.op_timeout_ms),
        think: Duration::from_millis(args.think_ms),
        checker_limit: Duration::from_secs(args.checker_timeout_s),
        recovery_limit: Duration::from_secs(10),
        out,
        keep_data: args.run.keep_data,
    };
    announce("keeper", args.time, &args.nemesis, &cfg.out);
    let cfg = &cfg;
    let reports = run_many(
        "keeper",
        args.nodes,
        args.run.runs,
        seed,
        &cancel,
        |net, r, s| run::keeper_run(cfg, net, r, s, cancel.clone()),
    )
    .await?;
    Ok(if args.expect_anomaly {
        expected_anomaly(&reports)
    } else {
        exit_code(&reports, args.run.runs)
    })
}

/// `jepsen-tests check`: re-checks a recorded history's register keys.
fn check(path: &std::path::Path, limit: u64) -> anyhow::Result<ExitCode> {
    let entries = history::load(path)?;
    let ops = history::ops(&entries);
    let verdicts = jepsen_tests::checker::register::check_history(
        &ops,
        workload::REGISTER_PREFIX,
        Duration::from_secs(limit),
    );
    let mut bad = false;
    for v in verdicts {
        match v.result {
            Ok(()) => println!("{}: linearizable ({} ops)", v.key, v.ops),
            Err(e) => {
                bad = true;
                println!("{}: {e}", v.key);
            }
        }
    }
    Ok(if bad {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    })
}

/// `jepsen-tests cleanup`: removes what harnesses left behind.
fn cleanup(all: bool, prefix: Option<String>) -> anyhow::Result<ExitCode> {
    let prefixes = match prefix {
        Some(p) => {
            anyhow::ensure!(
                p.starts_with(net::PREFIX_ROOT),
                "--prefix must start with {}",
                net::PREFIX_ROOT
            );
            vec![p]
        }
        None => net::stale_prefixes(all)?,
    };
    if prefixes.is_empty() {
        println!("nothing to clean up");
    }
    for p in prefixes {
        for what in net::cleanup_prefix(&p)? {
            println!("removed {what}");
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    guard::install_panic_hook();
    let cancel = CancellationToken::new();
    let result = match cli.command {
        Cmd::Keeper(args) => {
            guard::cancel_on_signal(cancel.clone());
            keeper(args, cancel).await
        }
        Cmd::Register(args) => {
            guard::cancel_on_signal(cancel.clone());
            register(args, cancel).await
        }
        Cmd::Push(args) => {
            guard::cancel_on_signal(cancel.clone());
            push(args, cancel).await
        }
        Cmd::Cleanup { all, prefix } => cleanup(all, prefix),
        Cmd::Check {
            history,
            checker_timeout_s,
        } => check(&history, checker_timeout_s),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            guard::cleanup_registered();
            eprintln!("jepsen-tests: {e:#}");
            ExitCode::FAILURE
        }
    }
}
