//! The slot controller: the register elected in `register-slots` keeps `/register/slots`
//! balanced over the live registers (`balance.rs` decides; this file reads, writes and waits).
//!
//! Every write is one keeper txn that compares both the map's mod_revision (no lost update) and the
//! create_revision of our election key (fencing: a deposed controller, whose key is gone, cannot
//! write).

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::time::Duration;

use keeper_sdk::InstanceInfo;
use keeper_sdk::Keeper;
use keeper_sdk::Leadership;
use keeper_sdk::layout;
use longlink_common::SlotMap;
use longlink_proto::etcdserverpb::Compare;
use longlink_proto::etcdserverpb::PutRequest;
use longlink_proto::etcdserverpb::RequestOp;
use longlink_proto::etcdserverpb::TxnRequest;
use longlink_proto::etcdserverpb::compare::CompareResult;
use longlink_proto::etcdserverpb::compare::CompareTarget;
use longlink_proto::etcdserverpb::compare::TargetUnion;
use longlink_proto::etcdserverpb::request_op::Request;
use std::sync::Arc;
use tokio_util::sync::CancellationToken;

use crate::balance::balance;
use crate::node::Node;

/// Election name of the slot controller.
pub const ELECTION: &str = "register-slots";

type SdkResult<T> = std::result::Result<T, keeper_sdk::Error>;

/// The slot map and its mod_revision (0 when absent).
pub async fn read_map(keeper: &Keeper) -> SdkResult<(SlotMap, i64)> {
    match keeper.get(layout::REGISTER_SLOTS_KEY).await? {
        None => Ok((SlotMap::empty(), 0)),
        Some(kv) => {
            let map: SlotMap = kv.json()?;
            map.check().map_err(|e| keeper_sdk::Error::Decode {
                key: layout::REGISTER_SLOTS_KEY.into(),
                message: e.to_string(),
            })?;
            Ok((map, kv.mod_revision))
        }
    }
}

/// Campaigns and, while leading, balances; until `shutdown`.
pub async fn run(keeper: Keeper, node: Arc<Node>, shutdown: CancellationToken) {
    loop {
        let leadership = tokio::select! {
            _ = shutdown.cancelled() => return,
            l = keeper.elect(ELECTION, node.id()) => l,
        };
        match leadership {
            Ok(l) => {
                tracing::info!(fencing = l.revision(), "slot controller: leading");
                if let Err(e) = lead(&keeper, &l, &node, &shutdown).await {
                    tracing::warn!("slot controller: {e}");
                }
                if shutdown.is_cancelled() {
                    let _ = l.resign().await;
                    return;
                }
            }
            Err(e) => tracing::warn!("slot controller: campaign failed: {e}"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}

async fn election_key(keeper: &Keeper, l: &Leadership) -> SdkResult<String> {
    let (kvs, _) = keeper
        .get_prefix(&layout::election_prefix(ELECTION))
        .await?;
    kvs.into_iter()
        .find(|kv| kv.create_revision == l.revision())
        .map(|kv| kv.key)
        .ok_or_else(|| keeper_sdk::Error::Conflict("our election key is gone".into()))
}

async fn lead(
    keeper: &Keeper,
    l: &Leadership,
    node: &Node,
    shutdown: &CancellationToken,
) -> SdkResult<()> {
    let key = election_key(keeper, l).await?;
    let mut registers = keeper.discover("register").await?;
    loop {
        let instances = registers.instances();
        let live: Vec<String> = instances.iter().map(|i| i.id.clone()).collect();
        let (map, rev) = read_map(keeper).await?;
        let config = node.config();
        let next = balance(&map.slots, &live, config.handback_slots_per_step);
        let leases = owner_leases(&next, &instances, &map);
        let mut current = map.slots.clone();
        if next != map.slots || leases != map.leases {
            let moved = next.iter().zip(&map.slots).filter(|(a, b)| a != b).count();
            let new = map.next(next).leased(leases);
            if write_guarded(keeper, &key, l.revision(), rev, &new).await? {
                tracing::info!(epoch = new.epoch, moved, live = ?live, "slot map written");
                current = new.slots;
            } else if !l.is_leader() {
                return Ok(());
            } else {
                // Lost a race with ourselves or a stale write; re-read at once.
                continue;
            }
        }
        let pending = balance(&current, &live, 1) != current;
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = l.lost() => return Ok(()),
            r = registers.changed() => { r?; }
            _ = tokio::time::sleep(Duration::from_millis(config.handback_interval_ms)), if pending => {}
        }
    }
}

/// The instance lease of every owner in `slots`: the one discovery shows it on, or (for an owner
/// that is not live, when no register is) the one `map` named. A register whose lease changed
/// keeps its slots and their `since`: no other register had them in between, and it answers for
/// them again once it sees this map name its new lease.
fn owner_leases(slots: &[String], live: &[InstanceInfo], map: &SlotMap) -> BTreeMap<String, i64> {
    let owners: BTreeSet<&str> = slots
        .iter()
        .map(String::as_str)
        .filter(|o| !o.is_empty())
        .collect();
    owners
        .into_iter()
        .filter_map(|owner| {
            let lease = live
                .iter()
                .find(|i| i.id == owner && i.lease != 0)
                .map(|i| i.lease)
                .or_else(|| map.leases.get(owner).copied())?;
            Some((owner.to_string(), lease))
        })
        .collect()
}

/// Writes `map` if the stored map is still at `rev` and our election key still exists with our
/// fencing revision.
async fn write_guarded(
    keeper: &Keeper,
    election_key: &str,
    fencing: i64,
    rev: i64,
    map: &SlotMap,
) -> SdkResult<bool> {
    let compare = vec![
        Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Mod as i32,
            key: layout::REGISTER_SLOTS_KEY.as_bytes().to_vec(),
            target_union: Some(TargetUnion::ModRevision(rev)),
            ..Default::default()
        },
        Compare {
            result: CompareResult::Equal as i32,
            target: CompareTarget::Create as i32,
            key: election_key.as_bytes().to_vec(),
            target_union: Some(TargetUnion::CreateRevision(fencing)),
            ..Default::default()
        },
    ];
    let put = RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: layout::REGISTER_SLOTS_KEY.as_bytes().to_vec(),
            value: serde_json::to_vec(map).expect("slot map serialises"),
            ..Default::default()
        })),
    };
    let resp = keeper
        .txn(TxnRequest {
            compare,
            success: vec![put],
            failure: vec![],
        })
        .await?;
    Ok(resp.succeeded)
}
