//! The operations of the senders' API, shared by the HTTP and gRPC front ends: authorization,
//! rate limiting, push (users or all), presence, kick, dispatch, broadcast progress, and the
//! intake of room events for the webhook coordinator.

use std::collections::BTreeMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use longlink_common::App;
use longlink_common::AppsConfig;
use longlink_proto::roompb;
use tokio::sync::Semaphore;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::api;
use crate::api::Push;
use crate::api::PushBatchRequest;
use crate::api::PushRequest;
use crate::api::Target;
use crate::broadcast::Broadcasts;
use crate::broadcast::Progress;
use crate::config::CenterConfig;
use crate::config::CenterTuning;
use crate::config::Live;
use crate::dispatch;
use crate::error::Error;
use crate::error::Result;
use crate::fabric::Fabric;
use crate::fabric::Lookup;
use crate::fabric::Registers;
use crate::fabric::Slots;
use crate::ids;
use crate::ratelimit::RateLimiter;
use crate::rooms::Rooms;
use crate::webhook::Coordinator;
use crate::webhook::Event;

/// Background QoS 1 retries in flight at once; past this a failed delivery is given up and
/// counted (`center_qos1_retry_dropped_total`) rather than growing memory.
const MAX_RETRY_TASKS: usize = 1024;

/// Where center's view of the world comes from: the keeper in production (see `server`),
/// channels fed directly in tests.
pub struct Inputs {
    /// The typed config `apps`.
    pub apps: watch::Receiver<Arc<AppsConfig>>,
    /// Live rooms (discovery `room`).
    pub rooms: Rooms,
    /// Live registers (discovery `register`): id -> gRPC address.
    pub registers: Registers,
    /// `/register/slots`.
    pub slots: Slots,
}

/// What a push answers: at once for users, in the background for `all`.
#[derive(Debug, Clone, PartialEq)]
pub enum PushOutcome {
    Users(api::PushResponse),
    Broadcast(api::BroadcastAccepted),
}

/// One center instance's state. Stateless with respect to the cluster: everything here is a
/// cache or in-flight work.
pub struct Center {
    config: Live<CenterConfig>,
    apps: watch::Receiver<Arc<AppsConfig>>,
    rooms: Rooms,
    limiter: RateLimiter,
    coordinator: Coordinator,
    fabric: Arc<Fabric>,
    broadcasts: Broadcasts,
    /// Background work (broadcasts, QoS 1 retries) that shutdown waits for.
    tasks: TaskTracker,
    retry_slots: Arc<Semaphore>,
    shutdown: CancellationToken,
}

/// Equal-time comparison, so that response timing does not reveal how much of a key matched.
fn same_key(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes()
            .zip(b.bytes())
            .fold(0u8, |acc, (x, y)| acc | (x ^ y))
            == 0
}

impl Center {
    /// Builds the state and starts the webhook coordinator; everything stops with `shutdown`.
    pub fn new(config: CenterConfig, inputs: Inputs, shutdown: CancellationToken) -> Arc<Center> {
        let tasks = TaskTracker::new();
        let (coordinator, worker) = Coordinator::start(
            config.webhook.clone(),
            inputs.apps.clone(),
            shutdown.clone(),
        );
        tasks.spawn(async move {
            let _ = worker.await;
        });
        let fabric = Arc::new(Fabric::new(
            config.fanout.clone(),
            inputs.rooms.clone(),
            inputs.registers,
            inputs.slots,
        ));
        Arc::new(Center {
            broadcasts: Broadcasts::new(
                Duration::from_secs(config.fanout.broadcast_keep_s),
                config.fanout.broadcast_history,
            ),
            config: Live::new(config),
            apps: inputs.apps,
            rooms: inputs.rooms,
            limiter: RateLimiter::default(),
            coordinator,
            fabric,
            tasks,
            retry_slots: Arc::new(Semaphore::new(MAX_RETRY_TASKS)),
            shutdown,
        })
    }

    /// The current settings (the tunables change when the typed config `center` does).
    pub fn config(&self) -> Arc<CenterConfig> {
        self.config.get()
    }

