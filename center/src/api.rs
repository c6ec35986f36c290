//! The API's request and response bodies (JSON over HTTP; the gRPC messages in center.proto
//! mirror them), and the checks a request must pass before any work is done.

use serde::Deserialize;
use serde::Serialize;

use crate::config::FanoutConfig;
use crate::config::MAX_USERS_PER_PUSH;
use crate::error::Error;
use crate::error::Result;

/// Messages in one `push/batch` request.
pub const MAX_MESSAGES_PER_BATCH: usize = 1000;

/// Longest accepted user id, in bytes (register refuses longer ones too).
pub const MAX_USER_BYTES: usize = 256;

/// `POST /v1/apps/{app}/push`. Exactly one of `users` (1..=1000) or `all: true`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushRequest {
    #[serde(default, deserialize_with = "present")]
    pub users: Option<Vec<String>>,
    #[serde(default)]
    pub all: bool,
    /// Any JSON; delivered to devices as is.
    pub payload: serde_json::Value,
    /// 0 = at most once, 1 = at least once.
    #[serde(default)]
    pub qos: u8,
    /// Seconds the message stays worth delivering (QoS 1 retries stop then).
    #[serde(default, deserialize_with = "present")]
    pub ttl_s: Option<u32>,
}

/// An optional field that may be absent but not `null` (the documented type is not nullable).
fn present<'de, D, T>(d: D) -> std::result::Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    T::deserialize(d).map(Some)
}

/// Who a checked push goes to.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// Distinct users, in request order.
    Users(Vec<String>),
    /// Every connection of the app.
    All,
}

/// A push that passed every check.
#[derive(Debug, Clone)]
pub struct Push {
    pub target: Target,
    /// The payload serialized once; rooms forward these bytes.
    pub payload: Vec<u8>,
    pub qos: u8,
    pub ttl_s: u32,
}

impl PushRequest {
    /// Checks the documented limits; the error names the one broken.
    pub fn check(self, fanout: &FanoutConfig) -> Result<Push> {
        let target = match (self.users, self.all) {
            (Some(_), true) => {
                return Err(Error::BadRequest(
                    "give either users or all=true, not both".into(),
                ));
            }
            (None, false) => {
                return Err(Error::BadRequest(
                    "give users (1 to 1000 user ids) or all=true".into(),
                ));
            }
            (None, true) => Target::All,
            (Some(users), false) => Target::Users(check_users(users)?),
        };
        checked(target, &self.payload, self.qos, self.ttl_s, fanout)
    }
}

/// The checks every push shares: qos, ttl, and the payload encoded once.
fn checked(
    target: Target,
    payload: &serde_json::Value,
    qos: u8,
    ttl_s: Option<u32>,
    fanout: &FanoutConfig,
) -> Result<Push> {
    if qos > 1 {
        return Err(Error::BadRequest(format!("qos must be 0 or 1, got {qos}")));
    }
    let ttl_s = ttl_s.unwrap_or(fanout.default_ttl_s);
    if ttl_s == 0 || ttl_s > fanout.max_ttl_s {
        return Err(Error::BadRequest(format!(
            "ttl_s must be between 1 and {}, got {ttl_s}",
            fanout.max_ttl_s
        )));
    }
    let payload = serde_json::to_vec(payload)
        .map_err(|e| Error::Internal(format!("cannot re-encode payload: {e}")))?;
    Ok(Push {
        target,
        payload,
        qos,
        ttl_s,
    })
}

/// `POST /v1/apps/{app}/push/batch`: many messages, each with its own users and payload, in one
/// request (personalised unicasts at high rates). 1..=1000 messages and at most 1000 recipients
/// in total; each message counts against the app's rate limit.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushBatchRequest {
    pub messages: Vec<BatchMessage>,
}

