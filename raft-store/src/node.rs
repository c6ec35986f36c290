//! A Raft group member: openraft plus storage plus networking, behind an API that speaks only in
//! the application's own commands and responses.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use openraft::BasicNode;
use openraft::ChangeMembers;
use openraft::Config;
use openraft::ReadPolicy;
use openraft::SnapshotPolicy;
use openraft::async_runtime::WatchReceiver;
use openraft::errors::ClientWriteError;
use openraft::errors::RaftError as OpenraftError;
use openraft::raft::ClientWriteResponse;
use tokio::sync::watch;

use crate::StateMachine;
use crate::error::Error;
use crate::error::Result;
use crate::forward::ForwardError;
use crate::forward::ForwardReply;
use crate::forward::Forwarded;
use crate::forward::WriteBatcher;
use crate::forward::forward_unary;
use crate::local_writes::LocalWrites;
use crate::log_store::LogStore;
use crate::log_store::Purges;
use crate::network::Peers;
use crate::sm_store::SmStore;
use crate::types::Command;
use crate::types::NodeId;
use crate::types::Raft;
use crate::types::TypeConfig;
use crate::types::decode;
use crate::types::encode;
use longlink_proto::OneWrite;

/// How a node runs. Timing defaults suit a LAN or loopback cluster.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    pub id: NodeId,
    /// Directory holding the node's RocksDB (`<data_dir>/raft`).
    pub data_dir: PathBuf,
    pub heartbeat_interval: Duration,
    /// An election starts after a random timeout in this range without hearing from a leader.
    pub election_timeout_min: Duration,
    pub election_timeout_max: Duration,
    /// Build a snapshot (and purge the log before it) every this many applied entries.
    pub snapshot_every: u64,
    /// Keep this many entries before the snapshot, so slightly lagging peers catch up by log.
    pub keep_logs_after_snapshot: u64,
    /// Upper bound for one write or read barrier, including forwarding to the leader.
    pub request_timeout: Duration,
}

impl NodeConfig {
    pub fn new(id: NodeId, data_dir: impl Into<PathBuf>) -> Self {
        Self {
            id,
            data_dir: data_dir.into(),
            heartbeat_interval: Duration::from_millis(100),
            election_timeout_min: Duration::from_millis(500),
            election_timeout_max: Duration::from_millis(1000),
            snapshot_every: 100_000,
            keep_logs_after_snapshot: 10_000,
            request_timeout: Duration::from_secs(5),
        }
    }
}

/// What a node knows about itself and its group.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NodeStatus {
    pub id: NodeId,
    pub leader: Option<NodeId>,
    pub term: u64,
    pub last_log_index: u64,
    pub committed_index: u64,
    pub applied_index: u64,
    pub snapshot_index: u64,
    /// Voters and their peer addresses.
    pub voters: BTreeMap<NodeId, String>,
    /// Learners (non-voting members) and their peer addresses.
    pub learners: BTreeMap<NodeId, String>,
}

impl NodeStatus {
    pub fn is_leader(&self) -> bool {
        self.leader == Some(self.id)
    }

    pub fn peer_addr(&self, id: NodeId) -> Option<&str> {
        self.voters
            .get(&id)
            .or_else(|| self.learners.get(&id))
            .map(String::as_str)
    }
}

pub(crate) struct Inner<M: StateMachine> {
    pub(crate) config: NodeConfig,
    pub(crate) raft: Raft<SmStore<M>>,
    pub(crate) sm: SmStore<M>,
    pub(crate) peers: Peers,
    /// Forwarded writes leave for the leader in batches (see `forward.rs`).
    batcher: WriteBatcher,
    /// Writes made while this node leads enter Raft in batches too (see `local_writes.rs`).
    pub(crate) local: LocalWrites,
    /// The log store's purge count: tells a retryable "not leader" from an ambiguous one.
    pub(crate) purges: Purges,
    status_rx: watch::Receiver<NodeStatus>,
    /// Set once the node's server starts shutting down: the `ForwardStream`s followers hold
    /// open to this node then end (see [`RaftNode::close_peer_streams`]).
    pub(crate) peer_streams_closed: watch::Sender<bool>,
}

/// One member of a Raft group replicating `M`. Cheap to clone.
pub struct RaftNode<M: StateMachine> {
    pub(crate) inner: Arc<Inner<M>>,
}

