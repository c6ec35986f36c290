//! One register run end to end: a keeper (1 or 3 nodes) and three `register` processes, each in
//! its own namespace; two test rooms and lookup clients in the harness; faults on the registers;
//! then heal, wait for every open connection to be found at its owner, and check R1-R3.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::checker;
use crate::history::Entry;
use crate::history::Outcome;
use crate::history::Recorder;
use crate::history::SessionOp;
use crate::history::SessionOpKind;
use crate::keeperio;
use crate::net::Network;
use crate::regwork;
use crate::regwork::Directory;
use crate::regwork::RegCtx;
use crate::regwork::TestRoom;
use crate::report;
use crate::report::RunReport;
use crate::svc::Role;
use crate::svc::ServiceRunConfig;
use crate::svc::Svc;
use crate::svcnemesis::SvcNemesis;

/// Port every register listens on (each has its own address).
pub const REGISTER_PORT: u16 = 7300;
/// Register instances under test.
pub const REGISTERS: usize = 3;
/// Test rooms.
const ROOMS: [&str; 2] = ["room-a", "room-b"];

/// Settings of a register run.
#[derive(Debug, Clone)]
pub struct RegisterRunConfig {
    /// What every service run needs.
    pub common: ServiceRunConfig,
    /// Open connections each test room keeps, roughly.
    pub sessions_per_room: usize,
    pub lookup_clients: usize,
    /// R2: how long a closed connection's session may still be found.
    pub r2_window: Duration,
}

/// Runs one register test in `net` (which has `keepers + 3` namespaces).
pub async fn register_run(
    cfg: &RegisterRunConfig,
    net: Arc<Network>,
    run: usize,
    seed: u64,
    cancel: CancellationToken,
) -> RunReport {
    let drive = async |rec: &Recorder, report: &mut RunReport| {
        drive(cfg, net, seed, rec, report, cancel).await
    };
    report::carry_out(&cfg.common.out, run, seed, drive, |report, entries| {
        let ops: Vec<&SessionOp> = entries
            .iter()
            .filter_map(|e| match e {
                Entry::Session(op) => Some(op),
                _ => None,
            })
            .collect();
        report.count(ops.iter().map(|o| o.outcome));
        report.events = ops
            .iter()
            .filter(|o| o.op == SessionOpKind::Lookup && o.outcome == Outcome::Ok)
            .count();
    })
    .await
}

fn register_svcs(
    cfg: &RegisterRunConfig,
    net: &Network,
    keeper: &[String],
    dir: &std::path::Path,
) -> Vec<Svc> {
    (0..REGISTERS)
        .map(|i| {
            let node = cfg.common.keepers + i;
            let id = format!("r{}", i + 1);
            let args = vec![
                "--id".to_string(),
                id.clone(),
                "--listen".into(),
                format!("{}:{REGISTER_PORT}", net.nodes[node].ip),
                "--data-dir".into(),
                dir.join(format!("{id}-data")).display().to_string(),
                "--keeper".into(),
                keeper.join(","),
                "--lease-ttl-s".into(),
                cfg.common.lease_ttl_s.to_string(),
            ];
            Svc::new(
                &id,
                Role::Register,
                node,
                &cfg.common.bin_dir.join("register"),
                args,
                dir,
            )
        })
        .collect()
}

