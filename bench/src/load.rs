//! The closed-loop driver: `clients` tasks each keep one request in flight for the warm-up and
//! the measured window, and only requests that complete inside the window are counted.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hdrhistogram::Histogram;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::cluster::Cluster;
use crate::kv::Op;
use crate::kv::Rng;
use crate::results::PhaseResult;
use crate::stats;

/// Clients beyond this many share connections round robin (HTTP/2 multiplexes their requests),
/// as the processes of a real deployment would; fewer clients get one connection each.
const MAX_CONNECTIONS: usize = 16;

/// How often a progress line is printed.
const PROGRESS_EVERY: Duration = Duration::from_secs(1);

/// After a failed request a client waits this long, so that a dead cluster is not hammered in a
/// tight loop until the phase ends.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

pub struct Timing {
    pub warmup: Duration,
    pub duration: Duration,
}

/// What one client task measured.
struct ClientResult {
    latencies: Histogram<u64>,
    errors: u64,
    first_error: Option<String>,
}

pub async fn run(
    name: &str,
    clients: usize,
    cluster: &Cluster,
    timing: &Timing,
    op: Op,
) -> anyhow::Result<PhaseResult> {
    anyhow::ensure!(clients > 0, "{name}: needs at least one client");
    let connections = clients.min(MAX_CONNECTIONS);
    let conns = cluster.connect_kv(connections).await?;
    let op = Arc::new(op);
    let counted = Arc::new(AtomicU64::new(0));
    let start = Instant::now();
    let window_start = start + timing.warmup;
    let window_end = window_start + timing.duration;

    let mut tasks = JoinSet::new();
    for client in 0..clients {
        let mut kv = conns[client % connections].clone();
        let op = op.clone();
        let counted = counted.clone();
        tasks.spawn(async move {
            let mut result = ClientResult {
                latencies: stats::histogram(),
                errors: 0,
                first_error: None,
            };
            let mut rng = Rng::new(client as u64 + 1);
            let mut seq = 0;
            loop {
                let sent = Instant::now();
                if sent >= window_end {
                    break;
                }
                let outcome = op.execute(&mut kv, client, seq, &mut rng).await;
                seq += 1;
                let done = Instant::now();
                match outcome {
                    Ok(()) if (window_start..=window_end).contains(&done) => {
                        stats::record(&mut result.latencies, done - sent);
                        counted.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        result.errors += 1;
                        result.first_error.get_or_insert_with(|| format!("{e:#}"));
                        tokio::time::sleep(ERROR_BACKOFF).await;
                    }
                }
            }
            result
        });
    }

    let mut latencies = stats::histogram();
    let mut errors = 0;
    let mut first_error = None;
    let mut progress = tokio::time::interval_at(start + PROGRESS_EVERY, PROGRESS_EVERY);
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                let Some(joined) = joined else { break };
                let client = joined?;
                latencies.add(&client.latencies)?;
                errors += client.errors;
                if first_error.is_none() {
                    first_error = client.first_error;
                }
            }
            now = progress.tick() => {
                if now <= window_start {
                    eprintln!("{name}: warm-up");
                } else {
                    let measured = now.min(window_end) - window_start;
                    eprintln!(
                        "{name}: {:.1}s/{:.1}s {} ops",
                        measured.as_secs_f64(),
                        timing.duration.as_secs_f64(),
                        counted.load(Ordering::Relaxed),
                    );
                }
            }
        }
    }

    let ops = latencies.len();
    let (p50_ms, p99_ms, max_ms) = stats::summary_ms(&latencies);
    let result = PhaseResult {
        name: name.to_owned(),
        clients,
        connections,
        ops,
        errors,
        first_error,
        ops_per_s: ops as f64 / timing.duration.as_secs_f64(),
        p50_ms,
        p99_ms,
        max_ms,
    };
    eprintln!(
        "{name}: done: {ops} ops, {:.0} ops/s, p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms, max {max_ms:.2} ms, {errors} errors",
        result.ops_per_s
    );
    Ok(result)
}
