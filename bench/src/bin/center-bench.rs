//! `center-bench`: end-to-end unicast through the whole chain on loopback (docs/benchmarks.md).
//!
//! Starts keeper + register + room(s) + center from the binaries next to this one (or, with
//! `--keeper`, uses a running cluster), connects `--clients` devices over TCP, then runs two
//! phases with the same messages, pacing and concurrency; every payload carries its send time:
//! 1. baseline: each message straight to its user's room with the room's gRPC `Push` (no
//!    center, no register lookup);
//! 2. end to end: `POST /v1/apps/{app}/push` to center over keep-alive HTTP connections.
//!
//! With `--users-per-request K`, each request (HTTP push, or one room `Push` per room in the
//! baseline) carries K consecutive users, so `--rate` messages/s are `rate / K` requests/s.
//!
//! Latency is send -> device received (the HTTP answer comes back independently). Each phase
//! reports sent, accepted, received, msgs/s received, p50/p99/max; the summary divides the end
//! to end numbers by the baseline's.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::OnceLock;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use clap::Parser;
use futures::StreamExt;
use hdrhistogram::Histogram;
use keeper_sdk::Keeper;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::Format;
use longlink_client::Connection;
use longlink_client::Frame;
use longlink_client::Transport;
use longlink_common::App;
use longlink_common::AppsConfig;
use longlink_common::apps::RateLimit;
use longlink_proto::roompb;
use longlink_proto::roompb::room_client::RoomClient;
use serde::Deserialize;
use serde::Serialize;
use testkit::KeeperCluster;
use testkit::Process;
use tonic::transport::Channel;

/// Unicast through keeper + register + room + center, against a direct room baseline.
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    /// Use the running cluster behind these keeper endpoints instead of starting one.
    #[arg(long, value_delimiter = ',')]
    keeper: Option<Vec<String>>,
    /// App to push to; its secret and first API key are read from the keeper's `apps` config
    /// (a started cluster gets this app, without a rate limit to speak of).
    #[arg(long, default_value = "bench")]
    app: String,
    /// Where the keeper, register, room and center binaries are [default: next to this one].
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// Rooms to start (without --keeper); clients are spread over them.
    #[arg(long, default_value_t = 1)]
    rooms: usize,
    /// Connected devices; message i goes to user `u{i % clients}`.
    #[arg(long, default_value_t = 1000)]
    clients: usize,
    /// Target messages per second in each phase.
    #[arg(long, default_value_t = 2000)]
    rate: u64,
    /// Seconds each phase sends for.
    #[arg(long, default_value_t = 10)]
    duration: u64,
    /// Requests in flight: HTTP keep-alive connections (and concurrent room gRPC calls).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Users per request (1 = unicast; more = multicast of the same payload).
    #[arg(long, default_value_t = 1)]
    users_per_request: usize,
    /// Send the users of a request as that many unicasts, each with its own payload and message
    /// id, through `POST /v1/apps/{app}/push/batch` (and as distinct items to the baseline).
    #[arg(long)]
    batch: bool,
    /// Print the results as JSON on stdout (progress stays on stderr).
    #[arg(long)]
    json: bool,
}

/// Microseconds since the first call, on a monotonic clock shared by senders and receivers.
fn now_us() -> u64 {
    static BASE: OnceLock<Instant> = OnceLock::new();
    BASE.get_or_init(Instant::now).elapsed().as_micros() as u64
}

/// The payload of every message: its phase, sequence number and send time (and, in a batch,
/// which message of the request it is).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stamp {
    phase: usize,
    seq: u64,
    sent_us: u64,
    #[serde(default)]
    part: usize,
}

/// What the devices saw in one phase.
struct Received {
    count: AtomicU64,
    last_us: AtomicU64,
    latency_us: Mutex<Histogram<u64>>,
}

impl Received {
    fn new() -> Received {
        Received {
            count: AtomicU64::new(0),
            last_us: AtomicU64::new(0),
            latency_us: Mutex::new(histogram()),
        }
    }
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000, 3).expect("valid histogram bounds")
}

/// The cluster being measured: where to connect, and the processes if this run started them.
struct Target {
    app: String,
    secret: String,
    api_key: String,
    center_http: String,
    /// (tcp, grpc) of every room.
    rooms: Vec<(String, String)>,
    _processes: Vec<Process>,
    _keepers: Option<KeeperCluster>,
}

