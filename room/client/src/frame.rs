//! The frame codec shared by room and its clients: `u32 BE length | u8 kind | protobuf body` on
//! TCP, `kind | body` in WebSocket binary messages. Decoding never trusts the peer: the length is
//! checked against the limit before anything is allocated, and "not enough bytes yet" is
//! [`Parsed::Incomplete`], not an error.

use bytes::BufMut;
use bytes::Bytes;
use bytes::BytesMut;
use longlink_proto::clientpb;
use prost::Message as _;

/// Bytes before the kind byte on TCP: the big-endian length of `kind | body`.
pub const LEN_BYTES: usize = 4;

/// The default largest `kind | body` a room accepts (DESIGN.md §5: 64 KiB).
pub const DEFAULT_MAX_FRAME: usize = 64 * 1024;

/// The kind byte (see `Kind` in proto/client.proto).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Auth = 1,
    Welcome = 2,
    Error = 3,
    Ping = 4,
    Pong = 5,
    Message = 6,
    Ack = 7,
    Uplink = 8,
    Kick = 9,
}

impl Kind {
    pub fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Auth,
            2 => Kind::Welcome,
            3 => Kind::Error,
            4 => Kind::Ping,
            5 => Kind::Pong,
            6 => Kind::Message,
            7 => Kind::Ack,
            8 => Kind::Uplink,
            9 => Kind::Kick,
            _ => return None,
        })
    }
}

/// One decoded frame.
#[derive(Debug, Clone, PartialEq)]
pub enum Frame {
    Auth(clientpb::Auth),
    Welcome(clientpb::Welcome),
    Error(clientpb::Error),
    Ping,
    Pong,
    Message(clientpb::Message),
    Ack(clientpb::Ack),
    Uplink(clientpb::Uplink),
    Kick(clientpb::Kick),
}

/// Why bytes from a peer are not a frame. Every variant maps to a protocol error code.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FrameError {
    /// The declared length exceeds the limit; nothing was allocated for it.
    #[error("frame of {len} bytes exceeds the max frame size of {max} bytes")]
    TooLarge { len: usize, max: usize },
    /// A zero length: there is no kind byte.
    #[error("empty frame (length 0 has no kind byte)")]
    Empty,
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("bad {kind:?} body: {message}")]
    BadBody { kind: Kind, message: String },
    #[error("bad JSON frame: {0}")]
    BadJson(String),
}

impl FrameError {
    /// The protocol error code sent in the `error` frame (docs/protocol.md).
    pub fn code(&self) -> &'static str {
        match self {
            FrameError::TooLarge { .. } => "frame_too_large",
            _ => "bad_frame",
        }
    }
}

/// Result of looking at the front of a byte stream.
#[derive(Debug, PartialEq)]
pub enum Parsed {
    /// A whole frame and how many bytes of the input it used.
    Frame(Frame, usize),
    /// More bytes are needed; `need` is the total the next frame occupies, when known.
    Incomplete { need: Option<usize> },
}

impl Frame {
    pub fn kind(&self) -> Kind {
        match self {
            Frame::Auth(_) => Kind::Auth,
            Frame::Welcome(_) => Kind::Welcome,
            Frame::Error(_) => Kind::Error,
            Frame::Ping => Kind::Ping,
            Frame::Pong => Kind::Pong,
            Frame::Message(_) => Kind::Message,
            Frame::Ack(_) => Kind::Ack,
            Frame::Uplink(_) => Kind::Uplink,
            Frame::Kick(_) => Kind::Kick,
        }
    }

    fn body_len(&self) -> usize {
        match self {
            Frame::Auth(m) => m.encoded_len(),
            Frame::Welcome(m) => m.encoded_len(),
            Frame::Error(m) => m.encoded_len(),
            Frame::Ping | Frame::Pong => 0,
            Frame::Message(m) => m.encoded_len(),
            Frame::Ack(m) => m.encoded_len(),
            Frame::Uplink(m) => m.encoded_len(),
            Frame::Kick(m) => m.encoded_len(),
        }
    }

    fn encode_body(&self, buf: &mut BytesMut) {
        // Encoding into a buffer reserved for encoded_len cannot fail.
        let r = match self {
            Frame::Auth(m) => m.encode(buf),
            Frame::Welcome(m) => m.encode(buf),
            Frame::Error(m) => m.encode(buf),
            Frame::Ping | Frame::Pong => Ok(()),
            Frame::Message(m) => m.encode(buf),
            Frame::Ack(m) => m.encode(buf),
            Frame::Uplink(m) => m.encode(buf),
            Frame::Kick(m) => m.encode(buf),
        };
        debug_assert!(r.is_ok());
    }

