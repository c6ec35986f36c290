//! The room's live state: every authenticated connection, indexed by id, by (app, user), by app
//! (for broadcast) and by register slot (for Sync and Digest); QoS 1 messages pending an ack and
//! the sessions waiting to be resumed; the counters behind `Stats`. Locks here are std locks,
//! held for map operations only and never across an `.await`.

use std::collections::HashMap;
use std::collections::HashSet;
use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::RwLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use bytes::Bytes;
use futures::future::BoxFuture;
use longlink_client::Frame;
use longlink_common::AppsConfig;
use longlink_common::SLOTS;
use longlink_common::slot_of;
use longlink_proto::clientpb;
use smallvec::SmallVec;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::auth::Identity;
use crate::config::RoomLimits;
use crate::error::code;
use crate::outbox::Closing;
use crate::outbox::Outbox;
use crate::outbox::PushError;

/// A session as the register stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SessionInfo {
    pub app: String,
    pub user: String,
    pub device: String,
    pub conn_id: u64,
    pub connected_at_ms: i64,
    pub client_ip: String,
    pub platform: String,
}

/// Where sessions are registered (the register cluster); absent in keeper-less tests.
pub trait Sessions: Send + Sync {
    /// Registers a new session; an error refuses the connection with `unavailable`.
    fn attach(&self, session: SessionInfo) -> BoxFuture<'static, Result<(), String>>;
    /// Forgets a closed session (batched, retried in the background).
    fn detach(&self, session: SessionInfo);
}

/// What a device did, as the coordinator hook hears it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EventKind {
    /// An uplink frame's payload (JSON text by convention).
    Uplink(Vec<u8>),
    /// The session was welcomed.
    Online,
    /// The session ended, with why (`closed`, `closed_by_room`).
    Offline(String),
}

/// One device event, handed to the coordinator hook ([`crate::coordinator`] reports it to
/// center, which forwards it to the app's webhook).
#[derive(Debug, Clone)]
pub struct DeviceEvent {
    pub app: String,
    pub user: String,
    pub device: String,
    pub conn_id: u64,
    pub ts_ms: i64,
    pub kind: EventKind,
}

/// A QoS 1 message sent or queued but not acked.
#[derive(Debug, Clone)]
struct Pending {
    id: String,
    /// The encoded `message` frame, resent as is.
    frame: Bytes,
}

/// One authenticated connection.
pub struct Conn {
    pub id: u64,
    pub app: Arc<str>,
    pub user: Arc<str>,
    /// Empty when the token had no `dev` claim.
    pub device: Arc<str>,
    /// Empty when the token had no `plat` claim.
    pub platform: Arc<str>,
    pub slot: u16,
    pub ip: IpAddr,
    pub connected_at_ms: i64,
    /// WebSocket (true) or TCP: a kick's reconnect list must name the same transport.
    pub ws: bool,
    pub outbox: Outbox,
    /// Oldest first; capped by `max_pending_qos1` (the oldest is dropped and counted beyond it).
    pending: Mutex<VecDeque<Pending>>,
    /// When the device last sent a frame, in ms of the hub's clock ([`Hub::heard`]); the hub's
    /// sweeper closes connections silent for 3 heartbeats. A shared sweep instead of a timer in
    /// every connection's task keeps idle connections small.
    last_heard_ms: AtomicU64,
}

impl Conn {
    pub fn session(&self) -> SessionInfo {
        SessionInfo {
            app: self.app.to_string(),
            user: self.user.to_string(),
            device: self.device.to_string(),
            conn_id: self.id,
            connected_at_ms: self.connected_at_ms,
            client_ip: self.ip.to_string(),
            platform: self.platform.to_string(),
        }
    }
}