/// One phase's results.
#[derive(Debug, Serialize)]
struct PhaseResult {
    name: &'static str,
    target_rate: u64,
    sent: u64,
    accepted: u64,
    errors: BTreeMap<String, u64>,
    received: u64,
    send_rate: f64,
    msgs_per_s: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    /// Send -> response (HTTP answer or gRPC reply).
    answer_p50_ms: f64,
    answer_p99_ms: f64,
}

#[derive(Debug, Serialize)]
struct Report {
    clients: usize,
    rooms: usize,
    concurrency: usize,
    users_per_request: usize,
    batch: bool,
    duration_s: u64,
    connect_s: f64,
    phases: Vec<PhaseResult>,
    /// End to end divided by baseline: msgs/s, p50, p99.
    ratio_msgs_per_s: f64,
    ratio_p50: f64,
    ratio_p99: f64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    anyhow::ensure!(
        cli.clients > 0 && cli.rate > 0 && cli.concurrency > 0,
        "clients, rate and concurrency must be positive"
    );
    anyhow::ensure!(
        (1..=cli.clients.min(1000)).contains(&cli.users_per_request)
            && cli.rate >= cli.users_per_request as u64,
        "--users-per-request must be 1..=min(clients, 1000) and at most --rate"
    );
    let target = match &cli.keeper {
        Some(endpoints) => connect_target(endpoints, &cli.app).await?,
        None => start_target(&cli).await?,
    };
    eprintln!(
        "center {} , rooms {:?}",
        target.center_http,
        target.rooms.iter().map(|r| &r.0).collect::<Vec<_>>()
    );
    let phases = [Arc::new(Received::new()), Arc::new(Received::new())];
    let started = Instant::now();
    let devices = connect_devices(&cli, &target, &phases).await?;
    let connect_s = started.elapsed().as_secs_f64();
    eprintln!("{} devices connected in {connect_s:.1} s", cli.clients);

    let baseline = run_phase(&cli, &target, 0, &phases[0]).await?;
    let e2e = run_phase(&cli, &target, 1, &phases[1]).await?;
    for d in devices {
        d.abort();
    }
    let ratio = |a: f64, b: f64| if b > 0.0 { a / b } else { 0.0 };
    let report = Report {
        clients: cli.clients,
        rooms: target.rooms.len(),
        concurrency: cli.concurrency,
        users_per_request: cli.users_per_request,
        batch: cli.batch,
        duration_s: cli.duration,
        connect_s,
        ratio_msgs_per_s: ratio(e2e.msgs_per_s, baseline.msgs_per_s),
        ratio_p50: ratio(e2e.p50_ms, baseline.p50_ms),
        ratio_p99: ratio(e2e.p99_ms, baseline.p99_ms),
        phases: vec![baseline, e2e],
    };
    print_report(&report, cli.json)?;
    Ok(())
}

/// A fresh cluster from the binaries: 1 keeper, 1 register, `--rooms` rooms, 1 center.
async fn start_target(cli: &Cli) -> anyhow::Result<Target> {
    let bin_dir = match &cli.bin_dir {
        Some(d) => d.clone(),
        None => std::env::current_exe()?
            .parent()
            .context("executable has a directory")?
            .to_path_buf(),
    };
    let bin = |name: &str| bin_dir.join(name);
    let keepers = KeeperCluster::start(&bin("keeper"), 1, "").await?;
    let endpoint = keepers.endpoints()[0].clone();
    let dir = keepers.dir.path().to_path_buf();
    eprintln!("starting a cluster; logs in {}", dir.display());
    let keeper = Keeper::connect(std::slice::from_ref(&endpoint)).await?;
    push_apps(&keeper, &cli.app).await?;
    let spawn = |name: &str, binary: &str, args: Vec<String>| {
        Process::start(
            name,
            &bin(binary),
            &args,
            &dir.join(format!("{name}.log")),
            &[],
        )
    };
    let mut processes = vec![spawn(
        "register",
        "register",
        args(&[
            "--id",
            "reg1",
            "--listen",
            &loopback(),
            "--data-dir",
            &dir.join("reg1").display().to_string(),
            "--keeper",
            &endpoint,
        ]),
    )?];
    // Rooms and center start on a settled slot map.
    wait_slots_owned(&keeper).await?;
    for i in 1..=cli.rooms.max(1) {
        let id = format!("room-{i}");
        let a = args(&[
            "--id",
            &id,
            "--tcp",
            &loopback(),
            "--ws",
            &loopback(),
            "--grpc",
            &loopback(),
            "--keeper",
            &endpoint,
        ]);
        processes.push(spawn(&id, "room", a)?);
    }
    let center = args(&[
        "--id",
        "center-1",
        "--http",
        &loopback(),
        "--grpc",
        &loopback(),
        "--keeper",
        &endpoint,
    ]);
    processes.push(spawn("center", "center", center)?);
    let mut target = wait_up(&endpoint, &cli.app, cli.rooms.max(1)).await?;
    target._processes = processes;
    target._keepers = Some(keepers);
    Ok(target)
}

