//! The register workload: test rooms that play a room's part against real `register` processes
//! (discovery entry, Attach / Detach of churning sessions, Sync of every slot whose owner
//! changed, a Digest round every second), and lookup clients. Every request is recorded as a
//! [`SessionOp`]; the rooms' own session sets are the truth the checker compares against.

use std::collections::BTreeMap;
use std::collections::BTreeSet;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use futures::StreamExt;
use longlink_common::SLOTS;
use longlink_common::SlotMap;
use longlink_common::slot_of;
use longlink_proto::registerpb;
use longlink_proto::registerpb::register_client::RegisterClient;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;
use tonic::transport::Endpoint;

use crate::history::Entry;
use crate::history::Outcome;
use crate::history::Recorder;
use crate::history::SessionOp;
use crate::history::SessionOpKind;
use crate::keeperio;

/// The app every test session belongs to.
pub const APP: &str = "jepsen";

/// The name of user `i`.
pub fn user(i: usize) -> String {
    format!("u{i}")
}

/// The slot map as last read, and a client per register: what rooms and lookup clients route by.
pub struct Directory {
    keeper: Vec<String>,
    map: watch::Receiver<Arc<SlotMap>>,
    map_tx: watch::Sender<Arc<SlotMap>>,
    clients: Mutex<HashMap<String, RegisterClient<Channel>>>,
}

impl Directory {
    pub fn new(keeper: Vec<String>) -> Arc<Self> {
        let (map_tx, map) = watch::channel(Arc::new(SlotMap::empty()));
        Arc::new(Self {
            keeper,
            map,
            map_tx,
            clients: Mutex::new(HashMap::new()),
        })
    }

    /// The newest slot map read.
    pub fn map(&self) -> Arc<SlotMap> {
        self.map.borrow().clone()
    }

    /// Wakes when a newer map has been read.
    pub fn subscribe(&self) -> watch::Receiver<Arc<SlotMap>> {
        self.map.clone()
    }

    /// Re-reads the slot map every 50 ms until `stop` (a poll, not a watch: simple, and a
    /// room that learns of a change 50 ms late is a slow room, which is allowed).
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        let mut c = None;
        while !stop.is_cancelled() {
            if c.is_none() {
                c = keeperio::connect(&self.keeper).await.ok();
            }
            if let Some(client) = c.as_mut() {
                match keeperio::slot_map(client).await {
                    Ok(m) if m.epoch > self.map.borrow().epoch => {
                        let _ = self.map_tx.send(Arc::new(m));
                    }
                    Ok(_) => {}
                    Err(_) => c = None,
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(50)) => {}
            }
        }
    }

    /// A client of register `id` (its address from discovery).
    pub async fn client(&self, id: &str) -> Option<RegisterClient<Channel>> {
        if let Some(c) = self.clients.lock().expect("directory lock").get(id) {
            return Some(c.clone());
        }
        let mut k = keeperio::connect(&self.keeper).await.ok()?;
        let addr = keeperio::register_addr(&mut k, id).await.ok()??;
        let channel = Endpoint::from_shared(format!("http://{addr}"))
            .ok()?
            .connect_timeout(Duration::from_millis(500))
            .tcp_nodelay(true)
            .connect_lazy();
        let c = RegisterClient::new(channel);
        self.clients
            .lock()
            .expect("directory lock")
            .insert(id.to_string(), c.clone());
        Some(c)
    }
}

/// Settings shared by the workload's tasks.
#[derive(Clone)]
pub struct RegCtx {
    pub rec: Recorder,
    pub dir: Arc<Directory>,
    /// A request not answered within this is `unknown`.
    pub op_timeout: Duration,
    pub users: usize,
    pub seed: u64,
}

/// The register's answer to one item, for the history.
struct Answer {
    outcome: Outcome,
    status: Option<String>,
    answer_epoch: Option<u64>,
    error: Option<String>,
}

