//! Peer links: the two busy peer streams, log replication and forwarded writes, as
//! length-prefixed frames on a TCP connection of their own to the peer's port.
//!
//! Each append request and each forwarded batch already travels as one bincode message on a
//! long-lived gRPC stream; HTTP/2 adds framing, flow control, a connection task and a stream
//! task on both sides of every message, and the payload is opaque bytes to it anyway. A link
//! carries the same messages with a 4-byte length in front of each (docs/decisions.md, "Peer
//! links"). Votes, snapshots, leader transfers and reads stay on gRPC.
//!
//! Wire: the client sends [`PREFACE`] and one byte naming the stream ([`Kind`]); the server
//! answers [`PREFACE`], then both send frames (big-endian u32 length, then the message), at most
//! [`MAX_PEER_MESSAGE`] bytes each. No HTTP client starts with the preface's first byte, so the
//! server tells a link from gRPC by it ([`is_link`]). A server that predates links answers with
//! HTTP/2: the client then uses the gRPC stream ([`OpenError::Refused`]).
//!
//! Liveness: HTTP/2 pings noticed a peer that vanished; a link relies on TCP instead. Data left
//! unacknowledged for [`USER_TIMEOUT`] (a partition, a dead host) and an idle connection whose
//! keepalive probes go unanswered both end the connection, and with it the stream; openraft then
//! opens a new one, the forwarder fails the batches in flight.

use std::io;
use std::time::Duration;

use bytes::Bytes;
use futures::SinkExt;
use futures::Stream;
use futures::StreamExt;
use socket2::SockRef;
use socket2::TcpKeepalive;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::tcp::OwnedWriteHalf;
use tokio_util::codec::FramedRead;
use tokio_util::codec::FramedWrite;
use tokio_util::codec::LengthDelimitedCodec;

use crate::StateMachine;
use crate::network::MAX_PEER_MESSAGE;
use crate::node::RaftNode;
use crate::service::append_replies;
use crate::service::forward_answers;
use crate::types::AppendEntriesRequest;
use crate::types::decode;

/// The first bytes of a link, from the client, and the server's answer.
pub const PREFACE: &[u8; 8] = b"LLPEER/1";

/// How long a connection may take to send its preface before the server drops it.
const PREFACE_TIMEOUT: Duration = Duration::from_secs(5);
/// Sent data unacknowledged this long ends the connection (`TCP_USER_TIMEOUT`).
const USER_TIMEOUT: Duration = Duration::from_secs(5);
/// An idle connection is probed after this long, then every second, three times.
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);

/// Whether `stream`, a connection to the node's port, is a peer link (else HTTP/2): looks at its
/// first byte without reading it, so either server gets the connection whole. A connection that
/// ends before its first byte is not a link.
pub async fn is_link(stream: &TcpStream) -> io::Result<bool> {
    let mut first = [0u8; 1];
    Ok(stream.peek(&mut first).await? == 1 && first[0] == PREFACE[0])
}

/// The stream a link carries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    /// The leader's append requests; the follower's `StreamAppendResult`s.
    Append = 1,
    /// A follower's `StreamedBatch`es; the leader's `StreamedReplies`.
    Forward = 2,
}

impl Kind {
    fn from_byte(byte: u8) -> Option<Kind> {
        match byte {
            1 => Some(Kind::Append),
            2 => Some(Kind::Forward),
            _ => None,
        }
    }
}

/// Why a link could not be opened.
#[derive(Debug)]
pub(crate) enum OpenError {
    /// The peer answered, but not as a link server (an older version): use gRPC.
    Refused,
    /// The peer could not be reached, or the connection failed.
    Io(io::Error),
}

impl std::fmt::Display for OpenError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            OpenError::Refused => f.write_str("the peer does not serve links"),
            OpenError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// Frames received on a link.