/// Waits until center and `rooms` rooms are in discovery.
async fn wait_up(endpoint: &str, app: &str, rooms: usize) -> anyhow::Result<Target> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let last = match connect_target(&[endpoint.to_string()], app).await {
            Ok(t) if t.rooms.len() >= rooms => return Ok(t),
            Ok(t) => anyhow::anyhow!("{} of {rooms} rooms in discovery", t.rooms.len()),
            Err(e) => e,
        };
        anyhow::ensure!(
            Instant::now() < deadline,
            "cluster not up within 60 s: {last}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

fn loopback() -> String {
    format!("127.0.0.1:{}", testkit::free_port())
}

/// The `apps` config of a started cluster: one app, rate limit out of the way.
async fn push_apps(keeper: &Keeper, app: &str) -> anyhow::Result<()> {
    let apps = AppsConfig {
        apps: vec![App {
            id: app.into(),
            secret: format!("{app}-secret"),
            api_keys: vec![format!("k-{app}")],
            webhook_url: None,
            rate_limit: RateLimit {
                per_second: u32::MAX / 2,
                burst: u32::MAX / 2,
            },
        }],
    };
    let doc = ConfigDocument {
        version: 1,
        format: Format::Json,
        body: serde_json::to_string(&apps)?,
        updated_at: keeper_sdk::layout::now_rfc3339(),
        author: "center-bench".into(),
    };
    let key = keeper_sdk::layout::config_key("apps");
    keeper.put(&key, serde_json::to_vec(&doc)?).await?;
    Ok(())
}

/// Waits until the slot controller has given every slot an owner.
async fn wait_slots_owned(keeper: &Keeper) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let map = keeper
            .get("/register/slots")
            .await?
            .and_then(|kv| serde_json::from_slice::<longlink_common::SlotMap>(&kv.value).ok());
        if map.is_some_and(|m| m.slots.iter().all(|o| !o.is_empty())) {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "slots not owned within 60 s");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Reads the app's credentials and the center and room addresses through the keeper.
async fn connect_target(endpoints: &[String], app: &str) -> anyhow::Result<Target> {
    let keeper = Keeper::connect(endpoints).await?;
    let kv = keeper
        .get(&keeper_sdk::layout::config_key("apps"))
        .await?
        .context("no apps config in the keeper")?;
    let doc: ConfigDocument = serde_json::from_slice(&kv.value)?;
    let apps: AppsConfig = match doc.format {
        Format::Json => serde_json::from_str(&doc.body)?,
        Format::Toml => toml::from_str(&doc.body)?,
    };
    let found = apps
        .get(app)
        .with_context(|| format!("no app {app:?} in the apps config"))?;
    let api_key = found
        .api_keys
        .first()
        .with_context(|| format!("app {app:?} has no API key"))?
        .clone();
    let centers = keeper.discover("center").await?.instances();
    let center_http = centers
        .iter()
        .find_map(|c| c.addrs.get("http").cloned())
        .context("no center in discovery")?;
    let rooms: Vec<(String, String)> = keeper
        .discover("room")
        .await?
        .instances()
        .iter()
        .filter_map(|r| Some((r.addrs.get("tcp")?.clone(), r.addrs.get("grpc")?.clone())))
        .collect();
    anyhow::ensure!(!rooms.is_empty(), "no room in discovery");
    Ok(Target {
        app: app.into(),
        secret: found.secret.clone(),
        api_key,
        center_http,
        rooms,
        _processes: Vec::new(),
        _keepers: None,
    })
}

/// Connects every device (user `u{i}` on room `i % rooms`) and starts its receive loop.
async fn connect_devices(
    cli: &Cli,
    target: &Target,
    phases: &[Arc<Received>; 2],
) -> anyhow::Result<Vec<tokio::task::JoinHandle<()>>> {
    let logins = futures::stream::iter(0..cli.clients)
        .map(|i| {
            let addr = target.rooms[i % target.rooms.len()].0.clone();
            let token = longlink_client::token(
                &target.app,
                &format!("u{i}"),
                None,
                &target.secret,
                Duration::from_secs(24 * 3600),
            );
            async move {
                let mut c = Connection::connect(&addr, Transport::Tcp).await?;
                c.auth(&token).await?;
                Ok::<_, longlink_client::Error>(c)
            }
        })
        .buffer_unordered(64);
    let connections: Vec<_> = logins.collect().await;
    let mut tasks = Vec::with_capacity(cli.clients);
    for c in connections {
        let c = c.context("device login")?;
        tasks.push(tokio::spawn(receive(c, phases.clone())));
    }
    Ok(tasks)
}

/// One device: records the latency of every stamped message; pings so it is never idle.
async fn receive(mut c: Connection, phases: [Arc<Received>; 2]) {
    let mut ping = tokio::time::interval(Duration::from_secs(10));
    loop {
        let frame = tokio::select! {
            f = c.recv() => f,
            _ = ping.tick() => {
                if c.ping().await.is_err() { return; }
                continue;
            }
        };
        let Ok(Some(frame)) = frame else { return };
        let Frame::Message(m) = frame else { continue };
        let Ok(stamp) = serde_json::from_slice::<Stamp>(&m.payload) else {
            continue;
        };
        let now = now_us();
        let Some(phase) = phases.get(stamp.phase) else {
            continue;
        };
        let latency = now.saturating_sub(stamp.sent_us).max(1);
        phase
            .latency_us
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .saturating_record(latency);
        phase.count.fetch_add(1, Ordering::Relaxed);
        phase.last_us.fetch_max(now, Ordering::Relaxed);
    }
}

/// How one message is sent in a phase.
#[derive(Clone)]
enum Sender {
    Room {
        rooms: Vec<RoomClient<Channel>>,
        batch: bool,
    },
    Http {
        client: reqwest::Client,
        url: String,
        key: String,
        batch: bool,
    },
}

impl Sender {
    fn new(
        target: &Target,
        phase: usize,
        concurrency: usize,
        batch: bool,
    ) -> anyhow::Result<Sender> {
        if phase == 0 {
            let rooms = target
                .rooms
                .iter()
                .map(|(_, grpc)| {
                    let channel = Channel::from_shared(format!("http://{grpc}"))?.connect_lazy();
                    Ok(RoomClient::new(channel))
                })
                .collect::<anyhow::Result<_>>()?;
            return Ok(Sender::Room { rooms, batch });
        }
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(concurrency)
            .tcp_nodelay(true)
            .build()?;
        let path = if batch { "push/batch" } else { "push" };
        Ok(Sender::Http {
            client,
            url: format!(
                "http://{}/v1/apps/{}/{path}",
                target.center_http, target.app
            ),
            key: target.api_key.clone(),
            batch,
        })
    }

    /// Sends request `seq` to `users`; `Err` names the failure for the error table.
    async fn send(&self, app: &str, users: &[String], stamp: &Stamp) -> Result<(), String> {
        let payload = serde_json::to_vec(stamp).map_err(|e| e.to_string())?;
        // In a batch, message k of the request has its own stamp (payload) and id.
        let part = |k: usize| Stamp {
            part: k,
            ..stamp.clone()
        };
        match self {
            Sender::Room { rooms, batch } => {
                // One Push per room, as a direct caller that knows every user's room would.
                let mut by_room: BTreeMap<usize, Vec<roompb::PushItem>> = BTreeMap::new();
                for (k, user) in users.iter().enumerate() {
                    let (id, payload) = if *batch {
                        let own = serde_json::to_vec(&part(k)).map_err(|e| e.to_string())?;
                        (format!("b{}-{k}", stamp.seq), own)
                    } else {
                        (format!("b{}", stamp.seq), payload.clone())
                    };
                    by_room
                        .entry(user_index(user) % rooms.len())
                        .or_default()
                        .push(roompb::PushItem {
                            conn_id: 0,
                            app: app.into(),
                            user: user.clone(),
                            message: Some(roompb::Message {
                                id,
                                qos: 0,
                                payload,
                                ts: 0,
                            }),
                        });
                }
                let calls = by_room.into_iter().map(|(i, items)| {
                    let mut client = rooms[i].clone();
                    async move { client.push(roompb::PushRequest { items }).await }
                });
                let mut delivered = 0;
                for answer in futures::future::join_all(calls).await {
                    delivered += answer
                        .map_err(|s| format!("grpc {:?}", s.code()))?
                        .into_inner()
                        .delivered as usize;
                }
                match delivered == users.len() {
                    true => Ok(()),
                    false => Err(format!("delivered {delivered} of {}", users.len())),
                }
            }
            Sender::Http {
                client,
                url,
                key,
                batch,
            } => {
                let body = if *batch {
                    let messages: Vec<_> = users
                        .iter()
                        .enumerate()
                        .map(|(k, user)| serde_json::json!({"users": [user], "payload": part(k)}))
                        .collect();
                    serde_json::json!({ "messages": messages })
                } else {
                    serde_json::json!({
                        "users": users,
                        "payload": serde_json::from_slice::<serde_json::Value>(&payload)
                            .map_err(|e| e.to_string())?,
                    })
                }
                .to_string();
                let res = client
                    .post(url)
                    .bearer_auth(key)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await
                    .map_err(|e| format!("http error: {}", e.without_url()))?;
                let status = res.status().as_u16();
                let text = res.text().await.map_err(|e| e.to_string())?;
                let sessions = serde_json::from_str::<serde_json::Value>(&text)
                    .ok()
                    .and_then(|v| match v.get("results") {
                        Some(results) => results
                            .as_array()?
                            .iter()
                            .map(|r| r["sessions"].as_u64())
                            .sum(),
                        None => v["sessions"].as_u64(),
                    });
                match (status, sessions) {
                    (200, Some(n)) if n == users.len() as u64 => Ok(()),
                    (200, n) => Err(format!("sessions {n:?}")),
                    (s, _) => Err(format!("http {s}")),
                }
            }
        }
    }
}

/// `u{i}` -> i, the index the device was connected with (its room is `i % rooms`).
fn user_index(user: &str) -> usize {
    user[1..].parse().unwrap_or(0)
}

/// Counters of the senders of one phase.
struct Sent {
    sent: AtomicU64,
    accepted: AtomicU64,
    /// Failed sends by what went wrong.
    errors: Mutex<BTreeMap<String, u64>>,
    /// Send -> answer (HTTP response or gRPC reply), microseconds.
    answer_us: Mutex<Histogram<u64>>,
}

impl Sent {
    fn new() -> Sent {
        Sent {
            sent: AtomicU64::new(0),
            accepted: AtomicU64::new(0),
            errors: Mutex::new(BTreeMap::new()),
            answer_us: Mutex::new(histogram()),
        }
    }
}

/// Sends `rate * duration` messages paced at `rate` by `concurrency` workers, then waits (up to
/// 10 s) for the devices to receive every accepted one.
async fn run_phase(
    cli: &Cli,
    target: &Target,
    phase: usize,
    received: &Arc<Received>,
) -> anyhow::Result<PhaseResult> {
    let name = if phase == 0 {
        "baseline: room gRPC Push"
    } else {
        "end to end: center HTTP push"
    };
    let name = match (phase, cli.batch) {
        (1, true) => "end to end: center HTTP push/batch (one unicast per user)",
        _ => name,
    };
    eprintln!(
        "phase {name}: {} msgs/s for {} s, {} user(s) per request",
        cli.rate, cli.duration, cli.users_per_request
    );
    let sender = Sender::new(target, phase, cli.concurrency, cli.batch)?;
    let per_request = cli.users_per_request as u64;
    let total = cli.rate * cli.duration / per_request;
    let interval_ns = 1_000_000_000 * per_request / cli.rate;
    let sent = Arc::new(Sent::new());
    let start = tokio::time::Instant::now();
    let start_us = now_us();
    let workers: Vec<_> = (0..cli.concurrency as u64)
        .map(|w| {
            let (sender, sent) = (sender.clone(), sent.clone());
            let (app, clients, step) = (target.app.clone(), cli.clients as u64, cli.concurrency);
            tokio::spawn(async move {
                for seq in (w..total).step_by(step) {
                    tokio::time::sleep_until(start + Duration::from_nanos(seq * interval_ns)).await;
                    let stamp = Stamp {
                        phase,
                        seq,
                        sent_us: now_us(),
                        part: 0,
                    };
                    let users: Vec<String> = (seq * per_request..(seq + 1) * per_request)
                        .map(|i| format!("u{}", i % clients))
                        .collect();
                    let result = sender.send(&app, &users, &stamp).await;
                    record(&sent, stamp.sent_us, per_request, result);
                }
            })
        })
        .collect();
    let progress = tokio::spawn(progress(sent.clone(), received.clone()));
    for w in workers {
        w.await?;
    }
    let send_s = (now_us() - start_us) as f64 / 1e6;
    let accepted = sent.accepted.load(Ordering::Relaxed);
    let deadline = Instant::now() + Duration::from_secs(10);
    while received.count.load(Ordering::Relaxed) < accepted && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    progress.abort();
    Ok(result(name, cli.rate, start_us, send_s, &sent, received))
}

/// Counts one request of `messages` messages (one per user).
fn record(sent: &Sent, sent_us: u64, messages: u64, result: Result<(), String>) {
    sent.sent.fetch_add(messages, Ordering::Relaxed);
    let took = now_us().saturating_sub(sent_us).max(1);
    sent.answer_us
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .saturating_record(took);
    match result {
        Ok(()) => {
            sent.accepted.fetch_add(messages, Ordering::Relaxed);
        }
        Err(e) => {
            *sent
                .errors
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .entry(e)
                .or_default() += messages;
        }
    }
}

/// Prints sent and received counts every second.
async fn progress(sent: Arc<Sent>, received: Arc<Received>) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.tick().await;
    loop {
        tick.tick().await;
        eprintln!(
            "  sent {:>8}  accepted {:>8}  received {:>8}",
            sent.sent.load(Ordering::Relaxed),
            sent.accepted.load(Ordering::Relaxed),
            received.count.load(Ordering::Relaxed)
        );
    }
}

