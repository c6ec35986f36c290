//! The room's side of the register (docs/register.md): attaches sessions to the register owning
//! each user's slot (batched across connections, retried on WRONG_OWNER / UNAVAILABLE with a
//! refreshed slot map), detaches closed ones, re-syncs every slot whose owner changed when the
//! slot map moves, and sends periodic per-slot digests (a mismatch triggers a Sync).
//!
//! Queues: attaches and detaches go through bounded channels. A full attach queue refuses the
//! connection (`unavailable`); a full detach queue drops the detach and counts it (the next
//! digest repairs it).

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clients::Channel;
use futures::future::BoxFuture;
use longlink_common::SLOTS;
use longlink_common::SlotMap;
use longlink_common::slot_of;
use longlink_proto::registerpb;
use longlink_proto::registerpb::register_client::RegisterClient;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::hub::Hub;
use crate::hub::SessionInfo;
use crate::hub::Sessions;

/// Keeper key of the slot map.
pub const SLOTS_KEY: &str = "/register/slots";
/// Items per Attach/Detach request.
const MAX_BATCH: usize = 1000;
/// How long one attach may be retried before the connection is refused.
const ATTACH_DEADLINE: Duration = Duration::from_secs(5);
const ATTACH_QUEUE: usize = 65_536;
/// Attach batches in flight at once (see `attach_loop`).
const ATTACH_INFLIGHT: usize = 4;
const DETACH_QUEUE: usize = 65_536;
const RPC_TIMEOUT: Duration = Duration::from_secs(3);

type AttachReply = oneshot::Sender<Result<(), String>>;

/// Shared routing state: the slot map and a client per register instance.
struct Routes {
    map: watch::Receiver<Arc<SlotMap>>,
    /// register id -> grpc address, from discovery.
    addrs: watch::Receiver<Arc<BTreeMap<String, String>>>,
    clients: Clients<RegisterClient<Channel>>,
}

impl Routes {
    fn map(&self) -> Arc<SlotMap> {
        self.map.borrow().clone()
    }

    /// A client for register `id`, if discovery knows its address.
    fn client(&self, id: &str) -> Option<RegisterClient<Channel>> {
        let addr = self.addrs.borrow().get(id).cloned()?;
        self.clients.get(id, &addr)
    }
}

/// The register client wired into the hub as its [`Sessions`].
pub struct Registrar {
    room_id: String,
    routes: Arc<Routes>,
    attach_tx: mpsc::Sender<(SessionInfo, AttachReply)>,
    detach_tx: mpsc::Sender<SessionInfo>,
    /// Detaches dropped because the queue was full.
    pub detach_drops: AtomicU64,
}

fn to_pb(room_id: &str, s: &SessionInfo) -> registerpb::Session {
    registerpb::Session {
        app: s.app.clone(),
        user: s.user.clone(),
        device: s.device.clone(),
        room_id: room_id.to_string(),
        conn_id: s.conn_id,
        connected_at_ms: s.connected_at_ms,
        client_ip: s.client_ip.clone(),
        platform: s.platform.clone(),
    }
}

