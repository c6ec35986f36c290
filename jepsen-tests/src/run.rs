//! One keeper run end to end: start a fresh cluster in the namespaces, run the workloads under
//! the nemesis, heal, read everything back (also after kill -9 of every node), check, and write
//! the verdict.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use etcd_client::GetOptions;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::checker;
use crate::checker::watch::FinalState;
use crate::cluster::Cluster;
use crate::cluster::client;
use crate::history;
use crate::history::Args;
use crate::history::OpKind;
use crate::history::Outcome;
use crate::history::Recorder;
use crate::nemesis::Nemesis;
use crate::nemesis::Schedule;
use crate::nemesis::stop_after;
use crate::net::Network;
use crate::report;
use crate::report::RunReport;
use crate::workload;
use crate::workload::Ctx;

/// Settings of a keeper run.
#[derive(Debug, Clone)]
pub struct KeeperRunConfig {
    pub time: Duration,
    pub clients: usize,
    pub writers: usize,
    pub watchers: usize,
    pub keys: usize,
    pub keeper_bin: PathBuf,
    /// Extra flags for every keeper (`--unsafe-stale-reads` for `--broken-keeper`).
    pub keeper_args: Vec<String>,
    pub schedule: Schedule,
    pub op_timeout: Duration,
    pub think: Duration,
    /// Time limit of the linearizability search (all keys together); running out is a failure.
    pub checker_limit: Duration,
    /// K4: after faults heal, a write must succeed within this.
    pub recovery_limit: Duration,
    pub out: PathBuf,
    pub keep_data: bool,
}

/// Runs one keeper test in `net`; never panics on cluster misbehaviour (that is an anomaly).
pub async fn keeper_run(
    cfg: &KeeperRunConfig,
    net: Arc<Network>,
    run: usize,
    seed: u64,
    cancel: CancellationToken,
) -> RunReport {
    let drive = async |rec: &Recorder, report: &mut RunReport| {
        drive(cfg, net, seed, rec, report, cancel).await
    };
    report::carry_out(&cfg.out, run, seed, drive, |report, entries| {
        report.count(history::ops(entries).iter().map(|o| o.outcome));
    })
    .await
}

