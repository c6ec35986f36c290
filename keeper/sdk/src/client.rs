//! [`Keeper`]: the process's handle on the keeper cluster, with raw key-value calls that every
//! higher-level feature (config, discovery, elections, commands) is built from.

use std::sync::Arc;
use std::time::Duration;

use crate::conn::Channel;
use longlink_proto::etcdserverpb::Compare;
use longlink_proto::etcdserverpb::DeleteRangeRequest;
use longlink_proto::etcdserverpb::PutRequest;
use longlink_proto::etcdserverpb::RangeRequest;
use longlink_proto::etcdserverpb::RangeResponse;
use longlink_proto::etcdserverpb::RequestOp;
use longlink_proto::etcdserverpb::StatusRequest;
use longlink_proto::etcdserverpb::TxnRequest;
use longlink_proto::etcdserverpb::TxnResponse;
use longlink_proto::etcdserverpb::cluster_client::ClusterClient;
use longlink_proto::etcdserverpb::compare::CompareResult;
use longlink_proto::etcdserverpb::compare::CompareTarget;
use longlink_proto::etcdserverpb::compare::TargetUnion;
use longlink_proto::etcdserverpb::kv_client::KvClient;
use longlink_proto::etcdserverpb::lease_client::LeaseClient;
use longlink_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use longlink_proto::etcdserverpb::request_op::Request;
use longlink_proto::etcdserverpb::watch_client::WatchClient;
use longlink_proto::mvccpb;

use crate::conn::Conn;
use crate::error::Error;
use crate::error::Result;
use crate::lease::KeptLease;
use crate::lease::LeaseState;
use crate::watch::WatchEvents;

/// How to reach the keeper and how this process names itself.
#[derive(Debug, Clone)]
pub struct ConnectOptions {
    /// `host:port` or `http://host:port`; calls fail over between them.
    pub endpoints: Vec<String>,
    /// Instance id used for `/applied` reports; default `{hostname}-{pid}`.
    pub instance: Option<String>,
    /// Upper bound for every call, retries and failovers included.
    pub request_timeout: Duration,
    /// TTL of the leases the SDK grants (session, registrations, elections), in seconds.
    pub lease_ttl_s: i64,
}

impl ConnectOptions {
    pub fn new(endpoints: &[String]) -> Self {
        Self {
            endpoints: endpoints.to_vec(),
            ..Self::default()
        }
    }
}

impl Default for ConnectOptions {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            instance: None,
            request_timeout: Duration::from_secs(5),
            lease_ttl_s: 10,
        }
    }
}

/// A key and its metadata as the keeper stores it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyValue {
    pub key: String,
    pub value: Vec<u8>,
    pub create_revision: i64,
    pub mod_revision: i64,
    pub version: i64,
    /// The lease the key is attached to, 0 if none.
    pub lease: i64,
}

impl From<mvccpb::KeyValue> for KeyValue {
    fn from(kv: mvccpb::KeyValue) -> Self {
        Self {
            key: String::from_utf8_lossy(&kv.key).into_owned(),
            value: kv.value,
            create_revision: kv.create_revision,
            mod_revision: kv.mod_revision,
            version: kv.version,
            lease: kv.lease,
        }
    }
}

impl KeyValue {
    /// The value as JSON of type `D`; a mismatch is [`Error::Decode`] naming the key.
    pub fn json<D: serde::de::DeserializeOwned>(&self) -> Result<D> {
        serde_json::from_slice(&self.value).map_err(|e| Error::Decode {
            key: self.key.clone(),
            message: e.to_string(),
        })
    }
}

/// Raw tonic clients on the current endpoint, for calls the SDK does not wrap (keeperctl's
/// member and status commands). They carry no timeout or failover of their own.
#[derive(Clone)]
pub struct RawClients {
    pub kv: KvClient<Channel>,
    pub watch: WatchClient<Channel>,
    pub lease: LeaseClient<Channel>,
    pub cluster: ClusterClient<Channel>,
    pub maintenance: MaintenanceClient<Channel>,
}

/// The process's connection to the keeper. Cheap to clone; make one per process.
#[derive(Clone)]
pub struct Keeper {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Keeper {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keeper")
            .field("instance", &self.instance())
            .field("endpoint", &self.inner.conn.endpoint())
            .finish()
    }
}

struct Inner {
    conn: Arc<Conn>,
    instance: String,
    lease_ttl_s: i64,
    /// The session lease that `/applied` reports hang on: granted on first use, kept alive and
    /// re-granted for as long as this `Keeper` lives, revoked when the last clone drops.
    session: tokio::sync::OnceCell<KeptLease>,
}

/// `{hostname}-{pid}`.
fn default_instance() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_string());
    format!("{host}-{}", std::process::id())
}

/// The end of the key range holding every key that starts with `prefix`.
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // Every byte was 0xff (or the prefix was empty): "to the end of the key space".
    vec![0]
}

impl Keeper {
    /// Connects with default options; see [`Keeper::connect_with`].
    pub async fn connect(endpoints: &[String]) -> Result<Keeper> {
        Self::connect_with(ConnectOptions::new(endpoints)).await
    }