impl Sessions for Registrar {
    fn attach(&self, session: SessionInfo) -> BoxFuture<'static, Result<(), String>> {
        let (tx, rx) = oneshot::channel();
        let queued = self.attach_tx.try_send((session, tx)).is_ok();
        Box::pin(async move {
            if !queued {
                return Err("attach queue full".into());
            }
            rx.await.unwrap_or_else(|_| Err("room is stopping".into()))
        })
    }

    fn detach(&self, session: SessionInfo) {
        if self.detach_tx.try_send(session).is_err() {
            self.detach_drops.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// Reads the slot map (or an empty one) and the revision it was read at.
async fn read_map(keeper: &keeper_sdk::Keeper) -> Result<(SlotMap, i64), String> {
    let (kvs, rev) = keeper
        .get_prefix(SLOTS_KEY)
        .await
        .map_err(|e| e.to_string())?;
    let map = kvs
        .iter()
        .find(|kv| kv.key == SLOTS_KEY)
        .and_then(|kv| serde_json::from_slice::<SlotMap>(&kv.value).ok())
        .filter(|m| m.check().is_ok())
        .unwrap_or_else(SlotMap::empty);
    Ok((map, rev))
}

/// Follows `/register/slots` into `tx`.
async fn follow_map(
    keeper: keeper_sdk::Keeper,
    tx: watch::Sender<Arc<SlotMap>>,
    from: i64,
    shutdown: CancellationToken,
) {
    let mut rev = from;
    loop {
        let mut events = match keeper.watch_prefix(SLOTS_KEY, rev + 1).await {
            Ok(w) => w,
            Err(e) => {
                tracing::warn!("slot map watch: {e}");
                tokio::select! { _ = shutdown.cancelled() => return, _ = tokio::time::sleep(Duration::from_secs(1)) => {} }
                continue;
            }
        };
        loop {
            let batch = tokio::select! {
                _ = shutdown.cancelled() => return,
                b = events.next() => b,
            };
            match batch {
                Ok(evs) => {
                    for ev in evs {
                        rev = rev.max(ev.revision);
                        if ev.kv.key != SLOTS_KEY {
                            continue;
                        }
                        if let Ok(m) = serde_json::from_slice::<SlotMap>(&ev.kv.value)
                            && m.check().is_ok()
                            && m.epoch >= tx.borrow().epoch
                        {
                            tx.send_replace(Arc::new(m));
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("slot map watch: {e}; re-reading");
                    if let Ok((m, r)) = read_map(&keeper).await {
                        rev = r;
                        if m.epoch >= tx.borrow().epoch {
                            tx.send_replace(Arc::new(m));
                        }
                    }
                    break;
                }
            }
        }
    }
}

/// Follows discovery of `register` into `tx` (id -> grpc address).
async fn follow_registers(
    mut d: keeper_sdk::Discovery,
    tx: watch::Sender<Arc<BTreeMap<String, String>>>,
    shutdown: CancellationToken,
) {
    let to_map = |list: &[keeper_sdk::InstanceInfo]| -> BTreeMap<String, String> {
        list.iter()
            .filter_map(|i| i.addrs.get("grpc").map(|a| (i.id.clone(), a.clone())))
            .collect()
    };
    tx.send_replace(Arc::new(to_map(&d.instances())));
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            n = d.changed() => n,
        };
        match next {
            Ok(list) => {
                tx.send_replace(Arc::new(to_map(&list)));
            }
            Err(e) => {
                tracing::warn!("register discovery: {e}");
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        }
    }
}

/// Starts the registrar's tasks and returns it (to be set as the hub's [`Sessions`]).
pub async fn start(
    keeper: keeper_sdk::Keeper,
    room_id: String,
    shutdown: CancellationToken,
) -> Result<Arc<Registrar>, String> {
    let (map, rev) = read_map(&keeper).await?;
    let (map_tx, map_rx) = watch::channel(Arc::new(map));
    tokio::spawn(follow_map(keeper.clone(), map_tx, rev, shutdown.clone()));
    let discovery = keeper
        .discover("register")
        .await
        .map_err(|e| e.to_string())?;
    let (addr_tx, addr_rx) = watch::channel(Arc::new(BTreeMap::new()));
    tokio::spawn(follow_registers(discovery, addr_tx, shutdown.clone()));
    let routes = Arc::new(Routes {
        map: map_rx,
        addrs: addr_rx,
        clients: Clients::new(RegisterClient::new, RPC_TIMEOUT),
    });
    let (attach_tx, attach_rx) = mpsc::channel(ATTACH_QUEUE);
    let (detach_tx, detach_rx) = mpsc::channel(DETACH_QUEUE);
    tokio::spawn(attach_loop(
        room_id.clone(),
        routes.clone(),
        attach_rx,
        shutdown.clone(),
    ));
    tokio::spawn(detach_loop(
        room_id.clone(),
        routes.clone(),
        detach_rx,
        shutdown,
    ));
    Ok(Arc::new(Registrar {
        room_id,
        routes,
        attach_tx,
        detach_tx,
        detach_drops: AtomicU64::new(0),
    }))
}

/// Sends one batch of attaches, retrying items that were routed wrong or found the register
/// unavailable, until each is OK, invalid, or past the deadline.
async fn attach_batch(room_id: &str, routes: &Routes, mut items: Vec<(SessionInfo, AttachReply)>) {
    let deadline = tokio::time::Instant::now() + ATTACH_DEADLINE;
    let mut delay = Duration::from_millis(20);
    loop {
        let map = routes.map();
        let mut by_owner: HashMap<String, Vec<(SessionInfo, AttachReply)>> = HashMap::new();
        let mut retry = Vec::new();
        for (s, reply) in items.drain(..) {
            match map.owner_of(&s.app, &s.user) {
                Some(owner) => by_owner
                    .entry(owner.to_string())
                    .or_default()
                    .push((s, reply)),
                None => retry.push((s, reply, "slot has no owner".to_string())),
            }
        }
        let calls = by_owner.into_iter().map(|(owner, batch)| {
            let client = routes.client(&owner);
            let epoch = map.epoch;
            async move {
                let Some(mut client) = client else {
                    return batch
                        .into_iter()
                        .map(|(s, r)| (s, r, Err(format!("register {owner} not in discovery"))))
                        .collect::<Vec<_>>();
                };
                let req = registerpb::AttachRequest {
                    epoch,
                    sessions: batch.iter().map(|(s, _)| to_pb(room_id, s)).collect(),
                };
                match client.attach(req).await {
                    Ok(resp) => {
                        let results = resp.into_inner().results;
                        batch
                            .into_iter()
                            .enumerate()
                            .map(|(i, (s, r))| {
                                let res = results.get(i).cloned().unwrap_or_default();
                                let verdict = match registerpb::Status::try_from(res.status) {
                                    Ok(registerpb::Status::Ok) => Ok(()),
                                    Ok(registerpb::Status::Invalid) => Err(Some(res.message)),
                                    _ => Err(None),
                                };
                                (
                                    s,
                                    r,
                                    match verdict {
                                        Ok(()) => Ok(()),
                                        Err(Some(m)) => Err(format!("invalid:{m}")),
                                        Err(None) => Err(format!(
                                            "retry: status {} owner {:?}",
                                            res.status, res.owner
                                        )),
                                    },
                                )
                            })
                            .collect()
                    }
                    Err(e) => batch
                        .into_iter()
                        .map(|(s, r)| (s, r, Err(format!("register {owner}: {}", e.message()))))
                        .collect(),
                }
            }
        });
        for (s, reply, outcome) in futures::future::join_all(calls).await.into_iter().flatten() {
            match outcome {
                Ok(()) => {
                    let _ = reply.send(Ok(()));
                }
                Err(m) if m.starts_with("invalid:") => {
                    let _ = reply.send(Err(m));
                }
                Err(m) => retry.push((s, reply, m)),
            }
        }
        if retry.is_empty() {
            return;
        }
        if tokio::time::Instant::now() + delay > deadline {
            for (_, reply, m) in retry {
                let _ = reply.send(Err(m));
            }
            return;
        }
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(Duration::from_millis(500));
        items = retry.into_iter().map(|(s, r, _)| (s, r)).collect();
    }
}

async fn attach_loop(
    room_id: String,
    routes: Arc<Routes>,
    mut rx: mpsc::Receiver<(SessionInfo, AttachReply)>,
    shutdown: CancellationToken,
) {
    let inflight = Arc::new(tokio::sync::Semaphore::new(ATTACH_INFLIGHT));
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            f = rx.recv() => match f { Some(f) => f, None => return },
        };
        // While every slot is busy, logins queue up and leave together in the next batch: a
        // reconnect storm becomes a few large Attach calls instead of thousands of tiny ones
        // (each a gRPC call and a blocking write on the register). At low load a slot is free
        // and the login goes out at once.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = inflight.clone().acquire_owned() => p.expect("the semaphore is never closed"),
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        // A few batches run concurrently so one slow register does not hold up every login.
        let (room_id, routes) = (room_id.clone(), routes.clone());
        tokio::spawn(async move {
            attach_batch(&room_id, &routes, batch).await;
            drop(permit);
        });
    }
}

async fn detach_loop(
    room_id: String,
    routes: Arc<Routes>,
    mut rx: mpsc::Receiver<SessionInfo>,
    shutdown: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            _ = shutdown.cancelled() => return,
            f = rx.recv() => match f { Some(f) => f, None => return },
        };
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(x) => batch.push(x),
                Err(_) => break,
            }
        }
        // A few attempts; what still fails is repaired by the next digest.
        let mut delay = Duration::from_millis(50);
        for _ in 0..5 {
            let map = routes.map();
            let mut by_owner: HashMap<String, Vec<SessionInfo>> = HashMap::new();
            for s in batch.drain(..) {
                let owner = map
                    .owner_of(&s.app, &s.user)
                    .unwrap_or_default()
                    .to_string();
                by_owner.entry(owner).or_default().push(s);
            }
            for (owner, sessions) in by_owner {
                let Some(mut client) = routes.client(&owner) else {
                    batch.extend(sessions);
                    continue;
                };
                let req = registerpb::DetachRequest {
                    epoch: map.epoch,
                    sessions: sessions
                        .iter()
                        .map(|s| registerpb::SessionKey {
                            app: s.app.clone(),
                            user: s.user.clone(),
                            room_id: room_id.clone(),
                            conn_id: s.conn_id,
                        })
                        .collect(),
                };
                match client.detach(req).await {
                    Ok(resp) => {
                        let results = resp.into_inner().results;
                        for (i, s) in sessions.into_iter().enumerate() {
                            let st = results.get(i).map_or(2, |r| r.status);
                            if st == registerpb::Status::WrongOwner as i32
                                || st == registerpb::Status::Unavailable as i32
                            {
                                batch.push(s);
                            }
                        }
                    }
                    Err(_) => batch.extend(sessions),
                }
            }
            if batch.is_empty() {
                break;
            }
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
    }
}

