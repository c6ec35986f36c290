//! What one `run` measured, as written to its JSON file and read back by `report`.

use std::fmt;

use serde::Deserialize;
use serde::Serialize;

/// The system a result set belongs to; the report puts keeper first and divides keeper by etcd.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum System {
    Keeper,
    Etcd,
}

impl fmt::Display for System {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            System::Keeper => "keeper",
            System::Etcd => "etcd",
        })
    }
}

/// Everything one `run` measured against one cluster.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SystemResults {
    pub system: System,
    /// As reported by the Maintenance Status RPC.
    pub version: String,
    /// In the order connections were assigned to them: the leader last, so that a single
    /// connection (put c=1, the watch writer) talks to a follower on both systems alike.
    pub endpoints: Vec<String>,
    pub leader: Option<String>,
    pub warmup_s: f64,
    pub duration_s: f64,
    pub value_size: usize,
    pub phases: Vec<PhaseResult>,
    pub watch: Option<WatchResult>,
}

/// One closed-loop phase (puts or gets at a fixed concurrency).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PhaseResult {
    /// e.g. `put c=64`; phases with the same name are compared with each other.
    pub name: String,
    pub clients: usize,
    pub connections: usize,
    /// Requests that completed successfully inside the measured window.
    pub ops: u64,
    /// Failed requests, warm-up included.
    pub errors: u64,
    pub first_error: Option<String>,
    pub ops_per_s: f64,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl PhaseResult {
    /// Why this phase makes the run fail, if it does.
    pub fn failure(&self) -> Option<String> {
        (self.errors > 0).then(|| {
            format!(
                "{}: {} request(s) failed, first: {}",
                self.name,
                self.errors,
                self.first_error.as_deref().unwrap_or("?")
            )
        })
    }
}

/// Watch delivery: every watcher must see every event written.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WatchResult {
    pub name: String,
    pub connections: usize,
    pub watchers: usize,
    /// Values put by the writer.
    pub events: usize,
    /// `watchers * events` when nothing was lost.
    pub expected_deliveries: u64,
    pub deliveries: u64,
    /// Watchers that did not receive exactly `events` events.
    pub incomplete_watchers: usize,
    pub first_error: Option<String>,
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
}

impl WatchResult {
    /// Why the watch phase makes the run fail, if it does.
    pub fn failure(&self) -> Option<String> {
        if self.deliveries == self.expected_deliveries
            && self.incomplete_watchers == 0
            && self.first_error.is_none()
        {
            return None;
        }
        Some(format!(
            "{}: {} of {} deliveries, {} watcher(s) incomplete{}",
            self.name,
            self.deliveries,
            self.expected_deliveries,
            self.incomplete_watchers,
            self.first_error
                .as_deref()
                .map(|e| format!(", first error: {e}"))
                .unwrap_or_default()
        ))
    }
}
