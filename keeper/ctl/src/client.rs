//! The keeper connection keeperctl uses: the SDK's [`Keeper`] (every call bounded by `--timeout`,
//! with endpoint failover) plus the few KV and txn shapes the commands need.

use std::time::Duration;

use anyhow::Context;
use anyhow::anyhow;
use keeper_sdk::ConnectOptions;
use keeper_sdk::Keeper;
use keeper_sdk::proto::OneWrite;
use longlink_proto::etcdserverpb::Compare;
use longlink_proto::etcdserverpb::DeleteRangeRequest;
use longlink_proto::etcdserverpb::PutRequest;
use longlink_proto::etcdserverpb::RangeRequest;
use longlink_proto::etcdserverpb::RequestOp;
use longlink_proto::etcdserverpb::TxnRequest;
use longlink_proto::etcdserverpb::cluster_client::ClusterClient;
use longlink_proto::etcdserverpb::compare;
use longlink_proto::etcdserverpb::maintenance_client::MaintenanceClient;
use longlink_proto::etcdserverpb::request_op;
use tonic::transport::Endpoint;

/// One key as keeperctl shows it.
pub use keeper_sdk::KeyValue as Kv;

/// keeperctl's connection to the keeper.
#[derive(Clone)]
pub struct Client {
    keeper: Keeper,
    /// Bound of the raw admin calls the SDK does not wrap.
    timeout: Duration,
}