    /// Applies a new version of the typed config `center`. Returns the changed fields that take
    /// effect only after a restart (see [`CenterTuning`]).
    pub fn apply_tuning(&self, tuning: &CenterTuning) -> Vec<&'static str> {
        let old = self.config.get();
        let mut later = Vec::new();
        let (ow, nw) = (&old.webhook, &tuning.webhook);
        let (of, nf) = (&old.fanout, &tuning.fanout);
        for (field, changed) in [
            ("webhook.queue", ow.queue != nw.queue),
            ("webhook.concurrency", ow.concurrency != nw.concurrency),
            (
                "fanout.broadcast_keep_s",
                of.broadcast_keep_s != nf.broadcast_keep_s,
            ),
            (
                "fanout.broadcast_history",
                of.broadcast_history != nf.broadcast_history,
            ),
        ] {
            if changed {
                later.push(field);
            }
        }
        self.fabric.set_config(tuning.fanout.clone());
        self.coordinator.set_config(tuning.webhook.clone());
        self.config.set(old.with_tuning(tuning));
        later
    }

    pub fn coordinator(&self) -> &Coordinator {
        &self.coordinator
    }

    /// Waits for background work after `shutdown` was cancelled.
    pub async fn wait(&self) {
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// The trust boundary of the API: `key` must be one of `app`'s API keys, and the app's
    /// token bucket must have a token. 401 without a key or with a key nobody has, 404 for an
    /// unknown app, 403 for another app's key, 429 when over the rate.
    pub fn authorize(&self, app: &str, key: Option<&str>) -> Result<App> {
        let found = self.authenticate(app, key)?;
        self.take_tokens(&found, 1)?;
        Ok(found)
    }

    /// The key checks of [`Center::authorize`] without taking a token: for requests whose cost
    /// is known only after their body is read (a batch costs one token per message).
    pub fn authenticate(&self, app: &str, key: Option<&str>) -> Result<App> {
        let key = key.ok_or_else(|| {
            Error::Unauthorized("missing API key: send `Authorization: Bearer <key>`".into())
        })?;
        let apps = self.apps.borrow().clone();
        let found = apps
            .get(app)
            .ok_or_else(|| Error::NotFound(format!("unknown app {app:?}")))?;
        if !found.api_keys.iter().any(|k| same_key(k, key)) {
            let other = apps
                .apps
                .iter()
                .any(|a| a.api_keys.iter().any(|k| same_key(k, key)));
            return Err(if other {
                Error::Forbidden(format!("this API key belongs to another app, not {app:?}"))
            } else {
                Error::Unauthorized("unknown API key".into())
            });
        }
        Ok(found.clone())
    }

    /// Takes `n` tokens from `app`'s bucket: 429 with the wait when short, 400 when `n` is more
    /// than the bucket ever holds (the request could never pass; a closed app, burst 0, stays 429).
    pub fn take_tokens(&self, app: &App, n: u32) -> Result<()> {
        let limit = app.rate_limit;
        if limit.burst > 0 && n > limit.burst {
            return Err(Error::BadRequest(format!(
                "this request counts as {n} pushes but app {:?} allows bursts of {} (rate_limit.burst)",
                app.id, limit.burst
            )));
        }
        if let Err(retry_after) = self.limiter.take_n(&app.id, limit, n) {
            metrics::counter!("center_rate_limited_total").increment(1);
            return Err(Error::RateLimited {
                app: app.id.clone(),
                per_second: limit.per_second,
                burst: limit.burst,
                retry_after,
            });
        }
        Ok(())
    }

    /// `GET /v1/dispatch`: the best rooms for `(app, user)`; no key needed (devices call it).
    pub fn dispatch(&self, app: &str, user: &str) -> Result<api::DispatchResponse> {
        if app.is_empty() {
            return Err(Error::BadRequest("app must not be empty".into()));
        }
        api::check_user(user)?;
        if self.apps.borrow().get(app).is_none() {
            return Err(Error::NotFound(format!("unknown app {app:?}")));
        }
        let rooms = self.rooms.borrow().clone();
        let picked = dispatch::candidates(app, user, &rooms, self.config().dispatch_candidates);
        if picked.is_empty() {
            return Err(Error::Unavailable("no live room".into()));
        }
        Ok(api::DispatchResponse {
            rooms: picked
                .into_iter()
                .map(|r| api::DispatchRoom {
                    id: r.id.clone(),
                    tcp: r.tcp.clone(),
                    ws: r.ws.clone(),
                })
                .collect(),
        })
    }

    /// A push of an authorized app.
    pub async fn push(&self, app: &App, request: PushRequest) -> Result<PushOutcome> {
        let push = request.check(&self.config().fanout)?;
        metrics::counter!("center_pushes_total", "qos" => push.qos.to_string()).increment(1);
        match push.target.clone() {
            Target::All => Ok(PushOutcome::Broadcast(self.broadcast(app, push))),
            Target::Users(users) => Ok(PushOutcome::Users(self.push_users(app, users, push).await)),
        }
    }

    /// A batch of pushes to users from an authenticated app: takes one token per message, then
    /// delivers them in one round (one lookup for all users, one room `Push` per room).
    pub async fn push_batch(
        &self,
        app: &App,
        request: PushBatchRequest,
    ) -> Result<api::PushBatchResponse> {
        let pushes = request.check(&self.config().fanout)?;
        self.take_tokens(app, pushes.len() as u32)?;
        metrics::counter!("center_push_batches_total").increment(1);
        let qos1 = pushes.iter().filter(|p| p.qos == 1).count() as u64;
        metrics::counter!("center_pushes_total", "qos" => "0")
            .increment(pushes.len() as u64 - qos1);
        metrics::counter!("center_pushes_total", "qos" => "1").increment(qos1);
        let pushes = pushes
            .into_iter()
            .map(|mut push| {
                let Target::Users(users) = std::mem::replace(&mut push.target, Target::All) else {
                    unreachable!("a checked batch message targets users");
                };
                (users, push)
            })
            .collect();
        Ok(api::PushBatchResponse {
            results: self.push_many(app, pushes).await,
        })
    }

    fn message(push: &Push, id: &str) -> roompb::Message {
        roompb::Message {
            id: id.to_owned(),
            qos: u32::from(push.qos),
            payload: push.payload.clone(),
            ts: ids::now_ms() as i64,
        }
    }

    async fn push_users(&self, app: &App, users: Vec<String>, push: Push) -> api::PushResponse {
        self.push_many(app, vec![(users, push)])
            .await
            .pop()
            .expect("one answer per push")
    }

    /// Delivers pushes to users in one round (one lookup, one `Push` per room for all of them);
    /// QoS 1 messages that missed users are retried in the background, each on its own.
    async fn push_many(
        &self,
        app: &App,
        pushes: Vec<(Vec<String>, Push)>,
    ) -> Vec<api::PushResponse> {
        let now = Instant::now();
        let messages: Vec<roompb::Message> = pushes
            .iter()
            .map(|(_, push)| Self::message(push, &ids::new_id("m")))
            .collect();
        // Every message's users in one list (moved, not copied); each job names its share.
        let none = HashSet::new();
        let mut everyone: Vec<String> = Vec::new();
        let mut jobs: Vec<Job> = Vec::with_capacity(pushes.len());
        let mut settings: Vec<Push> = Vec::with_capacity(pushes.len());
        for ((users, push), message) in pushes.into_iter().zip(&messages) {
            let start = everyone.len();
            everyone.extend(users);
            jobs.push(Job {
                users: start..everyone.len(),
                message,
                skip: &none,
            });
            settings.push(push);
        }
        let rounds = deliver_rounds(&self.fabric, &app.id, everyone, &jobs).await;
        drop(jobs);
        let mut answers = Vec::with_capacity(rounds.len());
        for ((push, message), round) in settings.iter().zip(messages).zip(rounds) {
            let mut response = api::PushResponse {
                id: message.id.clone(),
                sessions: round.sessions,
                users_online: round.online,
                users_offline: round.offline,
                users_unknown: round.unknown.len() as u64,
                retrying: 0,
            };
            let mut retry: Vec<String> = round.unknown;
            retry.extend(round.failed.into_iter().map(|(user, _)| user));
            retry.sort();
            retry.dedup();
            if push.qos == 1 && !retry.is_empty() {
                response.retrying = retry.len() as u64;
                let deadline = now + Duration::from_secs(u64::from(push.ttl_s));
                self.retry_in_background(app.id.clone(), retry, message, round.reached, deadline);
            }
            answers.push(response);
        }
        answers
    }

    /// Keeps trying to deliver a QoS 1 message to `users` until `deadline`, skipping the
    /// (user, room) pairs already reached.
    fn retry_in_background(
        &self,
        app: String,
        mut users: Vec<String>,
        message: roompb::Message,
        mut reached: HashSet<(String, String)>,
        deadline: Instant,
    ) {
        let Ok(permit) = self.retry_slots.clone().try_acquire_owned() else {
            metrics::counter!("center_qos1_retry_dropped_total").increment(users.len() as u64);
            tracing::warn!(id = %message.id, users = users.len(), "QoS 1 retry slots full; giving up");
            return;
        };
        let fabric = self.fabric.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let _permit = permit;
            let mut backoff = Duration::from_millis(100);
            while !users.is_empty() {
                let wake = Instant::now() + backoff;
                if wake >= deadline {
                    break;
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep_until(wake) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(5));
                let tried = std::mem::take(&mut users);
                let round = deliver_round(&fabric, &app, tried, &message, &reached).await;
                reached.extend(round.reached);
                let mut left: Vec<String> = round.unknown;
                left.extend(round.failed.into_iter().map(|(user, _)| user));
                left.sort();
                left.dedup();
                users = left;
            }
            if !users.is_empty() {
                metrics::counter!("center_qos1_expired_total").increment(users.len() as u64);
                tracing::info!(id = %message.id, users = users.len(), "QoS 1 ttl over before delivery");
            }
        });
    }

    fn broadcast(&self, app: &App, push: Push) -> api::BroadcastAccepted {
        let id = ids::new_id("b");
        let rooms: Vec<String> = self
            .rooms
            .borrow()
            .iter()
            .filter(|r| r.grpc.is_some())
            .map(|r| r.id.clone())
            .collect();
        let progress = self
            .broadcasts
            .start(id.clone(), app.id.clone(), rooms.len() as u64);
        let message = Self::message(&push, &id);
        for room in &rooms {
            let task = broadcast_room(
                self.fabric.clone(),
                progress.clone(),
                room.clone(),
                app.id.clone(),
                message.clone(),
                self.config().fanout.broadcast_retries,
                self.shutdown.clone(),
            );
            self.tasks.spawn(task);
        }
        api::BroadcastAccepted {
            progress: format!("/v1/apps/{}/broadcasts/{id}", app.id),
            id,
            rooms: rooms.len() as u64,
        }
    }

    /// Progress of a broadcast of `app`.
    pub fn broadcast_status(&self, app: &App, id: &str) -> Result<api::BroadcastStatus> {
        self.broadcasts
            .get(&app.id, id)
            .map(|p| p.status())
            .ok_or_else(|| Error::NotFound(format!("no broadcast {id:?} of app {:?} on this center instance (progress lives where the broadcast was accepted)", app.id)))
    }

    /// The sessions of one user.
    pub async fn presence(&self, app: &App, user: &str) -> Result<api::Presence> {
        api::check_user(user)?;
        let sessions = match self.fabric.lookup(&app.id, &[user.to_owned()]).await.pop() {
            Some(Lookup::Sessions(s)) => s,
            Some(Lookup::Unknown(why)) => {
                return Err(Error::Unavailable(format!("presence unknown now: {why}")));
            }
            None => return Err(Error::Internal("lookup answered nothing".into())),
        };
        Ok(api::Presence {
            app: app.id.clone(),
            user: user.to_owned(),
            online: !sessions.is_empty(),
            sessions: sessions
                .into_iter()
                .map(|s| api::SessionInfo {
                    room: s.room_id,
                    conn_id: s.conn_id.to_string(),
                    device: s.device,
                    since: s.connected_at_ms,
                    platform: s.platform,
                })
                .collect(),
        })
    }

    /// Closes every connection of one user.
    pub async fn kick(
        &self,
        app: &App,
        user: &str,
        reason: Option<String>,
    ) -> Result<api::KickResponse> {
        api::check_user(user)?;
        let sessions = match self.fabric.lookup(&app.id, &[user.to_owned()]).await.pop() {
            Some(Lookup::Sessions(s)) => s,
            Some(Lookup::Unknown(why)) => {
                return Err(Error::Unavailable(format!("sessions unknown now: {why}")));
            }
            None => return Err(Error::Internal("lookup answered nothing".into())),
        };
        let rooms: HashSet<String> = sessions.into_iter().map(|s| s.room_id).collect();
        let reason = reason.unwrap_or_else(|| "kicked".into());
        let calls = rooms.iter().map(|room| {
            let request = roompb::KickRequest {
                conn_id: 0,
                app: app.id.clone(),
                user: user.to_owned(),
                reason: reason.clone(),
                reconnect: vec![],
            };
            self.fabric
                .with_room(room, move |mut c| async move { c.kick(request).await })
        });
        let mut kicked = 0u64;
        let mut failures = Vec::new();
        for answer in futures::future::join_all(calls).await {
            match answer {
                Ok(r) => kicked += u64::from(r.kicked),
                Err(e) => failures.push(e.to_string()),
            }
        }
        if !failures.is_empty() {
            return Err(Error::Unavailable(format!(
                "kicked {kicked} connections, but: {}; retrying is safe",
                failures.join("; ")
            )));
        }
        Ok(api::KickResponse { kicked })
    }

    /// Events reported by rooms (uplinks, online, offline): queued for the app's webhook.
    /// Returns (queued, not queued).
    pub fn report(&self, events: Vec<Event>) -> (u64, u64) {
        let mut queued = 0;
        let mut not = 0;
        for e in events {
            if self.coordinator.submit(e) {
                queued += 1;
            } else {
                not += 1;
            }
        }
        (queued, not)
    }
}

