//! Leader election: each candidate writes `/election/{name}/{lease:016x}` on its own lease; the
//! candidate whose key has the smallest create_revision leads, and that revision is its fencing
//! token (a later leader always has a larger one). A candidate waits for the key just before
//! its own to go away, so a resignation wakes exactly one waiter.

use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::client::Keeper;
use crate::client::KeyValue;
use crate::error::Error;
use crate::error::Result;
use crate::layout;
use crate::lease::KeptLease;
use crate::lease::LeaseState;
use crate::watch::EventKind;

/// Leadership of one election. Dropping it revokes the lease in the background, which
/// deletes the key and lets the next candidate lead.
pub struct Leadership {
    keeper: Keeper,
    key: String,
    revision: i64,
    lease: Option<KeptLease>,
    leading: watch::Receiver<bool>,
    cancel: CancellationToken,
}

impl Leadership {
    /// The fencing token: the create_revision of our election key. Strictly larger for every
    /// later leader of the same election; pass it with writes so stale leaders can be refused.
    pub fn revision(&self) -> i64 {
        self.revision
    }

    /// Whether we still lead, as far as we know.
    pub fn is_leader(&self) -> bool {
        *self.leading.borrow()
    }

    /// Resolves when leadership is lost: the lease expired or was revoked, or our key was
    /// deleted. Resolves at once if it already is.
    pub async fn lost(&self) {
        let mut rx = self.leading.clone();
        let _ = rx.wait_for(|leading| !*leading).await;
    }

    /// Steps down: deletes our key and revokes the lease, and waits for both.
    pub async fn resign(mut self) -> Result<()> {
        self.cancel.cancel();
        let deleted = self.keeper.delete(&self.key, false).await;
        if let Some(lease) = self.lease.take() {
            lease.shutdown().await;
        }
        deleted.map(|_| ())
    }
}

impl Drop for Leadership {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

impl Keeper {
    /// Campaigns in election `name` as `candidate` and waits until it leads. There is no
    /// timeout on the wait: wrap it in one if the caller should give up.
    pub async fn elect(&self, name: &str, candidate: &str) -> Result<Leadership> {
        layout::check_name("election name", name).map_err(Error::Invalid)?;
        let lease = KeptLease::start(self.conn().clone(), self.lease_ttl_s(), false);
        let mut lease_rx = lease.subscribe();
        let id =
            crate::lease::wait_live(&mut lease_rx, self.request_timeout(), "lease grant").await?;
        let key = layout::election_key(name, id);
        let revision = match self
            .cas_leased(&key, 0, candidate.as_bytes().to_vec(), id)
            .await?
        {
            Some(rev) => rev,
            // The key is named after our fresh lease: it can only exist if a retried write
            // of ours already made it.
            None => self
                .get(&key)
                .await?
                .map(|kv| kv.create_revision)
                .ok_or_else(|| Error::Conflict(format!("election key {key} vanished")))?,
        };
        let prefix = layout::election_prefix(name);
        let mut backoff = Backoff::default();
        loop {
            let (kvs, at) = self.get_prefix(&prefix).await?;
            let Some(predecessor) = predecessor_of(&kvs, &key, revision)? else {
                break;
            };
            // Wait for the predecessor's key to go, or for our own lease to be lost.
            let mut w = self.watch_key_lazy(&predecessor, at + 1);
            let gone = loop {
                tokio::select! {
                    changed = lease_rx.changed() => {
                        if changed.is_err() || matches!(*lease_rx.borrow(), LeaseState::Lost(_) | LeaseState::Revoked) {
                            return Err(Error::Conflict(format!("lease of {key} lost while campaigning")));
                        }
                    }
                    events = w.next() => match events {
                        Ok(events) => if events.iter().any(|e| e.kind == EventKind::Delete) {
                            break true;
                        },
                        Err(Error::Compacted { .. }) => break false,
                        Err(e) => {
                            tracing::warn!(error = %e, "election watch failed; re-reading");
                            backoff.wait().await;
                            break false;
                        }
                    },
                }
            };
            let _ = gone; // either way: read again and re-check who leads
        }
        let (leading_tx, leading_rx) = watch::channel(true);
        let cancel = CancellationToken::new();
        tokio::spawn(watch_leadership(
            self.clone(),
            key.clone(),
            revision,
            lease.subscribe(),
            leading_tx,
            cancel.clone(),
        ));
        tracing::info!(election = name, candidate, fencing = revision, "leading");
        Ok(Leadership {
            keeper: self.clone(),
            key,
            revision,
            lease: Some(lease),
            leading: leading_rx,
            cancel,
        })
    }

