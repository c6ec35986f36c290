//! etcd `Lease` service and the leader's lease timers.
//!
//! Lease expiry is decided by the leader and applied through the log ([`Command::LeaseExpire`]),
//! so every replica deletes a lease's keys at the same revision. Deadlines are volatile leader
//! state: a keep-alive refreshes them without a log write. A node that becomes leader first gives
//! every existing lease a full TTL, so an election can delay an expiry but never cause one.
//! Followers proxy keep-alives and time-to-live queries to the leader.

use std::collections::HashMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use futures::Stream;
use futures::StreamExt;
use longlink_proto::OneWrite;
use longlink_proto::etcdserverpb::LeaseGrantRequest;
use longlink_proto::etcdserverpb::LeaseGrantResponse;
use longlink_proto::etcdserverpb::LeaseKeepAliveRequest;
use longlink_proto::etcdserverpb::LeaseKeepAliveResponse;
use longlink_proto::etcdserverpb::LeaseLeasesRequest;
use longlink_proto::etcdserverpb::LeaseLeasesResponse;
use longlink_proto::etcdserverpb::LeaseRevokeRequest;
use longlink_proto::etcdserverpb::LeaseRevokeResponse;
use longlink_proto::etcdserverpb::LeaseStatus;
use longlink_proto::etcdserverpb::LeaseTimeToLiveRequest;
use longlink_proto::etcdserverpb::LeaseTimeToLiveResponse;
use longlink_proto::etcdserverpb::lease_client::LeaseClient;
use longlink_proto::etcdserverpb::lease_server::Lease;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;
use tonic::transport::Channel;

use super::Keeper;
use crate::error::KeeperError;
use crate::store::Command;
use crate::store::Reply;
use crate::store::StoreError;

/// The largest TTL etcd accepts, in seconds.
const MAX_TTL: i64 = 9_000_000_000;
/// How often the leader looks for expired leases.
const EXPIRY_TICK: Duration = Duration::from_millis(100);
/// Most leases expired by one log entry.
const EXPIRE_BATCH: usize = 1_000;

/// The leader's lease deadlines. Empty on followers.
#[derive(Default)]
pub struct LeaseKeeper {
    state: Mutex<Deadlines>,
}

#[derive(Default)]
struct Deadlines {
    /// The term these deadlines were built in; a new term rebuilds them with full TTLs.
    term: Option<u64>,
    by_id: HashMap<i64, Instant>,
}

impl LeaseKeeper {
    /// Refreshes `id` to a full TTL. Returns the TTL, or `None` if this node does not time it.
    fn renew(&self, id: i64, ttl: i64) -> Option<i64> {
        let mut state = self.state.lock().expect("lease deadlines poisoned");
        state.term?;
        state
            .by_id
            .insert(id, Instant::now() + Duration::from_secs(ttl as u64));
        Some(ttl)
    }

    /// Seconds left for `id`, rounded up, if this node times it.
    fn remaining(&self, id: i64) -> Option<i64> {
        let state = self.state.lock().expect("lease deadlines poisoned");
        state.term?;
        let deadline = state.by_id.get(&id)?;
        let left = deadline.saturating_duration_since(Instant::now());
        Some(left.as_millis().div_ceil(1000) as i64)
    }
}

/// Leader loop: keep deadlines in step with the replicated lease table and expire the overdue.
pub(crate) async fn expire_loop(keeper: Arc<Keeper>) {
    let mut tick = tokio::time::interval(EXPIRY_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = keeper.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let status = keeper.node.status();
        if !status.is_leader() {
            let mut state = keeper
                .leases
                .state
                .lock()
                .expect("lease deadlines poisoned");
            state.term = None;
            state.by_id.clear();
            continue;
        }
        // A lease this leader has not applied yet is simply not timed yet: it gets a full TTL
        // once it shows up, so lagging behind can only delay an expiry.
        let leases = keeper.node.read(|s| s.lease_ttls());
        let now = Instant::now();
        let expired: Vec<i64> = {
            let mut state = keeper
                .leases
                .state
                .lock()
                .expect("lease deadlines poisoned");
            if state.term != Some(status.term) {
                state.term = Some(status.term);
                state.by_id.clear();
                tracing::info!(
                    term = status.term,
                    leases = leases.len(),
                    "leading: lease timers restarted"
                );
            }
            let mut live = HashMap::with_capacity(leases.len());
            for &(id, ttl) in &leases {
                let deadline = state
                    .by_id
                    .get(&id)
                    .copied()
                    .unwrap_or_else(|| now + Duration::from_secs(ttl as u64));
                live.insert(id, deadline);
            }
            state.by_id = live;
            state
                .by_id
                .iter()
                .filter(|(_, deadline)| **deadline <= now)
                .map(|(id, _)| *id)
                .take(EXPIRE_BATCH)
                .collect()
        };
        if expired.is_empty() {
            continue;
        }
        match keeper
            .write(Command::LeaseExpire {
                ids: expired.clone(),
            })
            .await
        {
            Ok(_) => {
                metrics::counter!("keeper_leases_expired_total").increment(expired.len() as u64);
                tracing::debug!(count = expired.len(), "expired leases");
            }
            Err(e) => tracing::warn!(error = %e, "lease expiry not committed; will retry"),
        }
    }
}