/// Waits until every slot has an owner, every register owns about a third, and every test
/// room has synced the current map.
async fn wait_balanced(
    dir: &Directory,
    rooms: &[Arc<TestRoom>],
    limit: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    loop {
        let map = dir.map();
        let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
        for o in &map.slots {
            *counts.entry(o.as_str()).or_default() += 1;
        }
        let balanced = counts.len() == REGISTERS
            && !counts.contains_key("")
            && counts.values().all(|n| n.abs_diff(1024 / REGISTERS) <= 2);
        let synced = rooms.iter().all(|r| r.synced_epoch() == map.epoch);
        if balanced && synced {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "slots not balanced over {REGISTERS} registers and synced within {limit:?}: epoch {}, {counts:?}",
            map.epoch
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn drive(
    cfg: &RegisterRunConfig,
    net: Arc<Network>,
    seed: u64,
    rec: &Recorder,
    report: &mut RunReport,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (cluster, _) = keeperio::start_keeper(&cfg.common, &net, &report.dir).await?;
    let keeper = cluster.addrs();
    let stop_bg = CancellationToken::new();
    let _stop_bg = stop_bg.clone().drop_guard();
    tokio::spawn(keeperio::record_keeper(
        keeper.clone(),
        rec.clone(),
        stop_bg.clone(),
    ));
    let dir = Directory::new(keeper.clone());
    tokio::spawn(dir.clone().follow(stop_bg.clone()));
    let ctx = RegCtx {
        rec: rec.clone(),
        dir: dir.clone(),
        op_timeout: cfg.common.op_timeout,
        users: cfg.common.users,
        seed,
    };
    let rooms: Vec<Arc<TestRoom>> = ROOMS
        .iter()
        .map(|id| TestRoom::new(id, ctx.clone()))
        .collect();
    for room in &rooms {
        let addrs = BTreeMap::from([("grpc".to_string(), "127.0.0.1:1".to_string())]);
        tokio::spawn(keeperio::hold_instance(
            keeper.clone(),
            "room".into(),
            room.id.clone(),
            addrs,
            10,
            stop_bg.clone(),
        ));
        tokio::spawn(room.clone().follow(stop_bg.clone()));
    }

    let mut svcs = register_svcs(cfg, &net, &keeper, &report.dir);
    for s in &mut svcs {
        s.spawn(&net)?;
    }
    rec.nemesis(
        "phase",
        "info",
        format!(
            "keeper {} and registers r1-r{REGISTERS} started",
            keeper.join(" ")
        ),
    );
    wait_balanced(&dir, &rooms, Duration::from_secs(60)).await?;
    rec.nemesis(
        "phase",
        "info",
        format!(
            "slots balanced at epoch {}; workload starts",
            dir.map().epoch
        ),
    );

    let stop_clients = CancellationToken::new();
    let mut tasks = Vec::new();
    for (i, room) in rooms.iter().enumerate() {
        for w in 0..2u64 {
            tasks.push(tokio::spawn(room.clone().churn(
                i as u64 * 10 + w,
                cfg.sessions_per_room,
                stop_clients.clone(),
            )));
        }
    }
    tasks.push(tokio::spawn(regwork::stale_prober(
        ctx.clone(),
        stop_clients.clone(),
    )));
    for w in 0..cfg.lookup_clients {
        tasks.push(tokio::spawn(regwork::lookup_client(
            ctx.clone(),
            w as u64,
            stop_clients.clone(),
        )));
    }

    let mut nemesis = SvcNemesis::new(
        svcs,
        net.clone(),
        (0..cfg.common.keepers).collect(),
        vec![Role::Register],
        rec.clone(),
        cfg.common.schedule.with_seed(seed),
    );
    let result = nemesis
        .run_then_heal(cfg.common.time, &cancel, &stop_clients, tasks, "clients")
        .await;
    report.faults = nemesis.faults_started;
    result?;
    let healed = Instant::now();
    match converge(&ctx, &rooms, cfg.common.recovery_limit).await {
        Ok(()) => rec.nemesis(
            "phase",
            "info",
            format!(
                "R1: every open connection found at its owner {:?} after heal",
                healed.elapsed()
            ),
        ),
        Err(problems) => {
            let n = problems.len();
            let shown: Vec<String> = problems.into_iter().take(5).collect();
            report.anomalies.push(format!(
                "R1/R2 after heal: {n} users still wrong {:?} after heal, e.g.\n    {}",
                cfg.common.recovery_limit,
                shown.join("\n    ")
            ));
        }
    }
    stop_bg.cancel();
    nemesis.stop();
    let mut cluster = cluster;
    cluster.stop();
    if !cfg.common.keep_data {
        cluster.remove_data();
        for i in 0..REGISTERS {
            let _ = std::fs::remove_dir_all(report.dir.join(format!("r{}-data", i + 1)));
        }
    }
    report
        .anomalies
        .extend(checker::sessions::check(&rec.entries(), cfg.r2_window));
    Ok(())
}

/// Looks every user up until each answer is OK, complete and exactly the rooms' open
/// connections; returns the last pass's mismatches if that does not happen within `limit`.
async fn converge(
    ctx: &RegCtx,
    rooms: &[Arc<TestRoom>],
    limit: Duration,
) -> Result<(), Vec<String>> {
    let open: Vec<(String, Vec<(String, u64)>)> =
        rooms.iter().map(|r| (r.id.clone(), r.open())).collect();
    let expected = checker::sessions::expected_by_user(&open);
    let none = Default::default();
    let deadline = Instant::now() + limit;
    let mut pending: Vec<String> = (0..ctx.users).map(regwork::user).collect();
    loop {
        let mut problems = Vec::new();
        let mut still = Vec::new();
        for u in pending {
            let op = regwork::lookup(ctx, ctx.rec.client_id(), &u).await;
            if let Some(p) =
                checker::sessions::compare_final(&op, expected.get(&u).unwrap_or(&none))
            {
                problems.push(p);
                still.push(u);
            }
        }
        if still.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(problems);
        }
        pending = still;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