/// `host:port` or a URL, as a tonic endpoint URL.
pub fn endpoint_url(endpoint: &str) -> String {
    if endpoint.starts_with("http://") || endpoint.starts_with("https://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

/// The key just after every key starting with `prefix` (etcd's range_end for a prefix).
pub fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// The result of one txn: whether the compares held, and the revision after it.
pub struct TxnOutcome {
    pub succeeded: bool,
    pub revision: i64,
}

impl Client {
    /// Connects through the SDK: fails unless one of `endpoints` answers within `timeout`.
    pub async fn connect(endpoints: &[String], timeout: Duration) -> anyhow::Result<Client> {
        let mut opts = ConnectOptions::new(endpoints);
        opts.request_timeout = timeout;
        opts.instance = Some(format!("keeperctl-{}", std::process::id()));
        let keeper = Keeper::connect_with(opts).await.map_err(|e| {
            anyhow!(
                "cannot reach the keeper at any of {} ({e})",
                endpoints.join(",")
            )
        })?;
        Ok(Client { keeper, timeout })
    }

    pub fn keeper(&self) -> &Keeper {
        &self.keeper
    }

    /// The Cluster API on the current endpoint, for `member` (bound each call with [`Self::bounded`]).
    pub fn cluster(&self) -> ClusterClient<keeper_sdk::Channel> {
        self.keeper.clients().cluster
    }

    /// Runs a raw call under the request timeout.
    pub async fn bounded<T>(
        &self,
        what: &str,
        call: impl std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    ) -> anyhow::Result<T> {
        match tokio::time::timeout(self.timeout, call).await {
            Ok(Ok(r)) => Ok(r.into_inner()),
            Ok(Err(s)) => Err(status_error(what, s)),
            Err(_) => Err(anyhow!(
                "{what}: no answer within {:.1} s",
                self.timeout.as_secs_f64()
            )),
        }
    }

    /// One key, or `None`.
    pub async fn get(&self, key: &str) -> anyhow::Result<Option<Kv>> {
        Ok(self.keeper.get(key).await?)
    }

    /// Every key under `prefix`, in key order, and the revision they were read at.
    pub async fn get_prefix(&self, prefix: &str) -> anyhow::Result<(Vec<Kv>, i64)> {
        Ok(self.keeper.get_prefix(prefix).await?)
    }

    /// The last key under `prefix` in key order.
    pub async fn last_under(&self, prefix: &str) -> anyhow::Result<Option<Kv>> {
        use longlink_proto::etcdserverpb::range_request::SortOrder;
        use longlink_proto::etcdserverpb::range_request::SortTarget;
        let req = RangeRequest {
            key: prefix.as_bytes().to_vec(),
            range_end: prefix_end(prefix.as_bytes()),
            limit: 1,
            sort_order: SortOrder::Descend as i32,
            sort_target: SortTarget::Key as i32,
            keys_only: true,
            ..Default::default()
        };
        let mut kv = self.keeper.clients().kv;
        let resp = self
            .bounded(&format!("get {prefix}*"), kv.range(req))
            .await?;
        Ok(resp.kvs.into_iter().next().map(Kv::from))
    }

    /// Puts one key; returns the new revision.
    pub async fn put(&self, key: &str, value: Vec<u8>) -> anyhow::Result<i64> {
        Ok(self.keeper.put(key, value).await?)
    }

    /// Deletes a key or a prefix; returns how many keys went.
    pub async fn delete(&self, key: &str, prefix: bool) -> anyhow::Result<i64> {
        Ok(self.keeper.delete(key, prefix).await?)
    }

    /// Runs `ops` if every compare holds.
    pub async fn txn(
        &self,
        compare: Vec<Compare>,
        ops: Vec<RequestOp>,
    ) -> anyhow::Result<TxnOutcome> {
        let resp = self
            .keeper
            .txn(TxnRequest {
                compare,
                success: ops,
                failure: Vec::new(),
            })
            .await?;
        Ok(TxnOutcome {
            succeeded: resp.succeeded,
            revision: resp.header.map(|h| h.revision).unwrap_or(0),
        })
    }
}

/// The Maintenance API of exactly `endpoint` (status asks every endpoint itself, no failover).
pub async fn maintenance_of(
    endpoint: &str,
    timeout: Duration,
) -> anyhow::Result<MaintenanceClient<keeper_sdk::Channel>> {
    let channel = Endpoint::from_shared(endpoint_url(endpoint))
        .with_context(|| format!("bad endpoint {endpoint:?}"))?
        .connect_timeout(timeout)
        .timeout(timeout)
        .connect()
        .await
        .map_err(|e| anyhow!("{endpoint}: {}", source_chain(&e)))?;
    Ok(MaintenanceClient::new(OneWrite::new(channel)))
}

/// Compare: `key`'s mod_revision is `rev` (0 = the key does not exist).
pub fn mod_revision_is(key: &str, rev: i64) -> Compare {
    Compare {
        result: compare::CompareResult::Equal as i32,
        target: compare::CompareTarget::Mod as i32,
        key: key.as_bytes().to_vec(),
        target_union: Some(compare::TargetUnion::ModRevision(rev)),
        range_end: Vec::new(),
    }
}

/// Op: put `key` = `value`.
pub fn put_op(key: &str, value: Vec<u8>) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestPut(PutRequest {
            key: key.as_bytes().to_vec(),
            value,
            ..Default::default()
        })),
    }
}

/// Op: delete `key`.
pub fn delete_op(key: &str) -> RequestOp {
    RequestOp {
        request: Some(request_op::Request::RequestDeleteRange(
            DeleteRangeRequest {
                key: key.as_bytes().to_vec(),
                ..Default::default()
            },
        )),
    }
}

/// A gRPC status as one readable line.
pub fn status_error(what: &str, status: tonic::Status) -> anyhow::Error {
    let detail = if status.message().is_empty() {
        format!("{:?}", status.code())
    } else {
        status.message().to_string()
    };
    anyhow!("{what}: {detail}")
}

/// An error and its sources on one line (tonic's transport errors hide the cause in sources).
pub fn source_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut parts = vec![e.to_string()];
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        cur = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_end_increments_last_byte() {
        assert_eq!(prefix_end(b"/a/"), b"/a0".to_vec());
        assert_eq!(prefix_end(b"a\xff"), b"b".to_vec());
        assert_eq!(prefix_end(b""), vec![0]);
    }

    #[test]
    fn endpoints_become_urls() {
        assert_eq!(endpoint_url("127.0.0.1:7379"), "http://127.0.0.1:7379");
        assert_eq!(endpoint_url("https://k:1"), "https://k:1");
    }
}
