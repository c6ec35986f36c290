//! etcd `KV` service: Range, Put, DeleteRange, Txn, Compact; and the leader's auto-compaction.

use std::sync::Arc;
use std::time::Duration;

use longlink_proto::etcdserverpb::CompactionRequest;
use longlink_proto::etcdserverpb::CompactionResponse;
use longlink_proto::etcdserverpb::DeleteRangeRequest;
use longlink_proto::etcdserverpb::DeleteRangeResponse;
use longlink_proto::etcdserverpb::PutRequest;
use longlink_proto::etcdserverpb::PutResponse;
use longlink_proto::etcdserverpb::RangeRequest;
use longlink_proto::etcdserverpb::RangeResponse;
use longlink_proto::etcdserverpb::TxnRequest;
use longlink_proto::etcdserverpb::TxnResponse;
use longlink_proto::etcdserverpb::kv_server::Kv;
use longlink_proto::etcdserverpb::range_request::SortOrder;
use longlink_proto::etcdserverpb::range_request::SortTarget;
use longlink_proto::mvccpb::KeyValue;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Keeper;
use crate::error::KeeperError;
use crate::limits;
use crate::store::Command;
use crate::store::RangeOp;
use crate::store::Reply;

fn unexpected(reply: Reply) -> Status {
    KeeperError::Internal(format!("unexpected reply {reply:?}")).into()
}

#[tonic::async_trait]
impl Kv for Keeper {
    async fn range(
        &self,
        request: Request<RangeRequest>,
    ) -> Result<Response<RangeResponse>, Status> {
        let req = request.into_inner();
        limits::check_request(&req)?;
        let serializable = req.serializable;
        let sort_order = SortOrder::try_from(req.sort_order).unwrap_or(SortOrder::None);
        let sort_target = SortTarget::try_from(req.sort_target).unwrap_or(SortTarget::Key);
        let filters = (
            req.min_mod_revision,
            req.max_mod_revision,
            req.min_create_revision,
            req.max_create_revision,
        );
        let needs_post = sort_order != SortOrder::None || filters != (0, 0, 0, 0);
        let user_limit = req.limit;
        let mut op = RangeOp::try_from(req)?;
        if needs_post {
            // Sorting and filtering need every match; the limit applies afterwards.
            op.limit = 0;
        }
        let (result, revision) = self
            .read(serializable, |s| {
                (
                    s.range(
                        &op.key,
                        &op.range_end,
                        op.revision,
                        op.limit,
                        op.keys_only,
                        op.count_only,
                    ),
                    s.revision(),
                )
            })
            .await?;
        let mut result = result.map_err(KeeperError::from)?;
        let mut resp: RangeResponse = if needs_post {
            let (min_mod, max_mod, min_create, max_create) = filters;
            result.kvs.retain(|kv| {
                (min_mod == 0 || kv.mod_revision >= min_mod)
                    && (max_mod == 0 || kv.mod_revision <= max_mod)
                    && (min_create == 0 || kv.create_revision >= min_create)
                    && (max_create == 0 || kv.create_revision <= max_create)
            });
            let mut resp: RangeResponse = result.into();
            sort_kvs(&mut resp.kvs, sort_order, sort_target);
            resp.count = resp.kvs.len() as i64;
            if user_limit > 0 && resp.kvs.len() as i64 > user_limit {
                resp.kvs.truncate(user_limit as usize);
                resp.more = true;
            }
            resp
        } else {
            result.into()
        };
        resp.header = self.header(revision);
        Ok(Response::new(resp))
    }

    async fn put(&self, request: Request<PutRequest>) -> Result<Response<PutResponse>, Status> {
        let req = request.into_inner();
        limits::check_request(&req)?;
        let (revision, reply) = self.write(Command::Put(req.try_into()?)).await?;
        let Reply::Put(put) = reply else {
            return Err(unexpected(reply));
        };
        let mut resp: PutResponse = put.into();
        resp.header = self.header(revision);
        Ok(Response::new(resp))
    }

