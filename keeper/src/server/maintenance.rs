//! etcd `Maintenance` service: Status and hashes (what `etcdctl endpoint status` and durability
//! checks use). Alarms and defragmentation do not apply to the keeper's storage.

use longlink_proto::etcdserverpb::AlarmRequest;
use longlink_proto::etcdserverpb::AlarmResponse;
use longlink_proto::etcdserverpb::DefragmentRequest;
use longlink_proto::etcdserverpb::DefragmentResponse;
use longlink_proto::etcdserverpb::HashKvRequest;
use longlink_proto::etcdserverpb::HashKvResponse;
use longlink_proto::etcdserverpb::HashRequest;
use longlink_proto::etcdserverpb::HashResponse;
use longlink_proto::etcdserverpb::StatusRequest;
use longlink_proto::etcdserverpb::StatusResponse;
use longlink_proto::etcdserverpb::maintenance_server::Maintenance;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Keeper;

/// The etcd API version the keeper speaks, reported by Status.
const API_VERSION: &str = "3.5.0";

#[tonic::async_trait]
impl Maintenance for Keeper {
    async fn alarm(
        &self,
        _request: Request<AlarmRequest>,
    ) -> Result<Response<AlarmResponse>, Status> {
        Ok(Response::new(AlarmResponse {
            header: self.header(self.node.read(|s| s.revision())),
            alarms: Vec::new(),
        }))
    }

    async fn status(
        &self,
        _request: Request<StatusRequest>,
    ) -> Result<Response<StatusResponse>, Status> {
        let status = self.node.status();
        let (revision, size) = self.node.read(|s| (s.revision(), s.len() as i64));
        Ok(Response::new(StatusResponse {
            header: self.header(revision),
            version: API_VERSION.into(),
            db_size: size,
            leader: status.leader.unwrap_or(0),
            raft_index: status.last_log_index,
            raft_term: status.term,
            raft_applied_index: status.applied_index,
            errors: Vec::new(),
            db_size_in_use: size,
            is_learner: status.learners.contains_key(&status.id),
        }))
    }

    async fn defragment(
        &self,
        _request: Request<DefragmentRequest>,
    ) -> Result<Response<DefragmentResponse>, Status> {
        Ok(Response::new(DefragmentResponse {
            header: self.header(self.node.read(|s| s.revision())),
        }))
    }

    async fn hash(&self, _request: Request<HashRequest>) -> Result<Response<HashResponse>, Status> {
        let (revision, hash) = self.node.read(|s| (s.revision(), s.hash()));
        Ok(Response::new(HashResponse {
            header: self.header(revision),
            hash: fold(hash),
        }))
    }

    async fn hash_kv(
        &self,
        _request: Request<HashKvRequest>,
    ) -> Result<Response<HashKvResponse>, Status> {
        let (revision, compacted, hash) = self
            .node
            .read(|s| (s.revision(), s.compact_revision(), s.hash()));
        Ok(Response::new(HashKvResponse {
            header: self.header(revision),
            hash: fold(hash),
            compact_revision: compacted,
            hash_revision: revision,
        }))
    }
}

/// etcd's hash fields are 32 bits wide.
fn fold(hash: u64) -> u32 {
    (hash ^ (hash >> 32)) as u32
}