fn result(
    name: &'static str,
    rate: u64,
    start_us: u64,
    send_s: f64,
    sent: &Sent,
    received: &Received,
) -> PhaseResult {
    let count = received.count.load(Ordering::Relaxed);
    let last = received.last_us.load(Ordering::Relaxed);
    let recv_s = last.saturating_sub(start_us) as f64 / 1e6;
    let lat = received
        .latency_us
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let answers = sent
        .answer_us
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    let ms = |us: u64| us as f64 / 1000.0;
    let sent_n = sent.sent.load(Ordering::Relaxed);
    PhaseResult {
        name,
        target_rate: rate,
        sent: sent_n,
        accepted: sent.accepted.load(Ordering::Relaxed),
        errors: sent
            .errors
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone(),
        received: count,
        send_rate: if send_s > 0.0 {
            sent_n as f64 / send_s
        } else {
            0.0
        },
        msgs_per_s: if recv_s > 0.0 {
            count as f64 / recv_s
        } else {
            0.0
        },
        p50_ms: ms(lat.value_at_quantile(0.5)),
        p99_ms: ms(lat.value_at_quantile(0.99)),
        max_ms: ms(lat.max()),
        answer_p50_ms: ms(answers.value_at_quantile(0.5)),
        answer_p99_ms: ms(answers.value_at_quantile(0.99)),
    }
}

