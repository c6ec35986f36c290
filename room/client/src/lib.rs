//! Device-side client for the room protocol (docs/protocol.md): connect over TCP or WebSocket
//! (binary or JSON text), authenticate, receive, ack, ping, and reconnect with backoff. Also the
//! frame codec both room and clients use, so the two agree byte for byte.

pub mod frame;
pub mod text;

use std::time::Duration;

use bytes::Buf;
use bytes::BytesMut;
use futures::SinkExt;
use futures::StreamExt;
use longlink_proto::clientpb;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite;
use tokio_tungstenite::tungstenite::Message as WsMessage;

pub use frame::Frame;
pub use frame::FrameError;

/// How a connection carries frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// `u32 BE length | kind | body` on a TCP stream.
    Tcp,
    /// WebSocket binary messages `kind | body`.
    WsBinary,
    /// WebSocket text messages in the JSON forms.
    WsText,
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("websocket: {0}")]
    Ws(String),
    #[error(transparent)]
    Frame(#[from] FrameError),
    /// The room answered with an `error` frame.
    #[error("refused by room: {code}: {message}")]
    Refused { code: String, message: String },
    /// The room closed the connection with a `kick` frame.
    #[error("kicked: {reason}")]
    Kicked {
        reason: String,
        reconnect: Vec<String>,
    },
    #[error("connection closed")]
    Closed,
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("timed out: {0}")]
    Timeout(&'static str),
}

impl From<tungstenite::Error> for Error {
    fn from(e: tungstenite::Error) -> Self {
        match e {
            tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed => {
                Error::Closed
            }
            tungstenite::Error::Io(e) => Error::Io(e),
            e => Error::Ws(e.to_string()),
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// Claims of a device token (HS256): `app`, `sub` (user), `dev` (optional), `exp` (unix seconds).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Claims {
    pub app: String,
    pub sub: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dev: Option<String>,
    /// The device's platform (`ios`, `android`, `web`, ...), shown in presence.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plat: Option<String>,
    pub exp: u64,
}

/// Signs a device token with the app's secret; `ttl` from now.
pub fn token(app: &str, user: &str, device: Option<&str>, secret: &str, ttl: Duration) -> String {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    token_at(app, user, device, secret, (now + ttl).as_secs())
}

/// Signs a device token expiring at `exp` (unix seconds), e.g. in the past for tests.
pub fn token_at(app: &str, user: &str, device: Option<&str>, secret: &str, exp: u64) -> String {
    let claims = Claims {
        app: app.into(),
        sub: user.into(),
        dev: device.map(str::to_string),
        plat: None,
        exp,
    };
    sign(&claims, secret)
}

/// Signs `claims` (e.g. with a `plat`) with the app's secret.
pub fn sign(claims: &Claims, secret: &str) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("HS256 signing cannot fail")
}

enum Wire {
    Tcp {
        stream: TcpStream,
        buf: BytesMut,
    },
    Ws {
        ws: Box<WebSocketStream<TcpStream>>,
        text: bool,
    },
}

/// One connection to a room, not yet or already authenticated. No reconnects: see [`Client`].
pub struct Connection {
    wire: Wire,
    /// Largest frame accepted from the room.
    max_frame: usize,
}

impl Connection {
    /// Opens a TCP connection, or a WebSocket at `ws://addr/ws`.
    pub async fn connect(addr: &str, transport: Transport) -> Result<Connection> {
        Self::connect_path(addr, transport, "/ws").await
    }

    /// A TCP connection over an already connected stream (e.g. bound to a chosen source address).
    pub fn from_tcp(stream: TcpStream) -> Result<Connection> {
        stream.set_nodelay(true)?;
        Ok(Connection {
            wire: Wire::Tcp {
                stream,
                buf: BytesMut::new(),
            },
            max_frame: 16 * 1024 * 1024,
        })
    }

    /// Like [`Connection::connect`] with another WebSocket path (tests of the 404 answer).
    pub async fn connect_path(addr: &str, transport: Transport, path: &str) -> Result<Connection> {
        let stream = TcpStream::connect(addr).await?;
        stream.set_nodelay(true)?;
        let wire = match transport {
            Transport::Tcp => Wire::Tcp {
                stream,
                buf: BytesMut::new(),
            },
            Transport::WsBinary | Transport::WsText => {
                let url = format!("ws://{addr}{path}");
                let (ws, _) = tokio_tungstenite::client_async(url, stream).await?;
                Wire::Ws {
                    ws: Box::new(ws),
                    text: transport == Transport::WsText,
                }
            }
        };
        Ok(Connection {
            wire,
            max_frame: 16 * 1024 * 1024,
        })
    }

