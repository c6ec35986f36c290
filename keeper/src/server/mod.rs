//! The keeper process: one Raft node serving the etcd v3 API and the Raft peer service on one
//! port, plus the leader-side background work (lease expiry, history compaction).

mod cluster;
mod kv;
mod lease;
mod maintenance;
mod serve;
mod watch;

use std::sync::Arc;
use std::sync::Weak;
use std::time::Duration;

use longlink_proto::etcdserverpb::ResponseHeader;
use longlink_proto::etcdserverpb::cluster_server::ClusterServer;
use longlink_proto::etcdserverpb::kv_server::KvServer;
use longlink_proto::etcdserverpb::lease_server::LeaseServer;
use longlink_proto::etcdserverpb::maintenance_server::MaintenanceServer;
use longlink_proto::etcdserverpb::watch_server::WatchServer;
use raft_store::NodeConfig;
use raft_store::RaftNode;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::ClusterState;
use crate::config::KeeperConfig;
use crate::error::KeeperError;
use crate::error::Result;
use crate::limits::MAX_DECODE;
use crate::store::Command;
use crate::store::KeeperState;
use crate::store::Reply;

pub use lease::LeaseKeeper;

/// Reported as `cluster_id` in every response header ("LONGLINK" in ASCII).
const CLUSTER_ID: u64 = 0x4c4f_4e47_4c49_4e4b;

/// Shared by every service of one keeper node.
pub(crate) struct Keeper {
    pub(crate) node: RaftNode<KeeperState>,
    pub(crate) config: KeeperConfig,
    pub(crate) leases: LeaseKeeper,
    pub(crate) shutdown: CancellationToken,
    /// Lets `&self` handlers hand an owned handle to the tasks they spawn.
    weak: Weak<Keeper>,
}

impl Keeper {
    pub(crate) fn self_arc(&self) -> Arc<Keeper> {
        self.weak
            .upgrade()
            .expect("keeper handle outlives its services")
    }

    pub(crate) fn header(&self, revision: i64) -> Option<ResponseHeader> {
        Some(ResponseHeader {
            cluster_id: CLUSTER_ID,
            member_id: self.node.id(),
            revision,
            raft_term: self.node.term(),
        })
    }

    /// Replicates `command`; returns the revision after it and its reply.
    pub(crate) async fn write(&self, command: Command) -> Result<(i64, Reply)> {
        let response = self.node.write(command).await?;
        let reply = response.result?;
        Ok((response.revision, reply))
    }

    /// Runs `f` on the state machine; linearizable (ReadIndex) unless `serializable`.
    pub(crate) async fn read<R>(
        &self,
        serializable: bool,
        f: impl FnOnce(&KeeperState) -> R,
    ) -> Result<R> {
        if !serializable && !crate::faults::stale_reads() {
            self.node.read_barrier().await?;
        }
        Ok(self.node.read(f))
    }
}

/// Runs a keeper node until `shutdown` is cancelled. Returns an error when the node cannot start
/// (port taken, unreadable data dir, invalid config) or fails while running.
pub async fn run(config: KeeperConfig, shutdown: CancellationToken) -> Result<()> {
    config.validate().map_err(KeeperError::InvalidArgument)?;
    let listener = TcpListener::bind(config.listen).await.map_err(|e| {
        KeeperError::Unavailable(format!("cannot listen on {}: {e}", config.listen))
    })?;
    serve(config, listener, shutdown).await
}

/// Like [`run`] on an already bound listener (tests bind port 0 and read the address first).
pub async fn serve(
    config: KeeperConfig,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<()> {
    config.validate().map_err(KeeperError::InvalidArgument)?;
    let (min, max) = config.election_timeout_ms;
    let node_config = NodeConfig {
        heartbeat_interval: Duration::from_millis(config.heartbeat_ms),
        election_timeout_min: Duration::from_millis(min),
        election_timeout_max: Duration::from_millis(max),
        snapshot_every: config.snapshot_every,
        keep_logs_after_snapshot: (config.snapshot_every / 10).max(100),
        request_timeout: config.request_timeout(),
        ..NodeConfig::new(config.id, &config.data_dir)
    };
    let node = RaftNode::open(node_config, KeeperState::new()).await?;
    if config.initial_cluster_state == ClusterState::New {
        let mut members = config.initial_cluster.clone();
        if members.is_empty() {
            members.insert(config.id, config.advertised());
        }
        node.initialize(&members).await?;
    }
    tracing::info!(id = config.id, listen = %config.listen, "keeper started");

    let tasks = TaskTracker::new();
    let keeper = Arc::new_cyclic(|weak| Keeper {
        node: node.clone(),
        leases: LeaseKeeper::default(),
        config,
        shutdown: shutdown.clone(),
        weak: weak.clone(),
    });
    tasks.spawn(lease::expire_loop(keeper.clone()));
    tasks.spawn(kv::compact_loop(keeper.clone()));

    // A graceful shutdown waits for every open stream; followers' forward streams to this node
    // stay open for as long as they may forward, so they are ended when the shutdown begins.
    let stopping = {
        let (shutdown, node) = (shutdown.clone(), node.clone());
        async move {
            shutdown.cancelled().await;
            node.close_peer_streams();
        }
    };
    let router = serve::Router::new(vec![
        serve::route(node.peer_service()),
        serve::route(
            KvServer::from_arc(keeper.clone())
                .max_decoding_message_size(MAX_DECODE)
                .max_encoding_message_size(MAX_DECODE),
        ),
        serve::route(WatchServer::from_arc(keeper.clone()).max_decoding_message_size(MAX_DECODE)),
        serve::route(LeaseServer::from_arc(keeper.clone())),
        serve::route(ClusterServer::from_arc(keeper.clone())),
        serve::route(MaintenanceServer::from_arc(keeper.clone())),
    ]);
    let links: serve::LinkFn = {
        let node = node.clone();
        Arc::new(move |stream| {
            let node = node.clone();
            Box::pin(async move { node.serve_link(stream).await })
        })
    };
    serve::serve(listener, router, Some(links), stopping).await;

    shutdown.cancel();
    tasks.close();
    tasks.wait().await;
    if let Some(stats) = node.runtime_stats().await {
        tracing::info!("raft runtime stats since start:\n{stats}");
    }
    let stopped = node.shutdown().await;
    tracing::info!("keeper stopped");
    stopped.map_err(KeeperError::from)
}
