//! The coordinator: delivers uplinks and online/offline events to each app's webhook.
//!
//! Events wait in one bounded queue. Producers never wait: when the queue is full the event is
//! dropped and counted (`center_webhook_dropped_total`), because a slow or dead webhook must not
//! slow down pushes or the rooms that report events. Deliveries run `concurrency` at a time and
//! are retried with exponential backoff up to `max_attempts`; delivery is at least once (a
//! receiver dedupes on the event id).
//!
//! Each POST carries (see docs/api.md):
//! - `X-Longlink-Event`: the event id;
//! - `X-Longlink-Timestamp`: Unix seconds at signing;
//! - `X-Longlink-Signature`: `v1=` + hex HMAC-SHA256, keyed with the app's secret, over the
//!   bytes `{timestamp}.{body}`.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;
use std::time::Duration;

use hmac::Hmac;
use hmac::Mac;
use longlink_common::AppsConfig;
use serde::Deserialize;
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::config::Live;
use crate::config::WebhookConfig;

/// Header carrying the signature.
pub const SIGNATURE_HEADER: &str = "x-longlink-signature";
/// Header carrying the signing time (Unix seconds), which is part of the signed bytes.
pub const TIMESTAMP_HEADER: &str = "x-longlink-timestamp";
/// Header carrying the event id (stable across retries).
pub const EVENT_HEADER: &str = "x-longlink-event";

/// What happened.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EventKind {
    /// A device sent data upstream.
    Uplink {
        /// The device's payload, as it sent it.
        payload: serde_json::Value,
    },
    /// A session started.
    Online,
    /// A session ended.
    Offline {
        /// Why, as the room saw it (`closed`, `kicked`, `idle`, ...).
        #[serde(default)]
        reason: String,
    },
}

/// One event for an app's webhook; the JSON body of the POST.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// Unique per event, stable across retries.
    pub id: String,
    pub app: String,
    pub user: String,
    #[serde(default)]
    pub device: String,
    #[serde(default)]
    pub conn_id: String,
    #[serde(default)]
    pub room: String,
    /// When the room saw it, Unix milliseconds.
    pub ts: u64,
    #[serde(flatten)]
    pub kind: EventKind,
}

/// Counters of the coordinator, also exported as metrics.
#[derive(Debug, Default)]
pub struct Stats {
    /// Events queued for delivery.
    pub accepted: AtomicU64,
    /// Events dropped because the queue was full.
    pub dropped: AtomicU64,
    /// Events not queued because the app is unknown or has no webhook.
    pub skipped: AtomicU64,
    /// Events the webhook accepted (2xx).
    pub delivered: AtomicU64,
    /// Events given up: attempts exhausted, or refused with a 4xx.
    pub failed: AtomicU64,
    /// POSTs made, retries included.
    pub attempts: AtomicU64,
}

/// The producer side: cheap to clone, never blocks.
#[derive(Clone)]
pub struct Coordinator {
    config: Arc<Live<WebhookConfig>>,
    queue: mpsc::Sender<Event>,
    apps: watch::Receiver<Arc<AppsConfig>>,
    stats: Arc<Stats>,
}

impl Coordinator {
    /// Applies new delivery settings (attempts, backoff, timeout) to the next attempts; `queue`
    /// and `concurrency` are fixed at start.
    pub fn set_config(&self, config: WebhookConfig) {
        self.config.set(config);
    }

    /// Starts the delivery loop; it stops when `shutdown` is cancelled (events still queued are
    /// dropped then: the webhook contract is at least once while running, not durable).
    pub fn start(
        config: WebhookConfig,
        apps: watch::Receiver<Arc<AppsConfig>>,
        shutdown: CancellationToken,
    ) -> (Coordinator, tokio::task::JoinHandle<()>) {
        let (tx, rx) = mpsc::channel(config.queue.max(1));
        let stats = Arc::new(Stats::default());
        // The timeout is set per POST, so that a new `timeout_ms` applies live.
        let client = reqwest::Client::builder()
            .build()
            .expect("reqwest client without TLS always builds");
        let config = Arc::new(Live::new(config));
        let worker = Worker {
            config: config.clone(),
            apps: apps.clone(),
            stats: stats.clone(),
            client,
            shutdown,
        };
        let handle = tokio::spawn(worker.run(rx));
        (
            Coordinator {
                config,
                queue: tx,
                apps,
                stats,
            },
            handle,
        )
    }

    /// Queues `event`; returns whether it was queued. Never waits.
    pub fn submit(&self, event: Event) -> bool {
        let has_webhook = self
            .apps
            .borrow()
            .get(&event.app)
            .is_some_and(|a| a.webhook_url.is_some());
        if !has_webhook {
            self.stats.skipped.fetch_add(1, Ordering::Relaxed);
            return false;
        }
        match self.queue.try_send(event) {
            Ok(()) => {
                self.stats.accepted.fetch_add(1, Ordering::Relaxed);
                true
            }
            Err(_) => {
                self.stats.dropped.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("center_webhook_dropped_total").increment(1);
                false
            }
        }
    }

    /// The counters.
    pub fn stats(&self) -> &Stats {
        &self.stats
    }
}

