//! Requests a follower hands to the leader, and the batching of forwarded writes.
//!
//! Every write that reaches a follower must run on the leader. Sending each one as its own peer
//! RPC costs a gRPC round trip of CPU on both sides per write, which under load is most of a
//! write's cost. Instead, one task per node queues forwarded writes and sends whatever has queued
//! up as one batch, one batch at a time: while it is out, new writes pile up and leave together in
//! the next batch, so batches grow with the load and a lone write still leaves at once.
//!
//! Batches travel on one long-lived stream per leader ([`Link`]), each message carrying a
//! sequence number its answer repeats: a batch costs one message each way instead of an HTTP/2
//! stream with its headers, trailers and server task. The stream is a peer link (`link.rs`); a
//! leader that predates links gets a gRPC `ForwardStream`, and one without that RPC either (an
//! older version still, during a rolling upgrade) each batch as a unary `Forward` of
//! [`Forwarded::Writes`].

use std::collections::HashMap;
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;
use std::sync::atomic::Ordering;

use futures::Stream;
use futures::StreamExt;
use futures::channel::mpsc::UnboundedSender;
use longlink_proto::raftpb::RaftMessage;
use serde::Deserialize;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::link;
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

/// A batch of encoded commands on a `ForwardStream`, proposed together.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StreamedBatch {
    pub(crate) seq: u64,
    pub(crate) commands: Vec<serde_bytes::ByteBuf>,
}

/// The leader's answer to the [`StreamedBatch`] with the same `seq`: one reply per command, in
/// order.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct StreamedReplies {
    pub(crate) seq: u64,
    pub(crate) replies: Vec<ForwardReply>,
}

/// What became of one batch: a reply per write, or one error for all of them.
type BatchOutcome = std::result::Result<Vec<ForwardReply>, ForwardError>;

/// Upper bounds of one batch, so a batch stays well under the peer message limit.
const MAX_BATCH_WRITES: usize = 512;
const MAX_BATCH_BYTES: usize = 8 << 20;
/// Writes waiting for a batch; callers wait (backpressure) when it is full.
pub(crate) const QUEUE: usize = 4096;

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

/// Sends one batch at a time, from this task: the next batch leaves when the previous one is
/// answered, so batches are as large as the load makes them. Against 4 batches in flight (puts at
/// 16-256 clients, 3 alternating runs, docs/benchmarks.md) one took ~8% less keeper CPU per put
/// and did 3-8% more puts with the same p99. Sent from here rather than from a task of its own, a
/// batch spawns nothing and its answer wakes one task instead of two.
async fn run(mut rx: mpsc::Receiver<PendingWrite>, peers: Peers) {
    let links = Links::new(peers);
    let mut carried: Option<PendingWrite> = None;
    loop {
        let first = match carried.take() {
            Some(p) => p,
            None => match rx.recv().await {
                Some(p) => p,
                None => return,
            },
        };
        // A write for another leader (the leader just changed) starts the next batch.
        let batch;
        (batch, carried) = take_batch(&mut rx, first, |p| p.command.len(), |a, b| a.addr == b.addr);
        send(&links, batch).await;
    }
}

/// `first` and the writes queued behind it, up to [`MAX_BATCH_WRITES`] and [`MAX_BATCH_BYTES`]
/// (`bytes` of each). A queued write that does not `join` the first ends the batch and is
/// handed back, to start the next one.
pub(crate) fn take_batch<T>(
    rx: &mut mpsc::Receiver<T>,
    first: T,
    bytes: impl Fn(&T) -> usize,
    join: impl Fn(&T, &T) -> bool,
) -> (Vec<T>, Option<T>) {
    let mut size = bytes(&first);
    let mut batch = vec![first];
    while batch.len() < MAX_BATCH_WRITES && size < MAX_BATCH_BYTES {
        match rx.try_recv() {
            Ok(p) if !join(&batch[0], &p) => return (batch, Some(p)),
            Ok(p) => {
                size += bytes(&p);
                batch.push(p);
            }
            Err(_) => break,
        }
    }
    (batch, None)
}

