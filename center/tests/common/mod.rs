//! Test harness: a center served on 127.0.0.1:0 whose inputs (apps, rooms, registers, slot
//! map) are channels the test drives, plus a small HTTP client.
#![allow(dead_code)]

pub mod hook;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;

use center::CenterConfig;
use center::Inputs;
use center::rooms::Room;
use center::server::Listeners;
use longlink_common::App;
use longlink_common::AppsConfig;
use longlink_common::SlotMap;
use longlink_common::apps::RateLimit;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

pub struct Harness {
    pub http: SocketAddr,
    pub grpc: SocketAddr,
    pub center: Arc<center::Center>,
    pub apps: watch::Sender<Arc<AppsConfig>>,
    pub rooms: watch::Sender<Arc<Vec<Room>>>,
    pub registers: watch::Sender<Arc<BTreeMap<String, String>>>,
    pub slots: watch::Sender<Arc<SlotMap>>,
    pub shutdown: CancellationToken,
    pub served: tokio::task::JoinHandle<center::Result<()>>,
    pub client: reqwest::Client,
}

pub fn app(id: &str, key: &str) -> App {
    App {
        id: id.into(),
        secret: format!("{id}-secret"),
        api_keys: vec![key.into()],
        webhook_url: None,
        rate_limit: RateLimit::default(),
    }
}

/// The usual two apps: `demo` (key `k-demo`) and `other` (key `k-other`).
pub fn two_apps() -> AppsConfig {
    AppsConfig {
        apps: vec![app("demo", "k-demo"), app("other", "k-other")],
    }
}

pub fn test_config() -> CenterConfig {
    let mut config = CenterConfig {
        http: "127.0.0.1:0".parse().unwrap(),
        grpc: "127.0.0.1:0".parse().unwrap(),
        ..CenterConfig::default()
    };
    config.webhook.backoff_initial_ms = 10;
    config.webhook.backoff_max_ms = 50;
    config.webhook.timeout_ms = 2_000;
    config.fanout.rpc_timeout_ms = 2_000;
    config
}

pub async fn start(config: CenterConfig, apps: AppsConfig, rooms: Vec<Room>) -> Harness {
    let (apps_tx, apps_rx) = watch::channel(Arc::new(apps));
    let (rooms_tx, rooms_rx) = center::rooms::channel(rooms);
    let (registers_tx, registers_rx) = watch::channel(Arc::new(BTreeMap::new()));
    let (slots_tx, slots_rx) = watch::channel(Arc::new(SlotMap::empty()));
    let shutdown = CancellationToken::new();
    let listeners = Listeners::bind(&config).await.expect("bind");
    let http = listeners.http.local_addr().unwrap();
    let grpc = listeners.grpc.local_addr().unwrap();
    let center = center::Center::new(
        config,
        Inputs {
            apps: apps_rx,
            rooms: rooms_rx,
            registers: registers_rx,
            slots: slots_rx,
        },
        shutdown.clone(),
    );
    let served = tokio::spawn(center::serve(
        center.clone(),
        listeners,
        telemetry::prometheus(),
        shutdown.clone(),
    ));
    Harness {
        http,
        grpc,
        center,
        apps: apps_tx,
        rooms: rooms_tx,
        registers: registers_tx,
        slots: slots_tx,
        shutdown,
        served,
        client: reqwest::Client::new(),
    }
}

/// A response: status, headers, body parsed as JSON when it is JSON.
pub struct Answer {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub json: serde_json::Value,
    pub text: String,
}

impl Answer {
    /// Asserts the error shape and code, returns the message.
    pub fn error(&self, status: u16, code: &str) -> String {
        assert_eq!(self.status, status, "body: {}", self.text);
        assert_eq!(self.json["error"]["code"], code, "body: {}", self.text);
        let message = self.json["error"]["message"].as_str().expect("message");
        assert!(!message.is_empty());
        assert_eq!(
            self.json.as_object().unwrap().len(),
            1,
            "only `error`: {}",
            self.text
        );
        message.to_owned()
    }
}

impl Harness {
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.http)
    }

    pub async fn send(
        &self,
        method: &str,
        path: &str,
        key: Option<&str>,
        body: Option<String>,
    ) -> Answer {
        let mut req = self.client.request(method.parse().unwrap(), self.url(path));
        if let Some(key) = key {
            req = req.header("authorization", format!("Bearer {key}"));
        }
        if let Some(body) = body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.expect("request");
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.expect("body");
        let json = serde_json::from_str(&text).unwrap_or(serde_json::Value::Null);
        Answer {
            status,
            headers,
            json,
            text,
        }
    }

    pub async fn get(&self, path: &str, key: Option<&str>) -> Answer {
        self.send("GET", path, key, None).await
    }

    pub async fn post(&self, path: &str, key: Option<&str>, body: serde_json::Value) -> Answer {
        self.send("POST", path, key, Some(body.to_string())).await
    }

    pub async fn stop(self) {
        self.shutdown.cancel();
        self.served.await.unwrap().unwrap();
    }
}

pub fn room(i: usize) -> Room {
    Room {
        id: format!("room-{i}"),
        tcp: Some(format!("127.0.0.1:{}", 17100 + i)),
        ws: Some(format!("127.0.0.1:{}", 17200 + i)),
        grpc: Some(format!("127.0.0.1:{}", 17300 + i)),
    }
}
