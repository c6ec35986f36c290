//! [`KeptLease`]: a lease granted and kept alive by a background task, with its state published
//! on a watch channel. Registrations, elections and the session lease are built on it.
//!
//! Keep-alives go out every TTL/3 on a keep-alive stream. When a stream breaks (node killed)
//! the task reopens it on the next endpoint at once; the keeper's new leader gives every lease a
//! full TTL, so a failover does not lose the lease. When the keeper answers a keep-alive with
//! TTL 0 the lease is gone (expired or revoked behind our back): the state becomes `Lost` and,
//! if asked to, the task grants a new lease.

use std::sync::Arc;
use std::time::Duration;

use longlink_proto::etcdserverpb::LeaseGrantRequest;
use longlink_proto::etcdserverpb::LeaseKeepAliveRequest;
use longlink_proto::etcdserverpb::LeaseRevokeRequest;
use longlink_proto::etcdserverpb::lease_client::LeaseClient;
use tokio::sync::mpsc;
use tokio::sync::watch;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::conn::Conn;
use crate::error::Error;
use crate::error::Result;

/// Where a kept lease stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LeaseState {
    /// No lease yet (first grant, or re-grant after a loss, in progress).
    Granting,
    /// `id` is alive as far as we know.
    Live(i64),
    /// `id` expired or was revoked. Final unless the lease re-grants.
    Lost(i64),
    /// We revoked it (shutdown). Final.
    Revoked,
}

