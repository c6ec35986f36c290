//! etcd requests -> store operations, with size limits checked on the way in.

use longlink_proto::etcdserverpb;
use longlink_proto::etcdserverpb::request_op::Request;

use crate::error::KeeperError;
use crate::limits;
use crate::store::Compare;
use crate::store::DeleteOp;
use crate::store::Op;
use crate::store::PutOp;
use crate::store::RangeOp;
use crate::store::TxnOp;

impl TryFrom<etcdserverpb::RangeRequest> for RangeOp {
    type Error = KeeperError;

    fn try_from(r: etcdserverpb::RangeRequest) -> Result<Self, KeeperError> {
        limits::check_key(&r.key)?;
        limits::check_range_end(&r.range_end)?;
        Ok(RangeOp {
            key: r.key,
            range_end: r.range_end,
            revision: r.revision,
            limit: r.limit,
            keys_only: r.keys_only,
            count_only: r.count_only,
        })
    }
}

impl TryFrom<etcdserverpb::PutRequest> for PutOp {
    type Error = KeeperError;

    fn try_from(r: etcdserverpb::PutRequest) -> Result<Self, KeeperError> {
        limits::check_key(&r.key)?;
        limits::check_value(&r.value)?;
        Ok(PutOp {
            key: r.key,
            value: r.value,
            lease: r.lease,
            prev_kv: r.prev_kv,
            ignore_value: r.ignore_value,
            ignore_lease: r.ignore_lease,
        })
    }
}

impl TryFrom<etcdserverpb::DeleteRangeRequest> for DeleteOp {
    type Error = KeeperError;

    fn try_from(r: etcdserverpb::DeleteRangeRequest) -> Result<Self, KeeperError> {
        limits::check_key(&r.key)?;
        limits::check_range_end(&r.range_end)?;
        Ok(DeleteOp {
            key: r.key,
            range_end: r.range_end,
            prev_kv: r.prev_kv,
        })
    }
}

impl TryFrom<etcdserverpb::TxnRequest> for TxnOp {
    type Error = KeeperError;

    fn try_from(r: etcdserverpb::TxnRequest) -> Result<Self, KeeperError> {
        let ops = |ops: Vec<etcdserverpb::RequestOp>| -> Result<Vec<Op>, KeeperError> {
            ops.into_iter().map(Op::try_from).collect()
        };
        Ok(TxnOp {
            compares: r
                .compare
                .into_iter()
                .map(Compare::try_from)
                .collect::<Result<_, _>>()?,
            success: ops(r.success)?,
            failure: ops(r.failure)?,
        })
    }
}

impl TryFrom<etcdserverpb::RequestOp> for Op {
    type Error = KeeperError;

    fn try_from(r: etcdserverpb::RequestOp) -> Result<Self, KeeperError> {
        match r.request {
            Some(Request::RequestRange(r)) => Ok(Op::Range(r.try_into()?)),
            Some(Request::RequestPut(r)) => Ok(Op::Put(r.try_into()?)),
            Some(Request::RequestDeleteRange(r)) => Ok(Op::DeleteRange(r.try_into()?)),
            Some(Request::RequestTxn(r)) => Ok(Op::Txn(r.try_into()?)),
            None => Err(KeeperError::InvalidArgument(
                "etcdserver: txn operation has no request".into(),
            )),
        }
    }
}