fn status_name(code: i32) -> String {
    registerpb::Status::try_from(code)
        .map(|s| s.as_str_name().to_ascii_lowercase())
        .unwrap_or_else(|_| format!("status-{code}"))
}

impl Answer {
    fn from_item(item: Option<&registerpb::ItemResult>) -> Self {
        match item {
            Some(r) => Self {
                outcome: if r.status == registerpb::Status::Ok as i32 {
                    Outcome::Ok
                } else {
                    Outcome::Fail
                },
                status: Some(status_name(r.status)),
                answer_epoch: Some(r.epoch),
                error: (!r.message.is_empty()).then(|| r.message.clone()),
            },
            None => Self {
                outcome: Outcome::Unknown,
                status: None,
                answer_epoch: None,
                error: Some("answer without a result".into()),
            },
        }
    }

    /// A gRPC error: `fail` only if the request provably never left (connect failure).
    fn from_error(e: &tonic::Status) -> Self {
        let msg = format!("{}: {}", e.code(), e.message());
        let never_sent = e.message().contains("tcp connect error")
            || e.message().contains("error trying to connect")
            || e.code() == tonic::Code::InvalidArgument;
        Self {
            outcome: if never_sent {
                Outcome::Fail
            } else {
                Outcome::Unknown
            },
            status: None,
            answer_epoch: None,
            error: Some(msg),
        }
    }

    /// The slot's owner has no known address: the request never left (`fail`).
    fn no_address(owner: &str) -> Self {
        Self {
            outcome: Outcome::Fail,
            status: None,
            answer_epoch: None,
            error: Some(format!("no address for owner {owner:?}")),
        }
    }

    fn timeout(limit: Duration) -> Self {
        Self {
            outcome: Outcome::Unknown,
            status: None,
            answer_epoch: None,
            error: Some(format!("no answer within {limit:?}")),
        }
    }
}

/// Runs `f` with the operation timeout.
async fn timed<T, F>(limit: Duration, f: F) -> Result<Result<T, tonic::Status>, ()>
where
    F: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    match tokio::time::timeout(limit, f).await {
        Ok(r) => Ok(r.map(tonic::Response::into_inner)),
        Err(_) => Err(()),
    }
}

/// Where a write went and what it was about.
struct Target<'a> {
    room: &'a str,
    user: &'a str,
    conn_id: u64,
    slot: u16,
    register: &'a str,
    epoch: u64,
}

/// Records a write (attach, detach, sync) and returns its outcome.
fn record_write(
    rec: &Recorder,
    client: u64,
    op: SessionOpKind,
    t: &Target<'_>,
    call_time: u64,
    answer: Answer,
    sessions: Option<usize>,
) -> Outcome {
    let outcome = answer.outcome;
    rec.entry(Entry::Session(SessionOp {
        client,
        op,
        room: t.room.to_string(),
        user: t.user.to_string(),
        conn_id: t.conn_id,
        slot: t.slot,
        register: t.register.to_string(),
        epoch: t.epoch,
        call_time,
        return_time: rec.now(),
        outcome,
        status: answer.status,
        answer_epoch: answer.answer_epoch,
        found: None,
        rebuilding: false,
        sessions,
        error: answer.error,
    }));
    outcome
}

/// The room id of the stale-owner probes (never in discovery, never attached).
pub const PROBE_ROOM: &str = "probe";