/// A lease kept alive until dropped (then revoked in the background).
pub(crate) struct KeptLease {
    state: watch::Receiver<LeaseState>,
    cancel: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

pub(crate) async fn grant(conn: &Conn, ttl_s: i64) -> Result<i64> {
    let resp = conn
        .call("lease grant", |ch| async move {
            Ok(LeaseClient::new(ch)
                .lease_grant(LeaseGrantRequest { ttl: ttl_s, id: 0 })
                .await?
                .into_inner())
        })
        .await?;
    if !resp.error.is_empty() {
        return Err(Error::Invalid(format!("lease grant: {}", resp.error)));
    }
    Ok(resp.id)
}

pub(crate) async fn revoke(conn: &Conn, id: i64) -> Result<()> {
    let r = conn
        .call("lease revoke", |ch| async move {
            LeaseClient::new(ch)
                .lease_revoke(LeaseRevokeRequest { id })
                .await
        })
        .await;
    match r {
        Ok(_) => Ok(()),
        // Already gone: the goal of a revoke is reached.
        Err(Error::Status(s)) if s.code() == tonic::Code::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Waits until `rx` shows a live lease and returns its id.
pub(crate) async fn wait_live(
    rx: &mut watch::Receiver<LeaseState>,
    timeout: Duration,
    what: &str,
) -> Result<i64> {
    let waited = tokio::time::timeout(
        timeout,
        rx.wait_for(|s| matches!(s, LeaseState::Live(_) | LeaseState::Revoked)),
    )
    .await;
    match waited {
        Ok(Ok(s)) => match *s {
            LeaseState::Live(id) => Ok(id),
            _ => Err(Error::Closed("lease")),
        },
        Ok(Err(_)) => Err(Error::Closed("lease")),
        Err(_) => Err(Error::Timeout {
            what: what.to_string(),
            after: timeout,
        }),
    }
}

impl KeptLease {
    /// Starts granting and keeping a lease of `ttl_s` seconds. With `regrant`, a lost lease is
    /// replaced by a new one; without, `Lost` is final.
    pub(crate) fn start(conn: Arc<Conn>, ttl_s: i64, regrant: bool) -> Self {
        let (tx, rx) = watch::channel(LeaseState::Granting);
        let cancel = CancellationToken::new();
        let task = tokio::spawn(run(conn, ttl_s, regrant, tx, cancel.clone()));
        Self {
            state: rx,
            cancel,
            task: Some(task),
        }
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<LeaseState> {
        self.state.clone()
    }

    /// Stops keeping the lease, revokes it, and waits for that to finish.
    pub(crate) async fn shutdown(mut self) {
        self.cancel.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
    }
}

impl Drop for KeptLease {
    fn drop(&mut self) {
        // The task sees the cancel and revokes the lease on its own.
        self.cancel.cancel();
    }
}

/// Why keeping one lease id ended.
enum Ended {
    Cancelled,
    Lost,
}

async fn run(
    conn: Arc<Conn>,
    ttl_s: i64,
    regrant: bool,
    tx: watch::Sender<LeaseState>,
    cancel: CancellationToken,
) {
    let mut backoff = Backoff::default();
    loop {
        let granted = tokio::select! {
            _ = cancel.cancelled() => None,
            r = grant(&conn, ttl_s) => Some(r),
        };
        let id = match granted {
            None => {
                tx.send_replace(LeaseState::Revoked);
                return;
            }
            Some(Ok(id)) => id,
            Some(Err(e)) => {
                tracing::warn!(error = %e, "lease grant failed; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => {}
                    _ = backoff.wait() => {}
                }
                continue;
            }
        };
        backoff.reset();
        tx.send_replace(LeaseState::Live(id));
        match keep_alive(&conn, id, ttl_s, &cancel).await {
            Ended::Cancelled => {
                if let Err(e) = revoke(&conn, id).await {
                    tracing::debug!(lease = id, error = %e, "revoke at shutdown failed; it will expire");
                }
                tx.send_replace(LeaseState::Revoked);
                return;
            }
            Ended::Lost => {
                tracing::warn!(lease = id, regrant, "lease lost (expired or revoked)");
                tx.send_replace(LeaseState::Lost(id));
                if !regrant {
                    cancel.cancelled().await;
                    return;
                }
                tx.send_replace(LeaseState::Granting);
            }
        }
    }
}

/// Keeps `id` alive until cancelled or the keeper says it is gone.
async fn keep_alive(conn: &Conn, id: i64, ttl_s: i64, cancel: &CancellationToken) -> Ended {
    let every =
        Duration::from_millis((ttl_s.max(1) as u64) * 1000 / 3).max(Duration::from_millis(100));
    // A keep-alive not answered within a third of the TTL is retried on the next endpoint at
    // once: waiting for the full request timeout could outlast the lease itself.
    let answer_within = conn
        .request_timeout
        .min(every)
        .max(Duration::from_millis(500));
    let mut backoff = Backoff::new(
        Duration::from_millis(50),
        (every / 2).max(Duration::from_millis(100)),
    );
    loop {
        let (channel, generation) = conn.channel();
        let (req_tx, req_rx) = mpsc::channel(1);
        let mut client = LeaseClient::new(channel);
        let opened = tokio::select! {
            _ = cancel.cancelled() => return Ended::Cancelled,
            r = tokio::time::timeout(
                answer_within,
                client.lease_keep_alive(ReceiverStream::new(req_rx)),
            ) => r,
        };
        let mut responses = match opened {
            Ok(Ok(r)) => r.into_inner(),
            _ => {
                conn.fail(generation);
                tokio::select! {
                    _ = cancel.cancelled() => return Ended::Cancelled,
                    _ = backoff.wait() => {}
                }
                continue;
            }
        };
        loop {
            if req_tx.send(LeaseKeepAliveRequest { id }).await.is_err() {
                break;
            }
            let answer = tokio::select! {
                _ = cancel.cancelled() => return Ended::Cancelled,
                r = tokio::time::timeout(answer_within, responses.message()) => r,
            };
            match answer {
                Ok(Ok(Some(resp))) if resp.ttl <= 0 => return Ended::Lost,
                Ok(Ok(Some(_))) => backoff.reset(),
                _ => break,
            }
            tokio::select! {
                _ = cancel.cancelled() => return Ended::Cancelled,
                _ = tokio::time::sleep(every) => {}
            }
        }
        tracing::debug!(
            lease = id,
            "keep-alive stream broke; reopening on the next endpoint"
        );
        conn.fail(generation);
        tokio::select! {
            _ = cancel.cancelled() => return Ended::Cancelled,
            _ = backoff.wait() => {}
        }
    }
}
