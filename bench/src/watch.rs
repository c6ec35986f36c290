//! Watch delivery latency: many watchers on one prefix, one writer putting timestamped values
//! at a steady rate; every watcher must receive every value exactly once.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;
use std::time::Instant;

use anyhow::Context;
use etcd_client::WatchClient;
use etcd_client::WatchOptions;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::cluster::Cluster;
use crate::results::WatchResult;
use crate::stats;

const PREFIX: &str = "bench/watch/";

/// How long all watches together may take to be created.
const CREATE_TIMEOUT: Duration = Duration::from_secs(30);

/// After the last put, how long watchers get to receive what they still miss before they count
/// as having lost it.
const DELIVERY_GRACE: Duration = Duration::from_secs(10);

const PROGRESS_EVERY: Duration = Duration::from_secs(1);

pub struct Shape {
    pub connections: usize,
    /// Watch streams per connection, one watch each (as separate clients would open them).
    pub per_connection: usize,
    /// Values the writer puts.
    pub events: usize,
    /// Puts per second.
    pub rate: u32,
}

/// What one watcher saw.
struct Watched {
    /// Receive time minus send time of each event, in arrival order.
    latencies: Vec<Duration>,
    error: Option<String>,
}

pub async fn run(cluster: &Cluster, shape: &Shape) -> anyhow::Result<WatchResult> {
    anyhow::ensure!(
        shape.connections > 0 && shape.per_connection > 0,
        "watch: needs watchers"
    );
    anyhow::ensure!(shape.rate > 0, "watch: needs a positive write rate");
    let watchers = shape.connections * shape.per_connection;
    let name = format!("watch {watchers}x{}", shape.events);
    eprintln!(
        "{name}: opening {watchers} watches on {} connections",
        shape.connections
    );

    let conns = cluster.connect_for_watch(shape.connections).await?;
    // Send and receive times are both measured from here, in this process: one clock.
    let origin = Instant::now();
    let delivered = Arc::new(AtomicU64::new(0));
    let stop = CancellationToken::new();
    let (ready_tx, mut ready_rx) = mpsc::channel(watchers);
    let mut tasks = JoinSet::new();
    for w in 0..watchers {
        let client = conns[w % shape.connections].watch_client();
        let watcher = watcher(
            client,
            origin,
            shape.events,
            ready_tx.clone(),
            delivered.clone(),
            stop.clone(),
        );
        tasks.spawn(watcher);
    }
    drop(ready_tx);

    let created = async {
        for _ in 0..watchers {
            match ready_rx.recv().await {
                Some(Ok(())) => {}
                Some(Err(e)) => anyhow::bail!("{name}: a watch could not be created: {e}"),
                None => anyhow::bail!("{name}: watchers ended before all watches were created"),
            }
        }
        Ok(())
    };
    let created = tokio::time::timeout(CREATE_TIMEOUT, created)
        .await
        .unwrap_or_else(|_| {
            Err(anyhow::anyhow!(
                "{name}: watches not all created within {CREATE_TIMEOUT:?}"
            ))
        });
    if let Err(e) = created {
        stop.cancel();
        tasks.shutdown().await;
        return Err(e);
    }
    eprintln!(
        "{name}: {watchers} watches created in {:.1}s",
        origin.elapsed().as_secs_f64()
    );

    let written = write(cluster, shape, &name, origin, &delivered).await;
    if let Err(e) = written {
        stop.cancel();
        tasks.shutdown().await;
        return Err(e);
    }

    let mut latencies = stats::histogram();
    let mut deliveries = 0;
    let mut incomplete = 0;
    let mut first_error = None;
    let grace = tokio::time::sleep(DELIVERY_GRACE);
    tokio::pin!(grace);
    let mut progress = tokio::time::interval(PROGRESS_EVERY);
    progress.tick().await;
    loop {
        tokio::select! {
            joined = tasks.join_next() => {
                let Some(joined) = joined else { break };
                let watched = joined?;
                deliveries += watched.latencies.len() as u64;
                if watched.latencies.len() != shape.events || watched.error.is_some() {
                    incomplete += 1;
                }
                if first_error.is_none() {
                    first_error = watched.error;
                }
                for latency in watched.latencies {
                    stats::record(&mut latencies, latency);
                }
            }
            () = &mut grace, if !stop.is_cancelled() => {
                eprintln!("{name}: {DELIVERY_GRACE:?} after the last put, some watchers still miss events");
                stop.cancel();
            }
            _ = progress.tick() => {
                eprintln!("{name}: waiting for the last deliveries, {} so far", delivered.load(Ordering::Relaxed));
            }
        }
    }

    let (p50_ms, p99_ms, max_ms) = stats::summary_ms(&latencies);
    let result = WatchResult {
        name: name.clone(),
        connections: shape.connections,
        watchers,
        events: shape.events,
        expected_deliveries: (watchers * shape.events) as u64,
        deliveries,
        incomplete_watchers: incomplete,
        first_error,
        p50_ms,
        p99_ms,
        max_ms,
    };
    eprintln!(
        "{name}: done: {deliveries}/{} deliveries, p50 {p50_ms:.2} ms, p99 {p99_ms:.2} ms, max {max_ms:.2} ms",
        result.expected_deliveries
    );
    Ok(result)
}