impl<M: StateMachine> Clone for RaftNode<M> {
    fn clone(&self) -> Self {
        Self {
            inner: self.inner.clone(),
        }
    }
}

impl<M: StateMachine> RaftNode<M> {
    /// Opens (or creates) the node's storage, restores the latest snapshot into `sm`, and starts
    /// Raft. The node serves peers once [`RaftNode::peer_service`] is mounted on a server.
    pub async fn open(config: NodeConfig, sm: M) -> Result<Self> {
        let db = crate::db::open(&config.data_dir)?;
        let log_store = LogStore::open(db.clone(), &config.data_dir).map_err(Error::storage)?;
        let purges = log_store.purges();
        let sm_store = SmStore::open(db, &config.data_dir, sm)?;
        let raft_config = Config {
            cluster_name: "longlink".into(),
            heartbeat_interval: config.heartbeat_interval.as_millis() as u64,
            election_timeout_min: config.election_timeout_min.as_millis() as u64,
            election_timeout_max: config.election_timeout_max.as_millis() as u64,
            snapshot_policy: SnapshotPolicy::LogsSinceLast(config.snapshot_every),
            max_in_snapshot_log_to_keep: config.keep_logs_after_snapshot,
            max_payload_entries: 128,
            enable_pre_vote: Some(true),
            // A restarted leader must win a new election before it serves: its stored committed
            // id lags (see log_store), so a restored leadership would answer ReadIndex with that
            // stale id and a linearizable read could miss writes acknowledged before the crash.
            // The election appends a fresh no-op, and reads wait until it is applied.
            enable_leader_restore: Some(false),
            ..Default::default()
        }
        .validate()
        .map_err(|e| Error::Raft(e.to_string()))?;
        let peers = Peers::default();
        let raft = Raft::new(
            config.id,
            Arc::new(raft_config),
            peers.clone(),
            log_store,
            sm_store.clone(),
        )
        .await
        .map_err(|e| Error::Raft(e.to_string()))?;

        // Leader, term and membership, republished when one of them changes: openraft's server
        // metrics change only then. Its full metrics change after every round of its core
        // (each append, commit and apply); following those cost ~2% of a node's CPU under load
        // (docs/benchmarks.md, session 14), so progress is read when asked for instead.
        let (status_tx, status_rx) = watch::channel(NodeStatus {
            id: config.id,
            ..Default::default()
        });
        let mut server = raft.server_metrics();
        let all = raft.metrics();
        tokio::spawn(async move {
            loop {
                let status = status_from_metrics(&server.borrow_and_update());
                status_tx.send_if_modified(|old| {
                    let changed = *old != status;
                    *old = status;
                    changed
                });
                if server.changed().await.is_err() {
                    // The core has ended and dropped its senders; it recorded why first.
                    stop_if_failed(&all.borrow_watched().running_state);
                    break;
                }
            }
        });

        let batcher = WriteBatcher::start(peers.clone());
        let local = LocalWrites::start(raft.clone(), purges.clone());
        Ok(Self {
            inner: Arc::new(Inner {
                config,
                raft,
                sm: sm_store,
                batcher,
                local,
                purges,
                peers,
                status_rx,
                peer_streams_closed: watch::channel(false).0,
            }),
        })
    }

    pub fn id(&self) -> NodeId {
        self.inner.config.id
    }

    /// Forms a new group from `members` (id -> peer address) if this node has never been part of
    /// one. Every founding member may call this with the same map; it is a no-op afterwards.
    pub async fn initialize(&self, members: &BTreeMap<NodeId, String>) -> Result<()> {
        let raft = &self.inner.raft;
        if raft
            .is_initialized()
            .await
            .map_err(|e| Error::Raft(e.to_string()))?
        {
            return Ok(());
        }
        let nodes: BTreeMap<NodeId, BasicNode> = members
            .iter()
            .map(|(id, addr)| (*id, BasicNode { addr: addr.clone() }))
            .collect();
        match raft.initialize(nodes).await {
            Ok(()) => Ok(()),
            Err(OpenraftError::APIError(openraft::errors::InitializeError::NotAllowed(_))) => {
                Ok(())
            }
            Err(e) => Err(Error::Raft(e.to_string())),
        }
    }