    /// The TCP form `len | kind | body`, allocated once at its exact size. A WebSocket binary
    /// message is [`ws_binary`] of it (a zero-copy slice), so one encoding serves both.
    pub fn encode(&self) -> Bytes {
        let body = self.body_len();
        let mut buf = BytesMut::with_capacity(LEN_BYTES + 1 + body);
        buf.put_u32((1 + body) as u32);
        buf.put_u8(self.kind() as u8);
        self.encode_body(&mut buf);
        buf.freeze()
    }

    /// Decodes a body of the given kind.
    pub fn decode(kind: u8, body: &[u8]) -> Result<Frame, FrameError> {
        let kind = Kind::from_u8(kind).ok_or(FrameError::UnknownKind(kind))?;
        let bad = |e: prost::DecodeError| FrameError::BadBody {
            kind,
            message: e.to_string(),
        };
        Ok(match kind {
            Kind::Auth => Frame::Auth(clientpb::Auth::decode(body).map_err(bad)?),
            Kind::Welcome => Frame::Welcome(clientpb::Welcome::decode(body).map_err(bad)?),
            Kind::Error => Frame::Error(clientpb::Error::decode(body).map_err(bad)?),
            Kind::Ping => {
                clientpb::Ping::decode(body).map_err(bad)?;
                Frame::Ping
            }
            Kind::Pong => {
                clientpb::Pong::decode(body).map_err(bad)?;
                Frame::Pong
            }
            Kind::Message => Frame::Message(clientpb::Message::decode(body).map_err(bad)?),
            Kind::Ack => Frame::Ack(clientpb::Ack::decode(body).map_err(bad)?),
            Kind::Uplink => Frame::Uplink(clientpb::Uplink::decode(body).map_err(bad)?),
            Kind::Kick => Frame::Kick(clientpb::Kick::decode(body).map_err(bad)?),
        })
    }

    /// An `error` frame.
    pub fn error(code: &str, message: impl Into<String>) -> Frame {
        Frame::Error(clientpb::Error {
            code: code.to_string(),
            message: message.into(),
        })
    }
}

