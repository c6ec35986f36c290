//! register: the global session store. Sessions live in RocksDB sharded into 1024 slots; the
//! keeper's slot map (`/register/slots`) says which register owns each slot, and every request is
//! fenced against it (docs/register.md).

pub mod balance;
pub mod config;
pub mod controller;
pub mod error;
pub mod follow;
pub mod gate;
pub mod keys;
pub mod lease;
pub mod node;
pub mod service;
pub mod store;
pub mod table;

use std::sync::Arc;
use std::time::Duration;

use keeper_sdk::ConnectOptions;
use keeper_sdk::Keeper;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::ProcessConfig;
pub use config::RegisterConfig;
pub use error::Error;
pub use error::Result;
pub use node::Node;

use crate::gate::LeaseGate;
use crate::lease::InstanceLease;
use crate::store::Store;

/// Runs a register until `shutdown`: opens the store, joins the keeper (config, discovery, slot
/// map, slot controller election), serves gRPC, and on shutdown stops serving and revokes its
/// lease so its slots move at once.
pub async fn run(config: ProcessConfig, shutdown: CancellationToken) -> Result<()> {
    config.validate().map_err(Error::Config)?;
    let store = Store::open(&config.data_dir)?;
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|e| Error::Listen {
            addr: config.listen.to_string(),
            reason: e.to_string(),
        })?;
    let addr = match &config.advertise {
        Some(a) => a.clone(),
        None => listener
            .local_addr()
            .map(|a| a.to_string())
            .unwrap_or_else(|_| config.listen.to_string()),
    };
    let keeper = Keeper::connect_with(ConnectOptions {
        endpoints: config.keeper.clone(),
        instance: Some(config.id.clone()),
        request_timeout: Duration::from_secs(5),
        // The controller's election lease fails over as fast as the instance lease.
        lease_ttl_s: config.lease_ttl_s as i64,
    })
    .await
    .map_err(|e| Error::Keeper(format!("connect: {e}")))?;
    let keeper_err = |what: &str| {
        let what = what.to_string();
        move |e: keeper_sdk::Error| Error::Keeper(format!("{what}: {e}"))
    };
    let typed = keeper
        .config_or_default_with::<RegisterConfig>("register", RegisterConfig::validate)
        .await
        .map_err(keeper_err("config"))?;
    let initial = (*typed.current()).clone();
    let node = Arc::new(Node::new(
        &config.id,
        store,
        Arc::new(LeaseGate::new()),
        initial,
    ));

    // Live rooms before the map, so rebuilding slots know whom to wait for.
    let rooms = keeper
        .discover("room")
        .await
        .map_err(keeper_err("discover rooms"))?;
    let live_rooms = follow::ids(&rooms);
    node.set_live_rooms(live_rooms.clone())?;
    // The lease before the map: the map read next may still assign our slots to the lease of our
    // previous run, which the controller revokes when that lease expires; those slots are held
    // until a map names this lease (nothing is served before `serve` below anyway).
    let lease =
        InstanceLease::register(&keeper, &node, &addr, &config.zone, config.lease_ttl_s).await?;
    let (map, rev) = controller::read_map(&keeper)
        .await
        .map_err(keeper_err("read slot map"))?;
    node.restore(map)?;
    tracing::info!(id = %config.id, %addr, epoch = node.epoch(), "register serving");

    let tasks = TaskTracker::new();
    let stop = shutdown.child_token();
    tasks.spawn(follow::slot_map(
        keeper.clone(),
        node.clone(),
        rev,
        stop.clone(),
    ));
    tasks.spawn(follow::rooms(rooms, node.clone(), live_rooms, stop.clone()));
    tasks.spawn(follow::config(typed, node.clone(), stop.clone()));
    tasks.spawn(follow::ticks(node.clone(), stop.clone()));
    tasks.spawn(controller::run(keeper.clone(), node.clone(), stop.clone()));
    let lease_task = tokio::spawn(lease.keep(node.clone(), stop.clone()));
    tasks.close();

    let served = service::serve(node.clone(), listener, stop.clone()).await;
    stop.cancel();
    tasks.wait().await;
    let _ = lease_task.await;
    tracing::info!("register stopped");
    served
}
