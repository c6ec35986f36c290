//! A center without a keeper, for API fuzzing (center/scripts/schemathesis.sh): apps `demo`
//! (key `k-demo`) and `other` (key `k-other`), and in-process stand-ins for one register (owns
//! every slot; every user is offline except `alice`, online in `room-1`) and one room (accepts
//! every Push, Broadcast and Kick), so every operation runs its whole path.
//!
//! cargo run -p center --example standalone -- 127.0.0.1:18080 127.0.0.1:18081

use std::collections::BTreeMap;
use std::sync::Arc;

use center::CenterConfig;
use center::Inputs;
use longlink_common::App;
use longlink_common::AppsConfig;
use longlink_common::SlotMap;
use longlink_common::apps::RateLimit;
use longlink_proto::registerpb;
use longlink_proto::registerpb::register_server::Register;
use longlink_proto::registerpb::register_server::RegisterServer;
use longlink_proto::roompb;
use longlink_proto::roompb::room_server::Room;
use longlink_proto::roompb::room_server::RoomServer;
use tokio::sync::watch;
use tonic::Request;
use tonic::Response;
use tonic::Status;

struct StandInRegister;

#[tonic::async_trait]
impl Register for StandInRegister {
    async fn lookup_batch(
        &self,
        request: Request<registerpb::LookupBatchRequest>,
    ) -> Result<Response<registerpb::LookupBatchResponse>, Status> {
        let results = request
            .into_inner()
            .users
            .into_iter()
            .map(|u| registerpb::LookupResponse {
                result: Some(registerpb::ItemResult::default()),
                sessions: if u.user == "alice" {
                    vec![registerpb::Session {
                        app: u.app,
                        user: u.user,
                        device: "phone".into(),
                        room_id: "room-1".into(),
                        conn_id: 1,
                        connected_at_ms: 1_700_000_000_000,
                        client_ip: "127.0.0.1".into(),
                        platform: "standalone".into(),
                    }]
                } else {
                    vec![]
                },
                rebuilding: false,
            })
            .collect();
        Ok(Response::new(registerpb::LookupBatchResponse { results }))
    }
    async fn lookup(
        &self,
        _: Request<registerpb::LookupRequest>,
    ) -> Result<Response<registerpb::LookupResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn attach(
        &self,
        _: Request<registerpb::AttachRequest>,
    ) -> Result<Response<registerpb::AttachResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn detach(
        &self,
        _: Request<registerpb::DetachRequest>,
    ) -> Result<Response<registerpb::DetachResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn sync(
        &self,
        _: Request<registerpb::SyncRequest>,
    ) -> Result<Response<registerpb::SyncResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn digest(
        &self,
        _: Request<registerpb::DigestRequest>,
    ) -> Result<Response<registerpb::DigestResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn stats(
        &self,
        _: Request<registerpb::StatsRequest>,
    ) -> Result<Response<registerpb::StatsResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
    async fn slot_status(
        &self,
        _: Request<registerpb::SlotStatusRequest>,
    ) -> Result<Response<registerpb::SlotStatusResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

struct StandInRoom;

#[tonic::async_trait]
impl Room for StandInRoom {
    async fn push(
        &self,
        request: Request<roompb::PushRequest>,
    ) -> Result<Response<roompb::PushResponse>, Status> {
        let delivered = request.into_inner().items.len() as u32;
        Ok(Response::new(roompb::PushResponse {
            delivered,
            per_item: vec![1; delivered as usize],
            ..Default::default()
        }))
    }
    async fn broadcast(
        &self,
        _: Request<roompb::BroadcastRequest>,
    ) -> Result<Response<roompb::BroadcastResponse>, Status> {
        Ok(Response::new(roompb::BroadcastResponse {
            delivered: 1,
            dropped: 0,
        }))
    }
    async fn kick(
        &self,
        _: Request<roompb::KickRequest>,
    ) -> Result<Response<roompb::KickResponse>, Status> {
        Ok(Response::new(roompb::KickResponse { kicked: 1 }))
    }
    async fn stats(
        &self,
        _: Request<roompb::StatsRequest>,
    ) -> Result<Response<roompb::StatsResponse>, Status> {
        Err(Status::unimplemented("stand-in"))
    }
}

/// Serves `router` on an ephemeral loopback port; returns the address.
async fn serve_grpc(router: tonic::transport::server::Router) -> anyhow::Result<String> {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    Ok(addr)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let config = CenterConfig {
        http: args
            .next()
            .as_deref()
            .unwrap_or("127.0.0.1:18080")
            .parse()?,
        grpc: args
            .next()
            .as_deref()
            .unwrap_or("127.0.0.1:18081")
            .parse()?,
        ..CenterConfig::default()
    };
    let app = |id: &str, key: &str| App {
        id: id.into(),
        secret: format!("{id}-secret"),
        api_keys: vec![key.into()],
        webhook_url: None,
        rate_limit: RateLimit {
            per_second: 100_000,
            burst: 100_000,
        },
    };
    let apps = AppsConfig {
        apps: vec![app("demo", "k-demo"), app("other", "k-other")],
    };
    let register = serve_grpc(
        tonic::transport::Server::builder().add_service(RegisterServer::new(StandInRegister)),
    )
    .await?;
    let room =
        serve_grpc(tonic::transport::Server::builder().add_service(RoomServer::new(StandInRoom)))
            .await?;
    let mut map = SlotMap::empty();
    map.epoch = 1;
    map.slots.iter_mut().for_each(|s| *s = "reg-1".into());

    let (_apps_tx, apps) = watch::channel(Arc::new(apps));
    let (_rooms_tx, rooms) = center::rooms::channel(vec![center::rooms::Room {
        id: "room-1".into(),
        tcp: Some("127.0.0.1:7100".into()),
        ws: Some("127.0.0.1:7101".into()),
        grpc: Some(room),
    }]);
    let (_registers_tx, registers) =
        watch::channel(Arc::new(BTreeMap::from([("reg-1".to_owned(), register)])));
    let (_slots_tx, slots) = watch::channel(Arc::new(map));
    let shutdown = telemetry::shutdown_on_signal();
    let listeners = center::server::Listeners::bind(&config).await?;
    let center = center::Center::new(
        config,
        Inputs {
            apps,
            rooms,
            registers,
            slots,
        },
        shutdown.clone(),
    );
    eprintln!("standalone center ready");
    center::serve(center, listeners, telemetry::prometheus(), shutdown).await?;
    Ok(())
}
