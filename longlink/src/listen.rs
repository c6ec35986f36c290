//! `longlink listen`: behaves like a device. Asks center's dispatch for rooms, connects over TCP
//! with a token minted from the app's secret, prints every message and acks it (the client acks
//! QoS 1 messages as they arrive).

use std::time::Duration;

use anyhow::Context;
use longlink_client::Client;
use longlink_client::ClientConfig;
use longlink_client::Transport;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

pub struct Args {
    pub app: String,
    pub user: String,
    pub device: String,
    pub center: String,
    pub keeper: Vec<String>,
    pub json: bool,
    pub count: Option<u64>,
}

#[derive(Deserialize)]
struct Dispatch {
    rooms: Vec<DispatchRoom>,
}

#[derive(Deserialize)]
struct DispatchRoom {
    id: String,
    tcp: Option<String>,
}

pub async fn run(args: Args, shutdown: CancellationToken) -> anyhow::Result<()> {
    let token = crate::token::mint(
        &args.keeper,
        &args.app,
        &args.user,
        Some(&args.device),
        Duration::from_secs(24 * 3600),
    )
    .await?;
    let url = format!("http://{}/v1/dispatch", args.center);
    let dispatch: Dispatch = reqwest::Client::new()
        .get(&url)
        .query(&[("app", &args.app), ("user", &args.user)])
        .send()
        .await
        .with_context(|| format!("asking {url} for rooms"))?
        .error_for_status()?
        .json()
        .await?;
    let addrs: Vec<String> = dispatch
        .rooms
        .iter()
        .filter_map(|r| r.tcp.clone())
        .collect();
    anyhow::ensure!(
        !addrs.is_empty(),
        "center knows no live room with a TCP address"
    );
    let mut config = ClientConfig::new(addrs[0].clone(), Transport::Tcp, token);
    config.addrs = addrs;
    let mut client = Client::connect(config).await?;
    let conn_id = client.welcome().map(|w| w.conn_id).unwrap_or_default();
    eprintln!(
        "listening as {}/{} on room {} (conn {conn_id}); Ctrl-C stops",
        args.app, args.user, dispatch.rooms[0].id
    );
    let mut received = 0;
    loop {
        let message = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            m = client.next() => m?,
        };
        let payload = String::from_utf8_lossy(&message.payload);
        if args.json {
            let payload: serde_json::Value = serde_json::from_slice(&message.payload)
                .unwrap_or_else(|_| serde_json::Value::String(payload.to_string()));
            let line = serde_json::json!({
                "id": message.id,
                "app": message.app,
                "qos": message.qos,
                "ts": message.ts,
                "payload": payload,
            });
            println!("{line}");
        } else {
            println!("message {} (qos {}): {payload}", message.id, message.qos);
        }
        received += 1;
        if args.count.is_some_and(|n| received >= n) {
            return Ok(());
        }
    }
}