/// The outcome of one attempt to deliver a message to a set of users.
struct Round {
    sessions: u64,
    online: u64,
    offline: u64,
    /// Users whose sessions could not be looked up.
    unknown: Vec<String>,
    /// (user, room) pairs whose room call failed, or whose room no longer had the user connected.
    failed: Vec<(String, String)>,
    /// (user, room) pairs delivered.
    reached: HashSet<(String, String)>,
}

/// Looks `users` up and pushes `message` to their rooms, one `Push` per room, skipping pairs in
/// `skip` (already delivered by an earlier round).
async fn deliver_round(
    fabric: &Fabric,
    app: &str,
    users: Vec<String>,
    message: &roompb::Message,
    skip: &HashSet<(String, String)>,
) -> Round {
    let job = Job {
        users: 0..users.len(),
        message,
        skip,
    };
    deliver_rounds(fabric, app, users, &[job])
        .await
        .pop()
        .expect("one round per job")
}

/// One message of a delivery round: its users, and the (user, room) pairs to skip.
struct Job<'a> {
    /// Its users: this range of the round's user list.
    users: std::ops::Range<usize>,
    message: &'a roompb::Message,
    skip: &'a HashSet<(String, String)>,
}

/// One room's share of a round: the items, and for each item the job and user it stands for.
type RoomPush = (Vec<roompb::PushItem>, Vec<(usize, String)>);

