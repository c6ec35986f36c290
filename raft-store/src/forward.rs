//! Requests a follower hands to the leader, and the batching of forwarded writes.
//!
//! Every write that reaches a follower must run on the leader. Sending each one as its own peer
//! RPC costs a gRPC round trip of CPU on both sides per write, which under load is most of a
//! write's cost. Instead, one task per node queues forwarded writes and sends whatever has queued
//! up as one `Writes` RPC, with at most [`MAX_IN_FLIGHT`] batches outstanding: while those are
//! out, new writes pile up and leave together in the next batch, so batches grow with the load
//! and a lone write still leaves at once.

use std::sync::Arc;

use serde::Deserialize;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::network::Peers;
use crate::types::NodeId;
use crate::types::decode;
use crate::types::encode;

/// Requests a follower hands to the leader over the peer service.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum Forwarded {
    /// An encoded application command.
    Write(#[serde(with = "serde_bytes")] Vec<u8>),
    /// Several encoded commands, proposed concurrently; the reply is a `Vec<ForwardReply>` in the
    /// same order.
    Writes(Vec<serde_bytes::ByteBuf>),
    AddLearner {
        id: NodeId,
        addr: String,
    },
    Promote {
        id: NodeId,
    },
    Remove {
        id: NodeId,
    },
    /// Confirm leadership and return the index a linearizable read must wait for.
    ReadIndex,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) enum ForwardError {
    NotLeader(Option<NodeId>),
    Failed(String),
}

pub(crate) type ForwardReply = std::result::Result<Vec<u8>, ForwardError>;

/// Batches sent to the leader and not yet answered; more writes wait and join the next batch.
/// One: the next batch leaves when the previous one is answered, so batches are as large as
/// the load makes them. Against 4 (puts at 16-256 clients, 3 alternating runs, docs/benchmarks.md)
/// it took ~8% less keeper CPU per put and did 3-8% more puts with the same p99.
const MAX_IN_FLIGHT: usize = 1;
/// Upper bounds of one batch, so a batch stays well under the peer message limit.
const MAX_BATCH_WRITES: usize = 512;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Writes waiting for a batch; callers wait (backpressure) when it is full.
const QUEUE: usize = 4096;

struct PendingWrite {
    leader: NodeId,
    addr: String,
    command: Vec<u8>,
    deadline: Instant,
    reply: oneshot::Sender<ForwardReply>,
}

/// The follower side: queues forwarded writes and sends them in batches.
pub(crate) struct WriteBatcher {
    tx: mpsc::Sender<PendingWrite>,
}

impl WriteBatcher {
    /// Starts the batching task; it stops when the batcher is dropped.
    pub(crate) fn start(peers: Peers) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(run(rx, peers));
        WriteBatcher { tx }
    }

    /// Runs `command` on `leader` (at peer address `addr`) as part of the next batch.
    pub(crate) async fn write(
        &self,
        leader: NodeId,
        addr: &str,
        command: Vec<u8>,
        deadline: Instant,
    ) -> ForwardReply {
        let (reply, rx) = oneshot::channel();
        let pending = PendingWrite {
            leader,
            addr: addr.to_string(),
            command,
            deadline,
            reply,
        };
        let timed_out = || {
            ForwardError::Failed(format!(
                "unreachable: leader {leader} did not answer in time"
            ))
        };
        match tokio::time::timeout_at(deadline, self.tx.send(pending)).await {
            Err(_) => return Err(timed_out()),
            Ok(Err(_)) => return Err(ForwardError::Failed("node stopped".into())),
            Ok(Ok(())) => {}
        }
        match tokio::time::timeout_at(deadline, rx).await {
            Err(_) => Err(timed_out()),
            Ok(Err(_)) => Err(ForwardError::Failed("node stopped".into())),
            Ok(Ok(reply)) => reply,
        }
    }
}

async fn run(mut rx: mpsc::Receiver<PendingWrite>, peers: Peers) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    let mut carried: Option<PendingWrite> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // Wait for a free slot before collecting: everything that queues meanwhile joins.
        let Ok(permit) = in_flight.clone().acquire_owned().await else {
            return;
        };
        let mut bytes = first.command.len();
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH_WRITES && bytes < MAX_BATCH_BYTES {
            match rx.try_recv() {
                // A write for another leader (the leader just changed) starts the next batch.
                Ok(p) if p.addr != batch[0].addr => {
                    carried = Some(p);
                    break;
                }
                Ok(p) => {
                    bytes += p.command.len();
                    batch.push(p);
                }
                Err(_) => break,
            }
        }
        let peers = peers.clone();
        tokio::spawn(async move {
            send(&peers, batch).await;
            drop(permit);
        });
    }
}

/// Sends one batch and hands each caller its own reply.
async fn send(peers: &Peers, batch: Vec<PendingWrite>) {
    let leader = batch[0].leader;
    let deadline = batch.iter().map(|p| p.deadline).max().expect("non-empty");
    let (commands, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| (p.command, (p.addr, p.reply)))
        .unzip();
    let count = commands.len();
    let addr = replies[0].0.clone();
    let commands = commands
        .into_iter()
        .map(serde_bytes::ByteBuf::from)
        .collect();
    let outcome = match encode(&Forwarded::Writes(commands)) {
        Err(e) => Err(ForwardError::Failed(e)),
        Ok(data) => {
            let mut client = peers.client(&addr);
            let msg = longlink_proto::raftpb::RaftMessage { data };
            match tokio::time::timeout_at(deadline, client.forward(msg)).await {
                Err(_) => Err(ForwardError::Failed(format!(
                    "unreachable: leader {leader} did not answer in time"
                ))),
                Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
                    // The leader may be gone; callers retry like during an election.
                    tracing::debug!(leader, %status, "forwarding a batch to the leader failed");
                    Err(ForwardError::NotLeader(None))
                }
                Ok(Err(status)) => Err(ForwardError::Failed(format!("unreachable: {status}"))),
                Ok(Ok(reply)) => decode::<ForwardReply>(&reply.into_inner().data)
                    .unwrap_or_else(|e| Err(ForwardError::Failed(e)))
                    .and_then(|data| {
                        decode::<Vec<ForwardReply>>(&data).map_err(ForwardError::Failed)
                    })
                    .and_then(|replies| {
                        if replies.len() == count {
                            Ok(replies)
                        } else {
                            Err(ForwardError::Failed(format!(
                                "leader answered {} of {count} forwarded writes",
                                replies.len()
                            )))
                        }
                    }),
            }
        }
    };
    match outcome {
        Ok(answers) => {
            for ((_, reply), answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            for (_, reply) in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}