/// Sends harmless writes to *former* owners with the epoch they owned the slot at: a Detach of
/// a session that never existed. A register that lost the slot must refuse (R3); one that
/// accepts shows up in the history as an `OK` write with a stale answer epoch.
pub async fn stale_prober(ctx: RegCtx, stop: CancellationToken) -> usize {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ 0x5ca1e);
    let mut maps: Vec<Arc<SlotMap>> = Vec::new();
    let mut client = ctx.rec.client_id();
    let mut n = 0;
    while !stop.is_cancelled() {
        let current = ctx.dir.map();
        if maps.last().map(|m| m.epoch) != Some(current.epoch) {
            maps.push(current.clone());
        }
        if maps.len() >= 2 {
            let old = maps[rng.random_range(0..maps.len() - 1)].clone();
            let user = format!("p{}", rng.random_range(0..1_000_000));
            let slot = slot_of(APP, &user);
            if let Some(owner) = old.owner(slot).filter(|o| Some(*o) != current.owner(slot))
                && let Some(mut c) = ctx.dir.client(owner).await
            {
                let call_time = ctx.rec.now();
                let req = registerpb::DetachRequest {
                    epoch: old.epoch,
                    sessions: vec![registerpb::SessionKey {
                        app: APP.into(),
                        user: user.clone(),
                        room_id: PROBE_ROOM.into(),
                        conn_id: 0,
                    }],
                };
                let answer = match timed(ctx.op_timeout, c.detach(req)).await {
                    Ok(Ok(r)) => Answer::from_item(r.results.first()),
                    Ok(Err(e)) => Answer::from_error(&e),
                    Err(()) => Answer::timeout(ctx.op_timeout),
                };
                let target = Target {
                    room: PROBE_ROOM,
                    user: &user,
                    conn_id: 0,
                    slot,
                    register: owner,
                    epoch: old.epoch,
                };
                n += 1;
                if record_write(
                    &ctx.rec,
                    client,
                    SessionOpKind::Detach,
                    &target,
                    call_time,
                    answer,
                    None,
                ) == Outcome::Unknown
                {
                    client = ctx.rec.client_id();
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    n
}

/// A room played by the harness: its connections are the truth.
pub struct TestRoom {
    pub id: String,
    ctx: RegCtx,
    /// Open connections per slot, `(user, conn_id)`. A connection is added before its Attach
    /// is sent and removed before its Detach, as a room does: so a Sync always carries every
    /// session whose Attach may already have landed.
    local: Mutex<Vec<BTreeSet<(String, u64)>>>,
    /// Serialises Attach, Detach and Sync per slot: a Sync must not carry a snapshot older than
    /// a write that reached the register before it.
    slot_locks: Vec<tokio::sync::Mutex<()>>,
    next_conn: AtomicU64,
    /// The newest map epoch whose moved slots this room has re-sent.
    synced_epoch: AtomicU64,
}

impl TestRoom {
    pub fn new(id: &str, ctx: RegCtx) -> Arc<Self> {
        Arc::new(Self {
            id: id.to_string(),
            ctx,
            local: Mutex::new(vec![BTreeSet::new(); usize::from(SLOTS)]),
            slot_locks: (0..SLOTS).map(|_| tokio::sync::Mutex::new(())).collect(),
            next_conn: AtomicU64::new(1),
            synced_epoch: AtomicU64::new(0),
        })
    }

    /// The newest map epoch whose moved slots this room has re-sent.
    pub fn synced_epoch(&self) -> u64 {
        self.synced_epoch.load(Ordering::Relaxed)
    }

    /// Every open connection: `(user, conn_id)`.
    pub fn open(&self) -> Vec<(String, u64)> {
        self.local
            .lock()
            .expect("room lock")
            .iter()
            .flat_map(|s| s.iter().cloned())
            .collect()
    }

    fn slot_sessions(&self, slot: u16) -> Vec<registerpb::Session> {
        self.local.lock().expect("room lock")[usize::from(slot)]
            .iter()
            .map(|(u, c)| self.session(u, *c))
            .collect()
    }

    fn session(&self, user: &str, conn_id: u64) -> registerpb::Session {
        registerpb::Session {
            app: APP.into(),
            user: user.into(),
            device: format!("d-{user}"),
            room_id: self.id.clone(),
            conn_id,
            ..Default::default()
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn record(
        &self,
        client: u64,
        op: SessionOpKind,
        user: &str,
        conn_id: u64,
        slot: u16,
        register: &str,
        epoch: u64,
        call_time: u64,
        answer: Answer,
        sessions: Option<usize>,
    ) -> Outcome {
        let target = Target {
            room: &self.id,
            user,
            conn_id,
            slot,
            register,
            epoch,
        };
        record_write(
            &self.ctx.rec,
            client,
            op,
            &target,
            call_time,
            answer,
            sessions,
        )
    }

    /// Sends Sync for `slot` to its current owner until it answers OK. False if `stop` fired.
    async fn sync_slot(&self, slot: u16, stop: &CancellationToken) -> bool {
        let client = self.ctx.rec.client_id();
        while !stop.is_cancelled() {
            let map = self.ctx.dir.map();
            let Some(owner) = map.owner(slot).map(str::to_string) else {
                return true;
            };
            let Some(mut c) = self.ctx.dir.client(&owner).await else {
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            };
            let outcome = {
                let _guard = self.slot_locks[usize::from(slot)].lock().await;
                let sessions = self.slot_sessions(slot);
                let n = sessions.len();
                let call_time = self.ctx.rec.now();
                let req = registerpb::SyncRequest {
                    epoch: map.epoch,
                    room_id: self.id.clone(),
                    slot: u32::from(slot),
                    sessions,
                };
                let answer = match timed(self.ctx.op_timeout, c.sync(req)).await {
                    Ok(Ok(r)) => Answer::from_item(r.result.as_ref()),
                    Ok(Err(e)) => Answer::from_error(&e),
                    Err(()) => Answer::timeout(self.ctx.op_timeout),
                };
                self.record(
                    client,
                    SessionOpKind::Sync,
                    "",
                    0,
                    slot,
                    &owner,
                    map.epoch,
                    call_time,
                    answer,
                    Some(n),
                )
            };
            if outcome == Outcome::Ok {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(30)).await;
        }
        false
    }

    /// Our digest of `slot` (docs/register.md, "Digest").
    fn digest(&self, slot: u16) -> registerpb::SlotDigest {
        let local = self.local.lock().expect("room lock");
        let mut sum = 0u64;
        for (user, conn) in &local[usize::from(slot)] {
            let mut h = xxhash_rust::xxh3::Xxh3::new();
            h.update(APP.as_bytes());
            h.update(&[0]);
            h.update(user.as_bytes());
            h.update(&[0]);
            h.update(&conn.to_be_bytes());
            sum = sum.wrapping_add(h.digest());
        }
        registerpb::SlotDigest {
            slot: u32::from(slot),
            digest: sum,
            count: local[usize::from(slot)].len() as u64,
        }
    }

    /// One digest round over every owned slot; returns the slots an owner asked to Sync.
    async fn digest_round(&self, map: &SlotMap) -> Vec<u16> {
        let mut by_owner: BTreeMap<String, Vec<registerpb::SlotDigest>> = BTreeMap::new();
        for slot in 0..SLOTS {
            if let Some(owner) = map.owner(slot) {
                by_owner
                    .entry(owner.to_string())
                    .or_default()
                    .push(self.digest(slot));
            }
        }
        let mut mismatched = Vec::new();
        for (owner, slots) in by_owner {
            let Some(mut c) = self.ctx.dir.client(&owner).await else {
                continue;
            };
            let req = registerpb::DigestRequest {
                epoch: map.epoch,
                room_id: self.id.clone(),
                slots,
            };
            if let Ok(Ok(r)) = timed(self.ctx.op_timeout, c.digest(req)).await {
                for m in r.mismatched {
                    if m.result.map(|r| r.status) == Some(registerpb::Status::Ok as i32) {
                        mismatched.push(m.slot as u16);
                    }
                }
            }
        }
        mismatched
    }

    /// The room's background loop: Sync every slot assigned anew, owner or `since` (every owned
    /// slot at first), and a digest round every second, until `stop`.
    pub async fn follow(self: Arc<Self>, stop: CancellationToken) {
        let mut synced = SlotMap::empty();
        let mut changes = self.ctx.dir.subscribe();
        let mut digest_every = tokio::time::interval(Duration::from_secs(1));
        while !stop.is_cancelled() {
            let map = self.ctx.dir.map();
            if map.epoch != synced.epoch {
                let moved: Vec<u16> = (0..SLOTS)
                    .filter(|s| {
                        map.owner(*s).is_some() && map.assignment(*s) != synced.assignment(*s)
                    })
                    .collect();
                let done: Vec<bool> = futures::stream::iter(moved)
                    .map(|slot| {
                        let (room, stop) = (self.clone(), stop.clone());
                        async move { room.sync_slot(slot, &stop).await }
                    })
                    .buffer_unordered(16)
                    .collect()
                    .await;
                if done.iter().all(|ok| *ok) {
                    synced = (*map).clone();
                    self.synced_epoch.store(map.epoch, Ordering::Relaxed);
                }
                continue;
            }
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = changes.changed() => {}
                _ = digest_every.tick() => {
                    for slot in self.digest_round(&map).await {
                        self.sync_slot(slot, &stop).await;
                    }
                }
            }
        }
    }

    /// Opens a connection for a random user: adds it, then Attach at the owner. A refused or
    /// unanswered Attach closes the connection again (the device would be told to retry).
    async fn attach(&self, client: u64, rng: &mut StdRng) -> Option<Outcome> {
        let user = user(rng.random_range(0..self.ctx.users));
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        let slot = slot_of(APP, &user);
        let _guard = self.slot_locks[usize::from(slot)].lock().await;
        let map = self.ctx.dir.map();
        let owner = map.owner(slot)?.to_string();
        let mut c = self.ctx.dir.client(&owner).await?;
        self.local.lock().expect("room lock")[usize::from(slot)].insert((user.clone(), conn));
        let call_time = self.ctx.rec.now();
        let req = registerpb::AttachRequest {
            epoch: map.epoch,
            sessions: vec![self.session(&user, conn)],
        };
        let answer = match timed(self.ctx.op_timeout, c.attach(req)).await {
            Ok(Ok(r)) => Answer::from_item(r.results.first()),
            Ok(Err(e)) => Answer::from_error(&e),
            Err(()) => Answer::timeout(self.ctx.op_timeout),
        };
        let outcome = self.record(
            client,
            SessionOpKind::Attach,
            &user,
            conn,
            slot,
            &owner,
            map.epoch,
            call_time,
            answer,
            None,
        );
        if outcome != Outcome::Ok {
            self.local.lock().expect("room lock")[usize::from(slot)].remove(&(user, conn));
        }
        Some(outcome)
    }

    /// Closes a random open connection: removes it, then Detach at the owner.
    async fn detach(&self, client: u64, rng: &mut StdRng) -> Option<Outcome> {
        let open = self.open();
        if open.is_empty() {
            return None;
        }
        let (user, conn) = open[rng.random_range(0..open.len())].clone();
        let slot = slot_of(APP, &user);
        let _guard = self.slot_locks[usize::from(slot)].lock().await;
        if !self.local.lock().expect("room lock")[usize::from(slot)].remove(&(user.clone(), conn)) {
            return None;
        }
        let map = self.ctx.dir.map();
        let call_time = self.ctx.rec.now();
        let owner = map.owner(slot).unwrap_or_default().to_string();
        let answer = match self.ctx.dir.client(&owner).await {
            None => Answer::no_address(&owner),
            Some(mut c) => {
                let req = registerpb::DetachRequest {
                    epoch: map.epoch,
                    sessions: vec![registerpb::SessionKey {
                        app: APP.into(),
                        user: user.clone(),
                        room_id: self.id.clone(),
                        conn_id: conn,
                    }],
                };
                match timed(self.ctx.op_timeout, c.detach(req)).await {
                    Ok(Ok(r)) => Answer::from_item(r.results.first()),
                    Ok(Err(e)) => Answer::from_error(&e),
                    Err(()) => Answer::timeout(self.ctx.op_timeout),
                }
            }
        };
        Some(self.record(
            client,
            SessionOpKind::Detach,
            &user,
            conn,
            slot,
            &owner,
            map.epoch,
            call_time,
            answer,
            None,
        ))
    }

    /// Opens and closes connections until `stop`, keeping about `target` open. One request in
    /// flight; an `unknown` outcome retires the client id.
    pub async fn churn(
        self: Arc<Self>,
        worker: u64,
        target: usize,
        stop: CancellationToken,
    ) -> usize {
        let mut n = 0;
        let mut rng = StdRng::seed_from_u64(self.ctx.seed ^ (worker + 7).wrapping_mul(0x9e37_79b9));
        let mut client = self.ctx.rec.client_id();
        while !stop.is_cancelled() {
            let open = self.open().len();
            let attach = open < target / 2 || (open < target * 2 && rng.random_bool(0.55));
            let done = if attach {
                self.attach(client, &mut rng).await
            } else {
                self.detach(client, &mut rng).await
            };
            n += usize::from(done.is_some());
            let pause = match done {
                Some(Outcome::Unknown) => {
                    client = self.ctx.rec.client_id();
                    100
                }
                Some(Outcome::Fail) => 100,
                Some(Outcome::Ok) => rng.random_range(5..30),
                None => 50,
            };
            tokio::time::sleep(Duration::from_millis(pause)).await;
        }
        n
    }
}

/// Looks up user `user` at the owner of its slot in the current map and records the answer.
pub async fn lookup(ctx: &RegCtx, client: u64, user: &str) -> SessionOp {
    let slot = slot_of(APP, user);
    // The call time is taken before the map is read: every write that returned before it was
    // routed by this map or an older one (the directory is shared and only moves forward).
    let call_time = ctx.rec.now();
    let map = ctx.dir.map();
    let owner = map.owner(slot).unwrap_or_default().to_string();
    let mut found = None;
    let mut rebuilding = false;
    let answer = match ctx.dir.client(&owner).await {
        None => Answer::no_address(&owner),
        Some(mut c) => {
            let req = registerpb::LookupRequest {
                epoch: map.epoch,
                app: APP.into(),
                user: user.into(),
            };
            match timed(ctx.op_timeout, c.lookup(req)).await {
                Ok(Ok(r)) => {
                    let a = Answer::from_item(r.result.as_ref());
                    if a.outcome == Outcome::Ok {
                        let mut f: Vec<String> = r
                            .sessions
                            .iter()
                            .map(|s| format!("{}/{}", s.room_id, s.conn_id))
                            .collect();
                        f.sort();
                        found = Some(f);
                        rebuilding = r.rebuilding;
                    }
                    a
                }
                Ok(Err(e)) => Answer::from_error(&e),
                Err(()) => Answer::timeout(ctx.op_timeout),
            }
        }
    };
    let op = SessionOp {
        client,
        op: SessionOpKind::Lookup,
        room: String::new(),
        user: user.into(),
        conn_id: 0,
        slot,
        register: owner,
        epoch: map.epoch,
        call_time,
        return_time: ctx.rec.now(),
        outcome: answer.outcome,
        status: answer.status,
        answer_epoch: answer.answer_epoch,
        found,
        rebuilding,
        sessions: None,
        error: answer.error,
    };
    ctx.rec.entry(Entry::Session(op.clone()));
    op
}

/// A lookup client: random users until `stop`.
pub async fn lookup_client(ctx: RegCtx, worker: u64, stop: CancellationToken) -> usize {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (worker + 99).wrapping_mul(0x9e37_79b9));
    let mut client = ctx.rec.client_id();
    let mut n = 0;
    while !stop.is_cancelled() {
        let u = user(rng.random_range(0..ctx.users));
        let op = lookup(&ctx, client, &u).await;
        n += 1;
        if op.outcome == Outcome::Unknown {
            client = ctx.rec.client_id();
        }
        let pause = if op.outcome == Outcome::Ok {
            rng.random_range(2..15)
        } else {
            50
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    n
}