/// Delivers several messages in one round: one lookup for all their users, then one `Push` per
/// room carrying every message bound for it. Returns a round per job, in order.
async fn deliver_rounds(
    fabric: &Fabric,
    app: &str,
    everyone: Vec<String>,
    jobs: &[Job<'_>],
) -> Vec<Round> {
    // Jobs' ranges cover `everyone` in order, so the answers are taken as they come.
    let mut lookups = fabric.lookup(app, &everyone).await.into_iter();
    let mut rounds: Vec<Round> = jobs
        .iter()
        .map(|_| Round {
            sessions: 0,
            online: 0,
            offline: 0,
            unknown: vec![],
            failed: vec![],
            reached: HashSet::new(),
        })
        .collect();
    let mut by_room: BTreeMap<String, RoomPush> = BTreeMap::new();
    for (j, job) in jobs.iter().enumerate() {
        let round = &mut rounds[j];
        for (user, lookup) in everyone[job.users.clone()].iter().zip(lookups.by_ref()) {
            match lookup {
                Lookup::Sessions(sessions) if sessions.is_empty() => round.offline += 1,
                Lookup::Sessions(sessions) => {
                    round.online += 1;
                    let mut rooms: Vec<String> = sessions.into_iter().map(|s| s.room_id).collect();
                    rooms.sort_unstable();
                    rooms.dedup();
                    for room in rooms {
                        // Only QoS 1 retries skip anything; a first round builds no key.
                        if !job.skip.is_empty() && job.skip.contains(&(user.clone(), room.clone()))
                        {
                            continue;
                        }
                        let (items, owners) = by_room.entry(room).or_default();
                        items.push(roompb::PushItem {
                            conn_id: 0,
                            app: app.to_owned(),
                            user: user.clone(),
                            message: Some(job.message.clone()),
                        });
                        owners.push((j, user.clone()));
                    }
                }
                Lookup::Unknown(why) => {
                    tracing::debug!(%app, %user, "lookup unknown: {why}");
                    round.unknown.push(user.clone());
                }
            }
        }
    }
    let calls = by_room
        .into_iter()
        .map(|(room, (items, owners))| async move {
            let answer = fabric.push(&room, items).await;
            (room, owners, answer)
        });
    for (room, owners, answer) in futures::future::join_all(calls).await {
        match answer {
            Ok(delivered) => {
                for ((j, user), n) in owners.into_iter().zip(delivered) {
                    if n == 0 {
                        // The session the lookup found had left the room by the time the push
                        // got there (its device reconnecting, say): nothing was delivered, so a
                        // QoS 1 message tries the user again, where the lookup then points.
                        rounds[j].failed.push((user, room.clone()));
                    } else {
                        rounds[j].sessions += u64::from(n);
                        rounds[j].reached.insert((user, room.clone()));
                    }
                }
            }
            Err(e) => {
                tracing::debug!(%room, "push failed: {e}");
                metrics::counter!("center_room_push_failures_total").increment(1);
                for (j, user) in owners {
                    rounds[j].failed.push((user, room.clone()));
                }
            }
        }
    }
    rounds
}

/// Sends one broadcast to one room, retrying a failed room up to `retries` more times.
async fn broadcast_room(
    fabric: Arc<Fabric>,
    progress: Arc<Progress>,
    room: String,
    app: String,
    message: roompb::Message,
    retries: u32,
    shutdown: CancellationToken,
) {
    let mut backoff = Duration::from_millis(200);
    for attempt in 0..=retries {
        if attempt > 0 {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff *= 2;
        }
        let request = roompb::BroadcastRequest {
            app: app.clone(),
            message: Some(message.clone()),
        };
        match fabric
            .with_room(
                &room,
                move |mut c| async move { c.broadcast(request).await },
            )
            .await
        {
            Ok(r) => {
                progress.room_done(u64::from(r.delivered), u64::from(r.dropped));
                return;
            }
            Err(e) => {
                tracing::debug!(%room, id = %progress.id, attempt, "broadcast failed: {e}");
            }
        }
    }
    metrics::counter!("center_broadcast_room_failures_total").increment(1);
    progress.room_failed();
}

#[cfg(test)]
mod tests {
    #[test]
    fn same_key_compares_whole_keys() {
        assert!(super::same_key("abc", "abc"));
        assert!(!super::same_key("abc", "abd"));
        assert!(!super::same_key("abc", "ab"));
        assert!(!super::same_key("", "a"));
    }
}
