//! Service discovery: [`Registration`] keeps an instance's key alive on a lease (re-granting
//! and re-writing it after a lease loss); [`Discovery`] keeps a live list of a service's
//! instances by watch.

use std::collections::BTreeMap;
use std::sync::Arc;

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::sync::DropGuard;

use crate::backoff::Backoff;
use crate::client::Keeper;
use crate::error::Error;
use crate::error::Result;
use crate::layout;
use crate::layout::InstanceInfo;
use crate::lease::KeptLease;
use crate::lease::LeaseState;
use crate::watch::EventKind;

/// What an instance registers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Instance {
    pub id: String,
    pub addrs: BTreeMap<String, String>,
    pub zone: String,
    pub meta: BTreeMap<String, String>,
}

/// An instance's presence in discovery. Dropping it revokes the lease in the background (the
/// key disappears at once); [`Registration::shutdown`] does the same and waits.
pub struct Registration {
    lease: Option<KeptLease>,
    lease_rx: watch::Receiver<LeaseState>,
    lost: watch::Receiver<bool>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Registration {
    /// The lease the instance key is on now (0 while a new lease is being granted).
    pub fn lease_id(&self) -> i64 {
        match *self.lease_rx.borrow() {
            LeaseState::Live(id) => id,
            _ => 0,
        }
    }

    /// `true` while the instance key is not known to be in place (lease lost and not yet
    /// re-registered, or keeper unreachable for the initial write).
    pub fn lost(&self) -> watch::Receiver<bool> {
        self.lost.clone()
    }

    /// Revokes the lease (deleting the instance key) and waits for that.
    pub async fn shutdown(mut self) -> Result<()> {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        if let Some(lease) = self.lease.take() {
            lease.shutdown().await;
        }
        Ok(())
    }
}

impl Drop for Registration {
    fn drop(&mut self) {
        self.cancel.cancel();
        // Dropping the lease cancels its task, which revokes it.
    }
}

/// A live list of a service's instances, sorted by id. Cheap to clone.
#[derive(Clone)]
pub struct Discovery {
    rx: watch::Receiver<Arc<Vec<InstanceInfo>>>,
    _stop: Arc<DropGuard>,
}

impl Discovery {
    /// The instances as of the last event seen.
    pub fn instances(&self) -> Arc<Vec<InstanceInfo>> {
        self.rx.borrow().clone()
    }

    /// Waits for the list to change and returns the new one. Changes that happen while the
    /// caller is busy are seen as one change to the latest list.
    pub async fn changed(&mut self) -> Result<Arc<Vec<InstanceInfo>>> {
        self.rx
            .changed()
            .await
            .map_err(|_| Error::Closed("discovery"))?;
        Ok(self.rx.borrow_and_update().clone())
    }
}

impl Keeper {
    /// Registers `instance` under `/instances/{service}/{id}` on a lease of the configured TTL
    /// and returns once the key is written.
    pub async fn register(&self, service: &str, instance: Instance) -> Result<Registration> {
        layout::check_name("service", service).map_err(Error::Invalid)?;
        layout::check_name("instance id", &instance.id).map_err(Error::Invalid)?;
        let info = InstanceInfo {
            id: instance.id.clone(),
            addrs: instance.addrs,
            zone: instance.zone,
            started_at: layout::now_rfc3339(),
            meta: instance.meta,
            lease: 0,
        };
        let body = serde_json::to_vec(&info).map_err(|e| Error::Invalid(e.to_string()))?;
        let key = layout::instance_key(service, &info.id);
        let lease = KeptLease::start(self.conn().clone(), self.lease_ttl_s(), true);
        let mut lease_rx = lease.subscribe();
        let first =
            crate::lease::wait_live(&mut lease_rx, self.request_timeout(), "lease grant").await?;
        self.put_leased(&key, body.clone(), first).await?;
        let (lost_tx, lost_rx) = watch::channel(false);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(keep_registered(
            self.clone(),
            key,
            body,
            first,
            lease.subscribe(),
            lost_tx,
            cancel.clone(),
        ));
        Ok(Registration {
            lease: Some(lease),
            lease_rx,
            lost: lost_rx,
            cancel,
            task: Some(task),
        })
    }