/// `v1=` + hex HMAC-SHA256(secret, `{timestamp}.{body}`).
pub fn sign(secret: &str, timestamp: u64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks a signature as a receiver should (constant-time comparison). Receivers should also
/// reject timestamps far from their clock to stop replays.
pub fn verify(secret: &str, timestamp: u64, body: &[u8], signature: &str) -> bool {
    let Some(hex_sig) = signature.strip_prefix("v1=") else {
        return false;
    };
    let Ok(sig) = hex::decode(hex_sig) else {
        return false;
    };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.verify_slice(&sig).is_ok()
}

struct Worker {
    config: Arc<Live<WebhookConfig>>,
    apps: watch::Receiver<Arc<AppsConfig>>,
    stats: Arc<Stats>,
    client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Worker {
    async fn run(self, mut rx: mpsc::Receiver<Event>) {
        let this = Arc::new(self);
        let slots = Arc::new(Semaphore::new(this.config.get().concurrency.max(1)));
        let mut tasks = JoinSet::new();
        loop {
            // Take a delivery slot before taking an event, so that while every slot is busy the
            // queue fills and producers drop (instead of events piling up here).
            let permit = tokio::select! {
                _ = this.shutdown.cancelled() => break,
                p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
            };
            let event = tokio::select! {
                _ = this.shutdown.cancelled() => break,
                e = rx.recv() => match e { Some(e) => e, None => break },
            };
            while tasks.try_join_next().is_some() {}
            let this = this.clone();
            tasks.spawn(async move {
                this.deliver(event).await;
                drop(permit);
            });
        }
        // Deliveries notice the shutdown between attempts; wait for the ones mid-POST.
        while tasks.join_next().await.is_some() {}
    }

    async fn deliver(&self, event: Event) {
        let body = match serde_json::to_vec(&event) {
            Ok(b) => b,
            Err(e) => {
                tracing::error!(id = %event.id, "cannot encode webhook event: {e}");
                self.give_up();
                return;
            }
        };
        let mut attempt = 0;
        loop {
            // Read at every attempt: a new max_attempts, backoff or timeout applies to retries.
            let config = self.config.get();
            attempt += 1;
            if attempt > config.max_attempts {
                break;
            }
            if attempt > 1 {
                tokio::select! {
                    _ = self.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(config.backoff(attempt)) => {}
                }
            }
            // Read the app at each attempt: a rotated secret or moved webhook applies to retries.
            let (url, secret) = {
                let apps = self.apps.borrow();
                match apps.get(&event.app) {
                    Some(app) => match &app.webhook_url {
                        Some(url) => (url.clone(), app.secret.clone()),
                        None => break,
                    },
                    None => break,
                }
            };
            self.stats.attempts.fetch_add(1, Ordering::Relaxed);
            let timestamp = crate::ids::now_ms() / 1000;
            let sent = self
                .client
                .post(&url)
                .timeout(Duration::from_millis(config.timeout_ms))
                .header("content-type", "application/json")
                .header(EVENT_HEADER, &event.id)
                .header(TIMESTAMP_HEADER, timestamp)
                .header(SIGNATURE_HEADER, sign(&secret, timestamp, &body))
                .body(body.clone())
                .send()
                .await;
            match sent {
                Ok(resp) if resp.status().is_success() => {
                    self.stats.delivered.fetch_add(1, Ordering::Relaxed);
                    metrics::counter!("center_webhook_delivered_total").increment(1);
                    return;
                }
                Ok(resp) => {
                    let status = resp.status();
                    let retryable = status.is_server_error()
                        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
                        || status == reqwest::StatusCode::REQUEST_TIMEOUT;
                    tracing::debug!(id = %event.id, %url, %status, attempt, "webhook answered");
                    if !retryable {
                        tracing::warn!(id = %event.id, %url, %status, "webhook refused event");
                        break;
                    }
                }
                Err(e) => {
                    tracing::debug!(id = %event.id, %url, attempt, "webhook POST failed: {e}");
                }
            }
        }
        tracing::warn!(id = %event.id, app = %event.app, "webhook event given up");
        self.give_up();
    }

    fn give_up(&self) {
        self.stats.failed.fetch_add(1, Ordering::Relaxed);
        metrics::counter!("center_webhook_failed_total").increment(1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_round_trip_and_tamper() {
        let sig = sign("s3cret", 1_700_000_000, b"{\"a\":1}");
        assert!(sig.starts_with("v1=") && sig.len() == 3 + 64);
        assert!(verify("s3cret", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify("other", 1_700_000_000, b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", 1_700_000_001, b"{\"a\":1}", &sig));
        assert!(!verify("s3cret", 1_700_000_000, b"{\"a\":2}", &sig));
        assert!(!verify("s3cret", 1_700_000_000, b"{\"a\":1}", "garbage"));
    }

    #[test]
    fn event_json_shape() {
        let e = Event {
            id: "e-1".into(),
            app: "demo".into(),
            user: "u1".into(),
            device: "d1".into(),
            conn_id: "c1".into(),
            room: "r1".into(),
            ts: 5,
            kind: EventKind::Uplink {
                payload: serde_json::json!({"x": 1}),
            },
        };
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["type"], "uplink");
        assert_eq!(v["payload"]["x"], 1);
        assert_eq!(v["user"], "u1");
        let back: Event = serde_json::from_value(v).unwrap();
        assert_eq!(back, e);
        let off = serde_json::to_value(Event {
            kind: EventKind::Offline {
                reason: "kicked".into(),
            },
            ..e
        })
        .unwrap();
        assert_eq!(off["type"], "offline");
        assert_eq!(off["reason"], "kicked");
    }
}
