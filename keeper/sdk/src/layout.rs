//! The keeper key layout and the JSON documents stored under it, shared by the SDK and keeperctl.
//!
//! Every value is JSON. Sequence numbers and versions in keys are zero-padded to 20 digits so
//! that the keeper's byte order is numeric order.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde::Serialize;

/// `/config/{service}`: the current config document.
pub fn config_key(service: &str) -> String {
    format!("/config/{service}")
}

/// `/config-history/{service}/`: prefix of every version ever pushed.
pub fn config_history_prefix(service: &str) -> String {
    format!("/config-history/{service}/")
}

/// `/config-history/{service}/{version:020}`.
pub fn config_history_key(service: &str, version: u64) -> String {
    format!("/config-history/{service}/{}", seq(version))
}

/// `/config-canary/{service}`: a gray release in progress ([`Canary`]).
pub fn config_canary_key(service: &str) -> String {
    format!("/config-canary/{service}")
}

/// `/schema/{service}`: the JSON Schema of the service's config type.
pub fn schema_key(service: &str) -> String {
    format!("/schema/{service}")
}

/// `/instances/{service}/`: prefix of a service's registered instances.
pub fn instances_prefix(service: &str) -> String {
    format!("/instances/{service}/")
}

/// `/instances/{service}/{id}` (leased): an [`InstanceInfo`].
pub fn instance_key(service: &str, id: &str) -> String {
    format!("/instances/{service}/{id}")
}

/// `/applied/{service}/`: prefix of every instance's [`AppliedReport`].
pub fn applied_prefix(service: &str) -> String {
    format!("/applied/{service}/")
}

/// `/applied/{service}/{instance}` (leased by the instance's session lease).
pub fn applied_key(service: &str, instance: &str) -> String {
    format!("/applied/{service}/{instance}")
}

/// `/commands/{service}/{id}/`: prefix of one instance's commands.
pub fn commands_prefix(service: &str, id: &str) -> String {
    format!("/commands/{service}/{id}/")
}

/// `/commands/{service}/{id}/{seq:020}`: a [`CommandDoc`].
pub fn command_key(service: &str, id: &str, seq_no: u64) -> String {
    format!("/commands/{service}/{id}/{}", seq(seq_no))
}

/// `/command-acks/{service}/{id}/`: prefix of one instance's acknowledgements.
pub fn command_acks_prefix(service: &str, id: &str) -> String {
    format!("/command-acks/{service}/{id}/")
}

/// `/command-acks/{service}/{id}/{seq:020}`: a [`CommandAck`].
pub fn command_ack_key(service: &str, id: &str, seq_no: u64) -> String {
    format!("/command-acks/{service}/{id}/{}", seq(seq_no))
}

/// `/election/{name}/`: prefix of an election's candidates.
pub fn election_prefix(name: &str) -> String {
    format!("/election/{name}/")
}

/// `/election/{name}/{lease_id:016x}` (leased): the candidate string.
pub fn election_key(name: &str, lease_id: i64) -> String {
    format!("/election/{name}/{lease_id:016x}")
}

/// `/register/slots`: the register slot map (`longlink_common::SlotMap`).
pub const REGISTER_SLOTS_KEY: &str = "/register/slots";

/// A version or sequence number as it appears in keys: 20 digits, zero-padded.
pub fn seq(n: u64) -> String {
    format!("{n:020}")
}

/// The number at the end of a key built with [`seq`], if there is one.
pub fn parse_seq_suffix(key: &str) -> Option<u64> {
    let last = key.rsplit('/').next()?;
    if last.len() != 20 || !last.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    last.parse().ok()
}

/// Checks a service, instance or election name: non-empty, at most 128 bytes, and free of '/'
/// and control characters, so keys built from it cannot reach into another name's keys.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    const MAX_NAME: usize = 128;
    if name.is_empty() {
        return Err(format!("{what} must not be empty"));
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "{what} {name:?} is {} bytes; the limit is {MAX_NAME}",
            name.len()
        ));
    }
    if name.contains('/') || name.chars().any(char::is_control) {
        return Err(format!(
            "{what} {name:?} must not contain '/' or control characters"
        ));
    }
    Ok(())
}

/// How a config document's body is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Toml,
    Json,
}

/// `/config/{service}` and `/config-history/{service}/{version:020}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigDocument {
    /// Grows by one with every push (a rollback is a push too).
    pub version: u64,
    pub format: Format,
    /// The file as the operator wrote it.
    pub body: String,
    /// RFC 3339, UTC.
    pub updated_at: String,
    pub author: String,
}

