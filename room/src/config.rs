//! room's settings: [`RoomConfig`] for the process (flags, fixed for its life) and [`RoomLimits`],
//! the typed config document `room` in the keeper, applied live to new and existing connections.

use std::net::IpAddr;
use std::net::SocketAddr;
use std::time::Duration;

use ipnet::IpNet;
use schemars::JsonSchema;
use serde::Deserialize;
use serde::Serialize;

/// Process settings, from flags.
#[derive(Debug, Clone)]
pub struct RoomConfig {
    /// Instance id in discovery and in register sessions; unique among live rooms.
    pub id: String,
    /// Device TCP listener.
    pub tcp: SocketAddr,
    /// Device WebSocket listener (path `/ws`).
    pub ws: SocketAddr,
    /// Internal gRPC (center, operators).
    pub grpc: SocketAddr,
    /// Keeper endpoints; empty runs without keeper (limits and apps come from `sources`).
    pub keeper: Vec<String>,
    /// Host advertised in discovery when a listener binds 0.0.0.0 (default: the listen IP).
    pub advertise_host: Option<String>,
}

impl Default for RoomConfig {
    fn default() -> Self {
        RoomConfig {
            id: "room-1".into(),
            tcp: ([127, 0, 0, 1], 7100).into(),
            ws: ([127, 0, 0, 1], 7101).into(),
            grpc: ([127, 0, 0, 1], 7102).into(),
            keeper: vec!["127.0.0.1:7379".into()],
            advertise_host: None,
        }
    }
}

/// The live config document `room` (`keeperctl config push room config/room.toml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(default, deny_unknown_fields)]
pub struct RoomLimits {
    /// Largest frame (`kind | body`, or a JSON text message) a device may send, in bytes.
    pub max_frame_bytes: usize,
    /// A connection must authenticate within this many milliseconds of being accepted.
    pub handshake_timeout_ms: u64,
    /// Heartbeat period told to clients; a connection silent for 3 periods is closed.
    pub heartbeat_s: u32,
    /// Connections held at once by this room (authenticated or not); more are refused.
    pub max_connections: usize,
    /// Connections from one IP address at once.
    pub max_connections_per_ip: usize,
    /// If not empty, only these networks may connect (CIDR, e.g. "10.0.0.0/8").
    pub allow_cidrs: Vec<String>,
    /// These networks may never connect; checked before `allow_cidrs`.
    pub deny_cidrs: Vec<String>,
    /// Frames queued for one connection; a push beyond it disconnects the slow consumer.
    pub outbound_max_messages: usize,
    /// Bytes queued for one connection; a push beyond it disconnects the slow consumer.
    pub outbound_max_bytes: usize,
    /// Unacked QoS 1 messages kept per session; the oldest is dropped (and counted) beyond it.
    pub max_pending_qos1: usize,
    /// How long unacked QoS 1 messages wait for a reconnect of the same app/user/device.
    pub resume_window_s: u64,
    /// WebSocket read and write buffer size per connection (new connections only).
    pub ws_buffer_bytes: usize,
    /// Seconds between per-slot digests sent to the registers.
    pub digest_interval_s: u64,
    /// Connections kicked per wave during `drain`.
    pub drain_wave_size: usize,
    /// Milliseconds between drain waves.
    pub drain_wave_interval_ms: u64,
}

impl Default for RoomLimits {
    fn default() -> Self {
        RoomLimits {
            max_frame_bytes: 64 * 1024,
            handshake_timeout_ms: 10_000,
            heartbeat_s: 30,
            max_connections: 1_000_000,
            max_connections_per_ip: 100_000,
            allow_cidrs: Vec::new(),
            deny_cidrs: Vec::new(),
            outbound_max_messages: 1024,
            outbound_max_bytes: 1024 * 1024,
            max_pending_qos1: 1024,
            resume_window_s: 30,
            ws_buffer_bytes: 4096,
            digest_interval_s: 30,
            drain_wave_size: 1000,
            drain_wave_interval_ms: 100,
        }
    }
}

/// Why a `room` document is not acceptable even though it parsed.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum LimitsError {
    #[error("room: {field} must be at least {min}")]
    TooSmall { field: &'static str, min: u64 },
    #[error("room: {field}: {value:?} is not a CIDR network ({message})")]
    BadCidr {
        field: &'static str,
        value: String,
        message: String,
    },
}

impl RoomLimits {
    /// Checks what serde cannot: sane minimums and parseable CIDRs.
    pub fn validate(&self) -> Result<(), LimitsError> {
        let mins: [(&'static str, u64, u64); 6] = [
            ("max_frame_bytes", self.max_frame_bytes as u64, 64),
            ("handshake_timeout_ms", self.handshake_timeout_ms, 10),
            ("heartbeat_s", u64::from(self.heartbeat_s), 1),
            (
                "outbound_max_messages",
                self.outbound_max_messages as u64,
                1,
            ),
            ("outbound_max_bytes", self.outbound_max_bytes as u64, 64),
            ("ws_buffer_bytes", self.ws_buffer_bytes as u64, 256),
        ];
        for (field, value, min) in mins {
            if value < min {
                return Err(LimitsError::TooSmall { field, min });
            }
        }
        self.networks()?;
        Ok(())
    }

    fn parse_nets(field: &'static str, list: &[String]) -> Result<Vec<IpNet>, LimitsError> {
        list.iter()
            .map(|s| {
                s.parse::<IpNet>()
                    .or_else(|e| s.parse::<IpAddr>().map(IpNet::from).map_err(|_| e))
                    .map_err(|e| LimitsError::BadCidr {
                        field,
                        value: s.clone(),
                        message: e.to_string(),
                    })
            })
            .collect()
    }

    /// The parsed (allow, deny) lists.
    pub fn networks(&self) -> Result<(Vec<IpNet>, Vec<IpNet>), LimitsError> {
        Ok((
            Self::parse_nets("allow_cidrs", &self.allow_cidrs)?,
            Self::parse_nets("deny_cidrs", &self.deny_cidrs)?,
        ))
    }

    pub fn handshake_timeout(&self) -> Duration {
        Duration::from_millis(self.handshake_timeout_ms)
    }

    /// Silence longer than this closes a connection: 3 heartbeats.
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.heartbeat_s) * 3)
    }

    pub fn resume_window(&self) -> Duration {
        Duration::from_secs(self.resume_window_s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn example_file_parses_and_validates() {
        let text = include_str!("../../config/room.toml");
        let limits: RoomLimits = toml::from_str(text).expect("config/room.toml parses");
        limits.validate().expect("config/room.toml is valid");
        assert_eq!(limits.max_frame_bytes, 65536);
        assert_eq!(limits.heartbeat_s, 30);
        assert_eq!(limits.deny_cidrs, vec!["192.0.2.0/24".to_string()]);
    }

    #[test]
    fn bad_documents_are_refused_with_the_field_named() {
        let err = toml::from_str::<RoomLimits>("max_frame = 1").unwrap_err();
        assert!(err.to_string().contains("max_frame"), "{err}");
        let limits = RoomLimits {
            deny_cidrs: vec!["10.0.0.0/99".into()],
            ..RoomLimits::default()
        };
        let err = limits.validate().unwrap_err();
        assert!(err.to_string().contains("deny_cidrs"), "{err}");
        let limits = RoomLimits {
            heartbeat_s: 0,
            ..RoomLimits::default()
        };
        assert_eq!(
            limits.validate(),
            Err(LimitsError::TooSmall {
                field: "heartbeat_s",
                min: 1
            })
        );
        assert_eq!(RoomLimits::default().validate(), Ok(()));
    }
}