/// Replaces this room's sessions of `slot` at its owner. Returns whether it succeeded.
async fn sync_slot(hub: &Hub, routes: &Routes, slot: u16) -> bool {
    // A session that starts attaching (or closes) while a Sync is in flight may reach the
    // register before the Sync's older snapshot replaces it away: send it again until no change
    // happened around it. What still races after a few rounds is left to the next digest.
    for _ in 0..SYNC_ROUNDS {
        let before = hub.slot_version(slot);
        if !sync_slot_once(hub, routes, slot).await {
            return false;
        }
        if hub.slot_version(slot) == before {
            return true;
        }
    }
    true
}

/// Most Syncs of one slot in a row while its sessions keep changing.
const SYNC_ROUNDS: usize = 4;

/// Replaces this room's sessions of `slot` at its owner with a snapshot taken now.
async fn sync_slot_once(hub: &Hub, routes: &Routes, slot: u16) -> bool {
    let map = routes.map();
    let Some(owner) = map.owner(slot) else {
        return false;
    };
    let Some(mut client) = routes.client(owner) else {
        return false;
    };
    let sessions = hub
        .slot_sessions(slot)
        .iter()
        .map(|s| to_pb(&hub.room_id, s))
        .collect();
    let req = registerpb::SyncRequest {
        epoch: map.epoch,
        room_id: hub.room_id.clone(),
        slot: u32::from(slot),
        sessions,
    };
    match client.sync(req).await {
        Ok(r) => r
            .into_inner()
            .result
            .is_some_and(|r| r.status == registerpb::Status::Ok as i32),
        Err(e) => {
            tracing::debug!(slot, owner, "sync failed: {}", e.message());
            false
        }
    }
}

