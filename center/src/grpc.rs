//! The gRPC front end (`longlink.center`): the HTTP API's operations for application servers,
//! and the Coordinator service through which rooms report device events. Conversions between
//! wire and domain types live here; errors become statuses through `From<Error>`.

use std::sync::Arc;

use longlink_proto::centerpb;
use longlink_proto::centerpb::center_server::CenterServer;
use longlink_proto::centerpb::coordinator_server::CoordinatorServer;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use crate::api::BatchMessage;
use crate::api::PushBatchRequest;
use crate::api::PushRequest;
use crate::error::Error;
use crate::ids;
use crate::service::Center;
use crate::service::PushOutcome;
use crate::webhook::Event;
use crate::webhook::EventKind;

/// Both services over one shared [`Center`].
#[derive(Clone)]
pub struct Grpc {
    center: Arc<Center>,
}

impl Grpc {
    pub fn new(center: Arc<Center>) -> Grpc {
        Grpc { center }
    }

    /// The `Center` service, with the request size limit of the HTTP API.
    pub fn center_service(&self) -> CenterServer<Grpc> {
        CenterServer::new(self.clone())
            .max_decoding_message_size(self.center.config().max_body_bytes)
    }

    /// The `Coordinator` service (rooms only).
    pub fn coordinator_service(&self) -> CoordinatorServer<Grpc> {
        CoordinatorServer::new(self.clone())
    }

    fn authorize<T>(
        &self,
        request: &Request<T>,
        app: &str,
    ) -> Result<longlink_common::App, Status> {
        Ok(self.center.authorize(app, bearer(request))?)
    }

    /// The key checks only: the caller takes its rate-limit tokens once it knows the cost.
    fn authenticate<T>(
        &self,
        request: &Request<T>,
        app: &str,
    ) -> Result<longlink_common::App, Status> {
        Ok(self.center.authenticate(app, bearer(request))?)
    }
}

/// The key from `authorization: Bearer <key>` metadata.
fn bearer<T>(request: &Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, key)| key.trim())
}

/// A push to users on the wire.
fn users_answer(u: crate::api::PushResponse) -> centerpb::PushResponse {
    centerpb::PushResponse {
        id: u.id,
        sessions: u.sessions,
        users_online: u.users_online,
        users_offline: u.users_offline,
        users_unknown: u.users_unknown,
        retrying: u.retrying,
        broadcast: false,
        rooms: 0,
    }
}

#[tonic::async_trait]
impl centerpb::center_server::Center for Grpc {
    async fn push(
        &self,
        request: Request<centerpb::PushRequest>,
    ) -> Result<Response<centerpb::PushResponse>, Status> {
        let app = self.authorize(&request, &request.get_ref().app)?;
        let r = request.into_inner();
        let payload: serde_json::Value = serde_json::from_slice(&r.payload_json)
            .map_err(|e| Error::BadRequest(format!("payload_json is not JSON: {e}")))?;
        let qos = u8::try_from(r.qos).unwrap_or(u8::MAX);
        let push = PushRequest {
            users: (!r.all || !r.users.is_empty()).then_some(r.users),
            all: r.all,
            payload,
            qos,
            ttl_s: (r.ttl_s != 0).then_some(r.ttl_s),
        };
        Ok(Response::new(match self.center.push(&app, push).await? {
            PushOutcome::Users(u) => users_answer(u),
            PushOutcome::Broadcast(b) => centerpb::PushResponse {
                id: b.id,
                broadcast: true,
                rooms: b.rooms,
                ..Default::default()
            },
        }))
    }

    async fn push_batch(
        &self,
        request: Request<centerpb::PushBatchRequest>,
    ) -> Result<Response<centerpb::PushBatchResponse>, Status> {
        let app = self.authenticate(&request, &request.get_ref().app)?;
        let messages = request
            .into_inner()
            .messages
            .into_iter()
            .enumerate()
            .map(|(i, m)| {
                let payload = serde_json::from_slice(&m.payload_json).map_err(|e| {
                    Error::BadRequest(format!("messages[{i}]: payload_json is not JSON: {e}"))
                })?;
                Ok(BatchMessage {
                    users: m.users,
                    payload,
                    qos: u8::try_from(m.qos).unwrap_or(u8::MAX),
                    ttl_s: (m.ttl_s != 0).then_some(m.ttl_s),
                })
            })
            .collect::<Result<Vec<_>, Error>>()?;
        let done = self
            .center
            .push_batch(&app, PushBatchRequest { messages })
            .await?;
        Ok(Response::new(centerpb::PushBatchResponse {
            results: done.results.into_iter().map(users_answer).collect(),
        }))
    }

