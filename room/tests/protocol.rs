//! End-to-end protocol tests against a room running in this process on real sockets: TCP and
//! WebSocket (binary and JSON text) clients, the internal gRPC API, refusals and limits.

mod common;

use std::time::Duration;

use common::*;
use futures::SinkExt;
use futures::StreamExt;
use longlink_client::Connection;
use longlink_client::Frame;
use longlink_client::Transport;
use longlink_client::frame;
use longlink_proto::clientpb;
use longlink_proto::roompb;
use room::RoomLimits;
use testkit::wait_until;
use tokio::io::AsyncReadExt;
use tokio::io::AsyncWriteExt;
use tokio_tungstenite::tungstenite::Message as WsMessage;

async fn auth_push_ack_in_order(t: Transport) {
    let room = TestRoom::start(RoomLimits::default()).await;
    let (mut c, w) = room.login(t, "demo", "alice", Some("phone")).await;
    assert_eq!(w.heartbeat_s, 30);
    assert_eq!(w.room_id, "room-test");
    let mut grpc = room.grpc().await;
    let items = (0..20)
        .map(|i| {
            to_user(
                "demo",
                "alice",
                msg(&format!("m{i}"), 1, &format!("{{\"n\":{i}}}")),
            )
        })
        .collect();
    let resp = grpc
        .push(roompb::PushRequest { items })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(resp.delivered, 20);
    let mut ids = vec![];
    for i in 0..20 {
        match next(&mut c).await {
            Some(Frame::Message(m)) => {
                assert_eq!(m.id, format!("m{i}"), "in order");
                assert_eq!(m.app, "demo");
                assert_eq!(m.qos, 1);
                assert_eq!(m.payload, format!("{{\"n\":{i}}}").into_bytes());
                ids.push(m.id);
            }
            other => panic!("expected message m{i}, got {other:?}"),
        }
    }
    assert_eq!(stats(&room).await.pending_qos1, 20);
    c.ack(ids).await.unwrap();
    wait_until("acks to clear pending", Duration::from_secs(5), || async {
        let s = stats(&room).await;
        (s.pending_qos1 == 0 && s.acks == 20).then_some(())
    })
    .await
    .unwrap();
    // Ping is answered.
    c.ping().await.unwrap();
    assert_eq!(next(&mut c).await, Some(Frame::Pong));
    // Unknown user: not found.
    let resp = grpc
        .push(roompb::PushRequest {
            items: vec![to_user("demo", "nobody", msg("x", 0, "1"))],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((resp.delivered, resp.not_found), (0, 1));
}

#[tokio::test]
async fn tcp_auth_welcome_push_ack_in_order() {
    auth_push_ack_in_order(Transport::Tcp).await;
}

#[tokio::test]
async fn ws_binary_auth_welcome_push_ack_in_order() {
    auth_push_ack_in_order(Transport::WsBinary).await;
}

#[tokio::test]
async fn ws_json_auth_welcome_push_ack_in_order() {
    auth_push_ack_in_order(Transport::WsText).await;
}

#[tokio::test]
async fn ws_json_text_forms_on_the_wire() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let stream = tokio::net::TcpStream::connect(room.ws).await.unwrap();
    let (mut ws, _) = tokio_tungstenite::client_async(format!("ws://{}/ws", room.ws), stream)
        .await
        .unwrap();
    let tok = token("demo", "bob", None, SECRET);
    ws.send(WsMessage::text(format!(
        r#"{{"type":"auth","token":"{tok}"}}"#
    )))
    .await
    .unwrap();
    let text = |m: Option<Result<WsMessage, _>>| match m {
        Some(Ok(WsMessage::Text(t))) => serde_json::from_str::<serde_json::Value>(&t).unwrap(),
        other => panic!("expected a text message, got {other:?}"),
    };
    let welcome = text(ws.next().await);
    assert_eq!(welcome["type"], "welcome");
    assert!(welcome["conn_id"].is_string(), "{welcome}");
    assert_eq!(welcome["heartbeat_s"], 30);
    ws.send(WsMessage::text(r#"{"type":"ping"}"#))
        .await
        .unwrap();
    assert_eq!(text(ws.next().await), serde_json::json!({"type":"pong"}));
    room.grpc()
        .await
        .push(roompb::PushRequest {
            items: vec![to_user("demo", "bob", msg("j1", 1, r#"{"hello":"world"}"#))],
        })
        .await
        .unwrap();
    let m = text(ws.next().await);
    assert_eq!(m["type"], "message");
    assert_eq!(m["id"], "j1");
    assert_eq!(m["app"], "demo");
    assert_eq!(m["qos"], 1);
    assert_eq!(m["payload"], serde_json::json!({"hello":"world"}));
    assert!(m["ts"].as_i64().unwrap() > 0);
    ws.send(WsMessage::text(r#"{"type":"ack","ids":["j1"]}"#))
        .await
        .unwrap();
    wait_until("json ack", Duration::from_secs(5), || async {
        (stats(&room).await.pending_qos1 == 0).then_some(())
    })
    .await
    .unwrap();
    ws.send(WsMessage::text(r#"{"type":"nonsense"}"#))
        .await
        .unwrap();
    let e = text(ws.next().await);
    assert_eq!(e["type"], "error");
    assert_eq!(e["code"], "bad_frame");
}

#[tokio::test]
async fn refusals_have_codes_and_close_the_socket() {
    let room = TestRoom::start(RoomLimits {
        handshake_timeout_ms: 500,
        ..RoomLimits::default()
    })
    .await;
    for t in [Transport::Tcp, Transport::WsBinary, Transport::WsText] {
        let addr = room.addr(t);
        // Bad signature.
        let mut c = Connection::connect(&addr, t).await.unwrap();
        c.send(&Frame::Auth(clientpb::Auth {
            token: token("demo", "u", None, "not-the-secret"),
        }))
        .await
        .unwrap();
        expect_error_then_close(&mut c, "unauthorized").await;
        // Expired.
        let mut c = Connection::connect(&addr, t).await.unwrap();
        c.send(&Frame::Auth(clientpb::Auth {
            token: longlink_client::token_at("demo", "u", None, SECRET, 1_000_000),
        }))
        .await
        .unwrap();
        expect_error_then_close(&mut c, "token_expired").await;
        // Unknown app.
        let mut c = Connection::connect(&addr, t).await.unwrap();
        c.send(&Frame::Auth(clientpb::Auth {
            token: token("nope", "u", None, SECRET),
        }))
        .await
        .unwrap();
        expect_error_then_close(&mut c, "unknown_app").await;
        // Something else first.
        let mut c = Connection::connect(&addr, t).await.unwrap();
        c.ping().await.unwrap();
        expect_error_then_close(&mut c, "auth_required").await;
        // Nothing within the handshake timeout.
        let mut c = Connection::connect(&addr, t).await.unwrap();
        let m = expect_error_then_close(&mut c, "handshake_timeout").await;
        assert!(m.contains("handshake_timeout_ms = 500"), "{m}");
    }
    // Oversized: TCP decided from the header alone.
    let mut c = Connection::connect(&room.tcp.to_string(), Transport::Tcp)
        .await
        .unwrap();
    c.send_raw(&(1u32 << 20).to_be_bytes()).await.unwrap();
    let m = expect_error_then_close(&mut c, "frame_too_large").await;
    assert!(m.contains("max frame size of 65536"), "{m}");
    // Oversized over WebSocket, after auth.
    let (mut c, _) = room.login(Transport::WsBinary, "demo", "big", None).await;
    let mut big = vec![frame::Kind::Uplink as u8];
    big.extend(vec![b'x'; 70_000]);
    c.send_raw(&big).await.unwrap();
    expect_error_then_close(&mut c, "frame_too_large").await;
    // Bad protobuf and unknown kind.
    let mut c = Connection::connect(&room.tcp.to_string(), Transport::Tcp)
        .await
        .unwrap();
    c.send_raw(&[0, 0, 0, 1, 99]).await.unwrap();
    expect_error_then_close(&mut c, "bad_frame").await;
    let mut c = Connection::connect(&room.tcp.to_string(), Transport::Tcp)
        .await
        .unwrap();
    c.send_raw(&[0, 0, 0, 4, 1, 0x0a, 10, b'x']).await.unwrap();
    expect_error_then_close(&mut c, "bad_frame").await;
    let s = stats(&room).await;
    assert!(s.auth_failures >= 12, "{s:?}");
    assert_eq!(s.connections, 0, "no session left: {s:?}");
}

#[tokio::test]
async fn idle_connections_are_closed_after_three_heartbeats() {
    let room = TestRoom::start(RoomLimits {
        heartbeat_s: 1,
        ..RoomLimits::default()
    })
    .await;
    let (mut idle, w) = room.login(Transport::Tcp, "demo", "idle", None).await;
    assert_eq!(w.heartbeat_s, 1);
    let (mut live, _) = room.login(Transport::WsBinary, "demo", "live", None).await;
    let started = tokio::time::Instant::now();
    let pinger = tokio::spawn(async move {
        for _ in 0..10 {
            live.ping().await.unwrap();
            assert_eq!(next(&mut live).await, Some(Frame::Pong));
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        live
    });
    let m = expect_error_then_close(&mut idle, "idle_timeout").await;
    assert!(m.contains("heartbeat_s = 1"), "{m}");
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(2500),
        "closed too early: {waited:?}"
    );
    // The pinging connection outlived it (5 s of pings, well past 3 heartbeats).
    let mut live = pinger.await.unwrap();
    live.ping().await.unwrap();
    assert_eq!(next(&mut live).await, Some(Frame::Pong));
}

#[tokio::test]
async fn a_slow_consumer_is_cut_off_while_others_keep_receiving() {
    let room = TestRoom::start(RoomLimits {
        outbound_max_messages: 64,
        outbound_max_bytes: 256 * 1024,
        ..RoomLimits::default()
    })
    .await;
    // The slow one: a tiny receive buffer and it never reads after the welcome.
    let socket = tokio::net::TcpSocket::new_v4().unwrap();
    socket.set_recv_buffer_size(4096).unwrap();
    let mut slow = socket.connect(room.tcp).await.unwrap();
    let auth = Frame::Auth(clientpb::Auth {
        token: token("demo", "slow", None, SECRET),
    });
    slow.write_all(&auth.encode()).await.unwrap();
    let mut head = [0u8; 5];
    slow.read_exact(&mut head).await.unwrap();
    assert_eq!(head[4], frame::Kind::Welcome as u8);
    let len = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
    let mut rest = vec![0u8; len - 1];
    slow.read_exact(&mut rest).await.unwrap();

    let (mut fast, _) = room.login(Transport::Tcp, "demo", "fast", None).await;
    let mut grpc = room.grpc().await;
    let payload = "x".repeat(32 * 1024);
    let mut dropped = 0;
    for i in 0..400 {
        let r = grpc
            .push(roompb::PushRequest {
                items: vec![to_user("demo", "slow", msg(&format!("s{i}"), 0, &payload))],
            })
            .await
            .unwrap()
            .into_inner();
        dropped += r.dropped;
        if dropped > 0 {
            break;
        }
    }
    assert_eq!(dropped, 1, "the slow consumer's queue overflowed");
    wait_until(
        "slow consumer counted and gone",
        Duration::from_secs(5),
        || async {
            let s = stats(&room).await;
            (s.slow_consumers == 1 && s.connections == 1).then_some(())
        },
    )
    .await
    .unwrap();
    // The other client still receives.
    grpc.push(roompb::PushRequest {
        items: vec![to_user("demo", "fast", msg("f1", 0, "\"hi\""))],
    })
    .await
    .unwrap();
    assert!(matches!(next(&mut fast).await, Some(Frame::Message(m)) if m.id == "f1"));
    // The slow socket is closed: reading drains what was buffered, then EOF.
    let mut sink = vec![0u8; 64 * 1024];
    let eof = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match slow.read(&mut sink).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await;
    assert!(eof.is_ok(), "slow consumer's socket was closed");
}

#[tokio::test]
async fn live_limit_changes_apply_without_restart() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let (mut a, _) = room.login(Transport::Tcp, "demo", "a", None).await;
    a.uplink(vec![b'1'; 2000]).await.unwrap();
    a.ping().await.unwrap();
    assert_eq!(next(&mut a).await, Some(Frame::Pong));
    // Lower the max frame: the same connection's next 2000-byte frame is refused.
    room.set_limits(|l| l.max_frame_bytes = 1024);
    a.uplink(vec![b'1'; 2000]).await.unwrap();
    let m = expect_error_then_close(&mut a, "frame_too_large").await;
    assert!(m.contains("1024"), "{m}");
    // Max connections: one held, the second refused; raised again, accepted.
    let (_held, _) = room.login(Transport::Tcp, "demo", "b", None).await;
    room.set_limits(|l| l.max_connections = 1);
    let mut c = Connection::connect(&room.tcp.to_string(), Transport::Tcp)
        .await
        .unwrap();
    let m = expect_error_then_close(&mut c, "too_many_connections").await;
    assert!(m.contains("max_connections = 1"), "{m}");
    room.set_limits(|l| l.max_connections = 10);
    let _ok = room.login(Transport::Tcp, "demo", "c", None).await;
    // Deny list.
    room.set_limits(|l| l.deny_cidrs = vec!["127.0.0.0/8".into()]);
    let mut c = Connection::connect(&room.tcp.to_string(), Transport::Tcp)
        .await
        .unwrap();
    expect_error_then_close(&mut c, "forbidden").await;
    assert!(stats(&room).await.rejected_connections >= 2);
}

#[tokio::test]
async fn broadcast_reaches_every_connection_of_one_app_only() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let (mut d1, _) = room.login(Transport::Tcp, "demo", "u1", None).await;
    let (mut d2, _) = room.login(Transport::WsBinary, "demo", "u2", None).await;
    let (mut d3, _) = room.login(Transport::WsText, "demo", "u3", None).await;
    let (mut o1, _) = room.login(Transport::Tcp, "other", "u1", None).await;
    let mut grpc = room.grpc().await;
    let r = grpc
        .broadcast(roompb::BroadcastRequest {
            app: "demo".into(),
            message: Some(msg("b1", 0, r#"{"all":true}"#)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.delivered, 3);
    for c in [&mut d1, &mut d2, &mut d3] {
        match next(c).await {
            Some(Frame::Message(m)) => {
                assert_eq!((m.id.as_str(), m.app.as_str()), ("b1", "demo"));
                assert_eq!(m.payload, br#"{"all":true}"#.to_vec());
            }
            other => panic!("expected the broadcast, got {other:?}"),
        }
    }
    // The other app's first frame is a later unicast, not the broadcast.
    grpc.push(roompb::PushRequest {
        items: vec![to_user("other", "u1", msg("o1", 0, "1"))],
    })
    .await
    .unwrap();
    assert!(
        matches!(next(&mut o1).await, Some(Frame::Message(m)) if m.id == "o1" && m.app == "other")
    );
    let s = stats(&room).await;
    assert_eq!(s.per_app.get("demo"), Some(&3));
    assert_eq!(s.per_app.get("other"), Some(&1));
}

#[tokio::test]
async fn kick_sends_reconnect_addresses_and_closes() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let (mut c, w) = room.login(Transport::Tcp, "demo", "k", None).await;
    let (mut keep, _) = room.login(Transport::Tcp, "demo", "stay", None).await;
    let r = room
        .grpc()
        .await
        .kick(roompb::KickRequest {
            conn_id: w.conn_id,
            reason: "operator".into(),
            reconnect: vec!["10.0.0.2:7100".into()],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kicked, 1);
    match next(&mut c).await {
        Some(Frame::Kick(k)) => {
            assert_eq!(k.reason, "operator");
            assert_eq!(k.reconnect, vec!["10.0.0.2:7100".to_string()]);
        }
        other => panic!("expected kick, got {other:?}"),
    }
    assert_eq!(next(&mut c).await, None, "closed after the kick");
    keep.ping().await.unwrap();
    assert_eq!(next(&mut keep).await, Some(Frame::Pong));
    // A conn id whose user does not match is not a target.
    let r = room
        .grpc()
        .await
        .kick(roompb::KickRequest {
            conn_id: w.conn_id + 1,
            app: "demo".into(),
            user: "someone-else".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.kicked, 0);
}

#[tokio::test]
async fn qos1_is_redelivered_to_a_reconnect_and_qos0_is_not() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let (mut c, _) = room.login(Transport::Tcp, "demo", "r", Some("d1")).await;
    let mut grpc = room.grpc().await;
    grpc.push(roompb::PushRequest {
        items: vec![
            to_user("demo", "r", msg("q0", 0, "0")),
            to_user("demo", "r", msg("q1", 1, "1")),
            to_user("demo", "r", msg("q2", 1, "2")),
        ],
    })
    .await
    .unwrap();
    for id in ["q0", "q1", "q2"] {
        assert!(matches!(next(&mut c).await, Some(Frame::Message(m)) if m.id == id));
    }
    c.ack(vec!["q1".into()]).await.unwrap();
    wait_until("ack of q1", Duration::from_secs(5), || async {
        (stats(&room).await.pending_qos1 == 1).then_some(())
    })
    .await
    .unwrap();
    drop(c);
    wait_until("close seen", Duration::from_secs(5), || async {
        (stats(&room).await.connections == 0).then_some(())
    })
    .await
    .unwrap();
    // Another device of the same user does not get it.
    let (_other, w) = room.login(Transport::Tcp, "demo", "r", Some("d2")).await;
    assert_eq!(w.resumed, 0);
    let (mut again, w) = room
        .login(Transport::WsBinary, "demo", "r", Some("d1"))
        .await;
    assert_eq!(w.resumed, 1);
    assert!(matches!(next(&mut again).await, Some(Frame::Message(m)) if m.id == "q2"));
}

#[tokio::test]
async fn websocket_path_must_be_ws() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let r = Connection::connect_path(&room.ws.to_string(), Transport::WsBinary, "/other").await;
    assert!(r.is_err(), "only /ws upgrades");
}

#[tokio::test]
async fn frames_sent_with_auth_in_one_packet_are_processed_after_welcome() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let mut s = tokio::net::TcpStream::connect(room.tcp).await.unwrap();
    let mut bytes = Frame::Auth(clientpb::Auth {
        token: token("demo", "p", None, SECRET),
    })
    .encode()
    .to_vec();
    bytes.extend_from_slice(&Frame::Ping.encode());
    // Split mid-frame to exercise partial reads.
    let (a, b) = bytes.split_at(7);
    s.write_all(a).await.unwrap();
    s.flush().await.unwrap();
    tokio::task::yield_now().await;
    s.write_all(b).await.unwrap();
    let mut buf = bytes::BytesMut::new();
    let mut got = vec![];
    while got.len() < 2 {
        if let frame::Parsed::Frame(f, n) = frame::parse(&buf, 1 << 20).unwrap() {
            let _ = buf.split_to(n);
            got.push(f);
            continue;
        }
        s.read_buf(&mut buf).await.unwrap();
    }
    assert!(matches!(got[0], Frame::Welcome(_)));
    assert_eq!(got[1], Frame::Pong);
}

#[tokio::test]
async fn qos1_for_a_user_between_connections_waits_for_the_resume() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let (c, _) = room.login(Transport::Tcp, "demo", "p", Some("d1")).await;
    let mut grpc = room.grpc().await;
    drop(c);
    wait_until("close seen", Duration::from_secs(5), || async {
        (stats(&room).await.connections == 0).then_some(())
    })
    .await
    .unwrap();
    // Nothing pending yet, so nothing was parked for a resume: QoS 0 and QoS 1 both miss...
    let missed = grpc
        .push(roompb::PushRequest {
            items: vec![to_user("demo", "p", msg("early", 1, "0"))],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((missed.delivered, missed.not_found), (0, 1));

    // ... unless the closed session left unacked messages (a resumable session exists).
    let (mut c, _) = room.login(Transport::Tcp, "demo", "p", Some("d1")).await;
    grpc.push(roompb::PushRequest {
        items: vec![to_user("demo", "p", msg("first", 1, "1"))],
    })
    .await
    .unwrap();
    assert!(matches!(next(&mut c).await, Some(Frame::Message(m)) if m.id == "first"));
    drop(c);
    wait_until("close seen", Duration::from_secs(5), || async {
        (stats(&room).await.connections == 0).then_some(())
    })
    .await
    .unwrap();
    let parked = grpc
        .push(roompb::PushRequest {
            items: vec![
                to_user("demo", "p", msg("while-away", 1, "2")),
                to_user("demo", "p", msg("qos0-away", 0, "3")),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (parked.delivered, parked.not_found),
        (1, 1),
        "QoS 1 parked, QoS 0 not"
    );
    let (mut back, w) = room.login(Transport::Tcp, "demo", "p", Some("d1")).await;
    assert_eq!(w.resumed, 2);
    for id in ["first", "while-away"] {
        assert!(matches!(next(&mut back).await, Some(Frame::Message(m)) if m.id == id));
    }
}

#[tokio::test]
async fn a_device_reconnecting_before_its_old_connection_closed_takes_over_its_messages() {
    let room = TestRoom::start(RoomLimits::default()).await;
    let (mut old, _) = room.login(Transport::Tcp, "demo", "t", Some("d1")).await;
    let mut grpc = room.grpc().await;
    grpc.push(roompb::PushRequest {
        items: vec![to_user("demo", "t", msg("unacked", 1, "1"))],
    })
    .await
    .unwrap();
    assert!(matches!(next(&mut old).await, Some(Frame::Message(m)) if m.id == "unacked"));
    // The same device authenticates again while the room still holds the old connection.
    let (mut new, w) = room.login(Transport::Tcp, "demo", "t", Some("d1")).await;
    assert_eq!(w.resumed, 1);
    assert!(matches!(next(&mut new).await, Some(Frame::Message(m)) if m.id == "unacked"));
    assert!(matches!(next(&mut old).await, Some(Frame::Kick(_))));
    // A token without a device never takes over another connection.
    let (_a, _) = room.login(Transport::Tcp, "demo", "n", None).await;
    let (_b, w) = room.login(Transport::Tcp, "demo", "n", None).await;
    assert_eq!(w.resumed, 0);
    wait_until(
        "both device-less connections open",
        Duration::from_secs(5),
        || async { (stats(&room).await.connections == 3).then_some(()) },
    )
    .await
    .unwrap();
}