async fn drive(
    cfg: &KeeperRunConfig,
    net: Arc<Network>,
    seed: u64,
    rec: &Recorder,
    report: &mut RunReport,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let cluster = Cluster::start(net, &cfg.keeper_bin, &cfg.keeper_args, &report.dir)?;
    rec.nemesis(
        "phase",
        "info",
        format!(
            "cluster of {} started: {}",
            cluster.slots.len(),
            cluster.addrs().join(" ")
        ),
    );
    let leader = cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .context("the fresh cluster did not elect a leader")?;
    rec.nemesis("phase", "info", format!("leader is n{}", leader + 1));
    let ctx = Ctx {
        rec: rec.clone(),
        addrs: cluster.addrs(),
        op_timeout: cfg.op_timeout,
        think: cfg.think,
        seed,
    };
    let n = ctx.addrs.len();

    // Workloads.
    let stop_clients = CancellationToken::new();
    let mut clients = Vec::new();
    for w in 0..cfg.clients {
        clients.push(tokio::spawn(workload::register_client(
            ctx.clone(),
            w,
            w % n,
            cfg.keys,
            stop_clients.clone(),
        )));
    }
    for w in 0..cfg.writers {
        clients.push(tokio::spawn(workload::durability_writer(
            ctx.clone(),
            w,
            (w + 1) % n,
            stop_clients.clone(),
        )));
    }
    let (target_tx, target_rx) = watch::channel(None);
    let abort_watchers = CancellationToken::new();
    let watchers: Vec<_> = (0..cfg.watchers)
        .map(|w| {
            tokio::spawn(workload::watcher(
                ctx.clone(),
                w,
                target_rx.clone(),
                abort_watchers.clone(),
            ))
        })
        .collect();
    // Watchers must stop on every exit path, including errors below.
    let _abort_watchers = abort_watchers.clone().drop_guard();

    // Nemesis.
    let mut nemesis = Nemesis::new(cluster, rec.clone(), cfg.schedule.with_seed(seed));
    nemesis.run(stop_after(cfg.time, &cancel)).await;
    report.faults = nemesis.faults_started;
    rec.nemesis("phase", "info", "time is up: stopping clients");
    stop_clients.cancel();
    for c in clients {
        match c.await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => rec.nemesis("phase", "error", format!("client failed: {e:#}")),
            Err(e) => rec.nemesis("phase", "error", format!("client task: {e}")),
        }
    }
    if cancel.is_cancelled() {
        nemesis.cluster.stop();
        anyhow::bail!("interrupted");
    }

    // Heal, then K4: a write succeeds within the recovery limit.
    nemesis.heal_processes().await?;
    let healed = Instant::now();
    let recovered = write_until_ok(&ctx, &nemesis.cluster, Duration::from_secs(60)).await;
    match recovered {
        Some(t) if t <= cfg.recovery_limit => rec.nemesis(
            "phase",
            "info",
            format!("K4: first write after heal succeeded in {t:?}"),
        ),
        Some(t) => report.anomalies.push(format!(
            "K4: first write after the faults healed took {t:?} (limit {:?})",
            cfg.recovery_limit
        )),
        None => report.anomalies.push(format!(
            "K4: no write succeeded within {:?} of healing",
            healed.elapsed()
        )),
    }
    if let Err(e) = nemesis.heal_membership(Duration::from_secs(30)).await {
        report
            .anomalies
            .push(format!("membership did not heal: {e:#}"));
    }
    let mut cluster = nemesis.cluster;
    cluster.wait_leader(Duration::from_secs(30)).await?;

    // Final reads of every register key (recorded: the linearizability check covers them),
    // and the whole key space for the watch and durability checks.
    final_reads(&ctx, &cluster, cfg.keys, "after heal").await;
    let end = read_prefix_any(&cluster, workload::ROOT, Duration::from_secs(30)).await?;
    rec.nemesis(
        "phase",
        "info",
        format!(
            "final state: revision {}, {} keys",
            end.revision,
            end.kvs.len()
        ),
    );
    let _ = target_tx.send(Some(end.revision));
    let mut logs = Vec::new();
    for w in watchers {
        match tokio::time::timeout(Duration::from_secs(30), w).await {
            Ok(Ok(log)) => logs.push(log),
            Ok(Err(e)) => report.anomalies.push(format!("watcher task failed: {e}")),
            Err(_) => {
                abort_watchers.cancel();
                report.anomalies.push(
                    "a watcher did not reach the final revision within 30 s of the end".into(),
                );
            }
        }
    }
    abort_watchers.cancel();
    report.events = logs.iter().map(|l| l.events.len()).sum();
    write_watch_log(&report.dir, &logs);

    let ops_now = history::ops(&rec.entries());
    let durable_after_heal = sub_map(&end.kvs, workload::DURABLE_PREFIX);
    report.anomalies.extend(checker::durability::check(
        &ops_now,
        workload::DURABLE_PREFIX,
        &durable_after_heal,
        "after heal",
    ));

    // kill -9 every node, restart, and read everything again.
    rec.nemesis("kill", "start", "kill -9 every node (durability check)");
    cluster.stop();
    for i in 0..cluster.slots.len() {
        cluster.spawn(i)?;
    }
    rec.nemesis("kill", "heal", "restarted every node");
    cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .context("no leader after restarting every node")?;
    final_reads(&ctx, &cluster, cfg.keys, "after kill -9 of every node").await;
    let again = read_prefix_any(&cluster, workload::ROOT, Duration::from_secs(30)).await?;
    let ops_all = history::ops(&rec.entries());
    report.anomalies.extend(checker::durability::check(
        &ops_all,
        workload::DURABLE_PREFIX,
        &sub_map(&again.kvs, workload::DURABLE_PREFIX),
        "after kill -9 of every node",
    ));

    // Every replica: same revision and hash, and every acknowledged write in its own copy.
    match converged(&cluster, Duration::from_secs(30)).await {
        Ok((rev, hash)) => rec.nemesis(
            "phase",
            "info",
            format!("replicas agree: revision {rev}, hash {hash:#010x}"),
        ),
        Err(e) => report.anomalies.push(e),
    }
    for s in cluster.slots.iter() {
        match read_prefix(&s.addr, workload::DURABLE_PREFIX, true).await {
            Ok(local) => report.anomalies.extend(checker::durability::check(
                &ops_all,
                workload::DURABLE_PREFIX,
                &local.kvs,
                &format!("replica n{} (serializable read)", s.index + 1),
            )),
            Err(e) => report
                .anomalies
                .push(format!("replica n{} unreadable: {e:#}", s.index + 1)),
        }
    }
    cluster.stop();
    if !cfg.keep_data {
        cluster.remove_data();
    }

    // K1 and K3.
    let lin =
        checker::register::check_history(&ops_all, workload::REGISTER_PREFIX, cfg.checker_limit);
    for v in &lin {
        if let Err(e) = &v.result {
            report.linearizability_violated = true;
            report
                .anomalies
                .push(format!("K1 key {} ({} ops): {e}", v.key, v.ops));
        }
    }
    report
        .anomalies
        .extend(checker::watch::check(&logs, &ops_now, &end));
    Ok(())
}