    /// Sends one frame in this connection's form.
    pub async fn send(&mut self, frame: &Frame) -> Result<()> {
        match &mut self.wire {
            Wire::Tcp { stream, .. } => stream.write_all(&frame.encode()).await?,
            Wire::Ws { ws, text: true } => ws.send(WsMessage::text(text::to_json(frame))).await?,
            Wire::Ws { ws, text: false } => {
                ws.send(WsMessage::Binary(frame::ws_binary(&frame.encode())))
                    .await?
            }
        }
        Ok(())
    }

    /// Sends raw bytes (TCP) or a raw message (WS binary/text), for tests of bad input.
    pub async fn send_raw(&mut self, bytes: &[u8]) -> Result<()> {
        match &mut self.wire {
            Wire::Tcp { stream, .. } => stream.write_all(bytes).await?,
            Wire::Ws { ws, text: true } => {
                ws.send(WsMessage::text(String::from_utf8_lossy(bytes).into_owned()))
                    .await?
            }
            Wire::Ws { ws, text: false } => ws.send(WsMessage::binary(bytes.to_vec())).await?,
        }
        Ok(())
    }

    /// The next frame; `Ok(None)` when the room closed the connection.
    pub async fn recv(&mut self) -> Result<Option<Frame>> {
        match &mut self.wire {
            Wire::Tcp { stream, buf } => loop {
                if let frame::Parsed::Frame(f, used) = frame::parse(buf, self.max_frame)? {
                    buf.advance(used);
                    return Ok(Some(f));
                }
                match stream.read_buf(buf).await {
                    Ok(0) => return Ok(None),
                    Ok(_) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return Ok(None),
                    Err(e) => return Err(e.into()),
                }
            },
            Wire::Ws { ws, .. } => loop {
                let msg = match ws.next().await {
                    None => return Ok(None),
                    Some(Err(e)) => match Error::from(e) {
                        Error::Closed => return Ok(None),
                        Error::Io(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {
                            return Ok(None);
                        }
                        e => return Err(e),
                    },
                    Some(Ok(m)) => m,
                };
                match msg {
                    WsMessage::Binary(b) => {
                        return Ok(Some(frame::decode_ws_binary(&b, self.max_frame)?));
                    }
                    WsMessage::Text(t) => return Ok(Some(text::from_json(&t, self.max_frame)?)),
                    WsMessage::Close(_) => return Ok(None),
                    _ => continue,
                }
            },
        }
    }

    /// Sends `auth` and waits for `welcome`; an `error` frame becomes [`Error::Refused`].
    pub async fn auth(&mut self, token: &str) -> Result<clientpb::Welcome> {
        self.send(&Frame::Auth(clientpb::Auth {
            token: token.into(),
        }))
        .await?;
        match self.recv().await? {
            Some(Frame::Welcome(w)) => Ok(w),
            Some(Frame::Error(e)) => Err(Error::Refused {
                code: e.code,
                message: e.message,
            }),
            Some(other) => Err(Error::Protocol(format!(
                "expected welcome, got {:?}",
                other.kind()
            ))),
            None => Err(Error::Closed),
        }
    }

    /// Acknowledges QoS 1 messages.
    pub async fn ack(&mut self, ids: Vec<String>) -> Result<()> {
        self.send(&Frame::Ack(clientpb::Ack { ids })).await
    }

    pub async fn ping(&mut self) -> Result<()> {
        self.send(&Frame::Ping).await
    }

    /// Sends an uplink payload (UTF-8 JSON by convention).
    pub async fn uplink(&mut self, payload: Vec<u8>) -> Result<()> {
        self.send(&Frame::Uplink(clientpb::Uplink { payload }))
            .await
    }

    /// Waits until the room closes the connection, returning the last `error`/`kick` frame seen.
    pub async fn closed(&mut self) -> Result<Option<Frame>> {
        let mut last = None;
        loop {
            match self.recv().await {
                Ok(Some(f @ (Frame::Error(_) | Frame::Kick(_)))) => last = Some(f),
                Ok(Some(_)) => {}
                Ok(None) => return Ok(last),
                Err(Error::Io(_)) => return Ok(last),
                Err(e) => return Err(e),
            }
        }
    }
}

/// What a [`Client`] needs to (re)connect.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Room addresses to try in order ("host:port", TCP or WS listener to match `transport`).
    pub addrs: Vec<String>,
    pub transport: Transport,
    pub token: String,
    /// First reconnect delay; doubles up to `max_backoff`.
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// Ack QoS 1 messages as soon as they are received.
    pub auto_ack: bool,
}

impl ClientConfig {
    pub fn new(addr: impl Into<String>, transport: Transport, token: impl Into<String>) -> Self {
        ClientConfig {
            addrs: vec![addr.into()],
            transport,
            token: token.into(),
            min_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(5),
            auto_ack: true,
        }
    }
}

/// A connection that stays up: pings every heartbeat, reconnects with exponential backoff (to
/// the addresses of a `kick` first), and re-authenticates. Messages arrive through [`Client::next`].
pub struct Client {
    config: ClientConfig,
    conn: Option<Connection>,
    welcome: Option<clientpb::Welcome>,
    /// Successful (re)connections so far.
    pub connects: u64,
}

impl Client {
    /// Connects and authenticates once; refusals are returned, not retried.
    pub async fn connect(config: ClientConfig) -> Result<Client> {
        let mut c = Client {
            config,
            conn: None,
            welcome: None,
            connects: 0,
        };
        c.establish().await?;
        Ok(c)
    }

