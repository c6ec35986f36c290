//! This register's presence in discovery (`/instances/register/{id}`) on a lease it keeps alive
//! itself, because the lease gate needs the send time of every successful keep-alive (gate.rs has
//! the arithmetic). After a lease loss the key is re-registered on a new lease and every owned slot
//! rebuilds, since requests were refused while the lease was gone.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use keeper_sdk::InstanceInfo;
use keeper_sdk::Keeper;
use keeper_sdk::layout;
use longlink_proto::etcdserverpb::LeaseKeepAliveRequest;
use tokio_util::sync::CancellationToken;

use crate::error::Error;
use crate::error::Result;
use crate::node::Node;

/// The instance key and lease of this register.
pub struct InstanceLease {
    keeper: Keeper,
    key: String,
    body: Vec<u8>,
    ttl: Duration,
    lease: i64,
}

impl InstanceLease {
    /// Grants a lease, writes the instance key on it, and opens the gate.
    pub async fn register(
        keeper: &Keeper,
        node: &Node,
        addr: &str,
        zone: &str,
        ttl_s: u64,
    ) -> Result<Self> {
        let info = InstanceInfo {
            id: node.id().to_string(),
            addrs: BTreeMap::from([("grpc".to_string(), addr.to_string())]),
            zone: zone.to_string(),
            started_at: layout::now_rfc3339(),
            meta: BTreeMap::new(),
            lease: 0,
        };
        let mut this = Self {
            keeper: keeper.clone(),
            key: layout::instance_key("register", node.id()),
            body: serde_json::to_vec(&info).expect("instance info serialises"),
            ttl: Duration::from_secs(ttl_s),
            lease: 0,
        };
        let sent = this.grant(node).await?;
        node.gate().renewed(sent, this.ttl);
        Ok(this)
    }

    /// Grants a new lease, moves the node onto it (slots assigned to the previous lease are held
    /// until the controller names this one), and writes the instance key on it; returns when the
    /// grant was sent. Does not open the gate: the caller decides when this register's view is
    /// fresh enough.
    async fn grant(&mut self, node: &Node) -> Result<Instant> {
        let sent = Instant::now();
        let lease = self
            .keeper
            .lease_grant(self.ttl.as_secs() as i64)
            .await
            .map_err(|e| Error::Keeper(format!("lease grant: {e}")))?;
        node.set_lease(lease);
        self.keeper
            .put_leased(&self.key, self.body.clone(), lease)
            .await
            .map_err(|e| Error::Keeper(format!("register instance: {e}")))?;
        self.lease = lease;
        tracing::info!(lease = format!("{lease:016x}"), key = %self.key, "registered");
        Ok(sent)
    }

    /// One keep-alive on the current endpoint; returns the TTL the keeper granted (0 = lease gone).
    async fn keep_alive_once(&self) -> Result<i64> {
        let mut client = self.keeper.clients().lease;
        let req = LeaseKeepAliveRequest { id: self.lease };
        let mut stream = client
            .lease_keep_alive(tokio_stream::iter(vec![req]))
            .await
            .map_err(|e| Error::Keeper(format!("keep-alive: {e}")))?
            .into_inner();
        match stream.message().await {
            Ok(Some(resp)) => Ok(resp.ttl),
            Ok(None) => Err(Error::Keeper("keep-alive stream ended".into())),
            Err(e) => Err(Error::Keeper(format!("keep-alive: {e}"))),
        }
    }

    /// Keeps the lease alive every TTL/6 until `shutdown`, then revokes it (so the slots move at
    /// once instead of after the TTL).
    pub async fn keep(mut self, node: Arc<Node>, shutdown: CancellationToken) {
        let interval = self.ttl / 6;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(interval) => {}
            }
            let sent = Instant::now();
            match tokio::time::timeout(interval, self.keep_alive_once()).await {
                Ok(Ok(ttl)) if ttl > 0 => {
                    let granted = Duration::from_secs(ttl as u64).min(self.ttl);
                    node.gate().renewed(sent, granted);
                }
                Ok(Ok(_)) => {
                    tracing::warn!("instance lease lost; refusing requests and re-registering");
                    node.gate().close();
                    if !self.regain(&node, &shutdown).await {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    tracing::warn!("{e}");
                    // A call through the SDK fails over to another endpoint if this one is down.
                    let _ = self.keeper.get(&self.key).await;
                }
                Err(_) => {
                    tracing::warn!("keep-alive timed out after {interval:?}");
                    let _ = self.keeper.get(&self.key).await;
                }
            }
        }
        node.gate().close();
        if let Err(e) = self.keeper.lease_revoke(self.lease).await {
            tracing::warn!("revoking the instance lease failed: {e}");
        }
    }

    /// After a lease loss: a new lease and instance key, then a fresh read of the slot map (our
    /// slots were probably moved while we were gone), and only then the gate opens. Opening it
    /// before the map is re-read would let a stale view accept writes for slots that moved.
    /// Returns false on shutdown.
    async fn regain(&mut self, node: &Arc<Node>, shutdown: &CancellationToken) -> bool {
        let retry = self.ttl / 6;
        loop {
            let attempt = async {
                let sent = self.grant(node).await?;
                let (map, _) = crate::controller::read_map(&self.keeper)
                    .await
                    .map_err(|e| Error::Keeper(format!("read slot map: {e}")))?;
                node.apply_map(map)?;
                Ok::<Instant, Error>(sent)
            };
            match attempt.await {
                Ok(sent) => {
                    node.rebuild_owned();
                    node.gate().renewed(sent, self.ttl);
                    tracing::info!(epoch = node.epoch(), "lease regained; serving again");
                    return true;
                }
                Err(e) => tracing::warn!("re-register failed: {e}"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(retry) => {}
            }
        }
    }
}