impl Keeper {
    /// A client of the leader's Lease service, for proxying from a follower. It rides on this
    /// node's Raft channel to the leader (same port), so every proxied call and keep-alive stream
    /// shares that one connection (a channel per call opened a TCP connection per client's
    /// keep-alive stream).
    async fn leader_lease_client(&self) -> Result<LeaseClient<OneWrite<Channel>>, Status> {
        let status = self.node.status();
        let leader = status.leader.ok_or(KeeperError::NoLeader)?;
        let addr = status.peer_addr(leader).ok_or(KeeperError::NoLeader)?;
        Ok(LeaseClient::new(self.node.peer_channel(addr)))
    }

    /// Renews `id` if this node is the leader; `None` if the request must go to the leader.
    fn renew_locally(&self, id: i64) -> Option<LeaseKeepAliveResponse> {
        if !self.node.is_leader() {
            return None;
        }
        let (lease, revision) = self.node.read(|s| (s.lease(id), s.revision()));
        let ttl = match lease {
            Some(lease) => self.leases.renew(id, lease.ttl)?,
            // etcd answers a keep-alive for an unknown lease with TTL 0.
            None => 0,
        };
        Some(LeaseKeepAliveResponse {
            header: self.header(revision),
            id,
            ttl,
        })
    }
}

type KeepAliveStream = Pin<Box<dyn Stream<Item = Result<LeaseKeepAliveResponse, Status>> + Send>>;