/// Counters reported by `Stats` and exported as metrics.
#[derive(Default)]
pub struct Stats {
    pub bytes_in: AtomicU64,
    pub bytes_out: AtomicU64,
    pub messages_out: AtomicU64,
    pub acks: AtomicU64,
    pub uplinks: AtomicU64,
    pub uplink_drops: AtomicU64,
    /// Online/offline events dropped because the coordinator queue was full.
    pub presence_drops: AtomicU64,
    /// Events the coordinator gave up on after its bounded retries.
    pub events_failed: AtomicU64,
    pub auth_failures: AtomicU64,
    pub slow_consumers: AtomicU64,
    pub queue_drops: AtomicU64,
    pub pending_drops: AtomicU64,
    pub rejected: AtomicU64,
}

impl Stats {
    pub fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }
}

#[derive(Default)]
struct Registry {
    conns: HashMap<u64, Arc<Conn>>,
    /// Authenticated connections whose Attach is in flight: in `by_slot` (a Sync of their slot
    /// must not drop them from the register) but not reachable by pushes before `welcome`.
    attaching: HashMap<u64, Arc<Conn>>,
    /// Per app, its users' connections; the app id is held once per app.
    by_app: HashMap<Arc<str>, AppIndex>,
    by_slot: HashMap<u16, HashSet<u64>>,
}

/// The connections of one app, by user.
#[derive(Default)]
struct AppIndex {
    /// Most users have one connection here: kept inline, without an allocation per user.
    users: HashMap<Arc<str>, SmallVec<[u64; 1]>>,
    /// Connections of the app (the sum of `users`' lengths).
    conns: usize,
}

impl Registry {
    /// Removes `conn` from its slot's index.
    fn unindex_slot(&mut self, conn: &Conn) {
        if let Some(set) = self.by_slot.get_mut(&conn.slot) {
            set.remove(&conn.id);
            if set.is_empty() {
                self.by_slot.remove(&conn.slot);
            }
        }
    }
}

type ResumeKey = (String, String, String);

struct Resumable {
    expires: Instant,
    pending: VecDeque<Pending>,
}

/// Result of queueing one message to one connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Queued,
    /// The queue was full: the connection is being closed as a slow consumer.
    Dropped,
    /// The connection is already closing.
    Closed,
}

pub struct Hub {
    pub room_id: String,
    next_conn: AtomicU64,
    reg: RwLock<Registry>,
    resume: Mutex<HashMap<ResumeKey, Resumable>>,
    pub stats: Stats,
    limits: watch::Receiver<Arc<RoomLimits>>,
    apps: watch::Receiver<Arc<AppsConfig>>,
    /// Device events for the coordinator. Bounded; a full queue drops the event and counts it
    /// in `uplink_drops` or `presence_drops`, so a connection task never waits here.
    events: Option<mpsc::Sender<DeviceEvent>>,
    sessions: RwLock<Option<Arc<dyn Sessions>>>,
    /// Per slot, bumped whenever a session of the slot starts attaching or is removed: a Sync
    /// whose snapshot is older than the last bump may have overwritten a newer Attach or Detach
    /// at the register, and is sent again (see `registrar::sync_slot`).
    slot_changes: Box<[AtomicU64]>,
    /// The origin of [`Conn::last_heard_ms`].
    clock: Instant,
    /// The empty string, shared by every connection without a device or platform.
    empty: Arc<str>,
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

impl Hub {
    pub fn new(
        room_id: String,
        limits: watch::Receiver<Arc<RoomLimits>>,
        apps: watch::Receiver<Arc<AppsConfig>>,
        events: Option<mpsc::Sender<DeviceEvent>>,
    ) -> Arc<Hub> {
        // Ids start at the boot time in ms << 20, so a restarted room with the same id never
        // reuses a connection id a register may still hold for its previous life.
        let first = (now_ms().max(0) as u64) << 20;
        Arc::new(Hub {
            room_id,
            next_conn: AtomicU64::new(first),
            reg: RwLock::new(Registry::default()),
            resume: Mutex::new(HashMap::new()),
            stats: Stats::default(),
            limits,
            apps,
            events,
            sessions: RwLock::new(None),
            slot_changes: (0..SLOTS).map(|_| AtomicU64::new(0)).collect(),
            clock: Instant::now(),
            empty: Arc::from(""),
        })
    }