/// Looks at the front of `buf` (TCP stream bytes). The declared length is checked against
/// `max_frame` as soon as its 4 bytes are present, before any body is buffered.
pub fn parse(buf: &[u8], max_frame: usize) -> Result<Parsed, FrameError> {
    if buf.len() < LEN_BYTES {
        return Ok(Parsed::Incomplete { need: None });
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    if len == 0 {
        return Err(FrameError::Empty);
    }
    if len > max_frame {
        return Err(FrameError::TooLarge {
            len,
            max: max_frame,
        });
    }
    let total = LEN_BYTES + len;
    if buf.len() < total {
        return Ok(Parsed::Incomplete { need: Some(total) });
    }
    let frame = Frame::decode(buf[LEN_BYTES], &buf[LEN_BYTES + 1..total])?;
    Ok(Parsed::Frame(frame, total))
}

/// Decodes a WebSocket binary message `kind | body`.
pub fn decode_ws_binary(msg: &[u8], max_frame: usize) -> Result<Frame, FrameError> {
    if msg.len() > max_frame {
        return Err(FrameError::TooLarge {
            len: msg.len(),
            max: max_frame,
        });
    }
    let (&kind, body) = msg.split_first().ok_or(FrameError::Empty)?;
    Frame::decode(kind, body)
}

/// The WebSocket binary form of an encoded TCP frame: the same bytes without the length.
pub fn ws_binary(tcp_frame: &Bytes) -> Bytes {
    tcp_frame.slice(LEN_BYTES..)
}

/// Decodes an encoded TCP frame produced by [`Frame::encode`] (trusted, local bytes).
pub fn decode_encoded(tcp_frame: &[u8]) -> Result<Frame, FrameError> {
    match parse(tcp_frame, usize::MAX)? {
        Parsed::Frame(f, _) => Ok(f),
        Parsed::Incomplete { .. } => Err(FrameError::Empty),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Frame {
        Frame::Message(clientpb::Message {
            id: "m1".into(),
            app: "demo".into(),
            qos: 1,
            payload: br#"{"a":1}"#.to_vec(),
            ts: 42,
        })
    }

    #[test]
    fn round_trip_every_kind() {
        let frames = vec![
            Frame::Auth(clientpb::Auth { token: "t".into() }),
            Frame::Welcome(clientpb::Welcome {
                conn_id: 7,
                heartbeat_s: 30,
                room_id: "r".into(),
                resumed: 0,
            }),
            Frame::error("unauthorized", "no"),
            Frame::Ping,
            Frame::Pong,
            msg(),
            Frame::Ack(clientpb::Ack {
                ids: vec!["a".into(), "b".into()],
            }),
            Frame::Uplink(clientpb::Uplink {
                payload: b"x".to_vec(),
            }),
            Frame::Kick(clientpb::Kick {
                reason: "drain".into(),
                reconnect: vec!["h:1".into()],
            }),
        ];
        for f in frames {
            let bytes = f.encode();
            assert_eq!(
                parse(&bytes, DEFAULT_MAX_FRAME).unwrap(),
                Parsed::Frame(f.clone(), bytes.len())
            );
            assert_eq!(
                decode_ws_binary(&ws_binary(&bytes), DEFAULT_MAX_FRAME).unwrap(),
                f
            );
        }
    }

    #[test]
    fn ping_is_five_bytes() {
        assert_eq!(&Frame::Ping.encode()[..], &[0, 0, 0, 1, 4]);
    }

    #[test]
    fn split_reads_are_incomplete_until_whole() {
        let mut stream = msg().encode().to_vec();
        stream.extend_from_slice(&Frame::Ping.encode());
        let first_len = msg().encode().len();
        for cut in 0..first_len {
            let r = parse(&stream[..cut], DEFAULT_MAX_FRAME).unwrap();
            assert!(matches!(r, Parsed::Incomplete { .. }), "cut {cut}: {r:?}");
        }
        assert_eq!(
            parse(&stream[..3], DEFAULT_MAX_FRAME).unwrap(),
            Parsed::Incomplete { need: None }
        );
        assert_eq!(
            parse(&stream[..5], DEFAULT_MAX_FRAME).unwrap(),
            Parsed::Incomplete {
                need: Some(first_len)
            }
        );
        let Parsed::Frame(f, used) = parse(&stream, DEFAULT_MAX_FRAME).unwrap() else {
            panic!("whole frame expected");
        };
        assert_eq!((f, used), (msg(), first_len));
        assert_eq!(
            parse(&stream[used..], DEFAULT_MAX_FRAME).unwrap(),
            Parsed::Frame(Frame::Ping, 5)
        );
    }

    #[test]
    fn oversized_is_refused_from_the_header_alone() {
        // Only the 4 length bytes are present: the limit is checked before any body arrives.
        let header = (u32::MAX).to_be_bytes();
        let err = parse(&header, DEFAULT_MAX_FRAME).unwrap_err();
        assert_eq!(
            err,
            FrameError::TooLarge {
                len: u32::MAX as usize,
                max: DEFAULT_MAX_FRAME
            }
        );
        assert_eq!(err.code(), "frame_too_large");
        assert!(err.to_string().contains("max frame size of 65536"), "{err}");
        // Exactly at the limit is fine.
        let at = ((DEFAULT_MAX_FRAME) as u32).to_be_bytes();
        assert!(matches!(
            parse(&at, DEFAULT_MAX_FRAME).unwrap(),
            Parsed::Incomplete { .. }
        ));
        let big = vec![6u8; DEFAULT_MAX_FRAME + 1];
        assert!(matches!(
            decode_ws_binary(&big, DEFAULT_MAX_FRAME),
            Err(FrameError::TooLarge { .. })
        ));
    }

    #[test]
    fn unknown_kind_empty_and_bad_protobuf_are_errors() {
        assert_eq!(
            parse(&[0, 0, 0, 1, 200], DEFAULT_MAX_FRAME).unwrap_err(),
            FrameError::UnknownKind(200)
        );
        assert_eq!(
            parse(&[0, 0, 0, 0], DEFAULT_MAX_FRAME).unwrap_err(),
            FrameError::Empty
        );
        assert_eq!(
            decode_ws_binary(&[], DEFAULT_MAX_FRAME).unwrap_err(),
            FrameError::Empty
        );
        // Auth body: field 1 (len-delimited) claiming 10 bytes but only 1 present.
        let err = parse(&[0, 0, 0, 4, 1, 0x0a, 10, b'x'], DEFAULT_MAX_FRAME).unwrap_err();
        assert!(
            matches!(
                err,
                FrameError::BadBody {
                    kind: Kind::Auth,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(err.code(), "bad_frame");
    }
}
