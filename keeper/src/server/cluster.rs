//! etcd `Cluster` service: membership through Raft (learners first, then promotion).

use longlink_proto::etcdserverpb::Member;
use longlink_proto::etcdserverpb::MemberAddRequest;
use longlink_proto::etcdserverpb::MemberAddResponse;
use longlink_proto::etcdserverpb::MemberListRequest;
use longlink_proto::etcdserverpb::MemberListResponse;
use longlink_proto::etcdserverpb::MemberPromoteRequest;
use longlink_proto::etcdserverpb::MemberPromoteResponse;
use longlink_proto::etcdserverpb::MemberRemoveRequest;
use longlink_proto::etcdserverpb::MemberRemoveResponse;
use longlink_proto::etcdserverpb::MemberUpdateRequest;
use longlink_proto::etcdserverpb::MemberUpdateResponse;
use longlink_proto::etcdserverpb::cluster_server::Cluster;
use raft_store::NodeStatus;
use tonic::Request;
use tonic::Response;
use tonic::Status;

use super::Keeper;
use crate::error::KeeperError;
use crate::store::Command;
use crate::store::Reply;

fn member(id: u64, addr: &str, is_learner: bool) -> Member {
    Member {
        id,
        name: format!("keeper-{id}"),
        peer_ur_ls: vec![format!("http://{addr}")],
        client_ur_ls: vec![format!("http://{addr}")],
        is_learner,
    }
}

fn members(status: &NodeStatus) -> Vec<Member> {
    let voters = status.voters.iter().map(|(id, a)| member(*id, a, false));
    let learners = status.learners.iter().map(|(id, a)| member(*id, a, true));
    voters.chain(learners).collect()
}

impl Keeper {
    /// Waits until this node's view of membership satisfies `done` (after a membership change
    /// committed on the leader), so the response lists the new membership.
    async fn membership_settled(&self, done: impl Fn(&NodeStatus) -> bool) -> NodeStatus {
        let mut watch = self.node.status_watch();
        let wait = watch.wait_for(|s| done(s));
        match tokio::time::timeout(self.config.request_timeout(), wait).await {
            Ok(Ok(s)) => s.clone(),
            _ => self.node.status(),
        }
    }
}

#[tonic::async_trait]
impl Cluster for Keeper {
    async fn member_add(
        &self,
        request: Request<MemberAddRequest>,
    ) -> Result<Response<MemberAddResponse>, Status> {
        let req = request.into_inner();
        if !req.is_learner {
            return Err(KeeperError::InvalidArgument(
                "keeper adds members as learners only: use `member add --learner`, start the node with \
                 --initial-cluster-state existing, then `member promote` once it has caught up"
                    .into(),
            )
            .into());
        }
        let [url] = req.peer_ur_ls.as_slice() else {
            return Err(KeeperError::InvalidArgument("give exactly one peer URL".into()).into());
        };
        let addr = url
            .trim_start_matches("http://")
            .trim_start_matches("https://")
            .trim_end_matches('/')
            .to_string();
        let status = self.node.status();
        if status
            .voters
            .values()
            .chain(status.learners.values())
            .any(|a| *a == addr)
        {
            return Err(
                KeeperError::InvalidArgument(format!("etcdserver: peerURL exists: {url}")).into(),
            );
        }
        // The id comes from a counter in the replicated state, not from the current members:
        // a removed member's id is never handed out again (its old data dir must not rejoin).
        let above = status
            .voters
            .keys()
            .chain(status.learners.keys())
            .max()
            .copied()
            .unwrap_or(0);
        let id = match self.write(Command::IssueMemberId { above }).await {
            Ok((_, Reply::MemberId { id })) => id,
            Ok((_, reply)) => {
                return Err(KeeperError::Internal(format!("unexpected reply {reply:?}")).into());
            }
            Err(e) => return Err(e.into()),
        };
        self.node
            .add_learner(id, addr.clone())
            .await
            .map_err(KeeperError::from)?;
        let status = self
            .membership_settled(|s| s.learners.contains_key(&id))
            .await;
        Ok(Response::new(MemberAddResponse {
            header: self.header(self.node.read(|s| s.revision())),
            member: Some(member(id, &addr, true)),
            members: members(&status),
        }))
    }

    async fn member_remove(
        &self,
        request: Request<MemberRemoveRequest>,
    ) -> Result<Response<MemberRemoveResponse>, Status> {
        let id = request.into_inner().id;
        let status = self.node.status();
        if !status.voters.contains_key(&id) && !status.learners.contains_key(&id) {
            return Err(KeeperError::MemberNotFound.into());
        }
        self.node.remove(id).await.map_err(KeeperError::from)?;
        let status = self
            .membership_settled(|s| !s.voters.contains_key(&id) && !s.learners.contains_key(&id))
            .await;
        Ok(Response::new(MemberRemoveResponse {
            header: self.header(self.node.read(|s| s.revision())),
            members: members(&status),
        }))
    }

    async fn member_update(
        &self,
        _request: Request<MemberUpdateRequest>,
    ) -> Result<Response<MemberUpdateResponse>, Status> {
        Err(Status::unimplemented(
            "keeper members keep their address for life: remove the member and add a new one",
        ))
    }

    async fn member_list(
        &self,
        request: Request<MemberListRequest>,
    ) -> Result<Response<MemberListResponse>, Status> {
        if request.into_inner().linearizable {
            self.node.read_barrier().await.map_err(KeeperError::from)?;
        }
        let status = self.node.status();
        Ok(Response::new(MemberListResponse {
            header: self.header(self.node.read(|s| s.revision())),
            members: members(&status),
        }))
    }

    async fn member_promote(
        &self,
        request: Request<MemberPromoteRequest>,
    ) -> Result<Response<MemberPromoteResponse>, Status> {
        let id = request.into_inner().id;
        let status = self.node.status();
        if status.voters.contains_key(&id) {
            return Err(KeeperError::InvalidArgument(
                "etcdserver: can only promote a learner member".into(),
            )
            .into());
        }
        if !status.learners.contains_key(&id) {
            return Err(KeeperError::MemberNotFound.into());
        }
        self.node.promote(id).await.map_err(|e| {
            KeeperError::Unavailable(format!(
                "etcdserver: can only promote a learner member which is in sync with leader ({e})"
            ))
        })?;
        let status = self
            .membership_settled(|s| s.voters.contains_key(&id))
            .await;
        Ok(Response::new(MemberPromoteResponse {
            header: self.header(self.node.read(|s| s.revision())),
            members: members(&status),
        }))
    }
}