    fn clock_ms(&self) -> u64 {
        self.clock.elapsed().as_millis() as u64
    }

    /// The app id as the connections of that app already hold it (one allocation per app, not
    /// per connection).
    fn intern_app(&self, app: &str) -> Arc<str> {
        let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
        match reg.by_app.get_key_value(app) {
            Some((shared, _)) => shared.clone(),
            None => app.into(),
        }
    }

    /// `value` as an `Arc<str>`; the empty string (no `dev` or `plat` claim) is one shared
    /// allocation.
    fn shared_if_empty(&self, value: String) -> Arc<str> {
        if value.is_empty() {
            self.empty.clone()
        } else {
            value.into()
        }
    }

    /// Records that `conn`'s device just sent a frame (it is not idle).
    pub fn heard(&self, conn: &Conn) {
        conn.last_heard_ms.store(self.clock_ms(), Ordering::Relaxed);
    }

    /// Closes, with an `idle_timeout` error, every connection that sent no frame for 3
    /// heartbeats; returns how many.
    pub fn close_idle(&self) -> usize {
        let limits = self.limits();
        let idle = limits.idle_timeout();
        let now = self.clock_ms();
        let limit_ms = idle.as_millis() as u64;
        let message = format!(
            "no frame for {} s (3 heartbeats of heartbeat_s = {})",
            idle.as_secs(),
            limits.heartbeat_s
        );
        let frame = Frame::error(code::IDLE_TIMEOUT, &message).encode();
        self.close_where(frame, |c| {
            now.saturating_sub(c.last_heard_ms.load(Ordering::Relaxed)) >= limit_ms
        })
    }

    /// Closes the connections `pick` chooses with `frame` (encoded once, shared); returns how
    /// many were open.
    fn close_where(&self, frame: Bytes, pick: impl Fn(&Conn) -> bool) -> usize {
        let picked: Vec<Arc<Conn>> = {
            let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
            reg.conns.values().filter(|c| pick(c)).cloned().collect()
        };
        picked
            .iter()
            .filter(|c| c.outbox.close(Closing::Final(frame.clone())))
            .count()
    }

    /// Closes every connection with an error frame `code`/`message` (the room is stopping).
    pub fn close_all(&self, code: &str, message: &str) {
        self.close_where(Frame::error(code, message).encode(), |_| true);
    }

    /// The change count of `slot` (see `slot_changes`); compare two readings around a Sync.
    pub fn slot_version(&self, slot: u16) -> u64 {
        self.slot_changes[usize::from(slot)].load(Ordering::SeqCst)
    }

    fn slot_changed(&self, slot: u16) {
        self.slot_changes[usize::from(slot)].fetch_add(1, Ordering::SeqCst);
    }

    /// The limits in force now.
    pub fn limits(&self) -> Arc<RoomLimits> {
        self.limits.borrow().clone()
    }

    pub fn apps(&self) -> Arc<AppsConfig> {
        self.apps.borrow().clone()
    }

    pub fn set_sessions(&self, sessions: Arc<dyn Sessions>) {
        *self.sessions.write().unwrap_or_else(|e| e.into_inner()) = Some(sessions);
    }

