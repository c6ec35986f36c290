//! center's configuration: the process settings from flags or a TOML file (`config/center.toml`),
//! and the typed config `center` from the keeper, whose tunables every center applies live.

use std::net::SocketAddr;
use std::time::Duration;

use std::sync::Arc;
use std::sync::RwLock;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::Serialize;

/// The most users one push may address; part of the API contract (docs/api.md), not tunable.
pub const MAX_USERS_PER_PUSH: usize = 1000;

/// How a center instance runs. center is stateless: any number of instances may run with the
/// same settings behind a load balancer, each with its own `id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CenterConfig {
    /// Instance id in discovery (`/instances/center/{id}`); unique among live centers.
    pub id: String,
    /// HTTP JSON API listen address.
    pub http: SocketAddr,
    /// gRPC API listen address.
    pub grpc: SocketAddr,
    /// Addresses published in discovery when they differ from the listen addresses (e.g. when
    /// listening on 0.0.0.0).
    pub advertise_http: Option<String>,
    /// See `advertise_http`.
    pub advertise_grpc: Option<String>,
    /// Keeper endpoints (`host:port`); apps config, discovery and the slot map come from here.
    pub keeper: Vec<String>,
    /// Largest accepted request body in bytes; larger bodies get 413 naming this limit.
    pub max_body_bytes: usize,
    /// How many room candidates `GET /v1/dispatch` returns.
    pub dispatch_candidates: usize,
    /// Delivery of uplinks and presence events to app webhooks.
    pub webhook: WebhookConfig,
    /// Calls toward rooms and registers.
    pub fanout: FanoutConfig,
}

/// Upper bound of `max_body_bytes`: a room decodes requests of up to 16 MiB, so one pushed
/// payload always fits in a room `Push`.
pub const MAX_BODY_LIMIT: usize = 8 << 20;

/// Typed config `center`, pushed with `keeperctl config push center FILE`: the tunables of
/// [`CenterConfig`], applied live by every center. Fields left out take the built-in defaults;
/// until a document is pushed, each center uses its own file's values.
///
/// Live except `webhook.queue`, `webhook.concurrency`, `fanout.broadcast_keep_s` and
/// `fanout.broadcast_history` (sizes fixed at start: they apply after a restart).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct CenterTuning {
    /// Largest accepted request body in bytes; larger bodies get 413 naming this limit.
    pub max_body_bytes: usize,
    /// How many room candidates `GET /v1/dispatch` returns.
    pub dispatch_candidates: usize,
    /// Delivery of uplinks and presence events to app webhooks.
    pub webhook: WebhookConfig,
    /// Calls toward rooms and registers.
    pub fanout: FanoutConfig,
}

impl Default for CenterTuning {
    fn default() -> Self {
        CenterConfig::default().tuning()
    }
}

impl CenterTuning {
    /// Checks what serde cannot; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if !(1024..=MAX_BODY_LIMIT).contains(&self.max_body_bytes) {
            return Err(format!(
                "max_body_bytes must be between 1024 and {MAX_BODY_LIMIT} (8 MiB), got {}",
                self.max_body_bytes
            ));
        }
        if self.dispatch_candidates == 0 {
            return Err("dispatch_candidates must be at least 1".into());
        }
        if self.webhook.queue == 0 || self.webhook.concurrency == 0 {
            return Err("webhook.queue and webhook.concurrency must be at least 1".into());
        }
        if self.webhook.max_attempts == 0 {
            return Err("webhook.max_attempts must be at least 1".into());
        }
        if self.fanout.room_inflight == 0 || self.fanout.register_inflight == 0 {
            return Err(
                "fanout.room_inflight and fanout.register_inflight must be at least 1".into(),
            );
        }
        if self.fanout.room_waiters == 0 {
            return Err("fanout.room_waiters must be at least 1".into());
        }
        if self.fanout.default_ttl_s > self.fanout.max_ttl_s {
            return Err("fanout.default_ttl_s must not exceed fanout.max_ttl_s".into());
        }
        Ok(())
    }
}

/// A value that is read often and replaced rarely (a live config section).
#[derive(Debug)]
pub struct Live<T>(RwLock<Arc<T>>);

impl<T> Live<T> {
    /// Starts with `value`.
    pub fn new(value: T) -> Self {
        Live(RwLock::new(Arc::new(value)))
    }

    /// The current value.
    pub fn get(&self) -> Arc<T> {
        self.0.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the value; readers see it from their next `get`.
    pub fn set(&self, value: T) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(value);
    }
}

/// Webhook coordinator settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// Events waiting for delivery; when full, new events are dropped and counted
    /// (`center_webhook_dropped_total`) so that a slow webhook never slows pushes.
    pub queue: usize,
    /// Deliveries in flight at once (each may be sleeping between retries).
    pub concurrency: usize,
    /// Attempts per event, the first included; then the event is given up and counted.
    pub max_attempts: u32,
    /// Backoff before the second attempt; doubles per attempt up to `backoff_max_ms`.
    pub backoff_initial_ms: u64,
    /// Upper bound of the backoff between attempts.
    pub backoff_max_ms: u64,
    /// Timeout of one POST.
    pub timeout_ms: u64,
}

