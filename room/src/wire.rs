//! The two transports a connection runs over. Both hand whole frames to the connection driver
//! and write frames in their TCP encoding (the WebSocket side slices or re-renders them). Reads
//! are cancel-safe: the only `.await` is readiness, and bytes move only after it.
//!
//! Memory: an idle TCP connection holds no read buffer. Bytes are read into a 4 KiB stack buffer
//! only when the socket is readable; only the tail of an incomplete frame is kept, and freed
//! once the frame completes. WebSocket connections hold tungstenite's read buffer, configured
//! small (`ws_buffer_bytes`).

use std::future::Future;
use std::io;
use std::time::Duration;

use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use futures::SinkExt;
use futures::StreamExt;
use longlink_client::Frame;
use longlink_client::FrameError;
use longlink_client::frame;
use longlink_client::frame::Parsed;
use longlink_client::text;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Size of the on-stack read buffer.
const READ_CHUNK: usize = 4096;
/// How long a closing connection waits for its last frame to be written and for the peer's FIN.
pub const LINGER: Duration = Duration::from_secs(1);

#[derive(Debug)]
pub enum ReadError {
    /// The peer closed the connection.
    Closed,
    Io(io::Error),
    /// The peer sent something that is not a frame; answered with an error frame.
    Frame(FrameError),
}

/// What a connection needs from its transport.
pub trait Wire: Send + 'static {
    /// WebSocket (true) or TCP.
    const WEBSOCKET: bool;
    /// Waits until data arrives and appends the whole frames it completes to `out`; returns the
    /// number of bytes read (frames may be empty when only part of one arrived). Cancel-safe.
    /// `max_frame` is asked when bytes arrive, so a live change applies to a read in progress.
    fn read_frames(
        &mut self,
        max_frame: impl Fn() -> usize + Send,
        out: &mut Vec<Frame>,
    ) -> impl Future<Output = Result<usize, ReadError>> + Send;
    /// Writes one frame given in its TCP encoding.
    fn write_frame(&mut self, frame: &Bytes) -> impl Future<Output = io::Result<()>> + Send;
    /// Closes gracefully: FIN (or a close frame), then discards input briefly so the last frame
    /// is not destroyed by a reset.
    fn close(self) -> impl Future<Output = ()> + Send;
}

/// A TCP connection.
pub struct TcpWire {
    stream: TcpStream,
    /// Bytes of an incomplete frame; empty (no allocation) between frames.
    partial: BytesMut,
}

impl TcpWire {
    pub fn new(stream: TcpStream) -> Self {
        TcpWire {
            stream,
            partial: BytesMut::new(),
        }
    }

    /// Parses every whole frame at the front of `buf`; returns how many bytes it used.
    fn parse_all(
        buf: &[u8],
        max_frame: usize,
        out: &mut Vec<Frame>,
    ) -> Result<(usize, Option<usize>), FrameError> {
        let mut used = 0;
        loop {
            match frame::parse(&buf[used..], max_frame)? {
                Parsed::Frame(f, n) => {
                    out.push(f);
                    used += n;
                }
                Parsed::Incomplete { need } => return Ok((used, need)),
            }
        }
    }

    /// One non-blocking read after readiness. `None` = spurious wake-up.
    fn read_ready(
        &mut self,
        max_frame: usize,
        out: &mut Vec<Frame>,
    ) -> Result<Option<usize>, ReadError> {
        let mut chunk = [0u8; READ_CHUNK];
        let n = match self.stream.try_read(&mut chunk) {
            Ok(0) => return Err(ReadError::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(None),
            Err(e) => return Err(ReadError::Io(e)),
        };
        if self.partial.is_empty() {
            let (used, need) =
                Self::parse_all(&chunk[..n], max_frame, out).map_err(ReadError::Frame)?;
            if used < n {
                // The length was already checked against max_frame by parse.
                self.partial
                    .reserve(need.unwrap_or(frame::LEN_BYTES).max(n - used));
                self.partial.put_slice(&chunk[used..n]);
            }
        } else {
            self.partial.put_slice(&chunk[..n]);
            let (used, need) =
                Self::parse_all(&self.partial, max_frame, out).map_err(ReadError::Frame)?;
            let _ = self.partial.split_to(used);
            if self.partial.is_empty() {
                self.partial = BytesMut::new();
            } else if let Some(need) = need {
                self.partial
                    .reserve(need.saturating_sub(self.partial.len()));
            }
        }
        Ok(Some(n))
    }
}

impl Wire for TcpWire {
    const WEBSOCKET: bool = false;