pub(crate) type Frames = FramedRead<OwnedReadHalf, LengthDelimitedCodec>;
/// Frames sent on a link; `send_all`/`forward` write whatever is ready in one go.
pub(crate) type FrameSink = FramedWrite<OwnedWriteHalf, LengthDelimitedCodec>;

fn codec() -> LengthDelimitedCodec {
    LengthDelimitedCodec::builder()
        .max_frame_length(MAX_PEER_MESSAGE)
        .new_codec()
}

fn tune(stream: &TcpStream) -> io::Result<()> {
    stream.set_nodelay(true)?;
    let socket = SockRef::from(stream);
    socket.set_tcp_user_timeout(Some(USER_TIMEOUT))?;
    socket.set_tcp_keepalive(
        &TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(Duration::from_secs(1))
            .with_retries(3),
    )
}

fn split(stream: TcpStream) -> (Frames, FrameSink) {
    let (read, write) = stream.into_split();
    (
        FramedRead::new(read, codec()),
        FramedWrite::new(write, codec()),
    )
}

/// Opens a link of `kind` to the peer at `addr` (host:port), within `timeout`.
pub(crate) async fn open(
    addr: &str,
    kind: Kind,
    timeout: Duration,
) -> Result<(Frames, FrameSink), OpenError> {
    let opening = async {
        let mut stream = TcpStream::connect(addr).await?;
        tune(&stream)?;
        let mut hello = [0u8; 9];
        hello[..8].copy_from_slice(PREFACE);
        hello[8] = kind as u8;
        stream.write_all(&hello).await?;
        // A server that predates links starts HTTP/2 (its SETTINGS frame) and closes; a link
        // server that will not serve this link (shutting down) closes without a byte.
        let mut answer = Vec::with_capacity(PREFACE.len());
        let mut buf = [0u8; 8];
        while answer.len() < PREFACE.len() {
            let n = stream
                .read(&mut buf[..PREFACE.len() - answer.len()])
                .await?;
            if n == 0 {
                break;
            }
            answer.extend_from_slice(&buf[..n]);
        }
        Ok::<_, io::Error>((stream, answer))
    };
    let (stream, answer) = tokio::time::timeout(timeout, opening)
        .await
        .map_err(|_| {
            OpenError::Io(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("opening a peer link to {addr} took over {timeout:?}"),
            ))
        })?
        .map_err(OpenError::Io)?;
    if answer.as_slice() == PREFACE {
        Ok(split(stream))
    } else if PREFACE.starts_with(&answer) {
        Err(OpenError::Io(io::Error::new(
            io::ErrorKind::ConnectionAborted,
            format!("{addr} closed the link before answering"),
        )))
    } else {
        Err(OpenError::Refused)
    }
}

/// Frames as a stream of messages; a broken connection or an oversized frame is an error
/// naming the limit.
pub(crate) fn messages(frames: Frames) -> impl Stream<Item = Result<Bytes, String>> + Send {
    frames.map(|frame| {
        frame
            .map(|f| f.freeze())
            .map_err(|e| format!("peer link: {e} (frames are limited to {MAX_PEER_MESSAGE} bytes)"))
    })
}

/// Writes `messages` to `sink` until they end, then closes the sending side; whatever is ready
/// at once goes out in one write. An error among the messages stops the writing and is returned.
pub(crate) async fn send_all(
    mut sink: FrameSink,
    messages: impl Stream<Item = io::Result<Vec<u8>>> + Send,
) -> io::Result<()> {
    let mut messages = std::pin::pin!(messages.map(|m| m.map(Bytes::from)));
    sink.send_all(&mut messages).await?;
    SinkExt::<Bytes>::close(&mut sink).await
}

impl<M: StateMachine> RaftNode<M> {
    /// Serves one peer link: `stream` is a connection to the node's port that [`is_link`].
    /// Returns when the link ends; a connection that is not a well-formed link is dropped with a
    /// log line saying why.
    pub async fn serve_link(&self, stream: TcpStream) {
        let peer = stream.peer_addr().ok();
        if let Err(reason) = self.serve_link_inner(stream).await {
            tracing::debug!(?peer, %reason, "peer link ended");
        }
    }