    /// Replicates `command` and returns what applying it produced. Forwarded to the leader when
    /// this node is not the leader.
    pub async fn write(&self, command: M::Command) -> Result<M::Response> {
        let bytes = encode(&command).map_err(Error::Codec)?;
        let reply = self.to_leader(Forwarded::Write(bytes)).await?;
        let outcome: std::result::Result<M::Response, String> =
            decode(&reply).map_err(Error::Codec)?;
        outcome.map_err(Error::Codec)
    }

    /// Waits until this node's state machine reflects every write acknowledged before the call
    /// (ReadIndex: the leader confirms its leadership with a quorum, then this node waits to have
    /// applied the leader's commit index). Reads made after this returns are linearizable.
    pub async fn read_barrier(&self) -> Result<()> {
        let reply = self.to_leader(Forwarded::ReadIndex).await?;
        let index: u64 = decode(&reply).map_err(Error::Codec)?;
        self.wait_applied(index).await
    }

    /// Waits until the local state machine has applied `index`.
    pub async fn wait_applied(&self, index: u64) -> Result<()> {
        let mut applied = self.inner.sm.shared.applied_tx.subscribe();
        let timeout = self.inner.config.request_timeout;
        tokio::time::timeout(timeout, applied.wait_for(|a| *a >= index))
            .await
            .map_err(|_| Error::Timeout(timeout))?
            .map_err(|_| Error::Raft("state machine closed".into()))?;
        Ok(())
    }

    /// Runs `f` on the local state machine (a serializable read unless preceded by
    /// [`RaftNode::read_barrier`]).
    pub fn read<R>(&self, f: impl FnOnce(&M) -> R) -> R {
        f(&self.inner.sm.read().sm)
    }

    /// The index of the last applied entry; changes after every applied batch.
    pub fn applied(&self) -> watch::Receiver<u64> {
        self.inner.sm.shared.applied_tx.subscribe()
    }

    /// Membership and leadership as last published, with progress read now.
    pub fn status(&self) -> NodeStatus {
        let mut status = self.inner.status_rx.borrow().clone();
        set_progress(&mut status, &self.inner.raft.metrics().borrow_watched());
        status
    }

    /// The current term (cheap: no copy of the membership).
    pub fn term(&self) -> u64 {
        self.inner.status_rx.borrow().term
    }

    /// The leader this node follows (or itself), if one is known.
    pub fn leader(&self) -> Option<NodeId> {
        self.inner.status_rx.borrow().leader
    }

    pub fn is_leader(&self) -> bool {
        self.leader() == Some(self.id())
    }

    /// Changes when the leader, the term or the membership does. What it holds has no progress
    /// (those fields are 0); [`RaftNode::status`] reads it.
    pub fn status_watch(&self) -> watch::Receiver<NodeStatus> {
        self.inner.status_rx.clone()
    }

    /// The channel this node's Raft traffic uses to the member at `addr` (host:port), for other
    /// services that member serves on the same port: one connection per peer for everything.
    pub fn peer_channel(&self, addr: &str) -> OneWrite<tonic::transport::Channel> {
        self.inner.peers.channel(addr)
    }

    /// Ends the `ForwardStream`s that followers hold open to this node, after the batches in
    /// them are answered, and refuses new ones. Call it when the server that mounts
    /// [`RaftNode::peer_service`] starts a graceful shutdown: a server waits for its open streams,
    /// and a follower keeps its stream open for as long as it may forward writes.
    pub fn close_peer_streams(&self) {
        self.inner.peer_streams_closed.send_replace(true);
    }

    /// Adds a non-voting member that starts receiving the log (or a snapshot) at once.
    pub async fn add_learner(&self, id: NodeId, addr: String) -> Result<()> {
        self.to_leader(Forwarded::AddLearner { id, addr })
            .await
            .map(drop)
    }

    /// Turns a caught-up learner into a voter.
    pub async fn promote(&self, id: NodeId) -> Result<()> {
        self.to_leader(Forwarded::Promote { id }).await.map(drop)
    }

    /// Removes a voter or learner from the group.
    pub async fn remove(&self, id: NodeId) -> Result<()> {
        self.to_leader(Forwarded::Remove { id }).await.map(drop)
    }