/// One message of a batch: a push to users (a batch carries no broadcasts).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchMessage {
    pub users: Vec<String>,
    pub payload: serde_json::Value,
    #[serde(default)]
    pub qos: u8,
    #[serde(default, deserialize_with = "present")]
    pub ttl_s: Option<u32>,
}

impl PushBatchRequest {
    /// Checks the batch limits and every message; an error names the message by its index.
    pub fn check(self, fanout: &FanoutConfig) -> Result<Vec<Push>> {
        let n = self.messages.len();
        if n == 0 || n > MAX_MESSAGES_PER_BATCH {
            return Err(Error::BadRequest(format!(
                "messages must list 1 to {MAX_MESSAGES_PER_BATCH} messages, got {n}"
            )));
        }
        let recipients: usize = self.messages.iter().map(|m| m.users.len()).sum();
        if recipients > MAX_USERS_PER_PUSH {
            return Err(Error::BadRequest(format!(
                "a batch reaches at most {MAX_USERS_PER_PUSH} users in total, got {recipients}"
            )));
        }
        self.messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let at = |e: Error| match e {
                    Error::BadRequest(why) => Error::BadRequest(format!("messages[{i}]: {why}")),
                    other => other,
                };
                let users = check_users(m.users).map_err(at)?;
                checked(Target::Users(users), &m.payload, m.qos, m.ttl_s, fanout).map_err(at)
            })
            .collect()
    }
}

/// Answer to a batch: one result per message, in request order.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PushBatchResponse {
    pub results: Vec<PushResponse>,
}

/// 1..=1000 non-empty ids of at most 256 bytes without NUL; duplicates removed, order kept.
pub fn check_users(users: Vec<String>) -> Result<Vec<String>> {
    if users.is_empty() {
        return Err(Error::BadRequest(format!(
            "users must list 1 to {MAX_USERS_PER_PUSH} user ids, got none"
        )));
    }
    if users.len() > MAX_USERS_PER_PUSH {
        return Err(Error::BadRequest(format!(
            "users must list at most {MAX_USERS_PER_PUSH} user ids, got {}",
            users.len()
        )));
    }
    let mut seen = std::collections::HashSet::with_capacity(users.len());
    let mut out = Vec::with_capacity(users.len());
    for user in users {
        check_user(&user)?;
        if seen.insert(user.clone()) {
            out.push(user);
        }
    }
    Ok(out)
}

/// A user id is non-empty, at most 256 bytes and has no NUL (the slot key separator).
pub fn check_user(user: &str) -> Result<()> {
    if user.is_empty() {
        return Err(Error::BadRequest("user ids must not be empty".into()));
    }
    if user.len() > MAX_USER_BYTES {
        return Err(Error::BadRequest(format!(
            "user ids are at most {MAX_USER_BYTES} bytes, got {}",
            user.len()
        )));
    }
    if user.contains('\0') {
        return Err(Error::BadRequest("user ids must not contain NUL".into()));
    }
    Ok(())
}

/// Answer to a push to users.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PushResponse {
    /// The message id devices see (and ack for QoS 1).
    pub id: String,
    /// Sessions (connections) the message was queued to.
    pub sessions: u64,
    /// Users with at least one session.
    pub users_online: u64,
    /// Users with no session.
    pub users_offline: u64,
    /// Users whose session lookup could not be answered now (register failing over); QoS 1
    /// messages to them are retried until the ttl.
    pub users_unknown: u64,
    /// Deliveries that failed on a room and are being retried in the background (QoS 1 only).
    pub retrying: u64,
}

/// Answer to a broadcast (`all: true`): it runs in the background.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BroadcastAccepted {
    pub id: String,
    /// Live rooms it is sent to.
    pub rooms: u64,
    /// Where to watch its progress.
    pub progress: String,
}