/// Sends one batch and hands each caller its own reply.
async fn send(links: &Links, batch: Vec<PendingWrite>) {
    let (leader, addr) = (batch[0].leader, batch[0].addr.clone());
    let deadline = batch.iter().map(|p| p.deadline).max().expect("non-empty");
    let (commands, replies): (Vec<_>, Vec<_>) = batch
        .into_iter()
        .map(|p| (serde_bytes::ByteBuf::from(p.command), p.reply))
        .unzip();
    let count = commands.len();
    let outcome = links
        .send(leader, &addr, commands, deadline)
        .await
        .and_then(|answers| {
            if answers.len() == count {
                Ok(answers)
            } else {
                Err(ForwardError::Failed(format!(
                    "leader answered {} of {count} forwarded writes",
                    answers.len()
                )))
            }
        });
    match outcome {
        Ok(answers) => {
            for (reply, answer) in replies.into_iter().zip(answers) {
                let _ = reply.send(answer);
            }
        }
        Err(e) => {
            for reply in replies {
                let _ = reply.send(Err(e.clone()));
            }
        }
    }
}

/// The streams forwarded batches travel on: one to the current leader.
struct Links {
    peers: Peers,
    current: tokio::sync::Mutex<Option<Arc<Link>>>,
    /// Leaders that do not serve `ForwardStream` (an older version): batches go as unary calls.
    unary: Mutex<HashSet<String>>,
}

/// Why no stream to the leader could be had.
enum NoLink {
    /// The leader does not serve `ForwardStream`.
    Unimplemented,
    Failed(ForwardError),
}

impl Links {
    fn new(peers: Peers) -> Self {
        Self {
            peers,
            current: Default::default(),
            unary: Default::default(),
        }
    }

    /// Runs `commands` on `leader` (at `addr`) as one batch.
    async fn send(
        &self,
        leader: NodeId,
        addr: &str,
        commands: Vec<serde_bytes::ByteBuf>,
        deadline: Instant,
    ) -> BatchOutcome {
        let unary = self
            .unary
            .lock()
            .expect("forward link set poisoned")
            .contains(addr);
        if unary {
            return send_unary(&self.peers, leader, addr, commands, deadline).await;
        }
        let mut commands = commands;
        // A stream that ended between the batch's lookup and its send (the leader restarted, or
        // an answer timed out) is replaced once.
        for _ in 0..2 {
            let link = match self.link(addr, deadline).await {
                Ok(link) => link,
                Err(NoLink::Unimplemented) => {
                    return send_unary(&self.peers, leader, addr, commands, deadline).await;
                }
                Err(NoLink::Failed(e)) => return Err(e),
            };
            match link.call(leader, commands, deadline).await {
                Ok(outcome) => return outcome,
                Err(unsent) => commands = unsent,
            }
        }
        // Nothing was sent: the caller may retry, as during an election.
        Err(ForwardError::NotLeader(None))
    }

    /// The open stream to `addr`, opening one if there is none (or only an ended one, or one
    /// to a former leader, which is closed by dropping it).
    async fn link(&self, addr: &str, deadline: Instant) -> std::result::Result<Arc<Link>, NoLink> {
        let mut current = self.current.lock().await;
        if let Some(link) = current.as_ref()
            && link.addr == addr
            && !link.ended()
        {
            return Ok(link.clone());
        }
        *current = None;
        match Link::open(&self.peers, addr, deadline).await {
            Ok(link) => {
                *current = Some(link.clone());
                Ok(link)
            }
            Err(status) if status.code() == tonic::Code::Unimplemented => {
                tracing::info!(
                    leader = addr,
                    "the leader has no ForwardStream; forwarding writes as unary calls"
                );
                self.unary
                    .lock()
                    .expect("forward link set poisoned")
                    .insert(addr.to_string());
                Err(NoLink::Unimplemented)
            }
            Err(status) if status.code() == tonic::Code::Unavailable => {
                tracing::debug!(leader = addr, %status, "opening the forward stream failed");
                Err(NoLink::Failed(ForwardError::NotLeader(None)))
            }
            Err(status) => Err(NoLink::Failed(ForwardError::Failed(format!(
                "unreachable: {status}"
            )))),
        }
    }
}

/// One `ForwardStream` to a leader: batches go out through `tx`, a reader task hands each answer
/// to the batch waiting for its `seq`.
struct Link {
    addr: String,
    tx: UnboundedSender<RaftMessage>,
    state: Arc<Mutex<LinkState>>,
    next_seq: AtomicU64,
}