    fn sessions(&self) -> Option<Arc<dyn Sessions>> {
        self.sessions
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A new connection object for a verified identity (not yet visible to pushes).
    pub fn new_conn(&self, id: Identity, ip: IpAddr, ws: bool) -> Arc<Conn> {
        Arc::new(Conn {
            id: self.next_conn.fetch_add(1, Ordering::Relaxed),
            slot: slot_of(&id.app, &id.user),
            app: self.intern_app(&id.app),
            user: id.user.into(),
            device: self.shared_if_empty(id.device),
            platform: self.shared_if_empty(id.platform),
            ip,
            connected_at_ms: now_ms(),
            ws,
            outbox: Outbox::default(),
            pending: Mutex::new(VecDeque::new()),
            last_heard_ms: AtomicU64::new(self.clock_ms()),
        })
    }

    /// Registers the session with the register (if wired). While the Attach is in flight the
    /// session counts as this room's in its slot, so that a concurrent Sync of that slot (slot
    /// moved, digest mismatch) carries it instead of replacing it away; [`Hub::insert`] then
    /// makes it reachable, and a failed Attach forgets it.
    pub async fn attach(&self, conn: &Arc<Conn>) -> Result<(), String> {
        let Some(sessions) = self.sessions() else {
            return Ok(());
        };
        {
            let mut reg = self.reg.write().unwrap_or_else(|e| e.into_inner());
            reg.attaching.insert(conn.id, conn.clone());
            reg.by_slot.entry(conn.slot).or_default().insert(conn.id);
        }
        self.slot_changed(conn.slot);
        let attached = sessions.attach(conn.session()).await;
        if attached.is_err() {
            let mut reg = self.reg.write().unwrap_or_else(|e| e.into_inner());
            reg.attaching.remove(&conn.id);
            reg.unindex_slot(conn);
        }
        attached
    }

    /// Makes `conn` reachable by pushes, after its welcome is queued. Returns the unacked QoS 1
    /// messages of a resumed session, which the caller queues next.
    pub fn insert(&self, conn: &Arc<Conn>) {
        let mut reg = self.reg.write().unwrap_or_else(|e| e.into_inner());
        reg.attaching.remove(&conn.id);
        reg.conns.insert(conn.id, conn.clone());
        let app = reg.by_app.entry(conn.app.clone()).or_default();
        app.users
            .entry(conn.user.clone())
            .or_default()
            .push(conn.id);
        app.conns += 1;
        reg.by_slot.entry(conn.slot).or_default().insert(conn.id);
        drop(reg);
        self.presence(conn, EventKind::Online);
    }

    /// Takes the resumable pending messages of (app, user, device), if within the window.
    pub fn take_resume(&self, conn: &Conn) -> usize {
        let key = (
            conn.app.to_string(),
            conn.user.to_string(),
            conn.device.to_string(),
        );
        let taken = self
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&key);
        let mut pending = taken
            .filter(|r| r.expires > Instant::now())
            .map(|r| r.pending)
            .unwrap_or_default();
        pending.extend(self.take_over(conn));
        let n = pending.len();
        *conn.pending.lock().unwrap_or_else(|e| e.into_inner()) = pending;
        n
    }

    /// A device holds one connection at a time: when it authenticates again while its older
    /// connection is still registered here (the room has not seen that one close yet, e.g. it
    /// was paused), the old one is dead from the device's side. Its unacked QoS 1 messages move
    /// to the new connection and it is closed. Only for tokens that name a device.
    fn take_over(&self, conn: &Conn) -> VecDeque<Pending> {
        if conn.device.is_empty() {
            return VecDeque::new();
        }
        let older: Vec<Arc<Conn>> = self
            .conns_of_user(&conn.app, &conn.user)
            .into_iter()
            .filter(|c| c.id != conn.id && c.device == conn.device)
            .collect();
        let mut moved = VecDeque::new();
        for old in older {
            moved.extend(std::mem::take(
                &mut *old.pending.lock().unwrap_or_else(|e| e.into_inner()),
            ));
            self.kick(&old, "replaced by a new connection of the same device", &[]);
        }
        moved
    }