    /// A live list of `service`'s instances, loaded before this returns.
    pub async fn discover(&self, service: &str) -> Result<Discovery> {
        layout::check_name("service", service).map_err(Error::Invalid)?;
        let prefix = layout::instances_prefix(service);
        let (map, revision) = load_instances(self, &prefix).await?;
        let (tx, rx) = watch::channel(Arc::new(map.values().cloned().collect::<Vec<_>>()));
        let cancel = CancellationToken::new();
        tokio::spawn(follow_instances(
            self.clone(),
            prefix,
            map,
            revision,
            tx,
            cancel.clone(),
        ));
        Ok(Discovery {
            rx,
            _stop: Arc::new(cancel.drop_guard()),
        })
    }
}

/// Re-writes the instance key whenever the lease is replaced.
async fn keep_registered(
    keeper: Keeper,
    key: String,
    body: Vec<u8>,
    mut written_on: i64,
    mut lease: watch::Receiver<LeaseState>,
    lost: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let state = *lease.borrow_and_update();
        match state {
            LeaseState::Live(id) if id != written_on => {
                match keeper.put_leased(&key, body.clone(), id).await {
                    Ok(_) => {
                        tracing::info!(%key, lease = id, "re-registered on a new lease");
                        written_on = id;
                        lost.send_replace(false);
                        backoff.reset();
                    }
                    Err(e) => {
                        tracing::warn!(%key, error = %e, "re-register failed; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = backoff.wait() => {}
                        }
                        continue;
                    }
                }
            }
            LeaseState::Lost(_) | LeaseState::Granting => {
                lost.send_replace(true);
            }
            LeaseState::Revoked => return,
            LeaseState::Live(_) => {}
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            changed = lease.changed() => if changed.is_err() { return },
        }
    }
}

async fn load_instances(
    keeper: &Keeper,
    prefix: &str,
) -> Result<(BTreeMap<String, InstanceInfo>, i64)> {
    let (kvs, revision) = keeper.get_prefix(prefix).await?;
    let mut map = BTreeMap::new();
    for kv in kvs {
        match kv.json::<InstanceInfo>() {
            Ok(info) => {
                map.insert(
                    kv.key.clone(),
                    InstanceInfo {
                        lease: kv.lease,
                        ..info
                    },
                );
            }
            Err(e) => tracing::warn!(error = %e, "skipping an unreadable instance"),
        }
    }
    Ok((map, revision))
}

async fn follow_instances(
    keeper: Keeper,
    prefix: String,
    mut map: BTreeMap<String, InstanceInfo>,
    revision: i64,
    tx: watch::Sender<Arc<Vec<InstanceInfo>>>,
    cancel: CancellationToken,
) {
    let mut watch = keeper.watch_prefix_lazy(&prefix, revision + 1);
    let mut backoff = Backoff::default();
    loop {
        let next = tokio::select! {
            _ = cancel.cancelled() => return,
            r = watch.next() => r,
        };
        match next {
            Ok(events) => {
                for e in events {
                    match e.kind {
                        EventKind::Put => match e.kv.json::<InstanceInfo>() {
                            Ok(info) => {
                                let info = InstanceInfo {
                                    lease: e.kv.lease,
                                    ..info
                                };
                                map.insert(e.kv.key.clone(), info);
                            }
                            Err(err) => {
                                tracing::warn!(error = %err, "skipping an unreadable instance")
                            }
                        },
                        EventKind::Delete => {
                            map.remove(&e.kv.key);
                        }
                    }
                }
                tx.send_replace(Arc::new(map.values().cloned().collect()));
            }
            Err(Error::Compacted { compact_revision }) => {
                tracing::warn!(%prefix, compact_revision, "discovery watch history compacted; reloading");
                let loaded = tokio::select! {
                    _ = cancel.cancelled() => return,
                    r = load_instances(&keeper, &prefix) => r,
                };
                match loaded {
                    Ok((fresh, rev)) => {
                        map = fresh;
                        tx.send_replace(Arc::new(map.values().cloned().collect()));
                        watch = keeper.watch_prefix_lazy(&prefix, rev + 1);
                        backoff.reset();
                    }
                    Err(e) => {
                        tracing::warn!(%prefix, error = %e, "discovery reload failed; retrying");
                        backoff.wait().await;
                    }
                }
            }
            Err(e) => {
                tracing::warn!(%prefix, error = %e, "discovery watch failed; retrying");
                backoff.wait().await;
            }
        }
    }
}