    async fn serve_link_inner(&self, mut stream: TcpStream) -> Result<(), String> {
        tune(&stream).map_err(|e| e.to_string())?;
        let mut hello = [0u8; 9];
        tokio::time::timeout(PREFACE_TIMEOUT, stream.read_exact(&mut hello))
            .await
            .map_err(|_| format!("no link preface within {PREFACE_TIMEOUT:?}"))?
            .map_err(|e| format!("reading the link preface: {e}"))?;
        if &hello[..8] != PREFACE {
            return Err("not a peer link: wrong preface".into());
        }
        let kind = Kind::from_byte(hello[8])
            .ok_or_else(|| format!("unknown peer link kind {} (1 or 2)", hello[8]))?;
        // Closed without an answer: the follower retries elsewhere, as after a refused stream.
        if kind == Kind::Forward && *self.inner.peer_streams_closed.borrow() {
            return Err("this node is shutting down".into());
        }
        stream.write_all(PREFACE).await.map_err(|e| e.to_string())?;
        let (frames, sink) = split(stream);
        let requests = messages(frames);
        match kind {
            Kind::Append => {
                // An undecodable request ends the input; the leader then restarts the stream.
                let input = requests
                    .map(|m| m.and_then(|m| decode::<AppendEntriesRequest>(&m)))
                    .take_while(|m| futures::future::ready(m.is_ok()))
                    .filter_map(|m| futures::future::ready(m.ok()));
                reply(sink, append_replies(self, input)).await
            }
            Kind::Forward => {
                let answers = forward_answers(self, requests)
                    .ok_or_else(|| "this node is shutting down".to_string())?;
                reply(sink, answers).await
            }
        }
    }
}