    /// A QoS 1 message for a user with no connection here: queued for every session of the user
    /// that closed within the resume window (its device gets it on reconnecting, as if it had
    /// been pending). Returns how many sessions it was queued for.
    pub fn park_for_resume(&self, app: &str, user: &str, id: &str, frame: &Bytes) -> u32 {
        let now = Instant::now();
        let mut parked = 0;
        let mut resume = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        for ((a, u, _), r) in resume.iter_mut() {
            if a == app && u == user && r.expires > now {
                r.pending.push_back(Pending {
                    id: id.to_string(),
                    frame: frame.clone(),
                });
                parked += 1;
            }
        }
        parked
    }

    /// Queues the resumed messages (after the welcome).
    pub fn redeliver(&self, conn: &Conn) {
        let frames: Vec<Bytes> = conn
            .pending
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|p| p.frame.clone())
            .collect();
        let limits = self.limits();
        for f in frames {
            if self.queue(conn, f, &limits) != Delivery::Queued {
                break;
            }
        }
    }

    /// Removes a closed connection; its unacked QoS 1 messages wait for a resume; the register
    /// is told.
    pub fn remove(&self, conn: &Arc<Conn>) {
        let mut reg = self.reg.write().unwrap_or_else(|e| e.into_inner());
        if reg.conns.remove(&conn.id).is_none() {
            return;
        }
        if let Some(app) = reg.by_app.get_mut(&conn.app) {
            if let Some(ids) = app.users.get_mut(&conn.user) {
                let before = ids.len();
                ids.retain(|i| *i != conn.id);
                app.conns -= before - ids.len();
                if ids.is_empty() {
                    app.users.remove(&conn.user);
                }
            }
            if app.conns == 0 {
                reg.by_app.remove(&conn.app);
            }
        }
        reg.unindex_slot(conn);
        drop(reg);
        self.slot_changed(conn.slot);
        let pending = std::mem::take(&mut *conn.pending.lock().unwrap_or_else(|e| e.into_inner()));
        let window = self.limits().resume_window();
        if !pending.is_empty() && !window.is_zero() {
            let key = (
                conn.app.to_string(),
                conn.user.to_string(),
                conn.device.to_string(),
            );
            self.resume
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .insert(
                    key,
                    Resumable {
                        expires: Instant::now() + window,
                        pending,
                    },
                );
        }
        if let Some(s) = self.sessions() {
            s.detach(conn.session());
        }
        // The room closed it (kick, slow consumer, protocol error) or the device went away.
        let reason = if conn.outbox.is_closing() {
            "closed_by_room"
        } else {
            "closed"
        };
        self.presence(conn, EventKind::Offline(reason.to_string()));
    }

    /// Drops resumable sessions whose window has passed; returns how many.
    pub fn expire_resumes(&self) -> usize {
        let now = Instant::now();
        let mut r = self.resume.lock().unwrap_or_else(|e| e.into_inner());
        let before = r.len();
        r.retain(|_, v| v.expires > now);
        before - r.len()
    }

    /// Queues an encoded frame to one connection under the live caps.
    fn queue(&self, conn: &Conn, frame: Bytes, limits: &RoomLimits) -> Delivery {
        match conn.outbox.push(
            frame,
            limits.outbound_max_messages,
            limits.outbound_max_bytes,
        ) {
            Ok(()) => Delivery::Queued,
            Err(PushError::Full) => {
                Stats::add(&self.stats.queue_drops, 1);
                Stats::add(&self.stats.slow_consumers, 1);
                metrics::counter!("room_slow_consumers_total").increment(1);
                tracing::info!(conn = conn.id, app = %conn.app, "slow consumer disconnected");
                Delivery::Dropped
            }
            Err(PushError::Closed) => Delivery::Closed,
        }
    }

    /// Queues a control frame (pong) to a connection.
    pub fn send(&self, conn: &Conn, frame: &Frame) -> Delivery {
        self.queue(conn, frame.encode(), &self.limits())
    }