/// `GET /v1/apps/{app}/broadcasts/{id}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BroadcastStatus {
    pub id: String,
    pub app: String,
    /// `running` until every room is done or failed, then `done`.
    pub state: String,
    pub rooms_total: u64,
    pub rooms_done: u64,
    pub rooms_failed: u64,
    /// Connections the rooms queued the message to.
    pub connections: u64,
    /// Connections whose outbound queue was full (message dropped for them).
    pub dropped: u64,
}

/// One session in a presence answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub room: String,
    pub conn_id: String,
    pub device: String,
    /// When the session started, Unix milliseconds.
    pub since: i64,
    pub platform: String,
}

/// `GET /v1/apps/{app}/users/{user}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Presence {
    pub app: String,
    pub user: String,
    pub online: bool,
    pub sessions: Vec<SessionInfo>,
}

/// Optional body of `POST /v1/apps/{app}/users/{user}/kick`.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KickRequest {
    /// Sent to the device in the kick frame.
    #[serde(default)]
    pub reason: Option<String>,
}

/// Answer to a kick.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KickResponse {
    /// Connections closed.
    pub kicked: u64,
}

/// `GET /v1/dispatch`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchResponse {
    pub rooms: Vec<DispatchRoom>,
}

/// One room candidate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DispatchRoom {
    pub id: String,
    pub tcp: Option<String>,
    pub ws: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> std::result::Result<PushRequest, serde_json::Error> {
        serde_json::from_str(json)
    }

    #[test]
    fn checks_name_the_limit() {
        let f = FanoutConfig::default();
        let err = parse(r#"{"users":["a"],"payload":1,"qos":2}"#)
            .unwrap()
            .check(&f)
            .unwrap_err();
        assert!(err.to_string().contains("qos must be 0 or 1"), "{err}");
        let many: Vec<String> = (0..1001).map(|i| format!("u{i}")).collect();
        let json = serde_json::json!({"users": many, "payload": {}}).to_string();
        let err = parse(&json).unwrap().check(&f).unwrap_err();
        assert!(err.to_string().contains("at most 1000"), "{err}");
        let err = parse(r#"{"users":[],"payload":1}"#)
            .unwrap()
            .check(&f)
            .unwrap_err();
        assert!(err.to_string().contains("got none"), "{err}");
        let err = parse(r#"{"payload":1}"#).unwrap().check(&f).unwrap_err();
        assert!(err.to_string().contains("all=true"), "{err}");
        let err = parse(r#"{"users":["a"],"all":true,"payload":1}"#)
            .unwrap()
            .check(&f)
            .unwrap_err();
        assert!(err.to_string().contains("not both"), "{err}");
        let err = parse(r#"{"users":["a"],"payload":1,"ttl_s":0}"#)
            .unwrap()
            .check(&f)
            .unwrap_err();
        assert!(err.to_string().contains("ttl_s"), "{err}");
        let err = parse(r#"{"users":[""],"payload":1}"#)
            .unwrap()
            .check(&f)
            .unwrap_err();
        assert!(err.to_string().contains("empty"), "{err}");
        assert!(parse(r#"{"users":["a"],"payload":1,"extra":1}"#).is_err());
        assert!(parse(r#"{"users":["a"]}"#).is_err(), "payload is required");
        assert!(parse(r#"{"all":true,"payload":1,"ttl_s":null}"#).is_err());
        assert!(parse(r#"{"users":null,"all":true,"payload":1}"#).is_err());
        assert!(
            parse(r#"{"users":["a"],"payload":null}"#).is_ok(),
            "payload is any JSON"
        );
    }

    #[test]
    fn users_are_deduplicated_in_order() {
        let p = parse(r#"{"users":["b","a","b"],"payload":{"k":[1,2]},"qos":1}"#)
            .unwrap()
            .check(&FanoutConfig::default())
            .unwrap();
        assert_eq!(p.target, Target::Users(vec!["b".into(), "a".into()]));
        assert_eq!(p.payload, br#"{"k":[1,2]}"#);
        assert_eq!(p.ttl_s, 60);
        assert_eq!(p.qos, 1);
    }
}
