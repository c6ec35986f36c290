//! `keeper-bench`: runs one fixed workload against one etcd-API cluster (`run`), and compares
//! the saved results of a keeper run and an etcd run (`report`).
//!
//! The two systems are measured one after the other, never together, because the load generator
//! and all six server processes share one small machine: `scripts/bench-keeper.sh` starts keeper,
//! runs `run --system keeper`, stops it, does the same for etcd, then calls `report`.

mod cluster;
mod kv;
mod load;
mod report;
mod results;
mod stats;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use clap::Subcommand;

use crate::results::SystemResults;

/// mimalloc instead of glibc malloc: the load generator shares the machine with the servers it
/// measures, and every request allocates and frees a handful of small buffers across threads
/// (malloc and free were ~8% of its CPU); measured in docs/benchmarks.md, session 12.
#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Benchmarks keeper against etcd through the etcd v3 API.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run every workload against one cluster and write its results as JSON.
    Run(RunArgs),
    /// Print the comparison table of saved results (one file per system).
    Report(ReportArgs),
}

#[derive(Debug, clap::Args)]
struct RunArgs {
    /// Which system the endpoints belong to; names the column in the report.
    #[arg(long, value_enum)]
    system: results::System,
    /// The cluster's client endpoints, comma separated (HOST:PORT or http://HOST:PORT).
    #[arg(long, value_delimiter = ',', required = true)]
    endpoints: Vec<String>,
    /// Write the results here (JSON).
    #[arg(long)]
    out: PathBuf,
    /// Measured time of each put and get phase (e.g. 5s, 500ms, 1m).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    duration: Duration,
    /// Unmeasured load before each put and get phase, so connections and caches are warm.
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    warmup: Duration,
    /// Concurrent in-flight requests of each put phase.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    put_clients: Vec<usize>,
    /// Concurrent in-flight requests of the get phases; 0 skips them.
    #[arg(long, default_value_t = 64)]
    get_clients: usize,
    /// Keys written before the get phases; each get picks one at random.
    #[arg(long, default_value_t = 1000)]
    get_keys: usize,
    /// Bytes in every value written by the put and get phases.
    #[arg(long, default_value_t = 256)]
    value_size: usize,
    /// Watch connections; each holds `--watches-per-connection` watch streams. 0 skips the watch
    /// phase.
    #[arg(long, default_value_t = 10)]
    watch_connections: usize,
    /// Watch streams per watch connection, all on the same prefix.
    #[arg(long, default_value_t = 100)]
    watches_per_connection: usize,
    /// Values the watch writer puts; every watcher must receive every one.
    #[arg(long, default_value_t = 200)]
    watch_events: usize,
    /// Puts per second of the watch writer.
    #[arg(long, default_value_t = 50)]
    watch_rate: u32,
    /// Per-request timeout; a request that takes longer counts as an error.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    timeout: Duration,
}

#[derive(Debug, clap::Args)]
struct ReportArgs {
    /// Results written by `run`. Several per system are rounds: the i-th keeper file is compared
    /// with the i-th etcd file, and the table shows medians.
    #[arg(required = true)]
    files: Vec<PathBuf>,
    /// Print JSON (both result sets and the table rows) instead of the table.
    #[arg(long)]
    json: bool,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let outcome = match cli.command {
        Command::Run(args) => run(args).await,
        Command::Report(args) => print_report(args),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("keeper-bench: error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs the workloads in a fixed order, writes what was measured even when something failed
/// (so the failure can be inspected), and fails if any request failed or any event was missed.
async fn run(args: RunArgs) -> anyhow::Result<()> {
    let timeout = args.timeout;
    let cluster = cluster::Cluster::discover(&args.endpoints, timeout).await?;
    eprintln!(
        "{}: version {}, endpoints {} (leader: {})",
        args.system,
        cluster.version,
        cluster.endpoints.join(","),
        cluster.leader.as_deref().unwrap_or("unknown"),
    );

    let mut results = SystemResults {
        system: args.system,
        version: cluster.version.clone(),
        endpoints: cluster.endpoints.clone(),
        leader: cluster.leader.clone(),
        warmup_s: args.warmup.as_secs_f64(),
        duration_s: args.duration.as_secs_f64(),
        value_size: args.value_size,
        phases: Vec::new(),
        watch: None,
    };
    let timing = load::Timing {
        warmup: args.warmup,
        duration: args.duration,
    };
    let mut failures = Vec::new();

    let value = kv::value(args.value_size);
    // Every put client gets its own key space across phases, so every put creates a new key.
    let mut next_client = 0;
    for &clients in &args.put_clients {
        let op = kv::Op::Put {
            first_client: next_client,
            value: value.clone(),
        };
        next_client += clients;
        let phase = load::run(&format!("put c={clients}"), clients, &cluster, &timing, op).await?;
        failures.extend(phase.failure());
        results.phases.push(phase);
    }

    if args.get_clients > 0 {
        kv::prewrite(&cluster, args.get_keys, &value).await?;
        for (name, serializable) in [("get linearizable", false), ("get serializable", true)] {
            let op = kv::Op::Get {
                keys: args.get_keys,
                serializable,
            };
            let name = format!("{name} c={}", args.get_clients);
            let phase = load::run(&name, args.get_clients, &cluster, &timing, op).await?;
            failures.extend(phase.failure());
            results.phases.push(phase);
        }
    }

    let shape = watch::Shape {
        connections: args.watch_connections,
        per_connection: args.watches_per_connection,
        events: args.watch_events,
        rate: args.watch_rate,
    };
    if shape.connections > 0 {
        let watched = watch::run(&cluster, &shape).await?;
        failures.extend(watched.failure());
        results.watch = Some(watched);
    }

    let json = serde_json::to_string_pretty(&results)?;
    std::fs::write(&args.out, json + "\n")
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    eprintln!("{}: results written to {}", args.system, args.out.display());
    if !failures.is_empty() {
        anyhow::bail!("{} run failed:\n  {}", args.system, failures.join("\n  "));
    }
    Ok(())
}

fn print_report(args: ReportArgs) -> anyhow::Result<()> {
    let mut sets = Vec::new();
    for path in &args.files {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let set: SystemResults = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a keeper-bench result", path.display()))?;
        sets.push(set);
    }
    let report = report::Report::build(sets)?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", report.table());
    }
    Ok(())
}

/// Parses `500ms`, `5s`, `2.5s`, `1m`; a bare number means seconds.
fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let split = text
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let number: f64 = number
        .parse()
        .map_err(|_| format!("`{text}` is not a duration (try 5s or 500ms)"))?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "" | "s" => number,
        "m" => number * 60.0,
        _ => {
            return Err(format!(
                "unknown unit `{unit}` in `{text}` (use ms, s or m)"
            ));
        }
    };
    Duration::try_from_secs_f64(seconds).map_err(|e| format!("`{text}`: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("2.5s"), Ok(Duration::from_millis(2500)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("3"), Ok(Duration::from_secs(3)));
        assert!(parse_duration("5h").is_err());
        assert!(parse_duration("fast").is_err());
        assert!(parse_duration("-1s").is_err());
    }
}