    /// Queues a message frame; QoS 1 messages are remembered until acked.
    fn deliver(
        &self,
        conn: &Conn,
        id: &str,
        qos: u32,
        frame: Bytes,
        limits: &RoomLimits,
    ) -> Delivery {
        if qos >= 1 {
            let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
            if p.len() >= limits.max_pending_qos1.max(1) {
                p.pop_front();
                Stats::add(&self.stats.pending_drops, 1);
            }
            p.push_back(Pending {
                id: id.to_string(),
                frame: frame.clone(),
            });
        }
        self.queue(conn, frame, limits)
    }

    /// Removes acked ids from the connection's pending set.
    pub fn ack(&self, conn: &Conn, ids: &[String]) {
        Stats::add(&self.stats.acks, ids.len() as u64);
        let mut p = conn.pending.lock().unwrap_or_else(|e| e.into_inner());
        p.retain(|m| !ids.contains(&m.id));
        if p.is_empty() && p.capacity() > 0 {
            *p = VecDeque::new();
        }
    }

    /// Hands an uplink to the coordinator hook; a full queue (or no hook) drops it (counted).
    pub fn uplink(&self, conn: &Conn, payload: Vec<u8>) {
        Stats::add(&self.stats.uplinks, 1);
        if !self.report(conn, EventKind::Uplink(payload)) {
            Stats::add(&self.stats.uplink_drops, 1);
            metrics::counter!("room_uplink_drops_total").increment(1);
        }
    }

    /// Hands an online/offline event to the coordinator hook, if one is wired; a full queue
    /// drops it (counted).
    fn presence(&self, conn: &Conn, kind: EventKind) {
        if self.events.is_some() && !self.report(conn, kind) {
            Stats::add(&self.stats.presence_drops, 1);
            metrics::counter!("room_presence_drops_total").increment(1);
        }
    }

    /// Queues an event without waiting. False when it was dropped: no hook, or the queue is
    /// full. Events of an app without a webhook have nowhere to go and are skipped (true).
    fn report(&self, conn: &Conn, kind: EventKind) -> bool {
        let Some(tx) = &self.events else {
            return false;
        };
        let wanted = self
            .apps
            .borrow()
            .get(&conn.app)
            .is_some_and(|a| a.webhook_url.is_some());
        if !wanted {
            return true;
        }
        tx.try_send(DeviceEvent {
            app: conn.app.to_string(),
            user: conn.user.to_string(),
            device: conn.device.to_string(),
            conn_id: conn.id,
            ts_ms: now_ms(),
            kind,
        })
        .is_ok()
    }

