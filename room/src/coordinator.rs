//! The room's side of center's coordinator: device events (uplinks, online, offline) go from the
//! hub to a live `center` instance (discovery service `center`, address `grpc`) in batches
//! through `Coordinator.Report`; center forwards them to the app's webhook.
//!
//! Queue: one bounded channel of [`QUEUE`] events between the connections and one sender task.
//! Connection tasks never wait on it: a full queue drops the event, counted in the hub's Stats
//! (`uplink_drops`, `presence_drops`). The sender takes what is queued, up to [`MAX_BATCH`]
//! events per Report, so batches grow with load while a quiet room reports an event at once.
//! A failed Report is retried on the next center in discovery with exponential backoff, at most
//! [`ATTEMPTS`] times; then the batch is dropped and counted (`events_failed`): waiting longer
//! would only move the loss into the queue. While a batch is retried new events wait in the
//! queue (or overflow it).

use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::sync::atomic::Ordering;
use std::time::Duration;

use crate::clients::Channel;
use longlink_proto::centerpb;
use longlink_proto::centerpb::coordinator_client::CoordinatorClient;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::clients::Clients;
use crate::hub::DeviceEvent;
use crate::hub::EventKind;
use crate::hub::Hub;
use crate::hub::Stats;

/// Events waiting for the sender; beyond this they are dropped and counted.
pub const QUEUE: usize = 65_536;
/// Most events in one Report.
pub const MAX_BATCH: usize = 1_000;
/// Report attempts per batch (each on the next center) before the batch is dropped.
pub const ATTEMPTS: u32 = 5;
const BACKOFF_FIRST: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);
const RPC_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stopping room keeps reporting what is still queued.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(2);

/// The bounded queue between the hub (sender half, see [`crate::Hooks`]) and [`start`].
pub fn channel() -> (mpsc::Sender<DeviceEvent>, mpsc::Receiver<DeviceEvent>) {
    mpsc::channel(QUEUE)
}

/// Live centers and a client per instance.
struct Centers {
    discovery: keeper_sdk::Discovery,
    /// center id -> (grpc address the client was made for, client).
    clients: Clients<CoordinatorClient<Channel>>,
    /// Round robin over centers: spreads batches and moves a retry to another center.
    next: AtomicUsize,
}

impl Centers {
    /// The next center in discovery that publishes a `grpc` address, with its client.
    fn pick(&self) -> Option<(String, CoordinatorClient<Channel>)> {
        let list = self.discovery.instances();
        let live: Vec<(&str, &str)> = list
            .iter()
            .filter_map(|i| i.addrs.get("grpc").map(|a| (i.id.as_str(), a.as_str())))
            .collect();
        if live.is_empty() {
            return None;
        }
        let (id, addr) = live[self.next.fetch_add(1, Ordering::Relaxed) % live.len()];
        Some((id.to_string(), self.clients.get(id, addr)?))
    }
}

/// The running sender task.
pub struct Reporter {
    stop: CancellationToken,
    task: JoinHandle<()>,
}

impl Reporter {
    /// Reports what is still queued (for at most a couple of seconds), then stops.
    pub async fn stop(self) {
        self.stop.cancel();
        let mut task = self.task;
        if tokio::time::timeout(FLUSH_TIMEOUT, &mut task)
            .await
            .is_err()
        {
            task.abort();
            tracing::warn!("coordinator: unreported events dropped at stop");
        }
    }
}

/// Starts the sender task on `queued`, following `discovery` of service `center`.
pub fn start(
    discovery: keeper_sdk::Discovery,
    hub: Arc<Hub>,
    queued: mpsc::Receiver<DeviceEvent>,
) -> Reporter {
    let centers = Centers {
        discovery,
        clients: Clients::new(CoordinatorClient::new, RPC_TIMEOUT),
        next: AtomicUsize::new(0),
    };
    let stop = CancellationToken::new();
    let task = tokio::spawn(send_loop(centers, hub, queued, stop.clone()));
    Reporter { stop, task }
}

/// The wire form of one event.
fn to_pb(room_id: &str, ev: DeviceEvent) -> centerpb::Event {
    let (kind, payload_json, reason) = match ev.kind {
        EventKind::Uplink(p) => (centerpb::event::Kind::Uplink, p, String::new()),
        EventKind::Online => (centerpb::event::Kind::Online, Vec::new(), String::new()),
        EventKind::Offline(r) => (centerpb::event::Kind::Offline, Vec::new(), r),
    };
    centerpb::Event {
        kind: kind as i32,
        app: ev.app,
        user: ev.user,
        device: ev.device,
        conn_id: ev.conn_id,
        room: room_id.to_string(),
        ts: ev.ts_ms,
        payload_json,
        reason,
    }
}

/// Moves up to [`MAX_BATCH`] already queued events into `batch` without waiting.
fn fill(room_id: &str, queued: &mut mpsc::Receiver<DeviceEvent>, batch: &mut Vec<centerpb::Event>) {
    while batch.len() < MAX_BATCH {
        match queued.try_recv() {
            Ok(ev) => batch.push(to_pb(room_id, ev)),
            Err(_) => return,
        }
    }
}

async fn send_loop(
    centers: Centers,
    hub: Arc<Hub>,
    mut queued: mpsc::Receiver<DeviceEvent>,
    stop: CancellationToken,
) {
    loop {
        let first = tokio::select! {
            ev = queued.recv() => ev,
            _ = stop.cancelled() => break,
        };
        let Some(first) = first else { return };
        let mut batch = vec![to_pb(&hub.room_id, first)];
        fill(&hub.room_id, &mut queued, &mut batch);
        send(&centers, &hub, batch).await;
    }
    // Stopping: report what the closed connections left behind ([`Reporter::stop`] bounds it).
    loop {
        let mut batch = Vec::new();
        fill(&hub.room_id, &mut queued, &mut batch);
        if batch.is_empty() {
            return;
        }
        send(&centers, &hub, batch).await;
    }
}