#[derive(Default)]
struct LinkState {
    /// Batches sent and not yet answered.
    pending: HashMap<u64, oneshot::Sender<BatchOutcome>>,
    /// Set when the stream ended (with why) or is not to be used any more.
    ended: Option<String>,
}

impl Link {
    async fn open(
        peers: &Peers,
        addr: &str,
        deadline: Instant,
    ) -> std::result::Result<Arc<Link>, tonic::Status> {
        let (tx, rx) = futures::channel::mpsc::unbounded::<RaftMessage>();
        let state = Arc::new(Mutex::new(LinkState::default()));
        let link = Arc::new(Link {
            addr: addr.to_string(),
            tx,
            state: state.clone(),
            next_seq: AtomicU64::new(1),
        });
        if peers.links_to(addr) {
            let timeout = deadline.saturating_duration_since(Instant::now());
            match link::open(addr, link::Kind::Forward, timeout).await {
                Ok((frames, sink)) => {
                    // Ends when the `Link` (its sender) is dropped, which closes the link.
                    let peer = addr.to_string();
                    tokio::spawn(async move {
                        if let Err(e) = link::send_all(sink, rx.map(|m| Ok(m.data))).await {
                            tracing::debug!(leader = peer, error = %e, "forward link write failed");
                        }
                    });
                    tokio::spawn(read_answers(link::messages(frames), state));
                    return Ok(link);
                }
                Err(link::OpenError::Refused) => peers.link_refused(addr),
                Err(e) => {
                    return Err(tonic::Status::unavailable(format!(
                        "opening the forward link: {e}"
                    )));
                }
            }
        }
        let mut client = peers.client(addr);
        let answers = tokio::time::timeout_at(deadline, client.forward_stream(rx))
            .await
            .map_err(|_| tonic::Status::unavailable("opening the forward stream timed out"))??
            .into_inner()
            .map(|answer| answer.map(|m| m.data).map_err(|status| status.to_string()));
        tokio::spawn(read_answers(answers, state));
        Ok(link)
    }

