//! The harness's own keeper traffic for the register and push workloads: seeding config,
//! holding a leased discovery entry (the test rooms), reading the slot map and register
//! addresses, and recording slot maps and register instances as they change. Everything goes
//! through the keeper's public etcd v3 API, with the JSON documents of DESIGN.md §3.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use etcd_client::Client;
use etcd_client::EventType;
use etcd_client::GetOptions;
use etcd_client::PutOptions;
use etcd_client::WatchOptions;
use longlink_common::SlotMap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::cluster::client;
use crate::history::Entry;
use crate::history::KeeperEvent;
use crate::history::MapRecord;
use crate::history::Recorder;
use crate::net::Network;
use crate::svc::ServiceRunConfig;

/// Where the slot controller keeps the slot map.
pub const SLOTS_KEY: &str = "/register/slots";
/// Prefix of the registers' discovery entries.
pub const REGISTERS_PREFIX: &str = "/instances/register/";

/// A discovery entry (`/instances/{service}/{id}`), as the keeper SDK writes it.
#[derive(Debug, Serialize)]
struct InstanceInfo<'a> {
    id: &'a str,
    addrs: BTreeMap<String, String>,
    zone: &'a str,
    started_at: &'a str,
    meta: BTreeMap<String, String>,
}

/// A client of any keeper in `addrs` that answers a status call.
/// Starts the keeper of a service run in the first `cfg.keepers` namespaces of `net` (logs and
/// data under `dir`), waits for a leader, and sets the register config every service run uses:
/// slots are handed back quickly so a restarted register gets its share within a run. Returns
/// the cluster and a client of it.
pub async fn start_keeper(
    cfg: &ServiceRunConfig,
    net: &Arc<Network>,
    dir: &Path,
) -> anyhow::Result<(Cluster, Client)> {
    let bin = cfg.bin_dir.join("keeper");
    let cluster = Cluster::start_on(net.clone(), cfg.keepers, &bin, &[], dir)?;
    cluster
        .wait_leader(Duration::from_secs(30))
        .await
        .context("the keeper did not elect a leader")?;
    let mut k = connect(&cluster.addrs()).await?;
    seed_config(
        &mut k,
        "register",
        &serde_json::json!({"handback_slots_per_step": 256, "handback_interval_ms": 500}),
    )
    .await?;
    Ok((cluster, k))
}