    /// Asks Raft to build a snapshot now (and purge the log it covers).
    pub async fn trigger_snapshot(&self) -> Result<()> {
        self.inner
            .raft
            .trigger()
            .snapshot()
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// openraft's runtime statistics as a multi-line table (batch sizes of appends, replication
    /// and applies; latency of each stage a log entry passes), when built with the
    /// `runtime-stats` feature; `None` otherwise or once Raft has stopped.
    pub async fn runtime_stats(&self) -> Option<String> {
        #[cfg(feature = "runtime-stats")]
        {
            let stats = self.inner.raft.runtime_stats().await.ok()?;
            Some(stats.display().multiline().to_string())
        }
        #[cfg(not(feature = "runtime-stats"))]
        None
    }

    /// Stops Raft. Storage is closed when the last clone is dropped.
    pub async fn shutdown(&self) -> Result<()> {
        self.inner
            .raft
            .shutdown()
            .await
            .map_err(|e| Error::Raft(e.to_string()))
    }

    /// Runs `request` on the leader: locally if this node leads, otherwise over the peer service.
    /// Retries while an election is in progress, up to the request timeout.
    async fn to_leader(&self, request: Forwarded) -> Result<Vec<u8>> {
        let timeout = self.inner.config.request_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let mut encoded: Option<Vec<u8>> = None;
        let mut status_rx = self.inner.status_rx.clone();
        loop {
            let (leader, leader_addr) = {
                let status = status_rx.borrow_and_update();
                let addr = status
                    .leader
                    .and_then(|l| status.peer_addr(l).map(str::to_string));
                (status.leader, addr)
            };
            let attempt = match (leader, leader_addr, &request) {
                (Some(leader), _, Forwarded::Write(command)) if leader == self.id() => {
                    self.inner.local.write(command.clone()).await
                }
                (Some(leader), _, _) if leader == self.id() => {
                    self.inner.handle_forwarded(request.clone()).await
                }
                (Some(leader), Some(addr), Forwarded::Write(command)) => {
                    self.inner
                        .batcher
                        .write(leader, &addr, command.clone(), deadline)
                        .await
                }
                (Some(leader), Some(addr), _) => {
                    if encoded.is_none() {
                        encoded = Some(encode(&request).map_err(Error::Codec)?);
                    }
                    let bytes = encoded.clone().expect("encoded above");
                    forward_unary(&self.inner.peers, leader, &addr, bytes, deadline).await
                }
                _ => Err(ForwardError::NotLeader(None)),
            };
            let last_error = match attempt {
                Ok(reply) => return Ok(reply),
                Err(ForwardError::Failed(reason)) if reason == LEADERSHIP_UNCONFIRMED => {
                    // A ReadIndex (the only request that fails so) changes nothing: ask again
                    // shortly. A quorum that stays silent ends in a timeout, as in etcd.
                    let now = tokio::time::Instant::now();
                    if now >= deadline {
                        return Err(Error::Timeout(timeout));
                    }
                    tokio::time::sleep_until(deadline.min(now + READ_INDEX_RETRY)).await;
                    continue;
                }
                Err(ForwardError::Failed(reason)) => {
                    return Err(forward_failure(reason, leader, self.id()));
                }
                Err(ForwardError::NotLeader(_)) => Error::NoLeader,
            };
            // Wait for the next status change (a new leader), but not longer than a short
            // retry: a node that is already known as the new leader may still refuse writes
            // (until its first entry commits), and no status change follows that.
            let retry_at = deadline.min(tokio::time::Instant::now() + NOT_LEADER_RETRY);
            match tokio::time::timeout_at(retry_at, status_rx.changed()).await {
                Ok(Ok(())) => continue,
                Ok(Err(_)) => return Err(Error::Raft("node stopped".into())),
                Err(_) if retry_at < deadline => continue,
                Err(_) => return Err(last_error),
            }
        }
    }
}

impl<M: StateMachine> Inner<M> {
    /// Awaits one proposal (a write or a membership change; not yet started, as futures are
    /// lazy) and maps its error: "not leader" is retryable unless the log was purged meanwhile
    /// (see [`not_leader`]).
    async fn propose<T>(
        &self,
        proposal: impl Future<
            Output = std::result::Result<
                T,
                OpenraftError<TypeConfig, ClientWriteError<TypeConfig>>,
            >,
        >,
    ) -> std::result::Result<T, ForwardError> {
        let before = self.purges.count();
        proposal.await.map_err(|e| match e {
            OpenraftError::APIError(ClientWriteError::ForwardToLeader(f)) => {
                not_leader(&self.purges, before, f.leader_id)
            }
            other => ForwardError::Failed(other.to_string()),
        })
    }