    async fn presence(
        &self,
        request: Request<centerpb::PresenceRequest>,
    ) -> Result<Response<centerpb::PresenceResponse>, Status> {
        let app = self.authorize(&request, &request.get_ref().app)?;
        let p = self.center.presence(&app, &request.get_ref().user).await?;
        Ok(Response::new(centerpb::PresenceResponse {
            online: p.online,
            sessions: p
                .sessions
                .into_iter()
                .map(|s| centerpb::SessionInfo {
                    room: s.room,
                    conn_id: s.conn_id.parse().unwrap_or_default(),
                    device: s.device,
                    since: s.since,
                    platform: s.platform,
                })
                .collect(),
        }))
    }

    async fn kick(
        &self,
        request: Request<centerpb::KickRequest>,
    ) -> Result<Response<centerpb::KickResponse>, Status> {
        let app = self.authorize(&request, &request.get_ref().app)?;
        let r = request.into_inner();
        let reason = (!r.reason.is_empty()).then_some(r.reason);
        let k = self.center.kick(&app, &r.user, reason).await?;
        Ok(Response::new(centerpb::KickResponse { kicked: k.kicked }))
    }

    async fn dispatch(
        &self,
        request: Request<centerpb::DispatchRequest>,
    ) -> Result<Response<centerpb::DispatchResponse>, Status> {
        let r = request.into_inner();
        let d = self.center.dispatch(&r.app, &r.user)?;
        Ok(Response::new(centerpb::DispatchResponse {
            rooms: d
                .rooms
                .into_iter()
                .map(|room| centerpb::DispatchRoom {
                    id: room.id,
                    tcp: room.tcp.unwrap_or_default(),
                    ws: room.ws.unwrap_or_default(),
                })
                .collect(),
        }))
    }

    async fn broadcast_status(
        &self,
        request: Request<centerpb::BroadcastStatusRequest>,
    ) -> Result<Response<centerpb::BroadcastStatusResponse>, Status> {
        let app = self.authorize(&request, &request.get_ref().app)?;
        let s = self.center.broadcast_status(&app, &request.get_ref().id)?;
        Ok(Response::new(centerpb::BroadcastStatusResponse {
            id: s.id,
            state: s.state,
            rooms_total: s.rooms_total,
            rooms_done: s.rooms_done,
            rooms_failed: s.rooms_failed,
            connections: s.connections,
            dropped: s.dropped,
        }))
    }
}

/// A room's event as the webhook will see it.
fn event_from_pb(e: centerpb::Event) -> Event {
    let kind = match centerpb::event::Kind::try_from(e.kind) {
        Ok(centerpb::event::Kind::Online) => EventKind::Online,
        Ok(centerpb::event::Kind::Offline) => EventKind::Offline { reason: e.reason },
        // Unknown kinds from a newer room are forwarded as uplinks rather than lost.
        Ok(centerpb::event::Kind::Uplink) | Err(_) => EventKind::Uplink {
            payload: serde_json::from_slice(&e.payload_json).unwrap_or_else(|_| {
                serde_json::Value::String(String::from_utf8_lossy(&e.payload_json).into_owned())
            }),
        },
    };
    Event {
        id: ids::new_id("e"),
        app: e.app,
        user: e.user,
        device: e.device,
        conn_id: e.conn_id.to_string(),
        room: e.room,
        ts: u64::try_from(e.ts).unwrap_or_default(),
        kind,
    }
}

#[tonic::async_trait]
impl centerpb::coordinator_server::Coordinator for Grpc {
    async fn report(
        &self,
        request: Request<centerpb::ReportRequest>,
    ) -> Result<Response<centerpb::ReportResponse>, Status> {
        let events = request
            .into_inner()
            .events
            .into_iter()
            .map(event_from_pb)
            .collect();
        let (queued, not_queued) = self.center.report(events);
        Ok(Response::new(centerpb::ReportResponse {
            queued,
            not_queued,
        }))
    }
}