    async fn read_frames(
        &mut self,
        max_frame: impl Fn() -> usize + Send,
        out: &mut Vec<Frame>,
    ) -> Result<usize, ReadError> {
        loop {
            // poll_read_ready keeps the waker in the socket's registration: unlike
            // `readable()`, the waiting future holds no waiter node (an idle connection waits
            // here all its life).
            std::future::poll_fn(|cx| self.stream.poll_read_ready(cx))
                .await
                .map_err(ReadError::Io)?;
            if let Some(n) = self.read_ready(max_frame(), out)? {
                return Ok(n);
            }
        }
    }

    async fn write_frame(&mut self, frame: &Bytes) -> io::Result<()> {
        self.stream.write_all(frame).await
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(LINGER, async {
            let _ = self.stream.shutdown().await;
            let mut sink = [0u8; 512];
            let mut discarded = 0usize;
            while discarded < 1 << 20 {
                match self.stream.read(&mut sink).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => discarded += n,
                }
            }
        })
        .await;
    }
}

/// A WebSocket connection. Replies use the form of the client's first frame: JSON text if it
/// was a text message, binary otherwise.
pub struct WsWire {
    ws: WebSocketStream<TcpStream>,
    /// Decided by the first data message; until then (refusals) text is used.
    text: Option<bool>,
}

impl WsWire {
    pub fn new(ws: WebSocketStream<TcpStream>) -> Self {
        WsWire { ws, text: None }
    }
}

fn ws_read_error(e: tungstenite::Error, max_frame: usize) -> ReadError {
    match e {
        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
            ReadError::Closed
        }
        tungstenite::Error::Io(e) => ReadError::Io(e),
        tungstenite::Error::Capacity(c) => ReadError::Frame(FrameError::TooLarge {
            len: match c {
                tungstenite::error::CapacityError::MessageTooLong { size, .. } => size,
                _ => max_frame + 1,
            },
            max: max_frame,
        }),
        e => ReadError::Frame(FrameError::BadJson(format!(
            "websocket protocol error: {e}"
        ))),
    }
}

impl Wire for WsWire {
    const WEBSOCKET: bool = true;

    async fn read_frames(
        &mut self,
        max_frame: impl Fn() -> usize + Send,
        out: &mut Vec<Frame>,
    ) -> Result<usize, ReadError> {
        loop {
            let next = self.ws.next().await;
            let max_frame = max_frame();
            let msg = match next {
                None => return Err(ReadError::Closed),
                Some(Err(e)) => return Err(ws_read_error(e, max_frame)),
                Some(Ok(m)) => m,
            };
            match msg {
                Message::Binary(b) => {
                    self.text.get_or_insert(false);
                    out.push(frame::decode_ws_binary(&b, max_frame).map_err(ReadError::Frame)?);
                    return Ok(b.len());
                }
                Message::Text(t) => {
                    self.text.get_or_insert(true);
                    out.push(text::from_json(&t, max_frame).map_err(ReadError::Frame)?);
                    return Ok(t.len());
                }
                Message::Close(_) => return Err(ReadError::Closed),
                // WebSocket pings count as traffic; tungstenite queues the pong itself.
                Message::Ping(p) | Message::Pong(p) => return Ok(p.len().max(1)),
                Message::Frame(_) => continue,
            }
        }
    }

    async fn write_frame(&mut self, frame: &Bytes) -> io::Result<()> {
        let msg = if self.text.unwrap_or(true) {
            let decoded = frame::decode_encoded(frame)
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            Message::text(text::to_json(&decoded))
        } else {
            Message::Binary(frame::ws_binary(frame))
        };
        self.ws.send(msg).await.map_err(|e| match e {
            tungstenite::Error::Io(e) => e,
            e => io::Error::other(e),
        })
    }

    async fn close(mut self) {
        let _ = tokio::time::timeout(LINGER, async {
            let _ = self
                .ws
                .close(Some(CloseFrame {
                    code: CloseCode::Normal,
                    reason: "".into(),
                }))
                .await;
            while let Some(Ok(_)) = self.ws.next().await {}
        })
        .await;
    }
}
