//! The peer side of `longlink.raft.RaftPeer`: receives openraft RPCs and forwarded requests.
//!
//! Trust boundary: this service is for the group's own members only. It must be reachable only
//! on the peer network; it performs no authentication of its own.

use std::pin::Pin;

use futures::Stream;
use futures::StreamExt;
use longlink_proto::raftpb::RaftMessage;
use longlink_proto::raftpb::SnapshotChunk;
use longlink_proto::raftpb::raft_peer_server::RaftPeer;
use longlink_proto::raftpb::raft_peer_server::RaftPeerServer;
use tonic::Request;
use tonic::Response;
use tonic::Status;
use tonic::Streaming;

use crate::StateMachine;
use crate::forward::Forwarded;
use crate::forward::StreamedBatch;
use crate::forward::StreamedReplies;
use crate::network::MAX_PEER_MESSAGE;
use crate::node::RaftNode;
use crate::node::write_many;
use crate::types::AppendEntriesRequest;
use crate::types::Snapshot;
use crate::types::SnapshotMeta;
use crate::types::TransferLeaderRequest;
use crate::types::Vote;
use crate::types::VoteRequest;
use crate::types::decode;
use crate::types::encode;

/// Serves one node's peer RPCs.
pub struct PeerService<M: StateMachine> {
    node: RaftNode<M>,
}

impl<M: StateMachine> RaftNode<M> {
    /// The tonic service that peers (and forwarding followers) call. Mount it on the node's
    /// listener next to any client-facing services.
    pub fn peer_service(&self) -> RaftPeerServer<PeerService<M>> {
        RaftPeerServer::new(PeerService { node: self.clone() })
            .max_decoding_message_size(MAX_PEER_MESSAGE)
            .max_encoding_message_size(MAX_PEER_MESSAGE)
    }
}

fn decode_msg<T: serde::de::DeserializeOwned>(msg: &RaftMessage) -> Result<T, Status> {
    decode(&msg.data)
        .map_err(|e| Status::invalid_argument(format!("undecodable peer message: {e}")))
}

fn reply<T: serde::Serialize>(value: &T) -> Result<Response<RaftMessage>, Status> {
    let data = encode(value).map_err(Status::internal)?;
    Ok(Response::new(RaftMessage { data }))
}

fn fatal(e: impl std::fmt::Display) -> Status {
    Status::unavailable(format!("raft stopped: {e}"))
}

type ReplyStream = Pin<Box<dyn Stream<Item = Result<RaftMessage, Status>> + Send>>;

/// Batches of one `ForwardStream` proposed at the same time; more wait in the stream. A follower
/// sends one at a time (`forward::run`), so this only bounds a misbehaving peer.
const FORWARD_STREAM_BATCHES: usize = 16;

/// Answers a leader's stream of append requests: each goes to openraft, each result comes back
/// encoded, in order. Ends with an error when Raft stops. Shared by the gRPC `StreamAppend` and
/// the peer link (`link.rs`).
pub(crate) fn append_replies<M: StateMachine>(
    node: &RaftNode<M>,
    input: impl Stream<Item = AppendEntriesRequest> + Send + 'static,
) -> impl Stream<Item = Result<Vec<u8>, String>> + Send + 'static {
    node.inner
        .raft
        .stream_append(Box::pin(input))
        .map(|result| match result {
            Ok(r) => encode(&r),
            Err(e) => Err(format!("raft stopped: {e}")),
        })
}

/// Answers a follower's stream of forwarded batches (encoded [`StreamedBatch`]es): proposes each
/// and sends back its [`StreamedReplies`], up to [`FORWARD_STREAM_BATCHES`] batches at a time,
/// answers in the order they are ready. An undecodable batch ends the stream with an error. No
/// new batches are taken once the node closes its peer streams (those taken are still
/// answered); `None` when it already has, so the follower retries on the next leader. Shared by
/// the gRPC `ForwardStream` and the peer link.
pub(crate) fn forward_answers<M, B>(
    node: &RaftNode<M>,
    batches: impl Stream<Item = Result<B, String>> + Send + 'static,
) -> Option<impl Stream<Item = Result<Vec<u8>, String>> + Send + 'static>
where
    M: StateMachine,
    B: AsRef<[u8]> + Send + 'static,
{
    let mut closed = node.inner.peer_streams_closed.subscribe();
    if *closed.borrow_and_update() {
        return None;
    }
    let closing = async move {
        let _ = closed.wait_for(|closed| *closed).await;
    };
    let node = node.clone();
    let answers = batches
        .take_until(closing)
        .map(move |batch| {
            let node = node.clone();
            async move {
                let batch: StreamedBatch = decode(batch?.as_ref())
                    .map_err(|e| format!("undecodable forwarded batch: {e}"))?;
                let commands = batch.commands.into_iter().map(|c| c.into_vec()).collect();
                let replies = write_many(&node.inner.raft, &node.inner.purges, commands).await;
                let answer = StreamedReplies {
                    seq: batch.seq,
                    replies,
                };
                encode(&answer)
            }
        })
        .buffer_unordered(FORWARD_STREAM_BATCHES);
    Some(answers)
}

