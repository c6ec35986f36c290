//! room's internal gRPC service (proto/room.proto), called by center. Trust boundary: callers are
//! internal services, not devices. Broadcast encodes its frame once and shares the bytes.

use std::sync::Arc;

use bytes::Bytes;
use longlink_proto::roompb;
use longlink_proto::roompb::room_server::Room;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::hub::Hub;
use crate::hub::Stats;

pub struct RoomService {
    pub hub: Arc<Hub>,
}

fn message(m: Option<roompb::Message>) -> Result<roompb::Message, Status> {
    let m = m.ok_or_else(|| Status::invalid_argument("message is required"))?;
    if m.qos > 1 {
        return Err(Status::invalid_argument(format!(
            "qos must be 0 or 1, got {}",
            m.qos
        )));
    }
    if m.qos == 1 && m.id.is_empty() {
        return Err(Status::invalid_argument("a QoS 1 message needs an id"));
    }
    Ok(m)
}

/// Largest gRPC request a room decodes: twice the largest body center can be configured to
/// accept (`max_body_bytes` ≤ 8 MiB), so that one item always fits.
pub const MAX_REQUEST_BYTES: usize = 16 << 20;

/// The frame of the previous push item. A multicast sends one message to many users in a row;
/// their items share one encoding (and every queue a reference to the same bytes). A message is
/// known by its id, as devices deduplicate by it; the payload is not kept for comparing, so a
/// run of different messages (merged unicasts) costs no extra copy.
struct Encoded {
    app: String,
    id: String,
    qos: u32,
    ts: i64,
    frame: Bytes,
}

impl Encoded {
    /// The frame of `m` for `app`, reusing `last` when it encoded the same message.
    fn frame(last: &mut Option<Encoded>, app: &str, m: roompb::Message) -> Bytes {
        if let Some(e) = last
            && !m.id.is_empty()
            && (e.app.as_str(), e.id.as_str(), e.qos, e.ts) == (app, m.id.as_str(), m.qos, m.ts)
        {
            return e.frame.clone();
        }
        let frame = Hub::message_frame(app, &m.id, m.qos, m.payload, m.ts);
        *last = Some(Encoded {
            app: app.to_string(),
            id: m.id,
            qos: m.qos,
            ts: m.ts,
            frame: frame.clone(),
        });
        frame
    }
}

#[tonic::async_trait]
impl Room for RoomService {
    async fn push(
        &self,
        req: Request<roompb::PushRequest>,
    ) -> Result<Response<roompb::PushResponse>, Status> {
        let items = req.into_inner().items;
        let mut out = roompb::PushResponse {
            per_item: Vec::with_capacity(items.len()),
            ..Default::default()
        };
        let mut last: Option<Encoded> = None;
        for item in items {
            let m = message(item.message)?;
            let (id, qos) = (m.id.clone(), m.qos);
            let targets = self.hub.targets(item.conn_id, &item.app, &item.user);
            if targets.is_empty() {
                // QoS 1 to a user between connections (closed here within the resume window,
                // not back yet): it waits for the resume instead of being lost.
                let parked = if qos == 1 && item.conn_id == 0 {
                    let frame = Encoded::frame(&mut last, &item.app, m);
                    self.hub.park_for_resume(&item.app, &item.user, &id, &frame)
                } else {
                    0
                };
                if parked == 0 {
                    out.not_found += 1;
                }
                out.delivered += parked;
                out.per_item.push(parked);
                continue;
            }
            let frame = Encoded::frame(&mut last, &targets[0].app, m);
            let (queued, dropped) = self.hub.deliver_to(&targets, &id, qos, &frame);
            out.delivered += queued;
            out.per_item.push(queued);
            out.dropped += dropped;
        }
        Ok(Response::new(out))
    }

    async fn broadcast(
        &self,
        req: Request<roompb::BroadcastRequest>,
    ) -> Result<Response<roompb::BroadcastResponse>, Status> {
        let req = req.into_inner();
        if req.app.is_empty() {
            return Err(Status::invalid_argument("app is required"));
        }
        let m = message(req.message)?;
        let conns = self.hub.conns_of_app(&req.app);
        // One encoding; every queue holds a reference to the same bytes.
        let frame = Hub::message_frame(&req.app, &m.id, m.qos, m.payload, m.ts);
        let (delivered, dropped) = self.hub.deliver_to(&conns, &m.id, m.qos, &frame);
        Ok(Response::new(roompb::BroadcastResponse {
            delivered,
            dropped,
        }))
    }

    async fn kick(
        &self,
        req: Request<roompb::KickRequest>,
    ) -> Result<Response<roompb::KickResponse>, Status> {
        let req = req.into_inner();
        if req.conn_id == 0 && (req.app.is_empty() || req.user.is_empty()) {
            return Err(Status::invalid_argument("give conn_id, or app and user"));
        }
        let reason = if req.reason.is_empty() {
            "kicked"
        } else {
            &req.reason
        };
        let kicked = self
            .hub
            .targets(req.conn_id, &req.app, &req.user)
            .iter()
            .filter(|c| self.hub.kick(c, reason, &req.reconnect))
            .count() as u32;
        Ok(Response::new(roompb::KickResponse { kicked }))
    }

    async fn stats(
        &self,
        _req: Request<roompb::StatsRequest>,
    ) -> Result<Response<roompb::StatsResponse>, Status> {
        let h = &self.hub;
        let s = &h.stats;
        Ok(Response::new(roompb::StatsResponse {
            room_id: h.room_id.clone(),
            connections: h.connection_count() as u64,
            per_app: h.per_app(),
            slow_consumers: Stats::get(&s.slow_consumers),
            queue_drops: Stats::get(&s.queue_drops),
            bytes_in: Stats::get(&s.bytes_in),
            bytes_out: Stats::get(&s.bytes_out),
            messages_out: Stats::get(&s.messages_out),
            acks: Stats::get(&s.acks),
            uplinks: Stats::get(&s.uplinks),
            uplink_drops: Stats::get(&s.uplink_drops),
            auth_failures: Stats::get(&s.auth_failures),
            pending_qos1: h.pending_count(),
            pending_drops: Stats::get(&s.pending_drops),
            rejected_connections: Stats::get(&s.rejected),
            presence_drops: Stats::get(&s.presence_drops),
            events_failed: Stats::get(&s.events_failed),
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn consecutive_items_of_one_message_share_one_encoding() {
        let m = |id: &str| roompb::Message {
            id: id.into(),
            qos: 1,
            payload: b"{}".to_vec(),
            ts: 5,
        };
        let mut last = None;
        let a = Encoded::frame(&mut last, "demo", m("m-1"));
        let b = Encoded::frame(&mut last, "demo", m("m-1"));
        assert_eq!(a.as_ptr(), b.as_ptr(), "the second item reused the frame");
        let other_app = Encoded::frame(&mut last, "other", m("m-1"));
        assert_ne!(other_app.as_ptr(), b.as_ptr());
        let other_id = Encoded::frame(&mut last, "other", m("m-2"));
        assert_ne!(other_id, other_app, "a new message gets its own frame");
        assert_eq!(a, Hub::message_frame("demo", "m-1", 1, b"{}".to_vec(), 5));
    }
}