/// `/config-canary/{service}`: a document that only some instances apply.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Canary {
    pub doc: ConfigDocument,
    /// Instance ids that apply `doc`.
    #[serde(default)]
    pub instances: Vec<String>,
    /// When set, instances with `xxh3_64(id) % 100 < percent` apply `doc` too.
    #[serde(default)]
    pub percent: Option<u8>,
}

impl Canary {
    /// Whether `instance` takes part in this gray release.
    pub fn includes(&self, instance: &str) -> bool {
        self.instances.iter().any(|i| i == instance)
            || self.percent.is_some_and(|p| {
                xxhash_rust::xxh3::xxh3_64(instance.as_bytes()) % 100 < u64::from(p)
            })
    }
}

/// The document `instance` must apply: the canary's when the instance is in the canary set,
/// otherwise the service's current document.
pub fn effective_document<'a>(
    config: Option<&'a ConfigDocument>,
    canary: Option<&'a Canary>,
    instance: &str,
) -> Option<&'a ConfigDocument> {
    match canary {
        Some(c) if c.includes(instance) => Some(&c.doc),
        _ => config,
    }
}

/// `/instances/{service}/{id}`: one registered instance.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InstanceInfo {
    pub id: String,
    /// Named addresses, e.g. `grpc -> 127.0.0.1:7102`.
    #[serde(default)]
    pub addrs: BTreeMap<String, String>,
    #[serde(default)]
    pub zone: String,
    /// RFC 3339, UTC: when this registration was first made.
    pub started_at: String,
    #[serde(default)]
    pub meta: BTreeMap<String, String>,
    /// The lease the instance key is on, as discovery read it (not part of the stored body; 0
    /// elsewhere). A new lease means a new incarnation: the instance restarted or re-registered.
    #[serde(skip)]
    pub lease: i64,
}

/// `/applied/{service}/{instance}`: what the instance did with the last document it tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AppliedReport {
    pub version: u64,
    /// `false` when the document did not parse or validate; the instance kept its previous value.
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `/commands/{service}/{id}/{seq:020}`: a control command for one instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CommandDoc {
    pub seq: u64,
    pub verb: String,
    #[serde(default)]
    pub args: serde_json::Value,
    /// RFC 3339, UTC.
    pub issued_at: String,
}

/// `/command-acks/{service}/{id}/{seq:020}`: the instance's answer to a command.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CommandAck {
    pub ok: bool,
    pub message: String,
    /// RFC 3339, UTC.
    pub at: String,
}

/// Now as RFC 3339 in UTC with second precision (`2026-11-25T17:40:00Z`).
pub fn now_rfc3339() -> String {
    rfc3339(chrono::Utc::now().timestamp())
}

