//! register's configuration: the typed `register` config pushed through the keeper (live), and the
//! process config (identity, addresses, keeper endpoints) from flags or a TOML file.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde::Serialize;

/// Typed config `register`, pushed with `keeperctl config push register FILE`; every register
/// applies each version. Missing fields take their defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RegisterConfig {
    /// A moved slot is `rebuilding` until every live room synced it or this many milliseconds
    /// passed; bounds how long lookups of offline users answer `unavailable`.
    pub rebuild_timeout_ms: u64,
    /// Most items in one Attach, Detach or LookupBatch; larger requests are refused whole.
    pub max_batch: usize,
    /// Most sessions in one Sync (one room's sessions in one slot).
    pub max_sync_sessions: usize,
    /// Slot controller: most slots handed to joining registers per step (orphaned slots of dead
    /// registers always move at once).
    pub handback_slots_per_step: usize,
    /// Slot controller: milliseconds between hand-back steps.
    pub handback_interval_ms: u64,
}

impl Default for RegisterConfig {
    fn default() -> Self {
        Self {
            rebuild_timeout_ms: 10_000,
            max_batch: 10_000,
            max_sync_sessions: 200_000,
            handback_slots_per_step: 64,
            handback_interval_ms: 1_000,
        }
    }
}

impl RegisterConfig {
    /// Checks what the schema cannot express; a document that fails is not applied.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_batch == 0 || self.max_sync_sessions == 0 {
            return Err(format!(
                "max_batch ({}) and max_sync_sessions ({}) must be at least 1",
                self.max_batch, self.max_sync_sessions
            ));
        }
        if self.handback_slots_per_step == 0 {
            return Err("handback_slots_per_step must be at least 1".into());
        }
        if self.handback_interval_ms == 0 {
            return Err("handback_interval_ms must be at least 1".into());
        }
        Ok(())
    }

    pub fn rebuild_timeout(&self) -> Duration {
        Duration::from_millis(self.rebuild_timeout_ms)
    }
}

/// Process settings: who this register is and where it listens. From `--config FILE`, with flags
/// overriding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ProcessConfig {
    /// Instance id, unique among registers and stable across restarts (the slot map names it).
    pub id: String,
    /// gRPC listen address.
    pub listen: SocketAddr,
    /// Address published in discovery, if not the listen address.
    pub advertise: Option<String>,
    /// RocksDB directory; kept across restarts.
    pub data_dir: PathBuf,
    /// Keeper client endpoints.
    pub keeper: Vec<String>,
    /// TTL of this register's instance lease, in seconds. It bounds failover time: a dead register's
    /// slots move once its lease expires, and a live one stops serving after TTL/2 without a
    /// successful keep-alive (docs/register.md, "Fencing").
    pub lease_ttl_s: u64,
    /// Zone published in discovery.
    pub zone: String,
}

impl Default for ProcessConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            listen: "127.0.0.1:7300".parse().expect("literal address"),
            advertise: None,
            data_dir: PathBuf::from("data/register"),
            keeper: vec!["127.0.0.1:7379".into()],
            lease_ttl_s: 10,
            zone: String::new(),
        }
    }
}

impl ProcessConfig {
    pub fn validate(&self) -> Result<(), String> {
        crate::keys::check_id("id", &self.id).map_err(|e| e.to_string())?;
        if self.keeper.is_empty() {
            return Err("keeper: at least one endpoint is required".into());
        }
        if self.lease_ttl_s < 2 {
            return Err(format!(
                "lease_ttl_s is {}, below the minimum of 2",
                self.lease_ttl_s
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_config_parses() {
        let text = std::fs::read_to_string(
            std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../config/register.toml"),
        )
        .unwrap();
        let config: ProcessConfig = toml::from_str(&text).unwrap();
        config.validate().unwrap();
        assert_eq!(config.id, "r1");
        assert_eq!(config.listen.port(), 7300);
    }

    #[test]
    fn typed_config_defaults_and_limits() {
        let c: RegisterConfig = toml::from_str("rebuild_timeout_ms = 500").unwrap();
        assert_eq!(c.rebuild_timeout(), Duration::from_millis(500));
        assert_eq!(c.max_batch, RegisterConfig::default().max_batch);
        assert!(toml::from_str::<RegisterConfig>("bogus = 1").is_err());
        let bad = RegisterConfig {
            max_batch: 0,
            ..Default::default()
        };
        assert!(bad.validate().unwrap_err().contains("max_batch"));
        let p = ProcessConfig {
            id: "r1".into(),
            lease_ttl_s: 1,
            ..Default::default()
        };
        assert!(p.validate().unwrap_err().contains("minimum of 2"));
    }
}
