//! The typed config `apps`: the applications allowed to use the system, read by room (JWT
//! secrets) and center (API keys, webhooks, rate limits).

use schemars::JsonSchema;
use serde::Deserialize;
use serde::Serialize;

/// The `apps` config document: `[[apps]]` tables in TOML, `{"apps": [...]}` in JSON.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AppsConfig {
    /// Every application; ids are unique.
    #[serde(default)]
    pub apps: Vec<App>,
}

/// One application.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct App {
    /// The app id used in tokens (`app` claim) and API paths.
    pub id: String,
    /// HS256 secret that signs device JWTs for this app.
    pub secret: String,
    /// Bearer keys accepted by center's API for this app.
    #[serde(default)]
    pub api_keys: Vec<String>,
    /// Where center POSTs uplinks and presence events (HMAC-signed with `secret`); none = off.
    #[serde(default)]
    pub webhook_url: Option<String>,
    /// Sender API rate limit for this app.
    #[serde(default)]
    pub rate_limit: RateLimit,
}

/// A token bucket: `per_second` requests sustained, bursts up to `burst`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RateLimit {
    /// Requests per second refilled into the bucket.
    pub per_second: u32,
    /// Bucket size.
    pub burst: u32,
}

impl Default for RateLimit {
    fn default() -> Self {
        RateLimit {
            per_second: 1_000,
            burst: 2_000,
        }
    }
}

/// Why an `apps` document is not acceptable even though it parsed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AppsError {
    /// Two apps share an id.
    #[error("apps: duplicate app id {0:?}")]
    DuplicateId(String),
    /// An app has an empty id or secret.
    #[error("apps: app {0:?} needs a non-empty id and secret")]
    Empty(String),
}

impl AppsConfig {
    /// Checks what serde cannot: unique ids, non-empty secrets.
    pub fn validate(&self) -> Result<(), AppsError> {
        let mut seen = std::collections::BTreeSet::new();
        for app in &self.apps {
            if app.id.is_empty() || app.secret.is_empty() {
                return Err(AppsError::Empty(app.id.clone()));
            }
            if !seen.insert(app.id.as_str()) {
                return Err(AppsError::DuplicateId(app.id.clone()));
            }
        }
        Ok(())
    }

    /// The app with id `id`.
    pub fn get(&self, id: &str) -> Option<&App> {
        self.apps.iter().find(|a| a.id == id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn toml_form_parses_and_validates() {
        let doc: AppsConfig = toml::from_str(
            r#"
            [[apps]]
            id = "demo"
            secret = "s3cret"
            api_keys = ["k1"]
            rate_limit = { per_second = 10, burst = 20 }
            "#,
        )
        .unwrap();
        assert_eq!(doc.get("demo").unwrap().rate_limit.burst, 20);
        assert_eq!(doc.validate(), Ok(()));
    }

    #[test]
    fn example_config_parses() {
        let doc: AppsConfig = toml::from_str(include_str!("../../config/apps.toml")).unwrap();
        assert_eq!(doc.validate(), Ok(()));
        assert_eq!(doc.get("demo").unwrap().api_keys, ["demo-local-key"]);
    }

    #[test]
    fn unknown_fields_and_duplicates_are_rejected() {
        let err =
            toml::from_str::<AppsConfig>("[[apps]]\nid='a'\nsecret='s'\nsecrit='x'\n").unwrap_err();
        assert!(err.to_string().contains("secrit"), "{err}");
        let doc = AppsConfig {
            apps: vec![
                App {
                    id: "a".into(),
                    secret: "s".into(),
                    api_keys: vec![],
                    webhook_url: None,
                    rate_limit: RateLimit::default(),
                },
                App {
                    id: "a".into(),
                    secret: "t".into(),
                    api_keys: vec![],
                    webhook_url: None,
                    rate_limit: RateLimit::default(),
                },
            ],
        };
        assert_eq!(doc.validate(), Err(AppsError::DuplicateId("a".into())));
    }
}
