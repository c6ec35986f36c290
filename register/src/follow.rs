//! Tasks that keep a register's view current: the slot map (watch), the live rooms (discovery),
//! the typed config, and the rebuild-timeout timer. Each runs until `shutdown`.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use keeper_sdk::ConfigHandle;
use keeper_sdk::Discovery;
use keeper_sdk::EventKind;
use keeper_sdk::Keeper;
use keeper_sdk::layout;
use longlink_common::SlotMap;
use longlink_proto::roompb;
use longlink_proto::roompb::room_client::RoomClient;
use tokio_util::sync::CancellationToken;

use crate::config::RegisterConfig;
use crate::controller::read_map;
use crate::node::Node;

const RETRY: Duration = Duration::from_millis(300);

/// Follows `/register/slots` from revision `rev + 1` (the map at `rev` is already applied).
pub async fn slot_map(keeper: Keeper, node: Arc<Node>, mut rev: i64, shutdown: CancellationToken) {
    loop {
        let mut watch = match keeper
            .watch_prefix(layout::REGISTER_SLOTS_KEY, rev + 1)
            .await
        {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("slot map watch: {e}");
                if !resync(&keeper, &node, &mut rev, &shutdown).await {
                    return;
                }
                continue;
            }
        };
        loop {
            let events = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = watch.next() => e,
            };
            match events {
                Ok(events) => {
                    for ev in events {
                        rev = ev.revision.max(rev);
                        if ev.kind != EventKind::Put || ev.kv.key != layout::REGISTER_SLOTS_KEY {
                            continue;
                        }
                        match ev.kv.json::<SlotMap>() {
                            Ok(map) => apply(&node, map),
                            Err(e) => tracing::error!("bad slot map: {e}"),
                        }
                    }
                }
                Err(e) => {
                    // Compacted or broken beyond the SDK's own resume: read the map again.
                    tracing::warn!("slot map watch: {e}");
                    if !resync(&keeper, &node, &mut rev, &shutdown).await {
                        return;
                    }
                    break;
                }
            }
        }
    }
}

fn apply(node: &Node, map: SlotMap) {
    if let Err(e) = node.apply_map(map) {
        tracing::error!("applying slot map: {e}");
    }
}

/// Reads and applies the current map after the watch broke; false on shutdown. Epochs in between
/// may have been missed (a slot that left and came back would look kept), so every owned slot
/// rebuilds.
async fn resync(keeper: &Keeper, node: &Node, rev: &mut i64, shutdown: &CancellationToken) -> bool {
    loop {
        match read_map(keeper).await {
            Ok((map, r)) => {
                apply(node, map);
                node.rebuild_owned();
                *rev = r.max(*rev);
                return true;
            }
            Err(e) => tracing::warn!("reading slot map: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return false,
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

/// The ids of the instances in `discovery`.
pub fn ids(discovery: &Discovery) -> BTreeSet<String> {
    discovery.instances().iter().map(|i| i.id.clone()).collect()
}

/// How often a room that left discovery but still answers is probed again.
const PROBE_EVERY: Duration = Duration::from_secs(2);
/// How long a probe may take before the room counts as gone.
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);

/// Whether the room's internal gRPC at `addr` answers `Stats`: up to [`PROBE_ATTEMPTS`]
/// attempts of [`PROBE_TIMEOUT`] each, so that one slow moment on a loaded host does not cost a
/// live room its sessions.
async fn answers(addr: &str) -> bool {
    for _ in 0..PROBE_ATTEMPTS {
        if answers_once(addr).await {
            return true;
        }
    }
    false
}

/// Probe attempts before a room that left discovery counts as gone.
const PROBE_ATTEMPTS: usize = 3;

async fn answers_once(addr: &str) -> bool {
    let Ok(endpoint) = tonic::transport::Endpoint::from_shared(format!("http://{addr}")) else {
        return false;
    };
    let endpoint = endpoint
        .connect_timeout(PROBE_TIMEOUT)
        .timeout(PROBE_TIMEOUT);
    let probe = async {
        let channel = endpoint.connect().await.ok()?;
        RoomClient::new(channel)
            .stats(roompb::StatsRequest {})
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(PROBE_TIMEOUT * 2, probe).await,
        Ok(Some(_))
    )
}

/// Follows the live rooms; rooms that are neither listed in discovery nor answering have their
/// sessions dropped. A room whose lease expired while it still answers on its gRPC address (cut
/// off from the keeper, not dead: its devices are still connected and it still detaches closed
/// ones) keeps its sessions, probed every [`PROBE_EVERY`], until it stops answering or comes back.
/// `applied` is the set the node was given at start; discovery may have moved on since, and
/// the first round applies whatever differs.
pub async fn rooms(
    mut discovery: Discovery,
    node: Arc<Node>,
    mut applied: BTreeSet<String>,
    shutdown: CancellationToken,
) {
    // The last grpc address seen for each room taken as live.
    let mut addrs: BTreeMap<String, String> = BTreeMap::new();
    loop {
        let listed = discovery.instances();
        for i in listed.iter() {
            if let Some(a) = i.addrs.get("grpc") {
                addrs.insert(i.id.clone(), a.clone());
            }
        }
        let mut live: BTreeSet<String> = listed.iter().map(|i| i.id.clone()).collect();
        let mut kept = false;
        for (id, addr) in &addrs {
            if !live.contains(id) && answers(addr).await {
                tracing::warn!(room = %id, %addr, "room left discovery but answers: keeping its sessions");
                live.insert(id.clone());
                kept = true;
            }
        }
        addrs.retain(|id, _| live.contains(id));
        if live != applied {
            applied = live.clone();
            let node = node.clone();
            let done = tokio::task::spawn_blocking(move || node.set_live_rooms(live)).await;
            if let Ok(Err(e)) = done {
                tracing::error!("dropping departed rooms: {e}");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = discovery.changed() => if let Err(e) = r {
                tracing::warn!("room discovery ended: {e}");
                return;
            },
            _ = tokio::time::sleep(PROBE_EVERY), if kept => {}
        }
    }
}

/// Applies every new version of the typed config (the handle only yields versions that passed
/// [`RegisterConfig::validate`]; the others are reported under `/applied` by the SDK).
pub async fn config(
    handle: ConfigHandle<RegisterConfig>,
    node: Arc<Node>,
    shutdown: CancellationToken,
) {
    handle
        .for_each(shutdown, |c, version| {
            tracing::info!(version, "config applied");
            node.set_config(c);
        })
        .await;
}

/// Readies rebuilding slots whose timeout passed.
pub async fn ticks(node: Arc<Node>, shutdown: CancellationToken) {
    let mut every = tokio::time::interval(Duration::from_millis(100));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = every.tick() => node.tick(),
        }
    }
}
