//! Store results -> etcd responses. Headers are filled by the caller.

use longlink_proto::etcdserverpb;
use longlink_proto::etcdserverpb::response_op::Response;

use crate::store::DeleteResponse;
use crate::store::OpResponse;
use crate::store::PutResponse;
use crate::store::RangeResult;
use crate::store::TxnResponse;

impl From<RangeResult> for etcdserverpb::RangeResponse {
    fn from(r: RangeResult) -> Self {
        etcdserverpb::RangeResponse {
            header: None,
            kvs: r.kvs.into_iter().map(Into::into).collect(),
            more: r.more,
            count: r.count,
        }
    }
}

impl From<PutResponse> for etcdserverpb::PutResponse {
    fn from(r: PutResponse) -> Self {
        etcdserverpb::PutResponse {
            header: None,
            prev_kv: r.prev_kv.map(Into::into),
        }
    }
}

impl From<DeleteResponse> for etcdserverpb::DeleteRangeResponse {
    fn from(r: DeleteResponse) -> Self {
        etcdserverpb::DeleteRangeResponse {
            header: None,
            deleted: r.deleted,
            prev_kvs: r.prev_kvs.into_iter().map(Into::into).collect(),
        }
    }
}

impl From<TxnResponse> for etcdserverpb::TxnResponse {
    fn from(r: TxnResponse) -> Self {
        etcdserverpb::TxnResponse {
            header: None,
            succeeded: r.succeeded,
            responses: r
                .responses
                .into_iter()
                .map(|op| etcdserverpb::ResponseOp {
                    response: Some(match op {
                        OpResponse::Range(r) => Response::ResponseRange(r.into()),
                        OpResponse::Put(r) => Response::ResponsePut(r.into()),
                        OpResponse::DeleteRange(r) => Response::ResponseDeleteRange(r.into()),
                        OpResponse::Txn(r) => Response::ResponseTxn(r.into()),
                    }),
                })
                .collect(),
        }
    }
}
