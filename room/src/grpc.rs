//! room's internal gRPC service (proto/room.proto), called by center. Trust boundary: callers are
//! internal services, not devices. Broadcast encodes its frame once and shares the bytes.

use std::sync::Arc;

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

#[tonic::async_trait]
impl Room for RoomService {
    async fn push(
        &self,
        req: Request<roompb::PushRequest>,
    ) -> Result<Response<roompb::PushResponse>, Status> {
        let mut out = roompb::PushResponse::default();
        for item in req.into_inner().items {
            let m = message(item.message)?;
            let targets = self.hub.targets(item.conn_id, &item.app, &item.user);
            if targets.is_empty() {
                // QoS 1 to a user between connections (closed here within the resume window,
                // not back yet): it waits for the resume instead of being lost.
                let parked = if m.qos == 1 && item.conn_id == 0 {
                    let frame = Hub::message_frame(&item.app, &m.id, m.qos, m.payload, m.ts);
                    self.hub
                        .park_for_resume(&item.app, &item.user, &m.id, &frame)
                } else {
                    0
                };
                if parked == 0 {
                    out.not_found += 1;
                }
                out.delivered += parked;
                continue;
            }
            let app = targets[0].app.to_string();
            let frame = Hub::message_frame(&app, &m.id, m.qos, m.payload, m.ts);
            let (queued, dropped) = self.hub.deliver_to(&targets, &m.id, m.qos, &frame);
            out.delivered += queued;
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
        }))
    }
}