/// Sends `replies` until they end or one is an error (which ends the link).
async fn reply(
    sink: FrameSink,
    replies: impl Stream<Item = Result<Vec<u8>, String>> + Send,
) -> Result<(), String> {
    send_all(sink, replies.map(|r| r.map_err(io::Error::other)))
        .await
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use tokio::net::TcpListener;

    use super::*;
    use crate::conformance::Counter;
    use crate::forward::StreamedBatch;
    use crate::forward::StreamedReplies;
    use crate::node::NodeConfig;
    use crate::types::encode;

    /// A one-node group that serves links on a loopback port, and that port.
    async fn linked_node(dir: &std::path::Path) -> (RaftNode<Counter>, String) {
        let node = RaftNode::open(NodeConfig::new(1, dir), Counter::default())
            .await
            .unwrap();
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        node.initialize(&BTreeMap::from([(1, addr.clone())]))
            .await
            .unwrap();
        node.write(0).await.unwrap();
        let server = node.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let server = server.clone();
                tokio::spawn(async move { server.serve_link(stream).await });
            }
        });
        (node, addr)
    }

    /// Sends `hello` and returns everything the server sent until it closed the connection
    /// (a reset, when it left some of `hello` unread).
    async fn answer_to(addr: &str, hello: &[u8]) -> Vec<u8> {
        let mut stream = TcpStream::connect(addr).await.unwrap();
        stream.write_all(hello).await.unwrap();
        let mut answer = Vec::new();
        let read = async {
            let mut buf = [0u8; 64];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) => break,
                    Ok(n) => answer.extend_from_slice(&buf[..n]),
                    Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                    Err(e) => panic!("reading the answer: {e}"),
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(10), read)
            .await
            .expect("the server closes the connection");
        answer
    }

    #[tokio::test]
    async fn forwarded_batches_are_answered_over_a_link() {
        let dir = tempfile::TempDir::new().unwrap();
        let (node, addr) = linked_node(dir.path()).await;
        let (frames, sink) = open(&addr, Kind::Forward, Duration::from_secs(5))
            .await
            .unwrap();
        let batches = [(7u64, vec![5u64, 6]), (8, vec![1])].map(|(seq, adds)| {
            let commands = adds
                .iter()
                .map(|n| serde_bytes::ByteBuf::from(encode(n).unwrap()))
                .collect();
            encode(&StreamedBatch { seq, commands }).unwrap()
        });
        // The first batch is answered before the second is sent, so their order is known.
        let (tx, rx) = futures::channel::mpsc::unbounded();
        let writer = tokio::spawn(send_all(sink, rx.map(Ok)));
        let mut answers = messages(frames);
        let mut totals = Vec::new();
        for batch in batches {
            tx.unbounded_send(batch).unwrap();
            let answer = answers.next().await.unwrap().unwrap();
            let answer: StreamedReplies = decode(&answer).unwrap();
            for reply in answer.replies {
                let total = decode::<Result<u64, String>>(&reply.unwrap()).unwrap();
                totals.push((answer.seq, total.unwrap()));
            }
        }
        totals.sort_unstable();
        assert_eq!(totals, [(7, 5), (7, 11), (8, 12)]);
        // Closing the sending side ends the stream, and the server closes its side.
        drop(tx);
        writer.await.unwrap().unwrap();
        assert!(answers.next().await.is_none());
        node.shutdown().await.unwrap();
    }

    /// What `open` makes of a server that answers the preface with `answer` and closes.
    async fn open_against(answer: &'static [u8]) -> Result<(), OpenError> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            let mut hello = [0u8; 9];
            stream.read_exact(&mut hello).await.unwrap();
            stream.write_all(answer).await.unwrap();
        });
        open(&addr, Kind::Append, Duration::from_secs(5))
            .await
            .map(|_| ())
    }

    #[tokio::test]
    async fn an_http2_answer_is_a_refusal_and_silence_is_not() {
        // hyper's HTTP/2 server sends its SETTINGS frame first, whatever the client sent.
        let settings = b"\x00\x00\x18\x04\x00\x00\x00\x00\x00";
        assert!(matches!(
            open_against(settings).await,
            Err(OpenError::Refused)
        ));
        // A link server that declines (shutting down) closes without answering: try again.
        assert!(matches!(open_against(b"").await, Err(OpenError::Io(_))));
        assert!(matches!(open_against(b"LLPE").await, Err(OpenError::Io(_))));
        assert!(open_against(PREFACE).await.is_ok());
    }

    #[tokio::test]
    async fn a_link_server_drops_what_is_not_a_link_and_frames_over_the_limit() {
        let dir = tempfile::TempDir::new().unwrap();
        let (node, addr) = linked_node(dir.path()).await;
        // Not a link at all, and a link of a kind this version does not know: no answer.
        assert_eq!(answer_to(&addr, b"GET / HTTP/1.1\r\n\r\n").await, b"");
        let mut hello = PREFACE.to_vec();
        hello.push(9);
        assert_eq!(answer_to(&addr, &hello).await, b"");
        // A frame announced over the limit ends the link once its length is read.
        let mut hello = PREFACE.to_vec();
        hello.push(Kind::Forward as u8);
        hello.extend_from_slice(&(MAX_PEER_MESSAGE as u32 + 1).to_be_bytes());
        assert_eq!(answer_to(&addr, &hello).await, PREFACE);

        // The receiving side's error names the limit.
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut sender = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        let (receiver, _) = listener.accept().await.unwrap();
        sender
            .write_all(&(MAX_PEER_MESSAGE as u32 + 1).to_be_bytes())
            .await
            .unwrap();
        let (frames, _sink) = split(receiver);
        let error = messages(frames).next().await.unwrap().unwrap_err();
        assert!(
            error.contains(&format!("limited to {MAX_PEER_MESSAGE} bytes")),
            "{error}"
        );
        node.shutdown().await.unwrap();
    }
}