/// Syncs `slots` (bounded concurrency); returns the ones that failed.
async fn sync_slots(hub: &Hub, routes: &Routes, slots: Vec<u16>) -> Vec<u16> {
    use futures::StreamExt;
    futures::stream::iter(slots)
        .map(|s| async move { (s, sync_slot(hub, routes, s).await) })
        .buffer_unordered(32)
        .filter_map(|(s, ok)| async move { (!ok).then_some(s) })
        .collect()
        .await
}

/// Sends digests of every slot to its owner; returns the slots to Sync.
async fn digest_round(hub: &Hub, routes: &Routes) -> Vec<u16> {
    let map = routes.map();
    let mut ours: HashMap<u16, (u64, u64)> = HashMap::new();
    for s in hub.all_conns() {
        let e = ours.entry(s.slot).or_default();
        e.0 =
            e.0.wrapping_add(longlink_common::session_hash(&s.app, &s.user, s.id));
        e.1 += 1;
    }
    let mut by_owner: HashMap<String, Vec<registerpb::SlotDigest>> = HashMap::new();
    for slot in 0..SLOTS {
        let Some(owner) = map.owner(slot) else {
            continue;
        };
        let (digest, count) = ours.get(&slot).copied().unwrap_or_default();
        by_owner
            .entry(owner.to_string())
            .or_default()
            .push(registerpb::SlotDigest {
                slot: u32::from(slot),
                digest,
                count,
            });
    }
    let mut resync = Vec::new();
    for (owner, slots) in by_owner {
        let Some(mut client) = routes.client(&owner) else {
            continue;
        };
        let req = registerpb::DigestRequest {
            epoch: map.epoch,
            room_id: hub.room_id.clone(),
            slots,
        };
        if let Ok(resp) = client.digest(req).await {
            for m in resp.into_inner().mismatched {
                if m.result
                    .as_ref()
                    .is_some_and(|r| r.status == registerpb::Status::Ok as i32)
                {
                    resync.push(m.slot as u16);
                }
            }
        }
    }
    resync
}