/// Flow control and retries toward rooms and registers.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields, default)]
pub struct FanoutConfig {
    /// RPCs in flight to one room at once; more wait their turn (a burst becomes queued work,
    /// not a flood of the room).
    pub room_inflight: usize,
    /// Callers allowed to wait for a room's turn; beyond this the call fails fast with 503 so
    /// that memory stays bounded.
    pub room_waiters: usize,
    /// `LookupBatch` calls in flight to one register at once; lookups of requests arriving
    /// meanwhile are merged into the next call. Waiting lookups are capped by `room_waiters`.
    pub register_inflight: usize,
    /// Timeout of one RPC to a room or register.
    pub rpc_timeout_ms: u64,
    /// Default `ttl_s` of a push that gives none.
    pub default_ttl_s: u32,
    /// Largest accepted `ttl_s`.
    pub max_ttl_s: u32,
    /// Extra attempts for a room whose `Broadcast` failed (a broadcast never loops forever).
    pub broadcast_retries: u32,
    /// How long a finished broadcast's progress stays visible.
    pub broadcast_keep_s: u64,
    /// Broadcasts whose progress is kept at once; the oldest finished one is forgotten first.
    pub broadcast_history: usize,
}

impl Default for CenterConfig {
    fn default() -> Self {
        CenterConfig {
            id: "center-1".into(),
            http: SocketAddr::from(([127, 0, 0, 1], 8080)),
            grpc: SocketAddr::from(([127, 0, 0, 1], 8081)),
            advertise_http: None,
            advertise_grpc: None,
            keeper: vec!["127.0.0.1:7379".into()],
            max_body_bytes: 1 << 20,
            dispatch_candidates: 3,
            webhook: WebhookConfig::default(),
            fanout: FanoutConfig::default(),
        }
    }
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            queue: 10_000,
            concurrency: 64,
            max_attempts: 6,
            backoff_initial_ms: 200,
            backoff_max_ms: 10_000,
            timeout_ms: 5_000,
        }
    }
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            room_inflight: 4,
            room_waiters: 4_096,
            register_inflight: 2,
            rpc_timeout_ms: 3_000,
            default_ttl_s: 60,
            max_ttl_s: 86_400,
            broadcast_retries: 3,
            broadcast_keep_s: 600,
            broadcast_history: 1_000,
        }
    }
}

impl WebhookConfig {
    /// The wait before attempt `attempt` (2, 3, ...): exponential, capped.
    pub fn backoff(&self, attempt: u32) -> Duration {
        let doublings = attempt.saturating_sub(2).min(20);
        let ms = self
            .backoff_initial_ms
            .saturating_mul(1u64 << doublings)
            .min(self.backoff_max_ms);
        Duration::from_millis(ms)
    }
}

impl CenterConfig {
    /// Checks what serde cannot; the message names the offending field.
    pub fn validate(&self) -> Result<(), String> {
        if self.id.is_empty() {
            return Err("id must not be empty".into());
        }
        if self.keeper.is_empty() {
            return Err("keeper needs at least one endpoint".into());
        }
        self.tuning().validate()
    }

    /// The tunable part, as the typed config `center` carries it.
    pub fn tuning(&self) -> CenterTuning {
        CenterTuning {
            max_body_bytes: self.max_body_bytes,
            dispatch_candidates: self.dispatch_candidates,
            webhook: self.webhook.clone(),
            fanout: self.fanout.clone(),
        }
    }

    /// This config with the tunables replaced by `tuning`.
    pub fn with_tuning(&self, tuning: &CenterTuning) -> CenterConfig {
        CenterConfig {
            max_body_bytes: tuning.max_body_bytes,
            dispatch_candidates: tuning.dispatch_candidates,
            webhook: tuning.webhook.clone(),
            fanout: tuning.fanout.clone(),
            ..self.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_matches_defaults() {
        let text = include_str!("../../config/center.toml");
        let parsed: CenterConfig = toml::from_str(text).expect("config/center.toml parses");
        parsed.validate().expect("config/center.toml is valid");
        // The example documents the defaults; drift between the two misleads operators.
        assert_eq!(parsed, CenterConfig::default());
    }

    #[test]
    fn unknown_fields_are_rejected() {
        let err = toml::from_str::<CenterConfig>("htp = \"127.0.0.1:1\"\n").unwrap_err();
        assert!(err.to_string().contains("htp"), "{err}");
        let err = toml::from_str::<CenterConfig>("[webhook]\nqueu = 3\n").unwrap_err();
        assert!(err.to_string().contains("queu"), "{err}");
    }

    #[test]
    fn body_limit_is_bounded_by_what_a_room_decodes() {
        let mut tuning = CenterTuning {
            max_body_bytes: MAX_BODY_LIMIT,
            ..CenterTuning::default()
        };
        tuning.validate().unwrap();
        tuning.max_body_bytes = MAX_BODY_LIMIT + 1;
        let err = tuning.validate().unwrap_err();
        assert!(
            err.contains("max_body_bytes") && err.contains("8 MiB"),
            "{err}"
        );
        tuning.max_body_bytes = 1023;
        assert!(tuning.validate().is_err());
    }

    #[test]
    fn backoff_doubles_and_caps() {
        let w = WebhookConfig {
            backoff_initial_ms: 100,
            backoff_max_ms: 1_000,
            ..WebhookConfig::default()
        };
        assert_eq!(w.backoff(2), Duration::from_millis(100));
        assert_eq!(w.backoff(3), Duration::from_millis(200));
        assert_eq!(w.backoff(5), Duration::from_millis(800));
        assert_eq!(w.backoff(6), Duration::from_millis(1_000));
        assert_eq!(w.backoff(60), Duration::from_millis(1_000));
    }
}