fn print_report(report: &Report, json: bool) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
        return Ok(());
    }
    println!(
        "{} clients on {} room(s), concurrency {}, {} user(s) per request{}, {} s per phase (connect {:.1} s)",
        report.clients,
        report.rooms,
        report.concurrency,
        report.users_per_request,
        if report.batch {
            " as a batch of unicasts"
        } else {
            ""
        },
        report.duration_s,
        report.connect_s
    );
    for p in &report.phases {
        println!("{}", p.name);
        println!(
            "  target {}/s, sent {} ({:.0}/s), accepted {}, received {}, errors {:?}",
            p.target_rate, p.sent, p.send_rate, p.accepted, p.received, p.errors
        );
        println!(
            "  delivered {:.0} msgs/s; send -> device p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms; answer p50 {:.2} ms, p99 {:.2} ms",
            p.msgs_per_s, p.p50_ms, p.p99_ms, p.max_ms, p.answer_p50_ms, p.answer_p99_ms
        );
    }
    println!(
        "end to end / baseline: msgs/s {:.2}x, p50 {:.2}x, p99 {:.2}x",
        report.ratio_msgs_per_s, report.ratio_p50, report.ratio_p99
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_index_is_the_connection_index() {
        assert_eq!(user_index("u0"), 0);
        assert_eq!(user_index("u1234"), 1234);
    }

    #[test]
    fn a_stamp_round_trips_as_json() {
        let s = Stamp {
            phase: 1,
            seq: 7,
            sent_us: 99,
            part: 3,
        };
        let back: Stamp = serde_json::from_slice(&serde_json::to_vec(&s).unwrap()).unwrap();
        assert_eq!(
            (back.phase, back.seq, back.sent_us, back.part),
            (1, 7, 99, 3)
        );
    }

    #[test]
    fn the_cli_parses() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
