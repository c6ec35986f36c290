//! The keeper's configuration: one struct, filled from flags or a TOML file.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;
use serde::Serialize;

/// How a keeper node runs. Every field has a default except the ones that identify the node.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KeeperConfig {
    /// This node's id in the Raft group (1, 2, 3...). Must be unique and never reused.
    pub id: u64,
    /// Address for both clients (etcd v3 gRPC) and peers (Raft RPCs).
    pub listen: SocketAddr,
    /// Address other nodes and clients use to reach this one; defaults to `listen`.
    pub advertise: Option<String>,
    /// Holds the node's RocksDB. Keep it across restarts: it is the node's identity and log.
    pub data_dir: PathBuf,
    /// Founding members, id -> address. A node whose id is listed forms the group with the
    /// others on first start; later starts recover from `data_dir` and ignore this.
    pub initial_cluster: BTreeMap<u64, String>,
    /// `new`: form the group from `initial_cluster` if this node has no state yet.
    /// `existing`: join as a learner added through `member add`; never bootstrap.
    pub initial_cluster_state: ClusterState,
    /// Raft heartbeat period in milliseconds.
    pub heartbeat_ms: u64,
    /// Election timeout range in milliseconds; a follower that hears nothing for a random time
    /// in this range starts an election.
    pub election_timeout_ms: (u64, u64),
    /// Build a Raft snapshot every this many log entries (etcd's `--snapshot-count` default is
    /// the same 100 000). Each snapshot encodes the whole state, so smaller values trade CPU and
    /// write-latency tails for a shorter log.
    pub snapshot_every: u64,
    /// Revisions of history kept for watches and historical reads; older history is compacted
    /// automatically by the leader once a tenth more has built up (so 100%-110% of this many
    /// stay readable), in steps of at most 1 000 revisions.
    pub history_revisions: i64,
    /// Smallest lease TTL granted, in seconds; shorter requests are raised to it so that an
    /// election cannot expire a healthy lease.
    pub min_lease_ttl_s: i64,
    /// Period of watch progress notifications for watches that asked for them, in seconds.
    pub watch_progress_s: u64,
    /// Upper bound for one client request (including forwarding to the leader), in milliseconds.
    pub request_timeout_ms: u64,
}

/// Whether a node may found a new group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum ClusterState {
    #[default]
    New,
    Existing,
}

impl Default for KeeperConfig {
    fn default() -> Self {
        Self {
            id: 1,
            listen: "127.0.0.1:7379".parse().expect("valid default address"),
            advertise: None,
            data_dir: PathBuf::from("data/keeper"),
            initial_cluster: BTreeMap::new(),
            initial_cluster_state: ClusterState::New,
            heartbeat_ms: 100,
            election_timeout_ms: (500, 1000),
            snapshot_every: 100_000,
            history_revisions: 100_000,
            min_lease_ttl_s: 2,
            watch_progress_s: 10,
            request_timeout_ms: 5_000,
        }
    }
}

impl KeeperConfig {
    /// The address peers and clients use for this node.
    pub fn advertised(&self) -> String {
        self.advertise
            .clone()
            .unwrap_or_else(|| self.listen.to_string())
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_millis(self.request_timeout_ms)
    }

    /// Checks what serde cannot: relations between fields.
    pub fn validate(&self) -> Result<(), String> {
        if self.id == 0 {
            return Err("id must be at least 1".into());
        }
        let (min, max) = self.election_timeout_ms;
        if self.heartbeat_ms == 0 || min <= self.heartbeat_ms || max <= min {
            return Err(format!(
                "need 0 < heartbeat_ms ({}) < election_timeout_ms.0 ({min}) < election_timeout_ms.1 ({max})",
                self.heartbeat_ms
            ));
        }
        if self.initial_cluster_state == ClusterState::New
            && !self.initial_cluster.is_empty()
            && !self.initial_cluster.contains_key(&self.id)
        {
            return Err(format!(
                "initial_cluster does not list this node's id {}; use initial_cluster_state = existing to join",
                self.id
            ));
        }
        if self.history_revisions < 1 {
            return Err("history_revisions must be at least 1".into());
        }
        Ok(())
    }
}

/// Parses `1=127.0.0.1:7379,2=127.0.0.1:7380` (an `http://` prefix is accepted and dropped).
pub fn parse_initial_cluster(s: &str) -> Result<BTreeMap<u64, String>, String> {
    let mut members = BTreeMap::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (id, addr) = part
            .split_once('=')
            .ok_or_else(|| format!("`{part}`: expected ID=HOST:PORT"))?;
        let id: u64 = id
            .trim()
            .parse()
            .map_err(|_| format!("`{part}`: member id `{id}` is not a number"))?;
        let addr = addr.trim().trim_start_matches("http://").to_string();
        if !addr.contains(':') {
            return Err(format!("`{part}`: address `{addr}` has no port"));
        }
        if members.insert(id, addr).is_some() {
            return Err(format!("member id {id} appears twice"));
        }
    }
    Ok(members)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = include_str!("../../config/keeper.toml");
        let config: KeeperConfig = toml::from_str(text).expect("config/keeper.toml parses");
        config.validate().expect("config/keeper.toml is valid");
        assert_eq!(config.initial_cluster.len(), 1);
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = toml::from_str::<KeeperConfig>("idd = 3").unwrap_err();
        assert!(err.to_string().contains("idd"), "{err}");
    }

    #[test]
    fn initial_cluster_parsing() {
        let m = parse_initial_cluster("1=127.0.0.1:1,2=http://127.0.0.2:2").unwrap();
        assert_eq!(m[&2], "127.0.0.2:2");
        assert!(parse_initial_cluster("x=1:2").is_err());
        assert!(parse_initial_cluster("1=a:1,1=b:2").is_err());
        assert!(parse_initial_cluster("1=nohost").is_err());
    }

    #[test]
    fn validation_catches_bad_timing() {
        let config = KeeperConfig {
            heartbeat_ms: 600,
            ..Default::default()
        };
        assert!(config.validate().is_err());
    }
}
