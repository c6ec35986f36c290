//! room: the long-connection gateway. Holds device connections over TCP and WebSocket,
//! authenticates them with the app's JWT secret, registers sessions, delivers pushes with acks,
//! and takes uplinks. [`run`] is the whole process (keeper-driven config, discovery, drain);
//! [`start`] runs the listeners on given config sources, for tests and the all-in-one binary.

pub mod admission;
pub mod auth;
pub mod clients;
pub mod config;
pub mod connection;
pub mod coordinator;
pub mod drain;
pub mod error;
pub mod grpc;
pub mod hub;
pub mod listener;
pub mod outbox;
pub mod registrar;
pub mod sources;
pub mod wire;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use longlink_common::AppsConfig;
use longlink_proto::roompb::room_server::RoomServer;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::RoomConfig;
pub use config::RoomLimits;
pub use error::Error;
pub use error::Result;
pub use hub::DeviceEvent;
pub use hub::Hub;

/// Where the live config comes from: the keeper (see [`sources`]) or a test's own channels.
pub struct Sources {
    pub limits: watch::Receiver<Arc<RoomLimits>>,
    pub apps: watch::Receiver<Arc<AppsConfig>>,
}

/// Hooks other parts wire in.
#[derive(Default)]
pub struct Hooks {
    /// Uplinks and online/offline events go here (bounded; a full queue drops and counts;
    /// without it uplinks are dropped and counted, presence is not reported).
    pub events: Option<mpsc::Sender<DeviceEvent>>,
    /// Where sessions are registered before `welcome` (the register); none = not registered.
    pub sessions: Option<Arc<dyn hub::Sessions>>,
}

/// A started room: the bound addresses and the running servers.
pub struct Running {
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    pub hub: Arc<Hub>,
    tasks: TaskTracker,
    grpc_task: tokio::task::JoinHandle<Result<()>>,
}

impl Running {
    /// Waits for every connection and server task after `shutdown` was cancelled.
    pub async fn wait(self) -> Result<()> {
        let grpc = self.grpc_task.await;
        self.tasks.close();
        self.tasks.wait().await;
        grpc.map_err(|e| Error::Grpc(e.to_string()))?
    }
}

/// The addresses published in discovery (`tcp`, `ws`, `grpc`).
pub fn discovery_addrs(bound: &Bound, host: Option<&str>) -> BTreeMap<String, String> {
    let show = |a: SocketAddr| match host {
        Some(h) if a.ip().is_unspecified() => format!("{h}:{}", a.port()),
        _ => a.to_string(),
    };
    BTreeMap::from([
        ("tcp".to_string(), show(bound.tcp_addr)),
        ("ws".to_string(), show(bound.ws_addr)),
        ("grpc".to_string(), show(bound.grpc_addr)),
    ])
}

/// Connections the kernel may hold for a listener before `accept` (capped by
/// `net.core.somaxconn`). tokio's default of 1024 overflowed in reconnect storms: every dropped
/// SYN costs the device a 1 s retransmit.
const LISTEN_BACKLOG: u32 = 65_535;

async fn bind(what: &'static str, addr: SocketAddr) -> Result<TcpListener> {
    let bind = || -> std::io::Result<TcpListener> {
        let socket = if addr.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        socket.listen(LISTEN_BACKLOG)
    };
    bind().map_err(|source| Error::Bind { what, addr, source })
}

/// The three listeners, bound but not yet serving.
pub struct Bound {
    tcp: TcpListener,
    ws: TcpListener,
    grpc: TcpListener,
    pub tcp_addr: SocketAddr,
    pub ws_addr: SocketAddr,
    pub grpc_addr: SocketAddr,
}

impl Bound {
    /// Binds the listeners of `config` (port 0 picks a free port).
    pub async fn bind(config: &RoomConfig) -> Result<Bound> {
        let tcp = bind("tcp", config.tcp).await?;
        let ws = bind("ws", config.ws).await?;
        let grpc = bind("grpc", config.grpc).await?;
        Ok(Bound {
            tcp_addr: tcp.local_addr()?,
            ws_addr: ws.local_addr()?,
            grpc_addr: grpc.local_addr()?,
            tcp,
            ws,
            grpc,
        })
    }
}

