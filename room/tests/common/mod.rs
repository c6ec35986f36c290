//! Shared helpers for room's integration tests: an in-process room on loopback ports with its
//! config in test-owned watch channels, tokens, and a gRPC client.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use longlink_client::Connection;
use longlink_client::Frame;
use longlink_client::Transport;
use longlink_common::App;
use longlink_common::AppsConfig;
use longlink_proto::roompb;
use longlink_proto::roompb::room_client::RoomClient;
use room::RoomConfig;
use room::RoomLimits;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub const SECRET: &str = "demo-secret";
pub const OTHER_SECRET: &str = "other-secret";

pub fn apps() -> AppsConfig {
    let app = |id: &str, secret: &str| App {
        id: id.into(),
        secret: secret.into(),
        api_keys: vec![],
        webhook_url: None,
        rate_limit: Default::default(),
    };
    AppsConfig {
        apps: vec![app("demo", SECRET), app("other", OTHER_SECRET)],
    }
}

/// A room running in this process; stopped on drop.
pub struct TestRoom {
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub grpc: SocketAddr,
    pub limits: watch::Sender<Arc<RoomLimits>>,
    pub apps: watch::Sender<Arc<AppsConfig>>,
    pub shutdown: CancellationToken,
    pub hub: Arc<room::Hub>,
}

impl Drop for TestRoom {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl TestRoom {
    pub async fn start(limits: RoomLimits) -> TestRoom {
        let (ltx, lrx) = watch::channel(Arc::new(limits));
        let (atx, arx) = watch::channel(Arc::new(apps()));
        let config = RoomConfig {
            id: "room-test".into(),
            tcp: "127.0.0.1:0".parse().unwrap(),
            ws: "127.0.0.1:0".parse().unwrap(),
            grpc: "127.0.0.1:0".parse().unwrap(),
            keeper: vec![],
            advertise_host: None,
        };
        let shutdown = CancellationToken::new();
        let running = room::start(
            &config,
            room::Sources {
                limits: lrx,
                apps: arx,
            },
            room::Hooks::default(),
            shutdown.clone(),
        )
        .await
        .expect("room starts");
        TestRoom {
            tcp: running.tcp,
            ws: running.ws,
            grpc: running.grpc,
            limits: ltx,
            apps: atx,
            shutdown,
            hub: running.hub.clone(),
        }
    }

    pub fn addr(&self, t: Transport) -> String {
        match t {
            Transport::Tcp => self.tcp.to_string(),
            _ => self.ws.to_string(),
        }
    }

    /// Changes the live limits.
    pub fn set_limits(&self, f: impl FnOnce(&mut RoomLimits)) {
        let mut l = (**self.limits.borrow()).clone();
        f(&mut l);
        self.limits.send_replace(Arc::new(l));
    }

    pub async fn grpc(&self) -> RoomClient<tonic::transport::Channel> {
        RoomClient::connect(format!("http://{}", self.grpc))
            .await
            .expect("grpc connects")
    }

    /// An authenticated connection of (demo, user, device).
    pub async fn login(
        &self,
        t: Transport,
        app: &str,
        user: &str,
        dev: Option<&str>,
    ) -> (Connection, longlink_proto::clientpb::Welcome) {
        let mut c = Connection::connect(&self.addr(t), t)
            .await
            .expect("connect");
        let secret = if app == "other" { OTHER_SECRET } else { SECRET };
        let w = c
            .auth(&token(app, user, dev, secret))
            .await
            .expect("welcome");
        (c, w)
    }
}

pub fn token(app: &str, user: &str, dev: Option<&str>, secret: &str) -> String {
    longlink_client::token(app, user, dev, secret, Duration::from_secs(3600))
}

pub fn msg(id: &str, qos: u32, payload: &str) -> roompb::Message {
    roompb::Message {
        id: id.into(),
        qos,
        payload: payload.as_bytes().to_vec(),
        ts: 0,
    }
}

pub fn to_user(app: &str, user: &str, m: roompb::Message) -> roompb::PushItem {
    roompb::PushItem {
        conn_id: 0,
        app: app.into(),
        user: user.into(),
        message: Some(m),
    }
}

/// The next frame within 5 s.
pub async fn next(c: &mut Connection) -> Option<Frame> {
    tokio::time::timeout(Duration::from_secs(5), c.recv())
        .await
        .expect("a frame within 5 s")
        .expect("recv ok")
}

/// Expects an `error` frame with `code`, then the close.
pub async fn expect_error_then_close(c: &mut Connection, code: &str) -> String {
    let f = tokio::time::timeout(Duration::from_secs(10), c.recv())
        .await
        .expect("an answer within 10 s");
    let message = match f {
        Ok(Some(Frame::Error(e))) => {
            assert_eq!(e.code, code, "error frame {e:?}");
            e.message
        }
        other => panic!("expected error {code}, got {other:?}"),
    };
    let end = tokio::time::timeout(Duration::from_secs(5), c.recv())
        .await
        .expect("closed within 5 s");
    assert!(
        matches!(end, Ok(None) | Err(longlink_client::Error::Io(_))),
        "expected a closed socket after the error, got {end:?}"
    );
    message
}

pub async fn stats(r: &TestRoom) -> roompb::StatsResponse {
    r.grpc()
        .await
        .stats(roompb::StatsRequest {})
        .await
        .unwrap()
        .into_inner()
}