/// Re-syncs slots assigned anew (another owner, or the same one again after a move we may not have
/// seen) as soon as the map moves, and sends digests periodically.
async fn sync_loop(hub: Arc<Hub>, routes: Arc<Routes>, shutdown: CancellationToken) {
    let mut map_rx = routes.map.clone();
    let mut addrs_rx = routes.addrs.clone();
    let mut last = routes.map();
    // Slots whose sync failed and must be retried.
    let mut owed: Vec<u16> = Vec::new();
    let digest_every = || Duration::from_secs(hub.limits().digest_interval_s.max(1));
    let mut next_digest = tokio::time::Instant::now() + Duration::from_millis(500);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            r = map_rx.changed() => {
                if r.is_err() { return; }
                let now = map_rx.borrow_and_update().clone();
                let moved: Vec<u16> = (0..SLOTS)
                    .filter(|s| now.assignment(*s) != last.assignment(*s) && now.owner(*s).is_some())
                    .collect();
                tracing::info!(epoch = now.epoch, moved = moved.len(), "slot map changed");
                last = now;
                owed.extend(moved);
            }
            r = addrs_rx.changed() => { if r.is_err() { return; } addrs_rx.borrow_and_update(); }
            _ = tokio::time::sleep_until(next_digest) => {
                let resync = digest_round(&hub, &routes).await;
                owed.extend(resync);
                next_digest = tokio::time::Instant::now() + digest_every();
            }
            _ = tokio::time::sleep(Duration::from_millis(200)), if !owed.is_empty() => {}
        }
        if !owed.is_empty() {
            owed.sort_unstable();
            owed.dedup();
            let todo = std::mem::take(&mut owed);
            owed = sync_slots(&hub, &routes, todo).await;
        }
    }
}

/// The slot of a session (for tests and tools).
pub fn slot_for(s: &SessionInfo) -> u16 {
    slot_of(&s.app, &s.user)
}

impl Registrar {
    pub fn room_id(&self) -> &str {
        &self.room_id
    }

    /// Starts re-syncing moved slots and sending digests for `hub`'s sessions.
    pub fn spawn_sync(&self, hub: Arc<Hub>, shutdown: CancellationToken) {
        tokio::spawn(sync_loop(hub, self.routes.clone(), shutdown));
    }
}