    /// Executes a forwarded request, which must arrive at the leader.
    pub(crate) async fn handle_forwarded(&self, request: Forwarded) -> ForwardReply {
        match request {
            Forwarded::Write(bytes) => self
                .propose(self.raft.client_write(Command(bytes)))
                .await
                .map(|r: ClientWriteResponse<TypeConfig>| r.data),
            Forwarded::Writes(commands) => {
                let commands = commands.into_iter().map(|c| c.into_vec()).collect();
                let replies = write_many(&self.raft, &self.purges, commands).await;
                encode(&replies).map_err(ForwardError::Failed)
            }
            Forwarded::ReadIndex => {
                let linearizer = self
                    .raft
                    .get_read_linearizer(ReadPolicy::ReadIndex)
                    .await
                    .map_err(|e| match e {
                        OpenraftError::APIError(
                            openraft::errors::LinearizableReadError::ForwardToLeader(f),
                        ) => ForwardError::NotLeader(f.leader_id),
                        OpenraftError::APIError(
                            openraft::errors::LinearizableReadError::QuorumNotEnough(q),
                        ) => {
                            tracing::debug!(error = %q, "read index: leadership not confirmed");
                            ForwardError::Failed(LEADERSHIP_UNCONFIRMED.into())
                        }
                        other => ForwardError::Failed(other.to_string()),
                    })?;
                encode(&linearizer.read_log_id().index()).map_err(ForwardError::Failed)
            }
            Forwarded::AddLearner { id, addr } => self
                .propose(self.raft.add_learner(id, BasicNode { addr }, false))
                .await
                .map(|_| Vec::new()),
            Forwarded::Promote { id } => {
                self.check_caught_up(id)?;
                self.propose(
                    self.raft
                        .change_membership(ChangeMembers::AddVoterIds([id].into()), true),
                )
                .await
                .map(|_| Vec::new())
            }
            Forwarded::Remove { id } => {
                let status = self.status_rx.borrow().clone();
                let change = if status.voters.contains_key(&id) {
                    ChangeMembers::RemoveVoters([id].into())
                } else if status.learners.contains_key(&id) {
                    ChangeMembers::RemoveNodes([id].into())
                } else {
                    return Err(ForwardError::Failed(format!("member {id} not found")));
                };
                self.propose(self.raft.change_membership(change, false))
                    .await
                    .map(|_| Vec::new())
            }
        }
    }
}

/// A learner may become a voter only when it is at most this many entries behind the leader:
/// promoting a node that is still catching up would leave the group without a working quorum
/// until it has.
const PROMOTE_MAX_LAG: u64 = 100;

impl<M: StateMachine> Inner<M> {
    fn check_caught_up(&self, id: NodeId) -> Result<(), ForwardError> {
        let metrics = self.raft.metrics();
        let (last, matched) = {
            let m = metrics.borrow_watched();
            let matched = m
                .replication
                .as_ref()
                .and_then(|r| r.get(&id).cloned())
                .flatten()
                .map(|l| l.index())
                .unwrap_or(0);
            (m.last_log_index.unwrap_or(0), matched)
        };
        if matched + PROMOTE_MAX_LAG < last {
            return Err(ForwardError::Failed(format!(
                "learner {id} is not caught up: it has {matched} of {last} log entries"
            )));
        }
        Ok(())
    }
}

/// What the leader answers a ReadIndex with when a quorum did not confirm its leadership in time
/// (heartbeats answered late by busy or unreachable followers). A string inside
/// `ForwardError::Failed`, so that it crosses the wire to followers of any version.
pub(crate) const LEADERSHIP_UNCONFIRMED: &str = "leadership not confirmed by a quorum in time";

/// How long a ReadIndex whose leadership check failed waits before it asks again.
const READ_INDEX_RETRY: Duration = Duration::from_millis(20);

/// How long a request answered "not leader" waits for a status change before it tries again.
const NOT_LEADER_RETRY: Duration = Duration::from_millis(50);

/// What a write answered "not leader" fails with, instead of being retried, when it may have been
/// applied (see [`Purges`]). A string inside `ForwardError::Failed`, so that it crosses the wire
/// to followers of any version; the follower turns it into [`Error::LeaderChanged`].
pub(crate) const LEADER_CHANGED: &str =
    "leader changed while the write was pending; it may or may not have been applied";

/// The error a request that failed on the leader (`leader`, as this node `me` saw it) ends with.
fn forward_failure(reason: String, leader: Option<NodeId>, me: NodeId) -> Error {
    match leader {
        _ if reason == LEADER_CHANGED => Error::LeaderChanged,
        Some(leader) if leader != me && reason.starts_with("unreachable") => {
            Error::LeaderUnreachable { leader, reason }
        }
        _ => Error::Raft(reason),
    }
}

/// openraft's "forward to leader" for a request proposed when the purge count was `before`:
/// retryable `NotLeader`, unless the log was purged since, when the request may have been
/// applied after all.
fn not_leader(purges: &Purges, before: u64, leader: Option<NodeId>) -> ForwardError {
    if purges.count() == before {
        ForwardError::NotLeader(leader)
    } else {
        ForwardError::Failed(LEADER_CHANGED.into())
    }
}

/// Proposes `commands` as one batch (one message to the Raft core instead of one each) and
/// answers each, in order, once applied.
pub(crate) async fn write_many<M: StateMachine>(
    raft: &Raft<SmStore<M>>,
    purges: &Purges,
    commands: Vec<Vec<u8>>,
) -> Vec<ForwardReply> {
    let count = commands.len();
    let before = purges.count();
    let mut replies: Vec<ForwardReply> = match raft
        .client_write_many(commands.into_iter().map(Command))
        .await
    {
        Ok(stream) => {
            stream
                .map(|written| match written {
                    Ok(Ok(w)) => Ok(w.response),
                    Ok(Err(forward)) => Err(not_leader(purges, before, forward.leader_id)),
                    Err(fatal) => Err(ForwardError::Failed(fatal.to_string())),
                })
                .collect()
                .await
        }
        Err(fatal) => vec![Err(ForwardError::Failed(fatal.to_string())); count],
    };
    // A stream cut short by a fatal error leaves the rest unanswered: they failed.
    replies.resize_with(count, || {
        Err(ForwardError::Failed("raft stopped before answering".into()))
    });
    replies
}

/// Raft stops for good when its storage fails (a log append, a vote or a snapshot that cannot
/// be written). A node in that state would keep its client port open and fail every request
/// while the rest of the group waits for it; better to die loudly so it gets restarted (or
/// replaced) from what is on disk. The panic aborts the process in the binaries, which install
/// the telemetry crate's abort-on-panic hook; a shutdown asked for (`Fatal::Stopped`) is not
/// a failure.
fn stop_if_failed(running: &Result<(), openraft::errors::Fatal<TypeConfig>>) {
    match running {
        Ok(()) | Err(openraft::errors::Fatal::Stopped) => {}
        Err(fatal) => {
            tracing::error!(error = %fatal, "raft stopped on a fatal error; exiting");
            panic!("raft stopped on a fatal error: {fatal}");
        }
    }
}

/// Who leads and who belongs; progress is left at 0 (see [`set_progress`]).
fn status_from_metrics(server: &openraft::metrics::RaftServerMetrics<TypeConfig>) -> NodeStatus {
    use openraft::vote::RaftLeaderId;
    let membership = server.membership_config.membership();
    let voter_ids: Vec<NodeId> = membership.voter_ids().collect();
    let mut voters = BTreeMap::new();
    let mut learners = BTreeMap::new();
    for (id, node) in membership.nodes() {
        if voter_ids.contains(id) {
            voters.insert(*id, node.addr.clone());
        } else {
            learners.insert(*id, node.addr.clone());
        }
    }
    NodeStatus {
        id: server.id,
        leader: server.current_leader,
        term: server.vote.leader_id().term(),
        voters,
        learners,
        ..NodeStatus::default()
    }
}

fn set_progress(status: &mut NodeStatus, all: &openraft::RaftMetrics<TypeConfig>) {
    let index = |id: &Option<crate::types::LogId>| id.as_ref().map(|l| l.index()).unwrap_or(0);
    status.last_log_index = all.last_log_index.unwrap_or(0);
    status.committed_index = index(&all.cluster_committed);
    status.applied_index = index(&all.last_applied);
    status.snapshot_index = index(&all.snapshot);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::conformance::Counter;

    /// A one-node group (no peers to reach) that has committed `writes` commands.
    async fn node_with_writes(dir: &std::path::Path, writes: u64) -> RaftNode<Counter> {
        let node = RaftNode::open(NodeConfig::new(1, dir), Counter::default())
            .await
            .unwrap();
        node.initialize(&BTreeMap::from([(1, "127.0.0.1:1".to_string())]))
            .await
            .unwrap();
        for n in 1..=writes {
            assert_eq!(node.write(n).await.unwrap(), n * (n + 1) / 2);
        }
        node
    }

    #[tokio::test]
    async fn a_reopened_leader_wins_a_new_election_before_it_leads() {
        let dir = tempfile::TempDir::new().unwrap();
        let node = node_with_writes(dir.path(), 3).await;
        let term = node.term();
        assert_eq!(node.leader(), Some(1));
        node.shutdown().await.unwrap();
        drop(node);

        let node = RaftNode::open(NodeConfig::new(1, dir.path()), Counter::default())
            .await
            .unwrap();
        let mut status = node.inner.status_rx.clone();
        let led = tokio::time::timeout(
            Duration::from_secs(10),
            status.wait_for(|s| s.leader == Some(1)),
        )
        .await
        .expect("the node elects itself")
        .unwrap()
        .term;
        // Restoring the old leadership would keep the term (and its stale committed id).
        assert_eq!(led, term + 1);
        // The new term's no-op commits the writes from before the restart.
        node.read_barrier().await.unwrap();
        assert_eq!(node.read(|c| c.total), 6);
        node.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_leaders_concurrent_writes_enter_raft_in_batches() {
        let dir = tempfile::TempDir::new().unwrap();
        let node = node_with_writes(dir.path(), 1).await;
        let before = node.inner.local.batches();
        let writes: Vec<_> = (2..=65u64)
            .map(|n| {
                let node = node.clone();
                tokio::spawn(async move { node.write(n).await.unwrap() })
            })
            .collect();
        let mut totals = Vec::new();
        for write in writes {
            totals.push(write.await.unwrap());
        }
        // Each write was applied once, in some order: 64 distinct running totals up to the sum.
        totals.sort_unstable();
        totals.dedup();
        assert_eq!(totals.len(), 64);
        assert_eq!(node.read(|c| c.total), 65 * 66 / 2);
        let batches = node.inner.local.batches() - before;
        assert!(batches <= 4, "64 concurrent writes took {batches} batches");
        node.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn a_not_leader_answer_after_a_purge_is_not_retried() {
        let dir = tempfile::TempDir::new().unwrap();
        let mut config = NodeConfig::new(1, dir.path());
        config.keep_logs_after_snapshot = 0;
        let node = RaftNode::open(config, Counter::default()).await.unwrap();
        node.initialize(&BTreeMap::from([(1, "127.0.0.1:1".to_string())]))
            .await
            .unwrap();
        for n in 1..=5 {
            node.write(n).await.unwrap();
        }
        let purges = node.inner.purges.clone();
        let before = purges.count();
        // Nothing purged since the write was proposed: "not leader" is retried elsewhere.
        assert!(matches!(
            not_leader(&purges, before, Some(2)),
            ForwardError::NotLeader(Some(2))
        ));

        // A snapshot purges the log it covers, through the log store that counts purges.
        node.trigger_snapshot().await.unwrap();
        let mut metrics = node.inner.raft.metrics();
        let purged = async {
            while metrics.borrow_and_update().purged.is_none() {
                metrics.changed().await.unwrap();
            }
        };
        tokio::time::timeout(Duration::from_secs(10), purged)
            .await
            .expect("the snapshot purges the log");
        assert!(purges.count() > before);
        // Now the entry may have been inside a snapshot: the caller learns that the outcome is
        // unknown, on this node and on a follower that forwarded the write.
        let ForwardError::Failed(reason) = not_leader(&purges, before, Some(2)) else {
            panic!("a not-leader answer after a purge must not be retryable");
        };
        let error = forward_failure(reason, Some(2), 1);
        assert!(matches!(error, Error::LeaderChanged), "{error}");
        assert!(!error.is_retryable());
        node.shutdown().await.unwrap();
    }

    #[tokio::test]
    async fn runtime_stats_follow_the_feature() {
        let dir = tempfile::TempDir::new().unwrap();
        let node = node_with_writes(dir.path(), 5).await;
        let stats = node.runtime_stats().await;
        if cfg!(feature = "runtime-stats") {
            let stats = stats.expect("stats with the feature on");
            // Five client writes went through the append and apply stages.
            assert!(stats.contains("apply_batch"), "{stats}");
            assert!(stats.contains("ClientWrite: 5"), "{stats}");
        } else {
            assert_eq!(stats, None);
        }
        node.shutdown().await.unwrap();
    }
}