    pub fn welcome(&self) -> Option<&clientpb::Welcome> {
        self.welcome.as_ref()
    }

    async fn establish(&mut self) -> Result<()> {
        let mut last = Error::Closed;
        for addr in self.config.addrs.clone() {
            match Connection::connect(&addr, self.config.transport).await {
                Ok(mut conn) => {
                    let w = conn.auth(&self.config.token).await?;
                    self.welcome = Some(w);
                    self.conn = Some(conn);
                    self.connects += 1;
                    return Ok(());
                }
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    async fn reconnect(&mut self) -> Result<()> {
        let mut delay = self.config.min_backoff;
        loop {
            match self.establish().await {
                Ok(()) => return Ok(()),
                Err(e @ Error::Refused { .. }) => return Err(e),
                Err(e) => tracing::debug!("reconnect failed: {e}; retrying in {delay:?}"),
            }
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(self.config.max_backoff);
        }
    }

    /// The next pushed message, reconnecting as needed.
    pub async fn next(&mut self) -> Result<clientpb::Message> {
        loop {
            if self.conn.is_none() {
                self.reconnect().await?;
            }
            let heartbeat = Duration::from_secs(u64::from(
                self.welcome.as_ref().map_or(30, |w| w.heartbeat_s.max(1)),
            ));
            let conn = self.conn.as_mut().ok_or(Error::Closed)?;
            let got = match tokio::time::timeout(heartbeat, conn.recv()).await {
                Err(_) => {
                    if conn.ping().await.is_err() {
                        self.conn = None;
                    }
                    continue;
                }
                Ok(r) => r,
            };
            match got {
                Ok(Some(Frame::Message(m))) => {
                    if self.config.auto_ack
                        && m.qos == 1
                        && conn.ack(vec![m.id.clone()]).await.is_err()
                    {
                        self.conn = None;
                    }
                    return Ok(m);
                }
                Ok(Some(Frame::Kick(k))) => {
                    if !k.reconnect.is_empty() {
                        self.config.addrs = k.reconnect;
                    }
                    self.conn = None;
                }
                Ok(Some(_)) => {}
                Ok(None) | Err(Error::Io(_)) | Err(Error::Closed) => self.conn = None,
                Err(e) => return Err(e),
            }
        }
    }

    /// Acknowledges messages on the current connection.
    pub async fn ack(&mut self, ids: Vec<String>) -> Result<()> {
        self.conn.as_mut().ok_or(Error::Closed)?.ack(ids).await
    }

    /// The addresses the client will use next (changed by a kick's reconnect list).
    pub fn addrs(&self) -> &[String] {
        &self.config.addrs
    }
}