    async fn delete_range(
        &self,
        request: Request<DeleteRangeRequest>,
    ) -> Result<Response<DeleteRangeResponse>, Status> {
        let req = request.into_inner();
        limits::check_request(&req)?;
        let (revision, reply) = self.write(Command::DeleteRange(req.try_into()?)).await?;
        let Reply::DeleteRange(deleted) = reply else {
            return Err(unexpected(reply));
        };
        let mut resp: DeleteRangeResponse = deleted.into();
        resp.header = self.header(revision);
        Ok(Response::new(resp))
    }

    async fn txn(&self, request: Request<TxnRequest>) -> Result<Response<TxnResponse>, Status> {
        let req = request.into_inner();
        limits::check_request(&req)?;
        let (revision, reply) = self.write(Command::Txn(req.try_into()?)).await?;
        let Reply::Txn(txn) = reply else {
            return Err(unexpected(reply));
        };
        let mut resp: TxnResponse = txn.into();
        resp.header = self.header(revision);
        Ok(Response::new(resp))
    }

    async fn compact(
        &self,
        request: Request<CompactionRequest>,
    ) -> Result<Response<CompactionResponse>, Status> {
        let req = request.into_inner();
        let (revision, _) = self
            .write(Command::Compact {
                revision: req.revision,
            })
            .await?;
        Ok(Response::new(CompactionResponse {
            header: self.header(revision),
        }))
    }
}

fn sort_kvs(kvs: &mut [KeyValue], order: SortOrder, target: SortTarget) {
    kvs.sort_by(|a, b| match target {
        SortTarget::Key => a.key.cmp(&b.key),
        SortTarget::Version => a.version.cmp(&b.version),
        SortTarget::Create => a.create_revision.cmp(&b.create_revision),
        SortTarget::Mod => a.mod_revision.cmp(&b.mod_revision),
        SortTarget::Value => a.value.cmp(&b.value),
    });
    if order == SortOrder::Descend {
        kvs.reverse();
    }
}

/// On the leader, keeps the history to about `history_revisions` revisions by proposing
/// compactions (through the log, so every replica compacts at the same revision).
///
/// A compaction is applied under the state machine's lock: every write waits while it runs
/// (~0.6 us per dropped revision on an idle core, 1-2.5 us on a busy one). One compaction of a
/// backlog of 30 000-75 000 revisions held every client for 64-75 ms (docs/benchmarks.md,
/// "Session 17"), so the backlog goes in steps of at most [`COMPACT_STEP`] revisions, each its
/// own log entry, with writes applied in between.
pub(crate) async fn compact_loop(keeper: Arc<Keeper>) {
    let retain = keeper.config.history_revisions;
    let mut tick = tokio::time::interval(COMPACT_CHECK);
    loop {
        tokio::select! {
            _ = keeper.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if !keeper.node.is_leader() {
            continue;
        }
        let (revision, compacted) = keeper.node.read(|s| (s.revision(), s.compact_revision()));
        // Compact once a tenth of the window has built up, not on every write.
        if revision - compacted <= retain + retain / 10 {
            continue;
        }
        let target = revision - retain;
        let mut at = compacted;
        while at < target && !keeper.shutdown.is_cancelled() {
            let next = (at + COMPACT_STEP).min(target);
            match keeper.write(Command::Compact { revision: next }).await {
                Ok(_) => tracing::debug!(revision = next, "compacted history"),
                Err(e) => {
                    tracing::warn!(revision = next, error = %e, "history compaction failed");
                    break;
                }
            }
            at = next;
        }
    }
}

/// How often the leader checks whether the history has outgrown its window.
const COMPACT_CHECK: Duration = Duration::from_secs(1);
/// Most revisions one compaction drops: a pause of a few milliseconds at most.
const COMPACT_STEP: i64 = 1_000;
