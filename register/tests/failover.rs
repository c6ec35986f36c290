//! Failover with a real keeper, three `register` processes and a test room (this process) holding
//! 100k sessions and playing the room's part: it registers in discovery, attaches its sessions,
//! follows the slot map and re-sends (`Sync`) every slot that changed owner, and runs digest rounds.
//!
//! Checks: after kill -9 of the register that leads the slot controller, every session is found by
//! `Lookup` at its new owner within lease TTL + 2 s and no lookup ever answers "offline" for one of
//! the (always connected) sessions; afterwards every slot's digest matches; a register stopped with
//! SIGSTOP past its TTL refuses every write after SIGCONT until it has caught up with the map; when
//! the room leaves discovery its sessions are dropped. A second test restarts a register: it answers
//! nothing until the map names its new lease; then, with no owner changed in between, it serves its
//! stored sessions at once, and after a map change behind its back it discards them.

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use futures::StreamExt;
use keeper_sdk::Instance;
use keeper_sdk::Keeper;
use keeper_sdk::layout;
use longlink_common::Digest;
use longlink_common::SLOTS;
use longlink_common::SlotMap;
use longlink_common::slot_of;
use longlink_proto::registerpb::register_client::RegisterClient;
use longlink_proto::registerpb::*;
use nix::sys::signal::Signal;
use testkit::KeeperCluster;
use testkit::Process;
use testkit::wait_until;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

const TTL_S: u64 = 3;
const SESSIONS: usize = 100_000;
const ROOM: &str = "room-t";
/// How long the registers may take until every sampled lookup of a departed room's sessions
/// answers offline. Quiet, that takes ~16 s, of which the drop itself is ~2 s: until ~8 s the
/// slot map is still settling after the stale owner resumed (lookups answer WRONG_OWNER), and a
/// pass of ~1 000 lookups one by one against debug builds takes ~10 s. CI runs this next to the
/// other tests on two cores, where 20 s once did not suffice.
const DROP_TIMEOUT: Duration = Duration::from_secs(60);

/// The test room: a fixed set of connected sessions, indexed by slot.
struct Room {
    keeper: Keeper,
    sessions: Vec<Session>,
    by_slot: Vec<Vec<usize>>,
    clients: Mutex<HashMap<String, RegisterClient<Channel>>>,
    syncs: AtomicU64,
    /// The newest slot-map epoch whose moved slots this room has re-sent.
    synced_epoch: AtomicU64,
}

impl Room {
    fn new(keeper: Keeper, n: usize) -> Self {
        let sessions: Vec<Session> = (0..n)
            .map(|i| Session {
                app: "demo".into(),
                user: format!("user-{i}"),
                device: "phone".into(),
                room_id: ROOM.into(),
                conn_id: i as u64 + 1,
                ..Default::default()
            })
            .collect();
        let mut by_slot = vec![Vec::new(); usize::from(SLOTS)];
        for (i, s) in sessions.iter().enumerate() {
            by_slot[usize::from(slot_of(&s.app, &s.user))].push(i);
        }
        Self {
            keeper,
            sessions,
            by_slot,
            clients: Mutex::new(HashMap::new()),
            syncs: AtomicU64::new(0),
            synced_epoch: AtomicU64::new(0),
        }
    }