    fn ended(&self) -> bool {
        self.lock().ended.is_some()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, LinkState> {
        self.state.lock().expect("forward link state poisoned")
    }

    /// Sends one batch and waits for its answer. A batch that was sent and then lost its
    /// stream fails (the leader may have proposed it: retrying could apply it twice); one that
    /// never left, because the stream had ended, comes back as `Err` with its commands.
    async fn call(
        &self,
        leader: NodeId,
        commands: Vec<serde_bytes::ByteBuf>,
        deadline: Instant,
    ) -> std::result::Result<BatchOutcome, Vec<serde_bytes::ByteBuf>> {
        let seq = self.next_seq.fetch_add(1, Ordering::Relaxed);
        let batch = StreamedBatch { seq, commands };
        let data = match encode(&batch) {
            Ok(data) => data,
            Err(e) => return Ok(Err(ForwardError::Failed(e))),
        };
        let (answer_tx, answer_rx) = oneshot::channel();
        {
            let mut state = self.lock();
            if state.ended.is_some() {
                return Err(batch.commands);
            }
            state.pending.insert(seq, answer_tx);
        }
        if self.tx.unbounded_send(RaftMessage { data }).is_err() {
            self.lock().pending.remove(&seq);
            return Err(batch.commands);
        }
        match tokio::time::timeout_at(deadline, answer_rx).await {
            Ok(Ok(outcome)) => Ok(outcome),
            Ok(Err(_)) => Ok(Err(ForwardError::Failed("node stopped".into()))),
            Err(_) => {
                // A leader this slow is treated as gone: the next batch opens a new stream.
                let mut state = self.lock();
                state.pending.remove(&seq);
                state.ended = Some("an answer timed out".into());
                Ok(Err(ForwardError::Failed(format!(
                    "unreachable: leader {leader} did not answer in time"
                ))))
            }
        }
    }
}

/// Hands each answer on `answers` to its batch; when the stream ends, fails every batch still
/// waiting (sent, so perhaps proposed: they are not retried).
async fn read_answers<A: AsRef<[u8]>>(
    answers: impl Stream<Item = std::result::Result<A, String>>,
    state: Arc<Mutex<LinkState>>,
) {
    let mut answers = std::pin::pin!(answers);
    let reason = loop {
        match answers.next().await {
            Some(Ok(msg)) => match decode::<StreamedReplies>(msg.as_ref()) {
                Ok(answer) => {
                    let waiting = state
                        .lock()
                        .expect("forward link state poisoned")
                        .pending
                        .remove(&answer.seq);
                    if let Some(waiting) = waiting {
                        let _ = waiting.send(Ok(answer.replies));
                    }
                }
                Err(e) => break format!("undecodable answer: {e}"),
            },
            None => break "the leader closed it".to_string(),
            Some(Err(e)) => break e,
        }
    };
    let waiting = {
        let mut state = state.lock().expect("forward link state poisoned");
        state.ended = Some(reason.clone());
        std::mem::take(&mut state.pending)
    };
    if !waiting.is_empty() {
        tracing::debug!(%reason, batches = waiting.len(), "forward stream ended with batches unanswered");
    }
    for (_, batch) in waiting {
        let _ = batch.send(Err(ForwardError::Failed(format!(
            "unreachable: the stream to the leader ended before it answered: {reason}"
        ))));
    }
}

/// Sends one batch as a unary `Forward` (leaders without `ForwardStream`).
async fn send_unary(
    peers: &Peers,
    leader: NodeId,
    addr: &str,
    commands: Vec<serde_bytes::ByteBuf>,
    deadline: Instant,
) -> BatchOutcome {
    let request = encode(&Forwarded::Writes(commands)).map_err(ForwardError::Failed)?;
    let data = forward_unary(peers, leader, addr, request, deadline).await?;
    decode::<Vec<ForwardReply>>(&data).map_err(ForwardError::Failed)
}

/// Runs an encoded [`Forwarded`] request on `leader` (at `addr`) as one unary `Forward` call.
pub(crate) async fn forward_unary(
    peers: &Peers,
    leader: NodeId,
    addr: &str,
    request: Vec<u8>,
    deadline: Instant,
) -> ForwardReply {
    let mut client = peers.client(addr);
    let msg = RaftMessage { data: request };
    match tokio::time::timeout_at(deadline, client.forward(msg)).await {
        Err(_) => Err(ForwardError::Failed(format!(
            "unreachable: leader {leader} did not answer in time"
        ))),
        Ok(Err(status)) if status.code() == tonic::Code::Unavailable => {
            // The leader may be gone (nothing reached it): callers retry like during an election.
            tracing::debug!(leader, %status, "forwarding to the leader failed");
            Err(ForwardError::NotLeader(None))
        }
        Ok(Err(status)) => Err(ForwardError::Failed(format!("unreachable: {status}"))),
        Ok(Ok(reply)) => decode::<ForwardReply>(&reply.into_inner().data)
            .unwrap_or_else(|e| Err(ForwardError::Failed(e))),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::convert::Infallible;
    use std::path::PathBuf;
    use std::task::Context;
    use std::task::Poll;

    use tonic::body::Body;
    use tonic::codegen::BoxFuture;
    use tonic::codegen::Service;
    use tonic::codegen::http;
    use tonic::server::NamedService;

    use crate::conformance::Counter;
    use crate::node::NodeConfig;
    use crate::node::RaftNode;

    /// The peer service, recording the path of every call it gets; with `refuse_streams` it
    /// answers `ForwardStream` like a leader built before that RPC existed (Unimplemented).
    #[derive(Clone)]
    struct Recorded<S> {
        inner: S,
        calls: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
        refuse_streams: bool,
    }

    impl<S: NamedService> NamedService for Recorded<S> {
        const NAME: &'static str = S::NAME;
    }

    impl<S> Service<http::Request<Body>> for Recorded<S>
    where
        S: Service<http::Request<Body>, Response = http::Response<Body>, Error = Infallible>,
        S::Future: Send + 'static,
    {
        type Response = http::Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<Self::Response, Infallible>;

        fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            self.inner.poll_ready(cx)
        }

        fn call(&mut self, request: http::Request<Body>) -> Self::Future {
            let path = request.uri().path().to_string();
            self.calls.lock().unwrap().push(path.clone());
            if self.refuse_streams && path.ends_with("/ForwardStream") {
                return Box::pin(async {
                    Ok(tonic::Status::unimplemented("no such method").into_http())
                });
            }
            Box::pin(self.inner.call(request))
        }
    }

    struct Group {
        nodes: Vec<RaftNode<Counter>>,
        calls: Vec<std::sync::Arc<std::sync::Mutex<Vec<String>>>>,
        /// Set to stop the servers.
        stop: tokio::sync::watch::Sender<bool>,
    }

    impl Group {
        /// Three nodes (data in `dirs`) serving their peer service on loopback, with a leader
        /// elected.
        /// With `links` false the servers answer peer links with HTTP/2, as a version that
        /// predates them would.
        async fn start(dirs: &[PathBuf; 3], refuse_streams: bool, links: bool) -> Group {
            let mut listeners = Vec::new();
            let mut members = BTreeMap::new();
            for id in 1..=3u64 {
                let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
                members.insert(id, listener.local_addr().unwrap().to_string());
                listeners.push(listener);
            }
            let (stop, _) = tokio::sync::watch::channel(false);
            let (mut nodes, mut calls) = (Vec::new(), Vec::new());
            for ((id, listener), dir) in (1..=3u64).zip(listeners).zip(dirs) {
                let node = RaftNode::open(NodeConfig::new(id, dir), Counter::default())
                    .await
                    .unwrap();
                let recorded = Recorded {
                    inner: node.peer_service(),
                    calls: Default::default(),
                    refuse_streams,
                };
                calls.push(recorded.calls.clone());
                // Peer links go to the node (counted as calls of "/link"), the rest to gRPC.
                let (to_grpc, incoming) = futures::channel::mpsc::unbounded();
                let (server, served) = (node.clone(), recorded.calls.clone());
                tokio::spawn(async move {
                    while let Ok((stream, _)) = listener.accept().await {
                        if links && crate::is_link(&stream).await.unwrap_or(false) {
                            served.lock().unwrap().push("/link".into());
                            let server = server.clone();
                            tokio::spawn(async move { server.serve_link(stream).await });
                        } else if to_grpc
                            .unbounded_send(Ok::<_, std::io::Error>(stream))
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                let mut stop_rx = stop.subscribe();
                let stopped = async move {
                    let _ = stop_rx.wait_for(|stop| *stop).await;
                };
                tokio::spawn(
                    tonic::transport::Server::builder()
                        .add_service(recorded)
                        .serve_with_incoming_shutdown(incoming, stopped),
                );
                nodes.push(node);
            }
            for node in &nodes {
                node.initialize(&members).await.unwrap();
            }
            for node in &nodes {
                let mut status = node.status_watch();
                tokio::time::timeout(
                    std::time::Duration::from_secs(10),
                    status.wait_for(|s| s.leader.is_some()),
                )
                .await
                .expect("a leader within 10 s")
                .unwrap();
            }
            Group { nodes, calls, stop }
        }

        /// The positions of the leader all three nodes name and of a follower. On a loaded
        /// machine the first leader can lose its term to a late election right after `start`,
        /// so this waits until the nodes agree again.
        async fn leader_and_follower(&self) -> (usize, usize) {
            let mut statuses: Vec<_> = self.nodes.iter().map(|n| n.status_watch()).collect();
            let agreed = async {
                loop {
                    let leaders: Vec<_> = statuses.iter().map(|s| s.borrow().leader).collect();
                    if let Some(leader) = leaders[0]
                        && leaders.iter().all(|l| *l == Some(leader))
                    {
                        return leader;
                    }
                    let changes = statuses.iter_mut().map(|s| Box::pin(s.changed()));
                    futures::future::select_all(changes).await.0.unwrap();
                }
            };
            let leader = tokio::time::timeout(std::time::Duration::from_secs(10), agreed)
                .await
                .expect("the three nodes name the same leader within 10 s");
            let leader = self.nodes.iter().position(|n| n.id() == leader).unwrap();
            (leader, (leader + 1) % 3)
        }

        /// How many calls of `method` node `i` has served.
        fn served(&self, i: usize, method: &str) -> usize {
            let suffix = format!("/{method}");
            let calls = self.calls[i].lock().unwrap();
            calls.iter().filter(|p| p.ends_with(&suffix)).count()
        }

        async fn stop(self) {
            for node in &self.nodes {
                node.shutdown().await.unwrap();
            }
            let _ = self.stop.send(true);
        }
    }

    /// `writes` concurrent writes of 1 through `node` to a counter at `from`: each caller's reply
    /// is the counter after its own write, so the replies are exactly from+1..=from+writes.
    async fn count_through(node: &RaftNode<Counter>, from: u64, writes: u64) {
        let mut tasks = Vec::new();
        for _ in 0..writes {
            let node = node.clone();
            tasks.push(tokio::spawn(async move { node.write(1).await.unwrap() }));
        }
        let mut replies = Vec::new();
        for task in tasks {
            replies.push(task.await.unwrap());
        }
        replies.sort_unstable();
        assert_eq!(replies, (from + 1..=from + writes).collect::<Vec<_>>());
    }

    /// Two rounds of 40 concurrent writes through a follower of a new group; returns the group
    /// and the leader's position.
    async fn two_rounds_through_a_follower(
        dirs: &[PathBuf; 3],
        refuse_streams: bool,
        links: bool,
    ) -> (Group, usize) {
        let group = Group::start(dirs, refuse_streams, links).await;
        let (leader, follower) = group.leader_and_follower().await;
        count_through(&group.nodes[follower], 0, 40).await;
        count_through(&group.nodes[follower], 40, 40).await;
        (group, leader)
    }

    /// Runs `test` on a two-worker runtime, with three data directories that outlive it. The
    /// runtime's tasks (servers, their connections, forward links) hold the nodes' storage
    /// until the runtime is dropped; a database still closing while its directory was being
    /// removed once left a MANIFEST behind in /tmp.
    fn with_three_dirs<Fut: Future<Output = ()>>(test: impl FnOnce([PathBuf; 3]) -> Fut) {
        let dirs: [tempfile::TempDir; 3] =
            std::array::from_fn(|_| tempfile::TempDir::new().unwrap());
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        runtime.block_on(test(dirs.each_ref().map(|d| d.path().to_path_buf())));
        drop(runtime);
        drop(dirs);
    }

    #[test]
    fn replication_and_forwarded_writes_travel_on_peer_links() {
        with_three_dirs(|dirs| async move {
            let (group, leader) = two_rounds_through_a_follower(&dirs, false, true).await;
            // Links from the follower that forwarded (and from any node that led before the
            // leader settled), none of the gRPC streams.
            assert!(group.served(leader, "link") >= 1);
            assert_eq!(group.served(leader, "ForwardStream"), 0);
            assert_eq!(group.served(leader, "Forward"), 0);
            // The leader replicates to each follower over a link; heartbeats, one request per
            // stream, keep to gRPC's `StreamAppend` instead of a connection each.
            for follower in (0..3).filter(|&i| i != leader) {
                assert!(group.served(follower, "link") >= 1);
                let (links, heartbeats) = (
                    group.served(follower, "link"),
                    group.served(follower, "StreamAppend"),
                );
                let more = heartbeats + 5;
                let mut waited = 0;
                while group.served(follower, "StreamAppend") < more {
                    assert!(
                        waited < 1000,
                        "no heartbeats reached node {follower} in 10 s"
                    );
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    waited += 1;
                }
                assert_eq!(group.served(follower, "link"), links);
            }
            group.stop().await;
        });
    }

    #[test]
    fn writes_through_a_follower_share_one_stream_to_a_leader_without_links() {
        with_three_dirs(|dirs| async move {
            let (group, leader) = two_rounds_through_a_follower(&dirs, false, false).await;
            // Every batch of both rounds went over the one stream; none as a call of its own.
            assert_eq!(group.served(leader, "ForwardStream"), 1);
            assert_eq!(group.served(leader, "Forward"), 0);
            group.stop().await;
        });
    }

    #[test]
    fn a_leader_without_forward_streams_gets_batches_as_unary_calls() {
        with_three_dirs(|dirs| async move {
            let (group, leader) = two_rounds_through_a_follower(&dirs, true, false).await;
            // The stream was tried once; the follower remembered the answer.
            assert_eq!(group.served(leader, "ForwardStream"), 1);
            assert!(group.served(leader, "Forward") >= 1);
            group.stop().await;
        });
    }
}