    fn conns_of_user(&self, app: &str, user: &str) -> Vec<Arc<Conn>> {
        let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
        reg.by_app
            .get(app)
            .and_then(|a| a.users.get(user))
            .map(|ids| {
                ids.iter()
                    .filter_map(|i| reg.conns.get(i).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The connections addressed by (conn_id or app+user). A conn id whose app/user does not
    /// match the given ones is not a target (a message never reaches another user).
    pub fn targets(&self, conn_id: u64, app: &str, user: &str) -> Vec<Arc<Conn>> {
        if conn_id != 0 {
            let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
            return reg
                .conns
                .get(&conn_id)
                .filter(|c| {
                    (app.is_empty() || *c.app == *app) && (user.is_empty() || *c.user == *user)
                })
                .cloned()
                .into_iter()
                .collect();
        }
        if app.is_empty() || user.is_empty() {
            return Vec::new();
        }
        self.conns_of_user(app, user)
    }

    /// Encodes a message frame once for `app`.
    pub fn message_frame(app: &str, id: &str, qos: u32, payload: Vec<u8>, ts: i64) -> Bytes {
        Frame::Message(clientpb::Message {
            id: id.to_string(),
            app: app.to_string(),
            qos,
            payload,
            ts: if ts == 0 { now_ms() } else { ts },
        })
        .encode()
    }

    /// Delivers one encoded message to `conns`; returns (queued, dropped).
    pub fn deliver_to(&self, conns: &[Arc<Conn>], id: &str, qos: u32, frame: &Bytes) -> (u32, u32) {
        let limits = self.limits();
        let (mut queued, mut dropped) = (0, 0);
        for c in conns {
            match self.deliver(c, id, qos, frame.clone(), &limits) {
                Delivery::Queued => queued += 1,
                Delivery::Dropped => dropped += 1,
                Delivery::Closed => {}
            }
        }
        (queued, dropped)
    }

    /// Every connection of `app`.
    pub fn conns_of_app(&self, app: &str) -> Vec<Arc<Conn>> {
        let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
        reg.by_app
            .get(app)
            .map(|a| {
                a.users
                    .values()
                    .flatten()
                    .filter_map(|i| reg.conns.get(i).cloned())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every connection.
    pub fn all_conns(&self) -> Vec<Arc<Conn>> {
        let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
        reg.conns.values().cloned().collect()
    }

    /// Closes a connection with a kick frame. Returns whether it was open.
    pub fn kick(&self, conn: &Conn, reason: &str, reconnect: &[String]) -> bool {
        let frame = Frame::Kick(clientpb::Kick {
            reason: reason.to_string(),
            reconnect: reconnect.to_vec(),
        })
        .encode();
        conn.outbox.close(Closing::Final(frame))
    }

    /// Closes a connection with an error frame.
    pub fn close_with_error(&self, conn: &Conn, code: &str, message: &str) -> bool {
        conn.outbox
            .close(Closing::Final(Frame::error(code, message).encode()))
    }

    pub fn connection_count(&self) -> usize {
        self.reg
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .conns
            .len()
    }

    pub fn per_app(&self) -> HashMap<String, u64> {
        let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
        reg.by_app
            .iter()
            .map(|(a, index)| (a.to_string(), index.conns as u64))
            .collect()
    }

    /// QoS 1 messages waiting for an ack, live and resumable.
    pub fn pending_count(&self) -> u64 {
        let live: usize = self
            .all_conns()
            .iter()
            .map(|c| c.pending.lock().unwrap_or_else(|e| e.into_inner()).len())
            .sum();
        let parked: usize = self
            .resume
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .values()
            .map(|r| r.pending.len())
            .sum();
        (live + parked) as u64
    }

    /// The sessions of one slot (for the register's Sync).
    pub fn slot_sessions(&self, slot: u16) -> Vec<SessionInfo> {
        let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
        reg.by_slot
            .get(&slot)
            .map(|ids| {
                ids.iter()
                    .filter_map(|i| reg.conns.get(i).or_else(|| reg.attaching.get(i)))
                    .map(|c| c.session())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Slots that have sessions here, with their session count.
    pub fn slot_counts(&self) -> Vec<(u16, usize)> {
        let reg = self.reg.read().unwrap_or_else(|e| e.into_inner());
        reg.by_slot.iter().map(|(s, ids)| (*s, ids.len())).collect()
    }
}

/// Periodically forgets resumable sessions past their window.
/// The hub's periodic work: forgets expired resume windows, closes idle connections, and at
/// `shutdown` closes every connection with a `shutting_down` error.
pub async fn sweeper(hub: Arc<Hub>, shutdown: tokio_util::sync::CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                hub.close_all(code::SHUTTING_DOWN, "room is shutting down");
                return;
            }
            _ = tick.tick() => {
                hub.expire_resumes();
                hub.close_idle();
            }
        }
    }
}

/// How often [`sweeper`] runs: an idle connection is closed at most this late.
pub const SWEEP_EVERY: Duration = Duration::from_millis(500);

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbox::Next;

    fn hub(limits: RoomLimits) -> Arc<Hub> {
        let (_lt, lr) = watch::channel(Arc::new(limits));
        let (_at, ar) = watch::channel(Arc::new(AppsConfig::default()));
        Hub::new("r1".into(), lr, ar, None)
    }

    fn ident(app: &str, user: &str, dev: &str) -> Identity {
        Identity {
            app: app.into(),
            user: user.into(),
            device: dev.into(),
            platform: String::new(),
        }
    }

    fn drain(c: &Conn) -> Vec<Frame> {
        let mut out = vec![];
        while let Next::Frame(b) = c.outbox.pop() {
            out.push(longlink_client::frame::decode_encoded(&b).unwrap());
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn qos1_is_resumed_within_the_window_and_qos0_is_not() {
        let h = hub(RoomLimits::default());
        let c1 = h.new_conn(ident("a", "u", "d"), "127.0.0.1".parse().unwrap(), false);
        h.insert(&c1);
        let targets = h.targets(0, "a", "u");
        assert_eq!(targets.len(), 1);
        let f1 = Hub::message_frame("a", "m1", 1, b"1".to_vec(), 1);
        let f2 = Hub::message_frame("a", "m2", 1, b"2".to_vec(), 1);
        let f0 = Hub::message_frame("a", "m0", 0, b"0".to_vec(), 1);
        h.deliver_to(&targets, "m1", 1, &f1);
        h.deliver_to(&targets, "m0", 0, &f0);
        h.deliver_to(&targets, "m2", 1, &f2);
        assert_eq!(drain(&c1).len(), 3);
        h.ack(&c1, &["m1".to_string()]);
        h.remove(&c1);
        assert_eq!(h.pending_count(), 1);

        // Same app/user/device within the window: m2 only.
        let c2 = h.new_conn(ident("a", "u", "d"), "127.0.0.1".parse().unwrap(), false);
        assert_eq!(h.take_resume(&c2), 1);
        h.insert(&c2);
        h.redeliver(&c2);
        let got = drain(&c2);
        assert!(
            matches!(&got[..], [Frame::Message(m)] if m.id == "m2"),
            "{got:?}"
        );
        h.remove(&c2);

        // After the window: nothing.
        tokio::time::advance(Duration::from_secs(31)).await;
        let c3 = h.new_conn(ident("a", "u", "d"), "127.0.0.1".parse().unwrap(), false);
        assert_eq!(h.take_resume(&c3), 0);
        // Another device never gets them.
        let c4 = h.new_conn(
            ident("a", "u", "other"),
            "127.0.0.1".parse().unwrap(),
            false,
        );
        assert_eq!(h.take_resume(&c4), 0);
    }

    #[test]
    fn conn_targets_must_match_app_and_user() {
        let h = hub(RoomLimits::default());
        let c = h.new_conn(ident("a", "u", ""), "127.0.0.1".parse().unwrap(), false);
        h.insert(&c);
        assert_eq!(h.targets(c.id, "a", "u").len(), 1);
        assert_eq!(h.targets(c.id, "", "").len(), 1);
        assert!(h.targets(c.id, "b", "u").is_empty());
        assert!(h.targets(c.id, "a", "v").is_empty());
        assert_eq!(h.slot_sessions(slot_of("a", "u")).len(), 1);
        h.remove(&c);
        assert!(h.targets(c.id, "", "").is_empty());
        assert!(h.slot_counts().is_empty());
        assert!(h.per_app().is_empty());
    }

    #[test]
    fn full_queue_counts_a_slow_consumer() {
        let h = hub(RoomLimits {
            outbound_max_messages: 2,
            ..RoomLimits::default()
        });
        let c = h.new_conn(ident("a", "u", ""), "127.0.0.1".parse().unwrap(), false);
        h.insert(&c);
        let f = Hub::message_frame("a", "m", 0, vec![], 1);
        let all = h.conns_of_app("a");
        assert_eq!(h.deliver_to(&all, "m", 0, &f), (1, 0));
        assert_eq!(h.deliver_to(&all, "m", 0, &f), (1, 0));
        assert_eq!(h.deliver_to(&all, "m", 0, &f), (0, 1));
        assert_eq!(Stats::get(&h.stats.slow_consumers), 1);
        assert_eq!(c.outbox.pop(), Next::Close(Closing::SlowConsumer));
    }
}