    async fn map(&self) -> SlotMap {
        loop {
            match self.keeper.get(layout::REGISTER_SLOTS_KEY).await {
                Ok(None) => return SlotMap::empty(),
                Ok(Some(kv)) => {
                    if let Ok(map) = kv.json::<SlotMap>() {
                        return map;
                    }
                }
                Err(_) => {}
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// A client for register `id`, from its address in discovery.
    async fn client(&self, id: &str) -> Option<RegisterClient<Channel>> {
        if let Some(c) = self.clients.lock().unwrap().get(id) {
            return Some(c.clone());
        }
        let kv = self
            .keeper
            .get(&layout::instance_key("register", id))
            .await
            .ok()??;
        let info: keeper_sdk::InstanceInfo = kv.json().ok()?;
        let addr = info.addrs.get("grpc")?.clone();
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(300))
            .timeout(Duration::from_secs(3))
            .connect_lazy();
        let c = RegisterClient::new(channel)
            .max_decoding_message_size(64 << 20)
            .max_encoding_message_size(64 << 20);
        self.clients
            .lock()
            .unwrap()
            .insert(id.to_string(), c.clone());
        Some(c)
    }

    fn slot_sessions(&self, slot: u16) -> Vec<Session> {
        self.by_slot[usize::from(slot)]
            .iter()
            .map(|i| self.sessions[*i].clone())
            .collect()
    }

    /// Sends every session of `slot` to its owner until it answers OK (re-reading the map on any
    /// refusal). Returns false if `stop` fires first.
    async fn sync_slot(&self, slot: u16, map: &SlotMap, stop: &CancellationToken) -> bool {
        let mut map = map.clone();
        let mut reread = false;
        while !stop.is_cancelled() {
            if reread {
                map = self.map().await;
            }
            let Some(owner) = map.owner(slot).map(str::to_string) else {
                return true;
            };
            // UNAVAILABLE (the owner has not applied this epoch yet): retry soon with the same
            // map; anything else: re-read the map first.
            reread = true;
            if let Some(mut c) = self.client(&owner).await {
                let req = SyncRequest {
                    epoch: map.epoch,
                    room_id: ROOM.into(),
                    slot: u32::from(slot),
                    sessions: self.slot_sessions(slot),
                };
                if let Ok(resp) = c.sync(req).await {
                    match resp.get_ref().result.as_ref().map(|r| r.status) {
                        Some(s) if s == Status::Ok as i32 => {
                            self.syncs.fetch_add(1, Ordering::Relaxed);
                            return true;
                        }
                        Some(s) if s == Status::Unavailable as i32 => reread = false,
                        _ => {}
                    }
                }
            }
            tokio::time::sleep(Duration::from_millis(if reread { 30 } else { 10 })).await;
        }
        false
    }

    /// Our digest of `slot`.
    fn digest(&self, slot: u16) -> Digest {
        let mut d = Digest::default();
        for i in &self.by_slot[usize::from(slot)] {
            let s = &self.sessions[*i];
            d.add(&s.app, &s.user, s.conn_id);
        }
        d
    }

    /// One digest round over every slot; returns the slots whose owner reported a mismatch.
    async fn digest_round(&self, map: &SlotMap) -> Vec<u16> {
        let mut by_owner: BTreeMap<String, Vec<SlotDigest>> = BTreeMap::new();
        for slot in 0..SLOTS {
            if let Some(owner) = map.owner(slot) {
                let d = self.digest(slot);
                by_owner
                    .entry(owner.to_string())
                    .or_default()
                    .push(SlotDigest {
                        slot: u32::from(slot),
                        digest: d.digest,
                        count: d.count,
                    });
            }
        }
        let mut mismatched = Vec::new();
        for (owner, slots) in by_owner {
            let Some(mut c) = self.client(&owner).await else {
                continue;
            };
            let req = DigestRequest {
                epoch: map.epoch,
                room_id: ROOM.into(),
                slots,
            };
            if let Ok(resp) = c.digest(req).await {
                for m in &resp.get_ref().mismatched {
                    if m.result.as_ref().map(|r| r.status) == Some(Status::Ok as i32) {
                        mismatched.push(m.slot as u16);
                    }
                }
            }
        }
        mismatched
    }

    /// Attaches every session, retrying refused items at their current owner.
    async fn attach_all(&self) {
        let mut pending: Vec<usize> = (0..self.sessions.len()).collect();
        let deadline = Instant::now() + Duration::from_secs(60);
        while !pending.is_empty() {
            assert!(
                Instant::now() < deadline,
                "{} sessions never attached",
                pending.len()
            );
            let map = self.map().await;
            let mut by_owner: BTreeMap<String, Vec<usize>> = BTreeMap::new();
            for i in &pending {
                let s = &self.sessions[*i];
                if let Some(o) = map.owner_of(&s.app, &s.user) {
                    by_owner.entry(o.to_string()).or_default().push(*i);
                }
            }
            let mut still = Vec::new();
            for (owner, items) in by_owner {
                let Some(mut c) = self.client(&owner).await else {
                    still.extend(items);
                    continue;
                };
                for chunk in items.chunks(5_000) {
                    let req = AttachRequest {
                        epoch: map.epoch,
                        sessions: chunk.iter().map(|i| self.sessions[*i].clone()).collect(),
                    };
                    match c.attach(req).await {
                        Ok(resp) => {
                            for (i, r) in chunk.iter().zip(&resp.get_ref().results) {
                                if r.status != Status::Ok as i32 {
                                    still.push(*i);
                                }
                            }
                        }
                        Err(_) => still.extend_from_slice(chunk),
                    }
                }
            }
            pending = still;
            if !pending.is_empty() {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }

    /// Looks up `pending` sessions' users at their owners; removes the found ones and returns how
    /// many lookups answered "offline" (OK without this session).
    async fn lookup_pass(&self, pending: &mut Vec<usize>) -> u64 {
        let map = self.map().await;
        let mut by_owner: BTreeMap<String, Vec<usize>> = BTreeMap::new();
        for i in pending.iter() {
            let s = &self.sessions[*i];
            if let Some(o) = map.owner_of(&s.app, &s.user) {
                by_owner.entry(o.to_string()).or_default().push(*i);
            }
        }
        let mut calls = Vec::new();
        for (owner, items) in by_owner {
            let Some(c) = self.client(&owner).await else {
                continue;
            };
            for chunk in items.chunks(2_000) {
                let mut c = c.clone();
                let chunk = chunk.to_vec();
                let users: Vec<User> = chunk
                    .iter()
                    .map(|i| User {
                        app: "demo".into(),
                        user: self.sessions[*i].user.clone(),
                    })
                    .collect();
                let epoch = map.epoch;
                calls.push(async move {
                    let resp = c.lookup_batch(LookupBatchRequest { epoch, users }).await;
                    (chunk, resp)
                });
            }
        }
        let results: Vec<_> = futures::stream::iter(calls)
            .buffer_unordered(8)
            .collect()
            .await;
        let mut found = std::collections::HashSet::new();
        let mut offline = 0;
        for (chunk, resp) in results {
            let Ok(resp) = resp else { continue };
            for (i, r) in chunk.iter().zip(&resp.get_ref().results) {
                if r.result.as_ref().map(|r| r.status) != Some(Status::Ok as i32) {
                    continue;
                }
                if r.sessions
                    .iter()
                    .any(|s| s.conn_id == self.sessions[*i].conn_id)
                {
                    found.insert(*i);
                } else {
                    offline += 1;
                }
            }
        }
        pending.retain(|i| !found.contains(i));
        offline
    }
}

/// The room's background loop: sync every slot whose owner changed, and a digest round per second.
async fn room_loop(room: Arc<Room>, stop: CancellationToken) {
    let mut synced = SlotMap::empty();
    let mut watch = room
        .keeper
        .watch_prefix(layout::REGISTER_SLOTS_KEY, 0)
        .await
        .expect("watch slot map");
    let mut digest_every = tokio::time::interval(Duration::from_secs(1));
    while !stop.is_cancelled() {
        let map = room.map().await;
        if map.epoch != synced.epoch {
            let moved: Vec<u16> = (0..SLOTS)
                .filter(|s| map.owner(*s).is_some() && map.owner(*s) != synced.owner(*s))
                .collect();
            let results: Vec<bool> = futures::stream::iter(moved)
                .map(|slot| {
                    let (room, stop, map) = (room.clone(), stop.clone(), map.clone());
                    async move { room.sync_slot(slot, &map, &stop).await }
                })
                .buffer_unordered(32)
                .collect()
                .await;
            if results.iter().all(|ok| *ok) {
                room.synced_epoch.store(map.epoch, Ordering::Relaxed);
                synced = map;
            }
            continue;
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = watch.next() => {}
            _ = digest_every.tick() => {
                for slot in room.digest_round(&map).await {
                    room.sync_slot(slot, &map, &stop).await;
                }
            }
        }
    }
}

fn start_register(dir: &std::path::Path, id: &str, endpoints: &[String]) -> Process {
    start_register_ttl(dir, id, endpoints, TTL_S)
}

fn start_register_ttl(
    dir: &std::path::Path,
    id: &str,
    endpoints: &[String],
    ttl_s: u64,
) -> Process {
    let port = testkit::free_port();
    let args: Vec<String> = [
        "--id",
        id,
        "--listen",
        &format!("127.0.0.1:{port}"),
        "--data-dir",
        &dir.join(id).display().to_string(),
        "--keeper",
        &endpoints.join(","),
        "--lease-ttl-s",
        &ttl_s.to_string(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    Process::start(
        id,
        &testkit::bin("register"),
        &args,
        &dir.join(format!("{id}.log")),
        &[],
    )
    .expect("start register")
}

fn counts(map: &SlotMap) -> BTreeMap<String, usize> {
    let mut c = BTreeMap::new();
    for o in &map.slots {
        *c.entry(o.clone()).or_default() += 1;
    }
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill9_failover_and_stale_owner() -> anyhow::Result<()> {
    let cluster = KeeperCluster::start(&testkit::bin("keeper"), 1, "").await?;
    let endpoints = cluster.endpoints();
    let keeper = Keeper::connect(&endpoints).await?;
    let registration = keeper
        .register(
            "room",
            Instance {
                id: ROOM.into(),
                addrs: BTreeMap::from([("grpc".into(), "127.0.0.1:1".into())]),
                ..Default::default()
            },
        )
        .await?;
    let room = Arc::new(Room::new(keeper.clone(), SESSIONS));
    let stop = CancellationToken::new();
    let _stop_guard = stop.clone().drop_guard();
    tokio::spawn(room_loop(room.clone(), stop.clone()));

    let dir = tempfile::tempdir()?;
    let mut procs: BTreeMap<String, Process> = ["r1", "r2", "r3"]
        .iter()
        .map(|id| (id.to_string(), start_register(dir.path(), id, &endpoints)))
        .collect();

    wait_until(
        "slots balanced over r1, r2, r3",
        Duration::from_secs(40),
        || {
            let room = room.clone();
            async move {
                let c = counts(&room.map().await);
                let ok = ["r1", "r2", "r3"]
                    .iter()
                    .all(|id| (341..=342).contains(c.get(*id).unwrap_or(&0)));
                ok.then_some(())
            }
        },
    )
    .await?;
    room.attach_all().await;
    let mut pending: Vec<usize> = (0..SESSIONS).collect();
    let offline_before = room.lookup_pass(&mut pending).await;
    assert_eq!(
        offline_before, 0,
        "lookups answered offline before any fault"
    );
    assert!(
        pending.is_empty(),
        "{} sessions not found before the fault",
        pending.len()
    );

    // Kill the register that leads the slot controller: both the controller and a third of the
    // slots must fail over.
    let leader = keeper
        .leader(register::controller::ELECTION)
        .await?
        .expect("a slot controller leads");
    let before = room.map().await;
    let moved_slots = counts(&before)[&leader];
    procs.get_mut(&leader).unwrap().kill9();
    let killed_at = Instant::now();

    let mut pending: Vec<usize> = (0..SESSIONS).collect();
    let mut offline = 0;
    let mut passes = 0;
    let mut map_moved_after = None;
    while !pending.is_empty() && killed_at.elapsed() < Duration::from_secs(30) {
        if map_moved_after.is_none() && room.map().await.epoch > before.epoch {
            map_moved_after = Some(killed_at.elapsed());
        }
        let t = killed_at.elapsed();
        offline += room.lookup_pass(&mut pending).await;
        passes += 1;
        if std::env::var("FAILOVER_TRACE").is_ok() {
            eprintln!(
                "pass {passes} at {t:?} took {:?}: {} pending, room synced epoch {}",
                killed_at.elapsed() - t,
                pending.len(),
                room.synced_epoch.load(Ordering::Relaxed)
            );
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    let recovered = killed_at.elapsed();
    let after = room.map().await;
    assert!(
        pending.is_empty(),
        "{} sessions still not found {recovered:?} after kill -9 of {leader}",
        pending.len()
    );
    assert_eq!(
        offline, 0,
        "lookups answered offline for connected sessions during failover"
    );
    assert!(after.owner(0).is_some() && !after.slots.contains(&leader));
    assert!(
        recovered <= Duration::from_secs(TTL_S + 2),
        "failover of {moved_slots} slots took {recovered:?} (> TTL {TTL_S}s + 2s); map moved after {map_moved_after:?}; {passes} lookup passes"
    );
    eprintln!(
        "failover: {moved_slots} slots, map moved after {map_moved_after:?}, every session found after {recovered:?} ({passes} passes)"
    );

    // Anti-entropy agrees: every owner holds exactly the room's sessions.
    let map = room.map().await;
    assert!(
        room.digest_round(&map).await.is_empty(),
        "digests mismatch after failover"
    );

    // Stale owner: stop one survivor past its TTL, let its slots move, resume it, and write to
    // it with the epoch it last knew.
    let stale = after
        .slots
        .iter()
        .find(|o| !o.is_empty())
        .cloned()
        .expect("an owner");
    let stale_epoch = after.epoch;
    let stale_slot = (0..SLOTS)
        .find(|s| {
            after.owner(*s) == Some(stale.as_str()) && !room.by_slot[usize::from(*s)].is_empty()
        })
        .expect("a populated slot of the stale owner");
    let mut stale_client = room.client(&stale).await.expect("stale owner's client");
    let p = procs.get_mut(&stale).unwrap();
    p.signal(Signal::SIGSTOP)?;
    let moved = wait_until(
        "the stopped register's slots to move",
        Duration::from_secs(20),
        || {
            let room = room.clone();
            let stale = stale.clone();
            async move {
                let m = room.map().await;
                (!m.slots.contains(&stale)).then_some(m.epoch)
            }
        },
    )
    .await;
    let moved_epoch = match moved {
        Ok(e) => e,
        Err(e) => {
            let _ = procs[&stale].signal(Signal::SIGCONT);
            return Err(e);
        }
    };
    procs[&stale].signal(Signal::SIGCONT)?;

    let i = room.by_slot[usize::from(stale_slot)][0];
    let s = room.sessions[i].clone();
    let mut refused = 0;
    let mut writes = 0;
    let resumed = Instant::now();
    while resumed.elapsed() < Duration::from_millis(1_500) {
        let mut fresh = s.clone();
        fresh.conn_id = 10_000_000 + writes;
        let mut results = Vec::new();
        if let Ok(r) = stale_client
            .attach(AttachRequest {
                epoch: stale_epoch,
                sessions: vec![fresh],
            })
            .await
        {
            results.extend(r.into_inner().results);
        }
        if let Ok(r) = stale_client
            .detach(DetachRequest {
                epoch: stale_epoch,
                sessions: vec![SessionKey {
                    app: s.app.clone(),
                    user: s.user.clone(),
                    room_id: ROOM.into(),
                    conn_id: s.conn_id,
                }],
            })
            .await
        {
            results.extend(r.into_inner().results);
        }
        if let Ok(r) = stale_client
            .sync(SyncRequest {
                epoch: stale_epoch,
                room_id: ROOM.into(),
                slot: u32::from(stale_slot),
                sessions: vec![],
            })
            .await
        {
            results.extend(r.into_inner().result);
        }
        for r in results {
            writes += 1;
            if r.status == Status::Ok as i32 {
                // Only a register that caught up (and was given the slot back) may accept.
                assert!(
                    r.epoch > moved_epoch,
                    "stale owner {stale} accepted a write at epoch {} (its slots moved at {moved_epoch})",
                    r.epoch
                );
            } else {
                refused += 1;
            }
        }
    }
    assert!(
        writes > 0 && refused > 0,
        "no write reached the resumed register"
    );
    eprintln!("stale owner: {refused} of {writes} writes refused after SIGCONT");

    // The room goes away (its instance key is deleted): every register drops its sessions, so
    // lookups answer offline.
    stop.cancel();
    registration.shutdown().await?;
    let sample: Vec<usize> = (0..SESSIONS).step_by(97).collect();
    let departed = Instant::now();
    // What the last pass saw, for the error if the sessions are never all dropped.
    let seen = Arc::new(Mutex::new(String::from("no pass finished")));
    wait_until(
        "the departed room's sessions to be dropped",
        DROP_TIMEOUT,
        || {
            let room = room.clone();
            let sample = sample.clone();
            let seen = seen.clone();
            async move {
                let outcome = async {
                    let map = room.map().await;
                    for i in &sample {
                        let s = &room.sessions[*i];
                        let owner = map
                            .owner_of(&s.app, &s.user)
                            .ok_or(format!("no owner for session {i} in map {}", map.epoch))?;
                        let mut c = room
                            .client(owner)
                            .await
                            .ok_or(format!("no client for register {owner}"))?;
                        let r = c
                            .lookup(LookupRequest {
                                epoch: map.epoch,
                                app: s.app.clone(),
                                user: s.user.clone(),
                            })
                            .await
                            .map_err(|e| format!("lookup {i} on register {owner}: {e}"))?
                            .into_inner();
                        let status = r.result.map(|r| r.status);
                        if status != Some(Status::Ok as i32) || !r.sessions.is_empty() {
                            return Err(format!(
                                "session {i} on register {owner} (map {}): status {status:?}, {} sessions",
                                map.epoch,
                                r.sessions.len()
                            ));
                        }
                    }
                    Ok(())
                }
                .await;
                outcome.map_err(|e| *seen.lock().unwrap() = e).ok()
            }
        },
    )
    .await
    .with_context(|| format!("last seen: {}", seen.lock().unwrap()))?;
    eprintln!(
        "departed room: every sampled lookup answered offline after {:?}",
        departed.elapsed()
    );
    Ok(())
}

/// A keeper, the test room registered in discovery, and its background loop.
async fn room_setup(
    n: usize,
) -> anyhow::Result<(
    KeeperCluster,
    Arc<Room>,
    keeper_sdk::Registration,
    CancellationToken,
)> {
    let cluster = KeeperCluster::start(&testkit::bin("keeper"), 1, "").await?;
    let keeper = Keeper::connect(&cluster.endpoints()).await?;
    let registration = keeper
        .register(
            "room",
            Instance {
                id: ROOM.into(),
                addrs: BTreeMap::from([("grpc".into(), "127.0.0.1:1".into())]),
                ..Default::default()
            },
        )
        .await?;
    let room = Arc::new(Room::new(keeper, n));
    let stop = CancellationToken::new();
    tokio::spawn(room_loop(room.clone(), stop.clone()));
    Ok((cluster, room, registration, stop))
}

async fn stats(room: &Room, id: &str) -> Option<StatsResponse> {
    let mut c = room.client(id).await?;
    Some(c.stats(StatsRequest {}).await.ok()?.into_inner())
}

/// Waits until r1 (perhaps restarted on another port: the client is looked up again each time)
/// answers Stats with a state that `ok` accepts.
async fn r1_stats(
    room: &Arc<Room>,
    what: &str,
    ok: impl Fn(&StatsResponse) -> bool,
) -> anyhow::Result<StatsResponse> {
    wait_until(what, Duration::from_secs(30), || {
        let room = room.clone();
        let ok = &ok;
        async move {
            room.clients.lock().unwrap().clear();
            let s = stats(&room, "r1").await?;
            ok(&s).then_some(s)
        }
    })
    .await
}

/// r1's answer to a lookup of the room's first session, routed by `epoch`.
async fn r1_lookup(room: &Room, epoch: u64) -> anyhow::Result<LookupResponse> {
    let s = &room.sessions[0];
    let mut c = room.client("r1").await.expect("client");
    Ok(c.lookup(LookupRequest {
        epoch,
        app: s.app.clone(),
        user: s.user.clone(),
    })
    .await?
    .into_inner())
}

/// The lease TTL of the restart test: long enough that the restarted register is certainly up
/// before its previous lease (and that lease's controller election key) expires.
const RESTART_TTL_S: u64 = 12;

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn restart_holds_slots_until_the_map_names_the_new_lease_then_keeps_or_discards_data()
-> anyhow::Result<()> {
    const N: usize = 5_000;
    let (cluster, room, _registration, stop) = room_setup(N).await?;
    let _stop_guard = stop.clone().drop_guard();
    let endpoints = cluster.endpoints();
    let dir = tempfile::tempdir()?;
    let mut r1 = start_register_ttl(dir.path(), "r1", &endpoints, RESTART_TTL_S);
    r1_stats(&room, "r1 to own every slot, ready", |s| {
        s.owned_slots == u32::from(SLOTS) && s.rebuilding_slots == 0
    })
    .await?;
    room.attach_all().await;
    let before = room.map().await;
    let old_lease = *before
        .leases
        .get("r1")
        .expect("the controller names the owner's lease");

    // kill -9 and restart at once. r1 led the slot controller, so nobody can name its new lease
    // before its old election key expires: until then the map assigns every slot to the old
    // lease, and the new r1 must answer none of them (the old lease's expiry could move them).
    r1.kill9();
    let mut r1 = start_register_ttl(dir.path(), "r1", &endpoints, RESTART_TTL_S);
    let restarted = r1_stats(&room, "r1 serving again", |s| s.serving).await?;
    let held = r1_lookup(&room, before.epoch).await?;
    let slots = room
        .client("r1")
        .await
        .expect("client")
        .slot_status(SlotStatusRequest { slots: vec![0] })
        .await?
        .into_inner();
    // Read after the answers: if the map still names the old lease now, it did when r1 answered.
    assert_eq!(
        room.map().await.leases.get("r1"),
        Some(&old_lease),
        "r1 restarted slower than the {RESTART_TTL_S}s lease TTL; the held state cannot be checked"
    );
    assert_eq!(
        restarted.owned_slots, 0,
        "restarted r1 owns slots of its old lease"
    );
    let result = held.result.expect("result");
    assert_eq!(result.status, Status::Unavailable as i32, "{result:?}");
    assert!(result.message.contains("current lease"), "{result:?}");
    assert_eq!(slots.slots[0].state, "held");

    // Once the old election key expires r1 leads again and names its new lease. No owner changed
    // in between, so the stored sessions are served as they are, without a rebuild.
    let named = r1_stats(&room, "r1 owning its slots again", |s| {
        s.owned_slots == u32::from(SLOTS)
    })
    .await?;
    let after = room.map().await;
    assert_ne!(after.leases.get("r1"), Some(&old_lease));
    assert_eq!(after.slots, before.slots);
    assert_eq!(
        after.since, before.since,
        "a lease change moved assignments"
    );
    assert_eq!(
        named.rebuilding_slots, 0,
        "no owner changed: slots are served at once"
    );
    let mut pending: Vec<usize> = (0..N).collect();
    assert_eq!(room.lookup_pass(&mut pending).await, 0);
    assert!(
        pending.is_empty(),
        "{} stored sessions lost across restart",
        pending.len()
    );

    // Stop it, move the map to a newer epoch behind its back, and restart: the stored data is
    // stale and must not be served (lookups say unavailable, not the old sessions).
    stop.cancel();
    r1.terminate(Duration::from_secs(10))?;
    let mut map = room.map().await;
    map.epoch += 5;
    room.keeper
        .put(layout::REGISTER_SLOTS_KEY, serde_json::to_vec(&map)?)
        .await?;
    let _r1 = start_register_ttl(dir.path(), "r1", &endpoints, RESTART_TTL_S);
    let restarted = r1_stats(&room, "r1 owning its slots after the epoch moved", |s| {
        s.owned_slots == u32::from(SLOTS)
    })
    .await?;
    // The stopped r1 resigned, so the new one leads at once and names its lease one epoch on.
    assert_eq!(restarted.epoch, map.epoch + 1);
    assert_eq!(restarted.rebuilding_slots, u32::from(SLOTS));
    let r = r1_lookup(&room, map.epoch).await?;
    assert_eq!(
        r.result.map(|r| r.status),
        Some(Status::Unavailable as i32),
        "stale stored sessions served after an epoch change: {:?}",
        r.sessions
    );
    Ok(())
}