    /// The current leader's candidate value in election `name`, if anyone leads.
    pub async fn leader(&self, name: &str) -> Result<Option<String>> {
        layout::check_name("election name", name).map_err(Error::Invalid)?;
        let (kvs, _) = self.get_prefix(&layout::election_prefix(name)).await?;
        Ok(kvs
            .iter()
            .min_by_key(|kv| kv.create_revision)
            .map(|kv| String::from_utf8_lossy(&kv.value).into_owned()))
    }
}

/// The key created just before ours, or `None` if ours is the oldest (we lead).
fn predecessor_of(kvs: &[KeyValue], ours: &str, our_revision: i64) -> Result<Option<String>> {
    if !kvs.iter().any(|kv| kv.key == ours) {
        return Err(Error::Conflict(format!(
            "election key {ours} is gone (lease expired or revoked)"
        )));
    }
    Ok(kvs
        .iter()
        .filter(|kv| kv.create_revision < our_revision)
        .max_by_key(|kv| kv.create_revision)
        .map(|kv| kv.key.clone()))
}

/// Marks leadership lost when the lease is lost or our key is deleted.
async fn watch_leadership(
    keeper: Keeper,
    key: String,
    revision: i64,
    mut lease: watch::Receiver<LeaseState>,
    leading: watch::Sender<bool>,
    cancel: CancellationToken,
) {
    let mut w = keeper.watch_key_lazy(&key, revision + 1);
    let why = loop {
        tokio::select! {
            _ = cancel.cancelled() => break "resigned",
            changed = lease.changed() => {
                if changed.is_err() {
                    break "lease task ended";
                }
                if matches!(*lease.borrow_and_update(), LeaseState::Lost(_) | LeaseState::Revoked) {
                    break "lease lost";
                }
            }
            events = w.next() => match events {
                Ok(events) if events.iter().any(|e| e.kind == EventKind::Delete) => break "election key deleted",
                Ok(_) => {}
                Err(Error::Compacted { .. }) => {
                    // Re-check by reading; continue watching from now.
                    match keeper.get(&key).await {
                        Ok(None) => break "election key deleted",
                        _ => w = keeper.watch_key_lazy(&key, 0),
                    }
                }
                Err(e) => tracing::warn!(%key, error = %e, "leadership watch failed; retrying"),
            },
        }
    };
    tracing::info!(%key, why, "leadership ended");
    leading.send_replace(false);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kv(key: &str, rev: i64) -> KeyValue {
        KeyValue {
            key: key.into(),
            value: vec![],
            create_revision: rev,
            mod_revision: rev,
            version: 1,
            lease: 0,
        }
    }

    #[test]
    fn the_oldest_key_leads_and_others_wait_on_their_predecessor() {
        let kvs = vec![kv("/e/a", 5), kv("/e/b", 3), kv("/e/c", 9)];
        assert_eq!(predecessor_of(&kvs, "/e/b", 3).unwrap(), None);
        assert_eq!(
            predecessor_of(&kvs, "/e/a", 5).unwrap(),
            Some("/e/b".into())
        );
        assert_eq!(
            predecessor_of(&kvs, "/e/c", 9).unwrap(),
            Some("/e/a".into())
        );
        assert!(matches!(
            predecessor_of(&kvs, "/e/z", 10),
            Err(Error::Conflict(_))
        ));
    }
}
