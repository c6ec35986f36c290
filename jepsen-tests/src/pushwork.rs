//! The push workload: devices (one per user, in the harness) that stay connected to a room over
//! the TCP protocol, ack every QoS 1 message and record what arrives; and pushers that send QoS 1
//! unicasts with unique payloads `{"k": key, "to": user}` through center's HTTP API.

use std::sync::Arc;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use longlink_client::Connection;
use longlink_client::Frame;
use longlink_client::Transport;
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;
use tokio_util::sync::CancellationToken;

use crate::history::DeviceEvent;
use crate::history::DeviceWhat;
use crate::history::Entry;
use crate::history::Outcome;
use crate::history::PushAnswer;
use crate::history::PushOp;
use crate::history::Recorder;

/// The app of the push workload.
pub const APP: &str = "jepsen";
/// Its secret (device tokens) and API key (pushes); test values only.
pub const SECRET: &str = "jepsen-secret-not-for-production";
pub const API_KEY: &str = "jepsen-key";
/// A device pings this often, and gives a connection up after this long without any frame.
const PING_EVERY: Duration = Duration::from_secs(1);
const LIVENESS: Duration = Duration::from_secs(5);

/// The typed config `apps` the run seeds.
pub fn apps_config() -> serde_json::Value {
    serde_json::json!({"apps": [{
        "id": APP,
        "secret": SECRET,
        "api_keys": [API_KEY],
        "rate_limit": {"per_second": 100000, "burst": 100000},
    }]})
}

/// A room devices can connect to.
#[derive(Clone)]
pub struct RoomAddr {
    pub name: String,
    pub tcp: String,
    /// The room process's restart count (see [`crate::svc::Svc::incarnation`]).
    pub incarnation: Arc<AtomicU32>,
}

/// Settings shared by devices and pushers.
#[derive(Clone)]
pub struct PushCtx {
    pub rec: Recorder,
    /// center's HTTP address.
    pub center: String,
    pub rooms: Vec<RoomAddr>,
    pub op_timeout: Duration,
    pub users: usize,
    pub seed: u64,
}

/// The name of user `i`.
pub fn user(i: usize) -> String {
    format!("u{i}")
}

fn device_event(ctx: &PushCtx, user: &str, what: DeviceWhat) {
    ctx.rec.entry(Entry::Device(DeviceEvent {
        time: ctx.rec.now(),
        user: user.to_string(),
        what,
    }));
}

/// Connects and authenticates to `room`; the welcome's conn id and resumed count.
async fn open(
    ctx: &PushCtx,
    room: &RoomAddr,
    user: &str,
) -> Result<(Connection, u64, u32), String> {
    let token = longlink_client::token(
        APP,
        user,
        Some(&format!("d-{user}")),
        SECRET,
        Duration::from_secs(3600),
    );
    let connect = async {
        let mut c = Connection::connect(&room.tcp, Transport::Tcp)
            .await
            .map_err(|e| e.to_string())?;
        let w = c.auth(&token).await.map_err(|e| e.to_string())?;
        Ok::<_, String>((c, w.conn_id, w.resumed))
    };
    tokio::time::timeout(ctx.op_timeout * 2, connect)
        .await
        .map_err(|_| "connect/auth timed out".to_string())?
}

/// Reads frames until the connection ends or `stop`; records and acks every message. Returns
/// why it ended.
async fn serve(ctx: &PushCtx, user: &str, c: &mut Connection, stop: &CancellationToken) -> String {
    let mut last_frame = Instant::now();
    let mut last_ping = Instant::now();
    loop {
        if stop.is_cancelled() {
            return "stopped".into();
        }
        if last_frame.elapsed() > LIVENESS {
            return format!("no frame for {LIVENESS:?}");
        }
        if last_ping.elapsed() >= PING_EVERY {
            last_ping = Instant::now();
            if let Err(e) = c.ping().await {
                return format!("ping: {e}");
            }
        }
        let frame = match tokio::time::timeout(Duration::from_millis(250), c.recv()).await {
            Err(_) => continue,
            Ok(Err(e)) => return format!("recv: {e}"),
            Ok(Ok(None)) => return "closed by the room".into(),
            Ok(Ok(Some(f))) => f,
        };
        last_frame = Instant::now();
        match frame {
            Frame::Message(m) => {
                let payload: serde_json::Value =
                    serde_json::from_slice(&m.payload).unwrap_or(serde_json::Value::Null);
                device_event(
                    ctx,
                    user,
                    DeviceWhat::Received {
                        id: m.id.clone(),
                        key: payload["k"].as_u64(),
                        to: payload["to"].as_str().map(str::to_string),
                        qos: m.qos,
                    },
                );
                if m.qos == 1
                    && let Err(e) = c.ack(vec![m.id]).await
                {
                    return format!("ack: {e}");
                }
            }
            Frame::Error(e) => return format!("error frame {}: {}", e.code, e.message),
            Frame::Kick(k) => return format!("kicked: {}", k.reason),
            _ => {}
        }
    }
}