/// Puts a probe key through any serving node until one is acknowledged; returns how long it
/// took. Each attempt is recorded.
async fn write_until_ok(ctx: &Ctx, cluster: &Cluster, limit: Duration) -> Option<Duration> {
    let started = Instant::now();
    let mut i = 0;
    while started.elapsed() < limit {
        let node = i % cluster.slots.len();
        i += 1;
        if !cluster.slots[node].serving() {
            continue;
        }
        let Ok(mut c) = client(&cluster.slots[node].addr).await else {
            continue;
        };
        let args = Args {
            key: format!("{}k4", workload::ROOT),
            value: Some(ctx.rec.unique_value()),
            expect: None,
        };
        let id = ctx.rec.client_id();
        let op = workload::execute(ctx, &mut c, id, Some(node), OpKind::Put, args).await;
        if op.outcome == Outcome::Ok {
            return Some(started.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    None
}

/// Reads every register key (linearizable), retrying on other nodes for up to 30 s per key.
async fn final_reads(ctx: &Ctx, cluster: &Cluster, keys: usize, when: &str) {
    ctx.rec
        .nemesis("phase", "info", format!("final reads {when}"));
    for k in 0..keys {
        let started = Instant::now();
        let mut i = k;
        while started.elapsed() < Duration::from_secs(30) {
            let node = i % cluster.slots.len();
            i += 1;
            let Ok(mut c) = client(&cluster.slots[node].addr).await else {
                continue;
            };
            let args = Args {
                key: format!("{}{k}", workload::REGISTER_PREFIX),
                value: None,
                expect: None,
            };
            let id = ctx.rec.client_id();
            let op = workload::execute(ctx, &mut c, id, Some(node), OpKind::Get, args).await;
            if op.outcome == Outcome::Ok {
                break;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Every key under `prefix` on node `addr`, and the header revision.
async fn read_prefix(addr: &str, prefix: &str, serializable: bool) -> anyhow::Result<FinalState> {
    let mut c = client(addr).await?;
    let mut opts = GetOptions::new().with_prefix();
    if serializable {
        opts = opts.with_serializable();
    }
    let r = crate::cluster::within(
        Duration::from_secs(10),
        "range read",
        c.get(prefix, Some(opts)),
    )
    .await?;
    let mut kvs = BTreeMap::new();
    for kv in r.kvs() {
        let key = String::from_utf8_lossy(kv.key()).into_owned();
        let value = std::str::from_utf8(kv.value())
            .ok()
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("{key} holds a value no client wrote: {:?}", kv.value()))?;
        kvs.insert(key, value);
    }
    Ok(FinalState {
        revision: r.header().map(|h| h.revision()).unwrap_or_default(),
        kvs,
    })
}

async fn read_prefix_any(
    cluster: &Cluster,
    prefix: &str,
    limit: Duration,
) -> anyhow::Result<FinalState> {
    let started = Instant::now();
    let mut last = None;
    let mut i = 0;
    while started.elapsed() < limit {
        let s = &cluster.slots[i % cluster.slots.len()];
        i += 1;
        match read_prefix(&s.addr, prefix, false).await {
            Ok(r) => return Ok(r),
            Err(e) => last = Some(e),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    Err(last
        .unwrap_or_else(|| anyhow::anyhow!("no node"))
        .context(format!("no linearizable read of {prefix} within {limit:?}")))
}

fn sub_map(kvs: &BTreeMap<String, u64>, prefix: &str) -> BTreeMap<String, u64> {
    kvs.iter()
        .filter(|(k, _)| k.starts_with(prefix))
        .map(|(k, v)| (k.clone(), *v))
        .collect()
}

/// Waits until every node reports the same (revision, hash).
async fn converged(cluster: &Cluster, limit: Duration) -> Result<(i64, u32), String> {
    let started = Instant::now();
    loop {
        let hashes = cluster.hashes().await;
        let ok: Vec<(usize, (i64, u32))> = hashes
            .iter()
            .filter_map(|(i, r)| r.as_ref().ok().map(|v| (*i, *v)))
            .collect();
        if ok.len() == cluster.slots.len() && ok.iter().all(|(_, v)| *v == ok[0].1) {
            return Ok(ok[0].1);
        }
        if started.elapsed() > limit {
            let mut msg = format!("replicas disagree after {limit:?}:");
            for (i, r) in &hashes {
                let _ = match r {
                    Ok((rev, h)) => write!(msg, " n{}: revision {rev} hash {h:#010x};", i + 1),
                    Err(e) => write!(msg, " n{}: {e:#};", i + 1),
                };
            }
            return Err(msg);
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

fn write_watch_log(dir: &std::path::Path, logs: &[checker::watch::WatcherLog]) {
    let Ok(f) = std::fs::File::create(dir.join("watch.jsonl")) else {
        return;
    };
    let mut f = std::io::BufWriter::new(f);
    for l in logs {
        let _ = writeln!(f, "{}", serde_json::to_string(l).unwrap_or_default());
    }
}