/// Seconds since the Unix epoch as RFC 3339 in UTC (the epoch itself for a time out of range).
pub fn rfc3339(unix_secs: i64) -> String {
    chrono::DateTime::from_timestamp(unix_secs, 0)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(version: u64) -> ConfigDocument {
        ConfigDocument {
            version,
            format: Format::Toml,
            body: format!("v = {version}"),
            updated_at: "2026-01-01T00:00:00Z".into(),
            author: "test".into(),
        }
    }

    #[test]
    fn keys() {
        assert_eq!(config_key("room"), "/config/room");
        assert_eq!(
            config_history_key("room", 7),
            "/config-history/room/00000000000000000007"
        );
        assert!(config_history_key("room", 7).starts_with(&config_history_prefix("room")));
        assert_eq!(config_canary_key("room"), "/config-canary/room");
        assert_eq!(schema_key("room"), "/schema/room");
        assert_eq!(instance_key("room", "r1"), "/instances/room/r1");
        assert!(instance_key("room", "r1").starts_with(&instances_prefix("room")));
        assert_eq!(applied_key("room", "r1"), "/applied/room/r1");
        assert_eq!(
            command_key("room", "r1", 3),
            "/commands/room/r1/00000000000000000003"
        );
        assert_eq!(
            command_ack_key("room", "r1", 3),
            "/command-acks/room/r1/00000000000000000003"
        );
        assert!(command_key("room", "r1", 3).starts_with(&commands_prefix("room", "r1")));
        // An instance whose id extends another's must not share its command prefix.
        assert!(!command_key("room", "r10", 1).starts_with(&commands_prefix("room", "r1")));
        assert_eq!(
            election_key("slots", 255),
            "/election/slots/00000000000000ff"
        );
    }

    #[test]
    fn seq_is_fixed_width_and_sorts_numerically() {
        assert_eq!(seq(0), "00000000000000000000");
        assert_eq!(seq(u64::MAX), "18446744073709551615");
        assert_eq!(seq(u64::MAX).len(), 20);
        let mut keys: Vec<String> = [10u64, 9, 100, 1].iter().map(|n| seq(*n)).collect();
        keys.sort();
        assert_eq!(keys, vec![seq(1), seq(9), seq(10), seq(100)]);
        assert_eq!(parse_seq_suffix(&command_key("s", "i", 42)), Some(42));
        assert_eq!(parse_seq_suffix("/commands/s/i/42"), None);
        assert_eq!(parse_seq_suffix("/commands/s/i/0000000000000000004x"), None);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("service", "room").is_ok());
        assert!(check_name("service", "").is_err());
        assert!(check_name("service", "a/b").unwrap_err().contains("'/'"));
        let long = "x".repeat(129);
        assert!(check_name("service", &long).unwrap_err().contains("128"));
    }

    #[test]
    fn documents_round_trip_as_json() {
        let d = doc(3);
        let json = serde_json::to_string(&d).unwrap();
        assert!(json.contains("\"format\":\"toml\""));
        assert_eq!(serde_json::from_str::<ConfigDocument>(&json).unwrap(), d);
        let r = AppliedReport {
            version: 3,
            ok: true,
            error: None,
        };
        assert_eq!(
            serde_json::to_string(&r).unwrap(),
            r#"{"version":3,"ok":true}"#
        );
        let c: Canary = serde_json::from_value(serde_json::json!({"doc": d})).unwrap();
        assert!(c.instances.is_empty() && c.percent.is_none());
    }

    #[test]
    fn effective_document_without_canary_is_the_config() {
        let config = doc(1);
        assert_eq!(effective_document(Some(&config), None, "a"), Some(&config));
        assert_eq!(effective_document(None, None, "a"), None);
    }

    #[test]
    fn effective_document_follows_the_canary_set() {
        let config = doc(1);
        let canary = Canary {
            doc: doc(2),
            instances: vec!["a".into(), "b".into()],
            percent: None,
        };
        assert_eq!(
            effective_document(Some(&config), Some(&canary), "a")
                .unwrap()
                .version,
            2
        );
        assert_eq!(
            effective_document(Some(&config), Some(&canary), "b")
                .unwrap()
                .version,
            2
        );
        assert_eq!(
            effective_document(Some(&config), Some(&canary), "c")
                .unwrap()
                .version,
            1
        );
        // A canary on a service with no config yet only reaches its own instances.
        assert_eq!(effective_document(None, Some(&canary), "c"), None);
        assert_eq!(
            effective_document(None, Some(&canary), "a")
                .unwrap()
                .version,
            2
        );
    }

    #[test]
    fn effective_document_by_percent() {
        let config = doc(1);
        let mut canary = Canary {
            doc: doc(2),
            instances: vec![],
            percent: Some(0),
        };
        let ids: Vec<String> = (0..1000).map(|i| format!("inst-{i}")).collect();
        let on = |c: &Canary| {
            ids.iter()
                .filter(|i| {
                    effective_document(Some(&config), Some(c), i)
                        .unwrap()
                        .version
                        == 2
                })
                .count()
        };
        assert_eq!(on(&canary), 0);
        canary.percent = Some(100);
        assert_eq!(on(&canary), 1000);
        canary.percent = Some(30);
        let n = on(&canary);
        assert!((200..400).contains(&n), "30% of 1000 gave {n}");
        // The choice is a pure function of the id: the same instances every time.
        for id in &ids {
            let expect = xxhash_rust::xxh3::xxh3_64(id.as_bytes()) % 100 < 30;
            assert_eq!(canary.includes(id), expect);
        }
        // Listed instances are in regardless of the percentage.
        canary.percent = Some(0);
        canary.instances = vec!["inst-1".into()];
        assert_eq!(on(&canary), 1);
    }

    #[test]
    fn rfc3339_formats_utc() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339(1_795_628_096), "2026-11-25T17:34:56Z");
        assert_eq!(now_rfc3339().len(), 20);
    }
}