/// Reports one batch, retrying on the next center with backoff; counts a batch given up on.
async fn send(centers: &Centers, hub: &Hub, events: Vec<centerpb::Event>) {
    let n = events.len() as u64;
    let mut delay = BACKOFF_FIRST;
    for attempt in 1..=ATTEMPTS {
        match centers.pick() {
            Some((id, mut client)) => {
                let request = centerpb::ReportRequest {
                    events: events.clone(),
                };
                match client.report(request).await {
                    Ok(answer) => {
                        let answer = answer.into_inner();
                        metrics::counter!("room_events_reported_total").increment(answer.queued);
                        metrics::counter!("room_events_not_queued_total")
                            .increment(answer.not_queued);
                        return;
                    }
                    Err(e) => {
                        tracing::debug!(center = %id, attempt, "coordinator: report failed: {e}")
                    }
                }
            }
            None => tracing::debug!(attempt, "coordinator: no center in discovery"),
        }
        if attempt < ATTEMPTS {
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(BACKOFF_MAX);
        }
    }
    tracing::warn!(events = n, "coordinator: no center took the batch; dropped");
    Stats::add(&hub.stats.events_failed, n);
    metrics::counter!("room_events_failed_total").increment(n);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind) -> DeviceEvent {
        DeviceEvent {
            app: "a".into(),
            user: "u".into(),
            device: "d".into(),
            conn_id: 7,
            ts_ms: 1,
            kind,
        }
    }

    #[test]
    fn events_keep_their_kind_payload_and_reason_on_the_wire() {
        let up = to_pb("r1", event(EventKind::Uplink(b"{}".to_vec())));
        assert_eq!(up.kind, centerpb::event::Kind::Uplink as i32);
        assert_eq!(
            (up.payload_json.as_slice(), up.room.as_str()),
            (&b"{}"[..], "r1")
        );
        let off = to_pb("r1", event(EventKind::Offline("closed".into())));
        assert_eq!(off.kind, centerpb::event::Kind::Offline as i32);
        assert_eq!((off.reason.as_str(), off.conn_id), ("closed", 7));
        let on = to_pb("r1", event(EventKind::Online));
        assert_eq!(on.kind, centerpb::event::Kind::Online as i32);
    }

    fn hub_with_queue(cap: usize) -> (Arc<Hub>, mpsc::Receiver<DeviceEvent>) {
        use longlink_common::App;
        use longlink_common::AppsConfig;
        let app = |id: &str, hook: Option<&str>| App {
            id: id.into(),
            secret: "s".into(),
            api_keys: vec![],
            webhook_url: hook.map(str::to_string),
            rate_limit: Default::default(),
        };
        let apps = AppsConfig {
            apps: vec![
                app("hooked", Some("http://127.0.0.1:9/hook")),
                app("quiet", None),
            ],
        };
        let (_, limits) = tokio::sync::watch::channel(Arc::new(crate::RoomLimits::default()));
        let (_, apps) = tokio::sync::watch::channel(Arc::new(apps));
        let (tx, rx) = mpsc::channel(cap);
        (Hub::new("r1".into(), limits, apps, Some(tx)), rx)
    }

    fn connect(hub: &Hub, app: &str) -> Arc<crate::hub::Conn> {
        let id = crate::auth::Identity {
            app: app.into(),
            user: "u".into(),
            device: "d".into(),
            platform: String::new(),
        };
        let conn = hub.new_conn(id, "127.0.0.1".parse().unwrap(), false);
        hub.insert(&conn);
        conn
    }

    #[test]
    fn the_hub_queues_events_of_apps_with_a_webhook_and_counts_drops() {
        let (hub, mut rx) = hub_with_queue(2);
        // No webhook: nothing queued, nothing counted as dropped.
        let quiet = connect(&hub, "quiet");
        hub.uplink(&quiet, b"1".to_vec());
        hub.remove(&quiet);
        assert!(rx.try_recv().is_err());
        assert_eq!(Stats::get(&hub.stats.uplink_drops), 0);

        // Online and the uplink fill the queue of 2; offline and a second uplink are dropped.
        let hooked = connect(&hub, "hooked");
        hub.uplink(&hooked, b"2".to_vec());
        hub.uplink(&hooked, b"3".to_vec());
        hub.remove(&hooked);
        let kinds: Vec<EventKind> = std::iter::from_fn(|| rx.try_recv().ok())
            .map(|e| e.kind)
            .collect();
        assert_eq!(kinds, [EventKind::Online, EventKind::Uplink(b"2".to_vec())]);
        assert_eq!(Stats::get(&hub.stats.uplink_drops), 1);
        assert_eq!(Stats::get(&hub.stats.presence_drops), 1);

        // A connection the room closed (a kick here) says so in its offline event.
        let again = connect(&hub, "hooked");
        let _ = rx.try_recv();
        hub.kick(&again, "bye", &[]);
        hub.remove(&again);
        let off = rx.try_recv().unwrap();
        assert_eq!(off.kind, EventKind::Offline("closed_by_room".into()));
    }

    #[tokio::test]
    async fn a_batch_takes_what_is_queued_up_to_the_cap() {
        let (tx, mut rx) = channel();
        for _ in 0..MAX_BATCH + 5 {
            tx.try_send(event(EventKind::Online)).unwrap();
        }
        let mut batch = Vec::new();
        fill("r1", &mut rx, &mut batch);
        assert_eq!(batch.len(), MAX_BATCH);
        let mut rest = Vec::new();
        fill("r1", &mut rx, &mut rest);
        assert_eq!(rest.len(), 5);
    }
}
