//! One push run end to end: a keeper, two registers, two rooms and a center, each in its own
//! namespace; devices and pushers in the harness; faults on registers and rooms; then heal,
//! wait for the messages still owed, and check P1-P2.

use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use tokio_util::sync::CancellationToken;

use crate::checker;
use crate::history::DeviceWhat;
use crate::history::Entry;
use crate::history::Recorder;
use crate::keeperio;
use crate::net::Network;
use crate::pushwork;
use crate::pushwork::PushCtx;
use crate::pushwork::RoomAddr;
use crate::report;
use crate::report::RunReport;
use crate::svc::Role;
use crate::svc::ServiceRunConfig;
use crate::svc::Svc;
use crate::svcnemesis::SvcNemesis;

/// Service processes (namespaces after the keepers'): r1, r2, room-1, room-2, center-1.
pub const SERVICES: usize = 5;

/// Settings of a push run.
#[derive(Debug, Clone)]
pub struct PushRunConfig {
    /// What every service run needs; `recovery_limit`: messages still owed after heal must
    /// arrive within it.
    pub common: ServiceRunConfig,
    pub pushers: usize,
}

/// Runs one push test in `net` (which has `keepers + SERVICES` namespaces).
pub async fn push_run(
    cfg: &PushRunConfig,
    net: Arc<Network>,
    run: usize,
    seed: u64,
    cancel: CancellationToken,
) -> RunReport {
    let drive = async |rec: &Recorder, report: &mut RunReport| {
        drive(cfg, net, seed, rec, report, cancel).await
    };
    report::carry_out(&cfg.common.out, run, seed, drive, |report, entries| {
        report.count(entries.iter().filter_map(|e| match e {
            Entry::Push(p) => Some(p.outcome),
            _ => None,
        }));
    })
    .await
}

fn arg_list(items: &[&str]) -> Vec<String> {
    items.iter().map(|s| s.to_string()).collect()
}

/// The service processes, in namespaces `keepers..keepers + SERVICES`.
fn services(cfg: &PushRunConfig, net: &Network, keeper: &str, dir: &std::path::Path) -> Vec<Svc> {
    let ip = |i: usize| net.nodes[cfg.common.keepers + i].ip.to_string();
    let ttl = cfg.common.lease_ttl_s.to_string();
    let mut out = Vec::new();
    for (i, id) in ["r1", "r2"].iter().enumerate() {
        let data = dir.join(format!("{id}-data")).display().to_string();
        let listen = format!("{}:7300", ip(i));
        let args = arg_list(&[
            "--id",
            id,
            "--listen",
            &listen,
            "--data-dir",
            &data,
            "--keeper",
            keeper,
            "--lease-ttl-s",
            &ttl,
        ]);
        out.push(Svc::new(
            id,
            Role::Register,
            cfg.common.keepers + i,
            &cfg.common.bin_dir.join("register"),
            args,
            dir,
        ));
    }
    for (j, id) in ["room-1", "room-2"].iter().enumerate() {
        let a = ip(2 + j);
        let (tcp, ws, grpc) = (
            format!("{a}:7100"),
            format!("{a}:7101"),
            format!("{a}:7102"),
        );
        let args = arg_list(&[
            "--id", id, "--tcp", &tcp, "--ws", &ws, "--grpc", &grpc, "--keeper", keeper,
        ]);
        out.push(Svc::new(
            id,
            Role::Room,
            cfg.common.keepers + 2 + j,
            &cfg.common.bin_dir.join("room"),
            args,
            dir,
        ));
    }
    let a = ip(4);
    let (http, grpc) = (format!("{a}:8080"), format!("{a}:8081"));
    let args = arg_list(&[
        "--id", "center-1", "--http", &http, "--grpc", &grpc, "--keeper", keeper,
    ]);
    out.push(Svc::new(
        "center-1",
        Role::Center,
        cfg.common.keepers + 4,
        &cfg.common.bin_dir.join("center"),
        args,
        dir,
    ));
    out
}