/// One user's device: stays connected (to its preferred room, to the next one after three
/// failed attempts), records every connection, disconnection and message, until `stop`.
pub async fn device(ctx: PushCtx, index: usize, stop: CancellationToken) -> usize {
    let user = user(index);
    let mut current = index % ctx.rooms.len();
    let mut failures = 0;
    let mut connections = 0;
    while !stop.is_cancelled() {
        let room = ctx.rooms[current].clone();
        match open(&ctx, &room, &user).await {
            Ok((mut c, conn_id, resumed)) => {
                failures = 0;
                connections += 1;
                device_event(
                    &ctx,
                    &user,
                    DeviceWhat::Connected {
                        room: room.name.clone(),
                        conn_id,
                        incarnation: room.incarnation.load(Ordering::Relaxed),
                        resumed,
                    },
                );
                let reason = serve(&ctx, &user, &mut c, &stop).await;
                device_event(&ctx, &user, DeviceWhat::Disconnected { reason });
            }
            Err(_) => {
                failures += 1;
                if failures >= 3 {
                    failures = 0;
                    current = (current + 1) % ctx.rooms.len();
                }
            }
        }
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
    connections
}

/// Sends one QoS 1 push of `key` to `user` and records it.
pub async fn push_one(
    ctx: &PushCtx,
    http: &reqwest::Client,
    client: u64,
    user: &str,
    key: u64,
) -> PushOp {
    let body = serde_json::json!({
        "users": [user],
        "payload": {"k": key, "to": user},
        "qos": 1,
        "ttl_s": 30,
    });
    let url = format!("http://{}/v1/apps/{APP}/push", ctx.center);
    let call_time = ctx.rec.now();
    let sent = http.post(url).bearer_auth(API_KEY).json(&body).send().await;
    let (outcome, http_status, answer, error) = match sent {
        Ok(r) => {
            let status = r.status().as_u16();
            if status == 200 {
                match r.json::<PushAnswer>().await {
                    Ok(a) => (Outcome::Ok, Some(status), Some(a), None),
                    Err(e) => (Outcome::Unknown, Some(status), None, Some(e.to_string())),
                }
            } else {
                let text = r.text().await.unwrap_or_default();
                (Outcome::Fail, Some(status), None, Some(text))
            }
        }
        Err(e) if e.is_connect() => (Outcome::Fail, None, None, Some(e.to_string())),
        Err(e) => (Outcome::Unknown, None, None, Some(e.to_string())),
    };
    let op = PushOp {
        client,
        user: user.to_string(),
        key,
        call_time,
        return_time: ctx.rec.now(),
        outcome,
        http_status,
        answer,
        error,
    };
    ctx.rec.entry(Entry::Push(op.clone()));
    op
}

/// A pusher: QoS 1 unicasts of fresh keys to random users until `stop`. One request in flight;
/// never retries; an `unknown` outcome retires the client id.
pub async fn pusher(ctx: PushCtx, worker: u64, stop: CancellationToken) -> usize {
    let mut rng = StdRng::seed_from_u64(ctx.seed ^ (worker + 31).wrapping_mul(0x9e37_79b9));
    let Ok(http) = reqwest::Client::builder().timeout(ctx.op_timeout).build() else {
        return 0;
    };
    let mut client = ctx.rec.client_id();
    let mut n = 0;
    while !stop.is_cancelled() {
        let u = user(rng.random_range(0..ctx.users));
        let op = push_one(&ctx, &http, client, &u, ctx.rec.unique_value()).await;
        n += 1;
        let pause = match op.outcome {
            Outcome::Ok => rng.random_range(10..50),
            Outcome::Fail => 200,
            Outcome::Unknown => {
                client = ctx.rec.client_id();
                200
            }
        };
        tokio::time::sleep(Duration::from_millis(pause)).await;
    }
    n
}
