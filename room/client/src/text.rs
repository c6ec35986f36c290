//! The JSON text forms of frames carried in WebSocket text messages (DESIGN.md §5), for browsers
//! and debugging. Payload bytes travel as a JSON value: senders put UTF-8 JSON in them; bytes that
//! are not JSON are shown as a JSON string (lossy UTF-8).

use longlink_proto::clientpb;
use serde::Deserialize;
use serde::Serialize;
use serde_json::Value;

use crate::frame::Frame;
use crate::frame::FrameError;

/// The text form of a frame, tagged by `type`.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Json {
    Auth {
        token: String,
    },
    Welcome {
        /// A decimal string: u64 ids do not survive JavaScript numbers.
        conn_id: String,
        heartbeat_s: u32,
        #[serde(default)]
        room_id: String,
        #[serde(default)]
        resumed: u32,
    },
    Error {
        code: String,
        #[serde(default)]
        message: String,
    },
    Ping,
    Pong,
    Message {
        id: String,
        #[serde(default)]
        app: String,
        #[serde(default)]
        qos: u32,
        #[serde(default)]
        payload: Value,
        #[serde(default)]
        ts: i64,
    },
    Ack {
        ids: Vec<String>,
    },
    Uplink {
        #[serde(default)]
        payload: Value,
    },
    Kick {
        #[serde(default)]
        reason: String,
        #[serde(default)]
        reconnect: Vec<String>,
    },
}

fn payload_to_json(bytes: &[u8]) -> Value {
    if bytes.is_empty() {
        return Value::Null;
    }
    serde_json::from_slice(bytes)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(bytes).into_owned()))
}

fn payload_from_json(v: &Value) -> Vec<u8> {
    match v {
        Value::Null => Vec::new(),
        v => serde_json::to_vec(v).unwrap_or_default(),
    }
}

/// The JSON text of a frame.
pub fn to_json(frame: &Frame) -> String {
    let j = match frame {
        Frame::Auth(m) => Json::Auth {
            token: m.token.clone(),
        },
        Frame::Welcome(m) => Json::Welcome {
            conn_id: m.conn_id.to_string(),
            heartbeat_s: m.heartbeat_s,
            room_id: m.room_id.clone(),
            resumed: m.resumed,
        },
        Frame::Error(m) => Json::Error {
            code: m.code.clone(),
            message: m.message.clone(),
        },
        Frame::Ping => Json::Ping,
        Frame::Pong => Json::Pong,
        Frame::Message(m) => Json::Message {
            id: m.id.clone(),
            app: m.app.clone(),
            qos: m.qos,
            payload: payload_to_json(&m.payload),
            ts: m.ts,
        },
        Frame::Ack(m) => Json::Ack { ids: m.ids.clone() },
        Frame::Uplink(m) => Json::Uplink {
            payload: payload_to_json(&m.payload),
        },
        Frame::Kick(m) => Json::Kick {
            reason: m.reason.clone(),
            reconnect: m.reconnect.clone(),
        },
    };
    // A tagged enum of strings and numbers always serialises.
    serde_json::to_string(&j).unwrap_or_default()
}

/// Parses a JSON text frame; `max_frame` bounds the text length.
pub fn from_json(text: &str, max_frame: usize) -> Result<Frame, FrameError> {
    if text.len() > max_frame {
        return Err(FrameError::TooLarge {
            len: text.len(),
            max: max_frame,
        });
    }
    let j: Json = serde_json::from_str(text).map_err(|e| FrameError::BadJson(e.to_string()))?;
    Ok(match j {
        Json::Auth { token } => Frame::Auth(clientpb::Auth { token }),
        Json::Welcome {
            conn_id,
            heartbeat_s,
            room_id,
            resumed,
        } => Frame::Welcome(clientpb::Welcome {
            conn_id: conn_id
                .parse()
                .map_err(|_| FrameError::BadJson(format!("conn_id {conn_id:?} is not a u64")))?,
            heartbeat_s,
            room_id,
            resumed,
        }),
        Json::Error { code, message } => Frame::Error(clientpb::Error { code, message }),
        Json::Ping => Frame::Ping,
        Json::Pong => Frame::Pong,
        Json::Message {
            id,
            app,
            qos,
            payload,
            ts,
        } => Frame::Message(clientpb::Message {
            id,
            app,
            qos,
            payload: payload_from_json(&payload),
            ts,
        }),
        Json::Ack { ids } => Frame::Ack(clientpb::Ack { ids }),
        Json::Uplink { payload } => Frame::Uplink(clientpb::Uplink {
            payload: payload_from_json(&payload),
        }),
        Json::Kick { reason, reconnect } => Frame::Kick(clientpb::Kick { reason, reconnect }),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn documented_forms_parse() {
        let auth = from_json(r#"{"type":"auth","token":"abc"}"#, 1024).unwrap();
        assert_eq!(
            auth,
            Frame::Auth(clientpb::Auth {
                token: "abc".into()
            })
        );
        assert_eq!(from_json(r#"{"type":"ping"}"#, 1024).unwrap(), Frame::Ping);
        assert_eq!(
            from_json(r#"{"type":"ack","ids":["1","2"]}"#, 1024).unwrap(),
            Frame::Ack(clientpb::Ack {
                ids: vec!["1".into(), "2".into()]
            })
        );
        assert_eq!(
            from_json(r#"{"type":"uplink","payload":{"k":[1,2]}}"#, 1024).unwrap(),
            Frame::Uplink(clientpb::Uplink {
                payload: br#"{"k":[1,2]}"#.to_vec()
            })
        );
    }

    #[test]
    fn server_frames_render_as_documented() {
        let m = Frame::Message(clientpb::Message {
            id: "m1".into(),
            app: "demo".into(),
            qos: 1,
            payload: br#"{"hello":"world"}"#.to_vec(),
            ts: 5,
        });
        let v: Value = serde_json::from_str(&to_json(&m)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"type":"message","id":"m1","app":"demo","qos":1,
                               "payload":{"hello":"world"},"ts":5})
        );
        let w = Frame::Welcome(clientpb::Welcome {
            conn_id: u64::MAX,
            heartbeat_s: 30,
            room_id: "r1".into(),
            resumed: 0,
        });
        assert!(to_json(&w).contains(r#""conn_id":"18446744073709551615""#));
        assert_eq!(from_json(&to_json(&w), 1024).unwrap(), w);
        // Non-JSON payload bytes become a string.
        let raw = Frame::Message(clientpb::Message {
            payload: b"plain".to_vec(),
            ..Default::default()
        });
        assert!(to_json(&raw).contains(r#""payload":"plain""#));
    }

    #[test]
    fn bad_json_and_unknown_types_are_bad_frames() {
        for bad in [r#"{"type":"nope"}"#, "not json", r#"{"token":"x"}"#] {
            let err = from_json(bad, 1024).unwrap_err();
            assert_eq!(err.code(), "bad_frame", "{bad}: {err}");
        }
        let err = from_json(&"x".repeat(2000), 1024).unwrap_err();
        assert_eq!(err.code(), "frame_too_large");
    }
}
