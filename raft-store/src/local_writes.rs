//! The leader's own clients' writes enter Raft in batches, as forwarded writes do.
//!
//! Every `client_write` is one message to the Raft core, and the core appends what one message
//! carries: writes that reach the leader one by one became one log append, one replication step
//! and one I/O notification each. In a 10 s put phase at 64 clients spread over three nodes, the
//! leader made 57 000 appends of one entry each (openraft's runtime stats), against 10 000
//! appends of ~14 entries when every client sat on a follower and each write came in a forwarded
//! batch. Queued here and proposed together (`client_write_many`), the writes that arrive
//! together share those steps: 5.5% less keeper CPU per put and 4% more puts at 64 clients, no
//! added latency at 1 or 16 (docs/benchmarks.md, "Session 11").

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use tokio::sync::mpsc;
use tokio::sync::oneshot;

use crate::StateMachine;
use crate::forward::ForwardError;
use crate::forward::ForwardReply;
use crate::forward::QUEUE;
use crate::forward::take_batch;
use crate::log_store::Purges;
use crate::node::write_many;
use crate::sm_store::SmStore;
use crate::types::Raft;

struct Pending {
    command: Vec<u8>,
    reply: oneshot::Sender<ForwardReply>,
}

/// Batches this node's writes while it leads. Stops when dropped.
pub(crate) struct LocalWrites {
    tx: mpsc::Sender<Pending>,
    /// Batches proposed so far (the tests' view of how writes were grouped).
    #[cfg_attr(not(test), allow(dead_code))]
    batches: Arc<AtomicU64>,
}

impl LocalWrites {
    pub(crate) fn start<M: StateMachine>(raft: Raft<SmStore<M>>, purges: Purges) -> Self {
        let (tx, rx) = mpsc::channel(QUEUE);
        let batches = Arc::new(AtomicU64::new(0));
        tokio::spawn(run(raft, purges, rx, batches.clone()));
        LocalWrites { tx, batches }
    }

    /// Proposes `command` with the writes queued alongside it and returns what applying it
    /// produced, or `NotLeader` as a single `client_write` would (the node no longer led, or the
    /// entry was truncated away).
    pub(crate) async fn write(&self, command: Vec<u8>) -> ForwardReply {
        let stopped = || ForwardError::Failed("node stopped".into());
        let (reply, rx) = oneshot::channel();
        self.tx
            .send(Pending { command, reply })
            .await
            .map_err(|_| stopped())?;
        rx.await.map_err(|_| stopped())?
    }

    #[cfg(test)]
    pub(crate) fn batches(&self) -> u64 {
        self.batches.load(Ordering::Relaxed)
    }
}

async fn run<M: StateMachine>(
    raft: Raft<SmStore<M>>,
    purges: Purges,
    mut rx: mpsc::Receiver<Pending>,
    batches: Arc<AtomicU64>,
) {
    while let Some(first) = rx.recv().await {
        // The first write woke this task; the writers that are ready to run come first, so the
        // writes that arrive together leave together. No timer: a lone write waits for nothing.
        tokio::task::yield_now().await;
        let (batch, _) = take_batch(&mut rx, first, |p| p.command.len(), |_, _| true);
        batches.fetch_add(1, Ordering::Relaxed);
        // Batches do not wait for each other: the next one is proposed while this one commits.
        let raft = raft.clone();
        let purges = purges.clone();
        tokio::spawn(async move {
            let (commands, replies): (Vec<_>, Vec<_>) =
                batch.into_iter().map(|p| (p.command, p.reply)).unzip();
            let answers = write_many(&raft, &purges, commands).await;
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        });
    }
}