/// Binds the three listeners and serves until `shutdown`.
pub async fn start(
    config: &RoomConfig,
    sources: Sources,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> Result<Running> {
    serve(config, Bound::bind(config).await?, sources, hooks, shutdown).await
}

/// Serves on bound listeners until `shutdown`.
pub async fn serve(
    config: &RoomConfig,
    bound: Bound,
    sources: Sources,
    hooks: Hooks,
    shutdown: CancellationToken,
) -> Result<Running> {
    let Bound {
        tcp,
        ws,
        grpc,
        tcp_addr,
        ws_addr,
        grpc_addr,
    } = bound;

    let hub = Hub::new(
        config.id.clone(),
        sources.limits,
        sources.apps,
        hooks.events,
    );
    if let Some(s) = hooks.sessions {
        hub.set_sessions(s);
    }
    let admission = admission::Admission::new();
    let tasks = TaskTracker::new();
    tasks.spawn(listener::accept_loop(
        listener::Kind::Tcp,
        tcp,
        hub.clone(),
        admission.clone(),
        tasks.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(listener::accept_loop(
        listener::Kind::Ws,
        ws,
        hub.clone(),
        admission,
        tasks.clone(),
        shutdown.clone(),
    ));
    tasks.spawn(hub::sweeper(hub.clone(), shutdown.clone()));

    let incoming = tonic::transport::server::TcpIncoming::from(grpc).with_nodelay(Some(true));
    // tonic's default of 4 MiB would refuse one push of a payload center accepts (up to 8 MiB).
    let service = RoomServer::new(grpc::RoomService { hub: hub.clone() })
        .max_decoding_message_size(grpc::MAX_REQUEST_BYTES);
    let stop = shutdown.clone();
    let grpc_task = tokio::spawn(async move {
        tonic::transport::Server::builder()
            .add_service(service)
            .serve_with_incoming_shutdown(incoming, stop.cancelled_owned())
            .await
            .map_err(|e| Error::Grpc(e.to_string()))
    });
    tracing::info!(id = %config.id, tcp = %tcp_addr, ws = %ws_addr, grpc = %grpc_addr, "room started");
    Ok(Running {
        tcp: tcp_addr,
        ws: ws_addr,
        grpc: grpc_addr,
        hub,
        tasks,
        grpc_task,
    })
}

/// The whole room process: live config from the keeper, registration in discovery as `room`,
/// the `drain` command; returns after `shutdown` (or a drain) once connections are closed.
pub async fn run(config: RoomConfig, shutdown: CancellationToken) -> Result<()> {
    // The room id names this instance in `/applied` reports too.
    let options = keeper_sdk::ConnectOptions {
        instance: Some(config.id.clone()),
        ..keeper_sdk::ConnectOptions::new(&config.keeper)
    };
    let keeper = keeper_sdk::Keeper::connect_with(options)
        .await
        .map_err(|e| Error::Keeper(format!("cannot connect to {:?}: {e}", config.keeper)))?;
    let sources = sources::from_keeper(&keeper, shutdown.clone()).await?;
    let bound = Bound::bind(&config).await?;
    // In discovery before the first attach: registers drop sessions of rooms not listed there.
    let instance = keeper_sdk::Instance {
        id: config.id.clone(),
        addrs: discovery_addrs(&bound, config.advertise_host.as_deref()),
        ..Default::default()
    };
    let registration = keeper
        .register("room", instance)
        .await
        .map_err(|e| Error::Keeper(format!("cannot register in discovery: {e}")))?;
    let registrar = registrar::start(keeper.clone(), config.id.clone(), shutdown.clone())
        .await
        .map_err(|e| Error::Keeper(format!("register routing: {e}")))?;
    // Everything that needs the keeper at start is done before devices can connect: a keeper
    // lost after that must not stop a room that is serving.
    let centers = keeper
        .discover("center")
        .await
        .map_err(|e| Error::Keeper(format!("center discovery: {e}")))?;
    let (events, queued) = coordinator::channel();
    let hooks = Hooks {
        events: Some(events),
        sessions: Some(registrar.clone()),
    };
    let running = serve(&config, bound, sources, hooks, shutdown.clone()).await?;
    registrar.spawn_sync(running.hub.clone(), shutdown.clone());
    let reporter = coordinator::start(centers, running.hub.clone(), queued);
    let drainer = tokio::spawn(drain::serve_commands(
        keeper.clone(),
        config.id.clone(),
        running.hub.clone(),
        shutdown.clone(),
    ));
    shutdown.cancelled().await;
    drainer.abort();
    let _ = registration.shutdown().await;
    let waited = running.wait().await;
    // After the connections closed, so that their offline events are reported too.
    reporter.stop().await;
    waited?;
    tracing::info!("room stopped");
    Ok(())
}