#[tonic::async_trait]
impl Lease for Keeper {
    async fn lease_grant(
        &self,
        request: Request<LeaseGrantRequest>,
    ) -> Result<Response<LeaseGrantResponse>, Status> {
        let req = request.into_inner();
        if req.ttl > MAX_TTL {
            return Err(
                KeeperError::InvalidArgument("etcdserver: too large lease TTL".into()).into(),
            );
        }
        let ttl = req.ttl.max(self.config.min_lease_ttl_s);
        let chosen = req.id;
        if chosen < 0 {
            return Err(KeeperError::InvalidArgument(
                "etcdserver: lease ID must be positive".into(),
            )
            .into());
        }
        // Pick ids like etcd: random positive 63-bit numbers; retry the rare collision.
        for _ in 0..8 {
            let id = if chosen > 0 {
                chosen
            } else {
                random_lease_id()
            };
            match self.write(Command::LeaseGrant { id, ttl }).await {
                Ok((revision, Reply::LeaseGrant { id, ttl })) => {
                    return Ok(Response::new(LeaseGrantResponse {
                        header: self.header(revision),
                        id,
                        ttl,
                        error: String::new(),
                    }));
                }
                Ok((_, reply)) => {
                    return Err(KeeperError::Internal(format!("unexpected reply {reply:?}")).into());
                }
                Err(KeeperError::Store(StoreError::LeaseExists)) if chosen == 0 => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(KeeperError::Internal("could not pick a free lease id".into()).into())
    }

    async fn lease_revoke(
        &self,
        request: Request<LeaseRevokeRequest>,
    ) -> Result<Response<LeaseRevokeResponse>, Status> {
        let id = request.into_inner().id;
        let (revision, _) = self.write(Command::LeaseRevoke { id }).await?;
        Ok(Response::new(LeaseRevokeResponse {
            header: self.header(revision),
        }))
    }

    type LeaseKeepAliveStream = KeepAliveStream;

    async fn lease_keep_alive(
        &self,
        request: Request<Streaming<LeaseKeepAliveRequest>>,
    ) -> Result<Response<KeepAliveStream>, Status> {
        let (tx, rx) = mpsc::channel(64);
        let keeper = self.self_arc();
        let mut inbound = request.into_inner();
        tokio::spawn(async move {
            // Proxy to the leader when this node is not it: one upstream stream, reopened when
            // the leader changes.
            let mut upstream: Option<(
                mpsc::Sender<LeaseKeepAliveRequest>,
                Streaming<LeaseKeepAliveResponse>,
            )> = None;
            loop {
                let req = tokio::select! {
                    _ = keeper.shutdown.cancelled() => return,
                    req = inbound.next() => match req {
                        Some(Ok(req)) => req,
                        _ => return,
                    },
                };
                if let Some(resp) = keeper.renew_locally(req.id) {
                    upstream = None;
                    if tx.send(Ok(resp)).await.is_err() {
                        return;
                    }
                    continue;
                }
                let answer = proxy_keep_alive(&keeper, &mut upstream, req).await;
                if answer.is_err() {
                    upstream = None;
                }
                if tx.send(answer).await.is_err() {
                    return;
                }
            }
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn lease_time_to_live(
        &self,
        request: Request<LeaseTimeToLiveRequest>,
    ) -> Result<Response<LeaseTimeToLiveResponse>, Status> {
        let req = request.into_inner();
        if !self.node.is_leader() {
            let mut client = self.leader_lease_client().await?;
            return client.lease_time_to_live(req).await;
        }
        let (lease, revision) = self.node.read(|s| (s.lease(req.id), s.revision()));
        let resp = match lease {
            None => LeaseTimeToLiveResponse {
                header: self.header(revision),
                id: req.id,
                ttl: -1,
                granted_ttl: 0,
                keys: Vec::new(),
            },
            Some(lease) => LeaseTimeToLiveResponse {
                header: self.header(revision),
                id: req.id,
                ttl: self.leases.remaining(req.id).unwrap_or(lease.ttl),
                granted_ttl: lease.ttl,
                keys: if req.keys { lease.keys } else { Vec::new() },
            },
        };
        Ok(Response::new(resp))
    }

    async fn lease_leases(
        &self,
        request: Request<LeaseLeasesRequest>,
    ) -> Result<Response<LeaseLeasesResponse>, Status> {
        let _ = request;
        let (leases, revision) = self.read(false, |s| (s.lease_ttls(), s.revision())).await?;
        Ok(Response::new(LeaseLeasesResponse {
            header: self.header(revision),
            leases: leases
                .into_iter()
                .map(|(id, _)| LeaseStatus { id })
                .collect(),
        }))
    }
}

async fn proxy_keep_alive(
    keeper: &Keeper,
    upstream: &mut Option<(
        mpsc::Sender<LeaseKeepAliveRequest>,
        Streaming<LeaseKeepAliveResponse>,
    )>,
    req: LeaseKeepAliveRequest,
) -> Result<LeaseKeepAliveResponse, Status> {
    if upstream.is_none() {
        let mut client = keeper.leader_lease_client().await?;
        let (up_tx, up_rx) = mpsc::channel(16);
        let replies = client
            .lease_keep_alive(ReceiverStream::new(up_rx))
            .await?
            .into_inner();
        *upstream = Some((up_tx, replies));
    }
    let (up_tx, replies) = upstream.as_mut().expect("upstream just opened");
    up_tx
        .send(req)
        .await
        .map_err(|_| Status::unavailable("etcdserver: leader changed"))?;
    let timeout = keeper.config.request_timeout();
    match tokio::time::timeout(timeout, replies.next()).await {
        Ok(Some(reply)) => reply,
        Ok(None) => Err(Status::unavailable("etcdserver: leader changed")),
        Err(_) => Err(KeeperError::Timeout.into()),
    }
}

fn random_lease_id() -> i64 {
    use std::hash::BuildHasher;
    use std::hash::Hasher;
    // RandomState is seeded randomly per process; mixing in the clock and a counter gives a
    // fresh value per call without another dependency.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    (h.finish() >> 1).max(1) as i64
}