/// Puts `bench/watch/{i}` = send time (nanoseconds since `origin`) at `shape.rate` per second.
async fn write(
    cluster: &Cluster,
    shape: &Shape,
    name: &str,
    origin: Instant,
    delivered: &AtomicU64,
) -> anyhow::Result<()> {
    let mut kv = cluster.connect(1).await?.remove(0).kv_client();
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / shape.rate);
    // A slow put delays the next ones rather than causing a burst that would skew latencies.
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    for i in 0..shape.events {
        ticker.tick().await;
        let sent = origin.elapsed().as_nanos().to_string();
        kv.put(format!("{PREFIX}{i}"), sent, None)
            .await
            .with_context(|| format!("{name}: put {i}"))?;
        if (i + 1) % shape.rate as usize == 0 || i + 1 == shape.events {
            eprintln!(
                "{name}: {:.1}s {}/{} puts, {} deliveries",
                started.elapsed().as_secs_f64(),
                i + 1,
                shape.events,
                delivered.load(Ordering::Relaxed)
            );
        }
    }
    Ok(())
}

/// One watcher: opens its own watch stream, reports when the watch is created, then records the
/// latency of each event until it has them all, the stream fails, or `stop`.
async fn watcher(
    mut client: WatchClient,
    origin: Instant,
    events: usize,
    ready: mpsc::Sender<Result<(), String>>,
    delivered: Arc<AtomicU64>,
    stop: CancellationToken,
) -> Watched {
    let mut watched = Watched {
        latencies: Vec::with_capacity(events),
        error: None,
    };
    let mut stream = match open(&mut client).await {
        Ok(stream) => {
            let _ = ready.send(Ok(())).await;
            stream
        }
        Err(e) => {
            let e = format!("{e:#}");
            let _ = ready.send(Err(e.clone())).await;
            watched.error = Some(e);
            return watched;
        }
    };
    drop(ready);

    let mut seen = vec![false; events];
    while watched.latencies.len() < events {
        let message = tokio::select! {
            () = stop.cancelled() => break,
            message = stream.message() => message,
        };
        let received = origin.elapsed();
        let response = match message {
            Ok(Some(response)) => response,
            Ok(None) => {
                watched.error = Some("watch stream closed by the server".into());
                break;
            }
            Err(e) => {
                watched.error = Some(format!("watch stream failed: {e}"));
                break;
            }
        };
        if response.canceled() {
            watched.error = Some(format!("watch canceled: {}", response.cancel_reason()));
            break;
        }
        for event in response.events() {
            match parse_event(event, events) {
                Ok((index, sent)) if !seen[index] => {
                    seen[index] = true;
                    watched.latencies.push(received.saturating_sub(sent));
                    delivered.fetch_add(1, Ordering::Relaxed);
                }
                Ok((index, _)) => {
                    watched
                        .error
                        .get_or_insert_with(|| format!("event {index} delivered twice"));
                }
                Err(e) => {
                    watched.error.get_or_insert(e);
                }
            }
        }
    }
    watched
}

/// Opens a watch stream on the prefix and waits for the server to confirm the watch.
async fn open(client: &mut WatchClient) -> anyhow::Result<etcd_client::WatchStream> {
    let mut stream = client
        .watch(PREFIX, Some(WatchOptions::new().with_prefix()))
        .await
        .context("watch")?;
    let first = stream.message().await.context("watch: first response")?;
    match first {
        Some(response) if response.created() && !response.canceled() => Ok(stream),
        Some(response) => anyhow::bail!(
            "watch: first response did not confirm the watch (canceled: {} {})",
            response.canceled(),
            response.cancel_reason()
        ),
        None => anyhow::bail!("watch: stream closed before the watch was created"),
    }
}

/// The writer's index and send time carried by an event.
fn parse_event(event: &etcd_client::Event, events: usize) -> Result<(usize, Duration), String> {
    let kv = event.kv().ok_or("event without a key-value")?;
    let key = String::from_utf8_lossy(kv.key());
    let index = key
        .strip_prefix(PREFIX)
        .and_then(|i| i.parse::<usize>().ok())
        .filter(|&i| i < events)
        .ok_or_else(|| format!("unexpected key {key}"))?;
    let sent = std::str::from_utf8(kv.value())
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
        .ok_or_else(|| format!("unexpected value for {key}"))?;
    Ok((index, Duration::from_nanos(sent)))
}
