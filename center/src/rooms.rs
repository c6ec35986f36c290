//! The live rooms as center sees them: a `watch` of the `room` instances in discovery, each with
//! its device-facing (tcp, ws) and internal (grpc) addresses.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde::Serialize;
use tokio::sync::watch;

/// One live room.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Room {
    /// The room's instance id; sessions in register name their room by it.
    pub id: String,
    /// Device TCP address (`host:port`), if the room serves TCP.
    pub tcp: Option<String>,
    /// Device WebSocket address (`host:port`, path `/ws`), if the room serves WebSocket.
    pub ws: Option<String>,
    /// Internal gRPC address center calls (Push, Broadcast, Kick).
    #[serde(skip)]
    pub grpc: Option<String>,
}

impl Room {
    /// A room from a discovery entry's id and `addrs` map (keys `tcp`, `ws`, `grpc`).
    pub fn from_addrs(id: &str, addrs: &BTreeMap<String, String>) -> Room {
        Room {
            id: id.to_owned(),
            tcp: addrs.get("tcp").cloned(),
            ws: addrs.get("ws").cloned(),
            grpc: addrs.get("grpc").cloned(),
        }
    }
}

/// The current set of live rooms, sorted by id; replaced whole on every discovery change.
pub type Rooms = watch::Receiver<Arc<Vec<Room>>>;

/// A `Rooms` fed by the caller (tests, or the discovery bridge in `server`).
pub fn channel(initial: Vec<Room>) -> (watch::Sender<Arc<Vec<Room>>>, Rooms) {
    watch::channel(Arc::new(sorted(initial)))
}

/// Sorts by id so that equal sets compare equal whatever order discovery listed them in.
pub fn sorted(mut rooms: Vec<Room>) -> Vec<Room> {
    rooms.sort_by(|a, b| a.id.cmp(&b.id));
    rooms.dedup_by(|a, b| a.id == b.id);
    rooms
}