/// Waits until both registers own slots, both rooms are in discovery and center is healthy.
async fn wait_ready(keeper: &[String], center: &str, limit: Duration) -> anyhow::Result<()> {
    let deadline = Instant::now() + limit;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(1))
        .build()?;
    loop {
        let mut last = String::new();
        let ready = async {
            let mut c = keeperio::connect(keeper).await?;
            let map = keeperio::slot_map(&mut c).await?;
            let owners: std::collections::BTreeSet<&str> =
                map.slots.iter().map(String::as_str).collect();
            anyhow::ensure!(
                owners.len() == 2 && !owners.contains(""),
                "slot owners {owners:?}"
            );
            for room in ["room-1", "room-2"] {
                anyhow::ensure!(
                    keeperio::instance_present(&mut c, "room", room).await?,
                    "{room} not in discovery"
                );
            }
            let r = http.get(format!("http://{center}/healthz")).send().await?;
            anyhow::ensure!(r.status().is_success(), "center /healthz: {}", r.status());
            anyhow::Ok(())
        }
        .await;
        match ready {
            Ok(()) => return Ok(()),
            Err(e) => last.push_str(&format!("{e:#}")),
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "services not ready within {limit:?}: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// After heal: pushes a QoS 1 message to every user, again every 2 s to those that have not
/// received any of theirs, until all did or `limit` passed (the users left). Every push is
/// recorded, so P1 and P2 cover these too.
async fn reachable(ctx: &PushCtx, limit: Duration) -> Result<(), Vec<String>> {
    let http = reqwest::Client::builder()
        .timeout(ctx.op_timeout)
        .build()
        .map_err(|e| vec![e.to_string()])?;
    let started = Instant::now();
    let mut keys: std::collections::HashMap<u64, String> = std::collections::HashMap::new();
    let mut pending: Vec<String> = (0..ctx.users).map(pushwork::user).collect();
    while !pending.is_empty() {
        if started.elapsed() > limit {
            return Err(pending);
        }
        for u in &pending {
            let key = ctx.rec.unique_value();
            keys.insert(key, u.clone());
            pushwork::push_one(ctx, &http, ctx.rec.client_id(), u, key).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let mut done = std::collections::HashSet::new();
        for e in ctx.rec.entries() {
            if let Entry::Device(d) = e
                && let DeviceWhat::Received { key: Some(k), .. } = d.what
                && keys.get(&k) == Some(&d.user)
            {
                done.insert(d.user);
            }
        }
        pending.retain(|u| !done.contains(u));
    }
    ctx.rec.nemesis(
        "phase",
        "info",
        format!(
            "every user received a push {:?} after heal",
            started.elapsed()
        ),
    );
    Ok(())
}

/// Users with at least one connection recorded.
fn connected_users(rec: &Recorder) -> usize {
    let mut users = std::collections::HashSet::new();
    for e in rec.entries() {
        if let Entry::Device(d) = e
            && matches!(d.what, DeviceWhat::Connected { .. })
        {
            users.insert(d.user);
        }
    }
    users.len()
}

async fn drive(
    cfg: &PushRunConfig,
    net: Arc<Network>,
    seed: u64,
    rec: &Recorder,
    report: &mut RunReport,
    cancel: CancellationToken,
) -> anyhow::Result<()> {
    let (mut cluster, mut k) = keeperio::start_keeper(&cfg.common, &net, &report.dir).await?;
    let keeper = cluster.addrs();
    keeperio::seed_config(&mut k, "apps", &pushwork::apps_config()).await?;
    let mut svcs = services(cfg, &net, &keeper.join(","), &report.dir);
    for s in &mut svcs {
        s.spawn(&net)?;
    }
    let center = format!("{}:8080", net.nodes[cfg.common.keepers + 4].ip);
    wait_ready(&keeper, &center, Duration::from_secs(60)).await?;
    rec.nemesis(
        "phase",
        "info",
        "keeper, r1, r2, room-1, room-2, center-1 ready",
    );
    let rooms: Vec<RoomAddr> = svcs
        .iter()
        .filter(|s| s.role == Role::Room)
        .map(|s| RoomAddr {
            name: s.name.clone(),
            tcp: format!("{}:7100", net.nodes[s.node].ip),
            incarnation: s.incarnation.clone(),
        })
        .collect();
    let ctx = PushCtx {
        rec: rec.clone(),
        center,
        rooms,
        op_timeout: cfg.common.op_timeout,
        users: cfg.common.users,
        seed,
    };
    let stop_devices = CancellationToken::new();
    let _stop_devices = stop_devices.clone().drop_guard();
    let devices: Vec<_> = (0..cfg.common.users)
        .map(|u| tokio::spawn(pushwork::device(ctx.clone(), u, stop_devices.clone())))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(30);
    while connected_users(rec) < cfg.common.users {
        anyhow::ensure!(
            Instant::now() < deadline,
            "devices did not all connect within 30 s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    rec.nemesis(
        "phase",
        "info",
        format!("{} devices connected; pushes start", cfg.common.users),
    );

    let stop_pushers = CancellationToken::new();
    let pushers: Vec<_> = (0..cfg.pushers)
        .map(|w| {
            tokio::spawn(pushwork::pusher(
                ctx.clone(),
                w as u64,
                stop_pushers.clone(),
            ))
        })
        .collect();
    let mut nemesis = SvcNemesis::new(
        svcs,
        net.clone(),
        (0..cfg.common.keepers).collect(),
        vec![Role::Register, Role::Room],
        rec.clone(),
        cfg.common.schedule.with_seed(seed),
    );
    let result = nemesis
        .run_then_heal(cfg.common.time, &cancel, &stop_pushers, pushers, "pushers")
        .await;
    report.faults = nemesis.faults_started;
    result?;
    let healed = Instant::now();
    loop {
        let owed = checker::push::check(&rec.entries(), false).owed;
        if owed.is_empty() {
            rec.nemesis(
                "phase",
                "info",
                format!(
                    "every owed message delivered {:?} after heal",
                    healed.elapsed()
                ),
            );
            break;
        }
        if healed.elapsed() > cfg.common.recovery_limit {
            rec.nemesis(
                "phase",
                "info",
                format!(
                    "{} messages still owed {:?} after heal",
                    owed.len(),
                    cfg.common.recovery_limit
                ),
            );
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if let Err(unreachable) = reachable(&ctx, cfg.common.recovery_limit).await {
        report.anomalies.push(format!(
            "P1 after heal: {} connected users got no QoS 1 push within {:?} of healing: {}",
            unreachable.len(),
            cfg.common.recovery_limit,
            unreachable.join(" ")
        ));
    }
    stop_devices.cancel();
    for d in devices {
        let _ = d.await;
    }
    nemesis.stop();
    cluster.stop();
    if !cfg.common.keep_data {
        cluster.remove_data();
        for id in ["r1", "r2"] {
            let _ = std::fs::remove_dir_all(report.dir.join(format!("{id}-data")));
        }
    }
    let v = checker::push::check(&rec.entries(), true);
    report.events = v.received;
    rec.nemesis(
        "phase",
        "info",
        format!(
            "P1: {} accepted pushes delivered ({} more than once), excused {:?}",
            v.delivered, v.duplicated, v.excused
        ),
    );
    report.anomalies.extend(v.anomalies);
    Ok(())
}