#[tonic::async_trait]
impl<M: StateMachine> RaftPeer for PeerService<M> {
    async fn vote(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req: VoteRequest = decode_msg(request.get_ref())?;
        let resp = self.node.inner.raft.vote(req).await.map_err(fatal)?;
        reply(&resp)
    }

    async fn pre_vote(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let req: VoteRequest = decode_msg(request.get_ref())?;
        let resp = self.node.inner.raft.pre_vote(req).await.map_err(fatal)?;
        reply(&resp)
    }

    async fn append(&self, request: Request<RaftMessage>) -> Result<Response<RaftMessage>, Status> {
        let req: AppendEntriesRequest = decode_msg(request.get_ref())?;
        let resp = self
            .node
            .inner
            .raft
            .append_entries(req)
            .await
            .map_err(fatal)?;
        reply(&resp)
    }

    type StreamAppendStream = ReplyStream;

    async fn stream_append(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::StreamAppendStream>, Status> {
        // An undecodable request ends the input; openraft on the leader then restarts the stream.
        let input = request
            .into_inner()
            .take_while(|m| futures::future::ready(m.is_ok()))
            .filter_map(|m| async move {
                m.ok()
                    .and_then(|m| decode::<AppendEntriesRequest>(&m.data).ok())
            });
        let replies = append_replies(&self.node, input).map(|reply| {
            reply
                .map(|data| RaftMessage { data })
                .map_err(Status::unavailable)
        });
        Ok(Response::new(Box::pin(replies)))
    }

    async fn snapshot(
        &self,
        request: Request<Streaming<SnapshotChunk>>,
    ) -> Result<Response<RaftMessage>, Status> {
        let mut chunks = request.into_inner();
        let first = chunks
            .next()
            .await
            .ok_or_else(|| Status::invalid_argument("empty snapshot stream"))??;
        let vote: Vote = decode(&first.vote)
            .map_err(|e| Status::invalid_argument(format!("snapshot vote: {e}")))?;
        let meta: SnapshotMeta = decode(&first.meta)
            .map_err(|e| Status::invalid_argument(format!("snapshot meta: {e}")))?;
        let mut data = first.data;
        let mut done = first.done;
        while !done {
            let chunk = chunks.next().await.ok_or_else(|| {
                Status::invalid_argument("snapshot stream ended before its last chunk")
            })??;
            data.extend_from_slice(&chunk.data);
            done = chunk.done;
        }
        let snapshot = Snapshot {
            meta,
            snapshot: data,
        };
        let resp = self
            .node
            .inner
            .raft
            .install_full_snapshot(vote, snapshot)
            .await
            .map_err(fatal)?;
        reply(&resp)
    }

    async fn transfer_leader(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let req: TransferLeaderRequest = decode_msg(request.get_ref())?;
        let resp = self
            .node
            .inner
            .raft
            .handle_transfer_leader(req)
            .await
            .map_err(fatal)?;
        reply(&resp)
    }

    async fn forward(
        &self,
        request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let forwarded: Forwarded = decode_msg(request.get_ref())?;
        let outcome = self.node.inner.handle_forwarded(forwarded).await;
        reply(&outcome)
    }

    type ForwardStreamStream = ReplyStream;

    async fn forward_stream(
        &self,
        request: Request<Streaming<RaftMessage>>,
    ) -> Result<Response<Self::ForwardStreamStream>, Status> {
        let messages = request
            .into_inner()
            .map(|m| m.map(|m| m.data).map_err(|status| status.to_string()));
        let answers = forward_answers(&self.node, messages)
            .ok_or_else(|| Status::unavailable("this node is shutting down"))?
            .map(|answer| {
                answer
                    .map(|data| RaftMessage { data })
                    .map_err(Status::invalid_argument)
            });
        Ok(Response::new(Box::pin(answers)))
    }

    async fn read_index(
        &self,
        _request: Request<RaftMessage>,
    ) -> Result<Response<RaftMessage>, Status> {
        let outcome = self.node.inner.handle_forwarded(Forwarded::ReadIndex).await;
        reply(&outcome)
    }
}