pub async fn connect(addrs: &[String]) -> anyhow::Result<Client> {
    let mut last = anyhow::anyhow!("no keeper address");
    for a in addrs {
        match client(a).await {
            Ok(mut c) => match tokio::time::timeout(Duration::from_secs(2), c.status()).await {
                Ok(Ok(_)) => return Ok(c),
                Ok(Err(e)) => last = e.into(),
                Err(_) => last = anyhow::anyhow!("{a}: status timed out"),
            },
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Pushes version 1 of the typed config `service` as a JSON document, and its history entry.
pub async fn seed_config(
    c: &mut Client,
    service: &str,
    body: &serde_json::Value,
) -> anyhow::Result<()> {
    let doc = serde_json::json!({
        "version": 1,
        "format": "json",
        "body": body.to_string(),
        "updated_at": "2025-01-01T00:00:00Z",
        "author": "jepsen-tests",
    });
    let value = doc.to_string();
    c.put(format!("/config/{service}"), value.clone(), None)
        .await?;
    c.put(format!("/config-history/{service}/{:020}", 1), value, None)
        .await?;
    Ok(())
}

/// The current slot map (empty if none was written yet).
pub async fn slot_map(c: &mut Client) -> anyhow::Result<SlotMap> {
    let r = tokio::time::timeout(Duration::from_secs(2), c.get(SLOTS_KEY, None))
        .await
        .context("slot map read timed out")??;
    match r.kvs().first() {
        None => Ok(SlotMap::empty()),
        Some(kv) => {
            let map: SlotMap =
                serde_json::from_slice(kv.value()).context("parsing the slot map")?;
            map.check()?;
            Ok(map)
        }
    }
}

/// The `grpc` address register `id` published in discovery.
pub async fn register_addr(c: &mut Client, id: &str) -> anyhow::Result<Option<String>> {
    let key = format!("{REGISTERS_PREFIX}{id}");
    let r = tokio::time::timeout(Duration::from_secs(2), c.get(key, None))
        .await
        .context("discovery read timed out")??;
    let Some(kv) = r.kvs().first() else {
        return Ok(None);
    };
    let v: serde_json::Value = serde_json::from_slice(kv.value())?;
    Ok(v["addrs"]["grpc"].as_str().map(str::to_string))
}

/// Keeps `/instances/{service}/{id}` alive on a lease of `ttl_s` until `stop`, then revokes it
/// (the entry disappears at once). Re-grants and re-writes after any keep-alive failure.
pub async fn hold_instance(
    keeper: Vec<String>,
    service: String,
    id: String,
    addrs: BTreeMap<String, String>,
    ttl_s: i64,
    stop: CancellationToken,
) {
    let info = InstanceInfo {
        id: &id,
        addrs,
        zone: "",
        started_at: "2025-01-01T00:00:00Z",
        meta: BTreeMap::new(),
    };
    let value = serde_json::to_string(&info).unwrap_or_default();
    let key = format!("/instances/{service}/{id}");
    while !stop.is_cancelled() {
        let held = async {
            let mut c = connect(&keeper).await?;
            let lease = c.lease_grant(ttl_s, None).await?.id();
            c.put(
                key.as_str(),
                value.as_str(),
                Some(PutOptions::new().with_lease(lease)),
            )
            .await?;
            let (mut keeper_tx, mut acks) = c.lease_keep_alive(lease).await?;
            let every = Duration::from_millis((ttl_s as u64 * 1000 / 4).max(200));
            loop {
                tokio::select! {
                    _ = stop.cancelled() => {
                        let _ = c.lease_revoke(lease).await;
                        return anyhow::Ok(());
                    }
                    _ = tokio::time::sleep(every) => {}
                }
                keeper_tx.keep_alive().await?;
                match tokio::time::timeout(Duration::from_secs(2), acks.message()).await {
                    Ok(Ok(Some(a))) if a.ttl() > 0 => {}
                    other => anyhow::bail!("lease keep-alive failed: {other:?}"),
                }
            }
        };
        if let Err(e) = held.await {
            eprintln!("jepsen-tests: {service}/{id} discovery entry: {e:#}; re-registering");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// Records every slot map and every register instance appearing or disappearing (with its
/// revision) until `stop`.
pub async fn record_keeper(keeper: Vec<String>, rec: Recorder, stop: CancellationToken) {
    while !stop.is_cancelled() {
        if let Err(e) = record_from(&keeper, &rec, &stop).await {
            rec.nemesis("phase", "info", format!("keeper recorder restarts: {e:#}"));
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

fn map_event(rec: &Recorder, revision: i64, value: &[u8]) {
    if let Ok(map) = serde_json::from_slice::<SlotMap>(value) {
        rec.entry(Entry::Keeper(KeeperEvent {
            time: rec.now(),
            revision,
            map: Some(MapRecord::encode(map.epoch, &map.slots)),
            instance: None,
        }));
    }
}

fn instance_event(rec: &Recorder, revision: i64, key: &[u8], present: bool) {
    let key = String::from_utf8_lossy(key);
    if let Some(id) = key.strip_prefix(REGISTERS_PREFIX) {
        rec.entry(Entry::Keeper(KeeperEvent {
            time: rec.now(),
            revision,
            map: None,
            instance: Some((id.to_string(), present)),
        }));
    }
}

async fn record_from(
    keeper: &[String],
    rec: &Recorder,
    stop: &CancellationToken,
) -> anyhow::Result<()> {
    let mut c = connect(keeper).await?;
    // One read of both at one revision, then watches from just after it: nothing is missed.
    let maps = c.get(SLOTS_KEY, None).await?;
    let rev = maps.header().map(|h| h.revision()).unwrap_or_default();
    let regs = c
        .get(
            REGISTERS_PREFIX,
            Some(GetOptions::new().with_prefix().with_revision(rev)),
        )
        .await?;
    if let Some(kv) = maps.kvs().first() {
        map_event(rec, kv.mod_revision(), kv.value());
    }
    for kv in regs.kvs() {
        instance_event(rec, kv.mod_revision(), kv.key(), true);
    }
    let mut maps_stream = c
        .watch(
            SLOTS_KEY,
            Some(WatchOptions::new().with_start_revision(rev + 1)),
        )
        .await?;
    let mut regs_stream = c
        .watch(
            REGISTERS_PREFIX,
            Some(
                WatchOptions::new()
                    .with_prefix()
                    .with_start_revision(rev + 1),
            ),
        )
        .await?;
    loop {
        tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            m = maps_stream.message() => {
                let m = m?.context("slot map watch closed")?;
                for e in m.events() {
                    if let (EventType::Put, Some(kv)) = (e.event_type(), e.kv()) {
                        map_event(rec, kv.mod_revision(), kv.value());
                    }
                }
            }
            m = regs_stream.message() => {
                let m = m?.context("register discovery watch closed")?;
                for e in m.events() {
                    if let Some(kv) = e.kv() {
                        instance_event(rec, kv.mod_revision(), kv.key(), e.event_type() == EventType::Put);
                    }
                }
            }
        }
    }
}

/// Whether `/instances/{service}/{id}` exists.
pub async fn instance_present(c: &mut Client, service: &str, id: &str) -> anyhow::Result<bool> {
    let key = format!("/instances/{service}/{id}");
    let r = tokio::time::timeout(Duration::from_secs(2), c.get(key, None))
        .await
        .context("discovery read timed out")??;
    Ok(!r.kvs().is_empty())
}