    /// Connects and checks that at least one endpoint answers within the request timeout.
    pub async fn connect_with(opts: ConnectOptions) -> Result<Keeper> {
        if opts.lease_ttl_s < 1 {
            return Err(Error::Invalid(format!(
                "lease_ttl_s is {}; the minimum is 1",
                opts.lease_ttl_s
            )));
        }
        let instance = opts.instance.clone().unwrap_or_else(default_instance);
        crate::layout::check_name("instance", &instance).map_err(Error::Invalid)?;
        let conn = Arc::new(Conn::new(&opts.endpoints, opts.request_timeout)?);
        conn.call("keeper status", |ch| async move {
            MaintenanceClient::new(ch).status(StatusRequest {}).await
        })
        .await?;
        Ok(Keeper {
            inner: Arc::new(Inner {
                conn,
                instance,
                lease_ttl_s: opts.lease_ttl_s,
                session: tokio::sync::OnceCell::new(),
            }),
        })
    }

    /// This process's instance id, used for `/applied` reports.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    pub(crate) fn conn(&self) -> &Arc<Conn> {
        &self.inner.conn
    }

    pub(crate) fn lease_ttl_s(&self) -> i64 {
        self.inner.lease_ttl_s
    }

    pub fn request_timeout(&self) -> Duration {
        self.inner.conn.request_timeout
    }

    /// Tonic clients on the endpoint calls currently go to.
    pub fn clients(&self) -> RawClients {
        let (ch, _) = self.inner.conn.channel();
        RawClients {
            kv: KvClient::new(ch.clone()),
            watch: WatchClient::new(ch.clone()),
            lease: LeaseClient::new(ch.clone()),
            cluster: ClusterClient::new(ch.clone()),
            maintenance: MaintenanceClient::new(ch),
        }
    }

    async fn range(&self, what: &str, req: RangeRequest) -> Result<RangeResponse> {
        self.inner
            .conn
            .call(what, |ch| {
                let req = req.clone();
                async move { Ok(KvClient::new(ch).range(req).await?.into_inner()) }
            })
            .await
    }

    /// One key, or `None` if absent.
    pub async fn get(&self, key: &str) -> Result<Option<KeyValue>> {
        let req = RangeRequest {
            key: key.as_bytes().to_vec(),
            ..Default::default()
        };
        let resp = self.range(&format!("get {key}"), req).await?;
        Ok(resp.kvs.into_iter().next().map(KeyValue::from))
    }

    /// Every key under `prefix`, in key order, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> Result<(Vec<KeyValue>, i64)> {
        let req = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            ..Default::default()
        };
        let resp = self.range(&format!("get prefix {prefix}"), req).await?;
        let revision = resp.header.map(|h| h.revision).unwrap_or_default();
        Ok((resp.kvs.into_iter().map(KeyValue::from).collect(), revision))
    }

    /// Several single keys read at one revision, and that revision. With `revision` 0 the
    /// first key is read linearizably and the others at the revision that read returned.
    ///
    /// Not a txn: the keeper runs every txn through the Raft log, read-only ones included.
    /// A read at a fixed revision has one answer on every node that applied it, so those are
    /// serializable (no ReadIndex round trip); a node that has not applied it yet answers
    /// OutOfRange.
    pub(crate) async fn get_keys_at(
        &self,
        keys: &[String],
        revision: i64,
    ) -> Result<(Vec<Option<KeyValue>>, i64)> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.get_keys_once(keys, revision).await {
                Err(Error::Status(s))
                    if s.code() == tonic::Code::OutOfRange && revision == 0 && attempt < 5 =>
                {
                    // The node the later keys went to (after a failover) is behind the first
                    // read: read all again.
                    tokio::time::sleep(std::time::Duration::from_millis(20 * attempt)).await;
                }
                other => return other,
            }
        }
    }

    async fn get_keys_once(
        &self,
        keys: &[String],
        revision: i64,
    ) -> Result<(Vec<Option<KeyValue>>, i64)> {
        let mut at = revision;
        let mut out = Vec::with_capacity(keys.len());
        for k in keys {
            let req = RangeRequest {
                key: k.as_bytes().to_vec(),
                revision: at,
                serializable: at > 0,
                ..Default::default()
            };
            let resp = self.range(&format!("get {k}"), req).await?;
            if at == 0 {
                at = resp.header.map(|h| h.revision).unwrap_or_default();
            }
            out.push(resp.kvs.into_iter().next().map(KeyValue::from));
        }
        Ok((out, at))
    }

    /// Writes `key`; returns the revision of the write.
    pub async fn put(&self, key: &str, value: impl Into<Vec<u8>>) -> Result<i64> {
        self.put_leased(key, value.into(), 0).await
    }

    /// Writes `key` attached to `lease` (0 = none); returns the revision of the write.
    pub async fn put_leased(&self, key: &str, value: Vec<u8>, lease: i64) -> Result<i64> {
        let req = PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            lease,
            ..Default::default()
        };
        let resp = self
            .inner
            .conn
            .call(&format!("put {key}"), |ch| {
                let req = req.clone();
                async move { Ok(KvClient::new(ch).put(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.header.map(|h| h.revision).unwrap_or_default())
    }

    /// Deletes `key` (or every key under it when `prefix`); returns how many were deleted.
    pub async fn delete(&self, key: &str, prefix: bool) -> Result<i64> {
        let req = DeleteRangeRequest {
            key: key.as_bytes().to_vec(),
            range_end: if prefix {
                prefix_end(key.as_bytes())
            } else {
                Vec::new()
            },
            ..Default::default()
        };
        let resp = self
            .inner
            .conn
            .call(&format!("delete {key}"), |ch| {
                let req = req.clone();
                async move { Ok(KvClient::new(ch).delete_range(req).await?.into_inner()) }
            })
            .await?;
        Ok(resp.deleted)
    }

    /// Writes `key` only if its mod_revision is `expected_mod_revision` (0 = the key must not
    /// exist). Returns whether it was written.
    pub async fn cas(
        &self,
        key: &str,
        expected_mod_revision: i64,
        value: impl Into<Vec<u8>>,
    ) -> Result<bool> {
        Ok(self
            .cas_leased(key, expected_mod_revision, value.into(), 0)
            .await?
            .is_some())
    }

    /// [`Keeper::cas`] with a lease; returns the revision of the write if it happened.
    pub(crate) async fn cas_leased(
        &self,
        key: &str,
        expected_mod_revision: i64,
        value: Vec<u8>,
        lease: i64,
    ) -> Result<Option<i64>> {
        let resp = self
            .txn(TxnRequest {
                compare: vec![mod_revision_is(key, expected_mod_revision)],
                success: vec![RequestOp {
                    request: Some(Request::RequestPut(PutRequest {
                        key: key.as_bytes().to_vec(),
                        value,
                        lease,
                        ..Default::default()
                    })),
                }],
                failure: vec![],
            })
            .await?;
        Ok(resp
            .succeeded
            .then(|| resp.header.map(|h| h.revision).unwrap_or_default()))
    }

    /// A raw transaction, with the request timeout and failover.
    pub async fn txn(&self, req: TxnRequest) -> Result<TxnResponse> {
        self.inner
            .conn
            .call("txn", |ch| {
                let req = req.clone();
                async move { Ok(KvClient::new(ch).txn(req).await?.into_inner()) }
            })
            .await
    }

    /// Events under `prefix` from `start_revision` (0 = from now on); see [`WatchEvents`].
    pub async fn watch_prefix(&self, prefix: &str, start_revision: i64) -> Result<WatchEvents> {
        let mut w = WatchEvents::new(
            self.inner.conn.clone(),
            prefix.as_bytes().to_vec(),
            prefix_end(prefix.as_bytes()),
            start_revision,
        );
        w.open_now().await?;
        Ok(w)
    }

    /// Events on exactly `key` from `start_revision`; the stream opens on first `next()`.
    pub(crate) fn watch_key_lazy(&self, key: &str, start_revision: i64) -> WatchEvents {
        WatchEvents::new(
            self.inner.conn.clone(),
            key.as_bytes().to_vec(),
            Vec::new(),
            start_revision,
        )
    }

    /// Events under `prefix` from `start_revision`; the stream opens on first `next()`.
    pub(crate) fn watch_prefix_lazy(&self, prefix: &str, start_revision: i64) -> WatchEvents {
        WatchEvents::new(
            self.inner.conn.clone(),
            prefix.as_bytes().to_vec(),
            prefix_end(prefix.as_bytes()),
            start_revision,
        )
    }

    /// Grants a lease of `ttl_s` seconds; returns its id.
    pub async fn lease_grant(&self, ttl_s: i64) -> Result<i64> {
        crate::lease::grant(&self.inner.conn, ttl_s).await
    }

    /// Revokes a lease (deleting its keys).
    pub async fn lease_revoke(&self, id: i64) -> Result<()> {
        crate::lease::revoke(&self.inner.conn, id).await
    }

    /// The session lease's state, starting its keep-alive task on first use.
    pub(crate) async fn session(&self) -> tokio::sync::watch::Receiver<LeaseState> {
        let conn = self.inner.conn.clone();
        let ttl = self.inner.lease_ttl_s;
        self.inner
            .session
            .get_or_init(|| async move { KeptLease::start(conn, ttl, true) })
            .await
            .subscribe()
    }

    /// The session lease id, waiting (up to the request timeout) until it is granted.
    pub(crate) async fn session_lease(&self) -> Result<i64> {
        let mut rx = self.session().await;
        let timeout = self.request_timeout();
        crate::lease::wait_live(&mut rx, timeout, "session lease").await
    }
}

/// A compare that holds when `key`'s mod_revision is `rev` (0: the key does not exist).
pub(crate) fn mod_revision_is(key: &str, rev: i64) -> Compare {
    Compare {
        result: CompareResult::Equal as i32,
        target: CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(TargetUnion::ModRevision(rev)),
        range_end: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_covers_the_prefix() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn default_instance_names_host_and_pid() {
        let id = default_instance();
        assert!(id.ends_with(&format!("-{}", std::process::id())));
        assert!(crate::layout::check_name("instance", &id).is_ok());
    }
}
