//! `center::run` against a real keeper process: apps config, room discovery and the center's own
//! registration all go through the keeper, and config changes apply live.
//! Needs the keeper binary (`cargo build -p keeper`).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use center::CenterConfig;
use common::two_apps;
use keeper_sdk::Keeper;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::Format;
use keeper_sdk::layout::InstanceInfo;
use longlink_common::AppsConfig;
use tokio_util::sync::CancellationToken;

async fn push_apps(keeper: &Keeper, version: u64, apps: &AppsConfig) {
    let doc = ConfigDocument {
        version,
        format: Format::Json,
        body: serde_json::to_string(apps).unwrap(),
        updated_at: "2026-01-01T00:00:00Z".into(),
        author: "test".into(),
    };
    keeper
        .put("/config/apps", serde_json::to_vec(&doc).unwrap())
        .await
        .unwrap();
}

/// GET `path`: (status, body), or `None` when the server is not reachable (yet).
async fn get(
    http: &reqwest::Client,
    base: &str,
    path: &str,
    key: Option<&str>,
) -> Option<(u16, String)> {
    let mut req = http.get(format!("{base}{path}"));
    if let Some(k) = key {
        req = req.header("authorization", format!("Bearer {k}"));
    }
    let r = req.send().await.ok()?;
    Some((r.status().as_u16(), r.text().await.unwrap_or_default()))
}

/// A one-node keeper with the two test apps pushed: the cluster, a client, its endpoints.
async fn keeper_with_apps() -> (testkit::KeeperCluster, Keeper, Vec<String>) {
    let cluster = testkit::KeeperCluster::start(&testkit::bin("keeper"), 1, "")
        .await
        .unwrap();
    let endpoints = cluster.endpoints();
    let keeper = Keeper::connect(&endpoints).await.unwrap();
    push_apps(&keeper, 1, &two_apps()).await;
    (cluster, keeper, endpoints)
}

/// A center `center-t` on free loopback ports, following the keeper at `endpoints`.
fn center_config(endpoints: &[String]) -> CenterConfig {
    CenterConfig {
        id: "center-t".into(),
        http: format!("127.0.0.1:{}", testkit::free_port())
            .parse()
            .unwrap(),
        grpc: format!("127.0.0.1:{}", testkit::free_port())
            .parse()
            .unwrap(),
        keeper: endpoints.to_vec(),
        ..CenterConfig::default()
    }
}

#[tokio::test]
async fn run_follows_the_keeper_and_registers_itself() {
    let (_cluster, keeper, endpoints) = keeper_with_apps().await;
    let room = InstanceInfo {
        id: "room-7".into(),
        addrs: BTreeMap::from([
            ("tcp".into(), "127.0.0.1:7100".into()),
            ("ws".into(), "127.0.0.1:7101".into()),
            ("grpc".into(), "127.0.0.1:7102".into()),
        ]),
        zone: String::new(),
        started_at: "2026-01-01T00:00:00Z".into(),
        meta: BTreeMap::new(),
        lease: 0,
    };
    keeper
        .put("/instances/room/room-7", serde_json::to_vec(&room).unwrap())
        .await
        .unwrap();

    let config = center_config(&endpoints);
    let base = format!("http://{}", config.http);
    let shutdown = CancellationToken::new();
    let running = tokio::spawn(center::run(config, shutdown.clone()));
    let http = reqwest::Client::new();
    let (http, base, keeper) = (&http, base.as_str(), &keeper);
    testkit::wait_until("center serving", Duration::from_secs(20), || async move {
        get(http, base, "/healthz", None)
            .await
            .filter(|(s, _)| *s == 200)
    })
    .await
    .unwrap();

    // Registered in discovery with both addresses.
    let kv = testkit::wait_until(
        "center registered",
        Duration::from_secs(10),
        || async move {
            keeper
                .get("/instances/center/center-t")
                .await
                .ok()
                .flatten()
        },
    )
    .await
    .unwrap();
    let info: InstanceInfo = kv.json().unwrap();
    assert!(info.addrs.contains_key("http") && info.addrs.contains_key("grpc"));

    // Rooms come from discovery, apps from the config.
    let (status, body) = get(http, base, "/v1/dispatch?app=demo&user=alice", None)
        .await
        .unwrap();
    assert_eq!(status, 200, "{body}");
    assert!(
        body.contains("room-7") && body.contains("127.0.0.1:7101"),
        "{body}"
    );
    let (status, _) = get(http, base, "/v1/apps/demo/broadcasts/b-x", Some("k-demo"))
        .await
        .unwrap();
    assert_eq!(status, 404, "authorized, no such broadcast");

    // A new apps version without demo's key applies live.
    let mut apps = two_apps();
    apps.apps[0].api_keys = vec!["k-demo-2".into()];
    push_apps(keeper, 2, &apps).await;
    testkit::wait_until("old key refused", Duration::from_secs(10), || async move {
        get(http, base, "/v1/apps/demo/broadcasts/b-x", Some("k-demo"))
            .await
            .filter(|(s, _)| *s == 401)
    })
    .await
    .unwrap();

    // A room leaving discovery leaves dispatch.
    keeper
        .delete("/instances/room/room-7", false)
        .await
        .unwrap();
    testkit::wait_until("room gone", Duration::from_secs(10), || async move {
        get(http, base, "/v1/dispatch?app=demo&user=alice", None)
            .await
            .filter(|(s, _)| *s == 503)
    })
    .await
    .unwrap();

    shutdown.cancel();
    running.await.unwrap().unwrap();
    assert!(
        keeper
            .get("/instances/center/center-t")
            .await
            .unwrap()
            .is_none(),
        "deregistered on shutdown"
    );
}

/// POSTs a push whose body is `size` bytes; returns the status and body.
async fn post_push(http: &reqwest::Client, base: &str, size: usize) -> (u16, String) {
    let filler = "x".repeat(size.saturating_sub(60));
    let body = format!(r#"{{"users":["alice"],"payload":{{"f":"{filler}"}},"qos":0}}"#);
    let r = http
        .post(format!("{base}/v1/apps/demo/push"))
        .header("authorization", "Bearer k-demo")
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    (r.status().as_u16(), r.text().await.unwrap_or_default())
}

/// `keeperctl config push center FILE --wait`, without blocking the runtime the center runs on.
async fn keeperctl_push(
    endpoints: &[String],
    dir: &std::path::Path,
    body: &str,
) -> std::process::Output {
    let file = dir.join("center.toml");
    std::fs::write(&file, body).unwrap();
    tokio::process::Command::new(testkit::bin("keeperctl"))
        .args(["--endpoints", &endpoints.join(",")])
        .args(["config", "push", "center", file.to_str().unwrap()])
        .args(["--wait", "--timeout", "30"])
        .output()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn typed_config_center_applies_live_and_bad_versions_are_refused() {
    let (_cluster, _keeper, endpoints) = keeper_with_apps().await;
    let config = center_config(&endpoints);
    let base = format!("http://{}", config.http);
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    tokio::spawn(center::run(config, shutdown.clone()));
    let http = reqwest::Client::new();
    testkit::wait_until("center serving", Duration::from_secs(20), || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            get(&http, &base, "/healthz", None)
                .await
                .filter(|(s, _)| *s == 200)
        }
    })
    .await
    .unwrap();
    // Under the default 1 MiB limit a 3000-byte body is read (and answered for other reasons).
    assert_ne!(post_push(&http, &base, 3000).await.0, 413);

    let dir = tempfile::tempdir().unwrap();
    let pushed = keeperctl_push(&endpoints, dir.path(), "max_body_bytes = 2048\n").await;
    assert!(pushed.status.success(), "{pushed:?}");
    // The SDK reports a version applied when the center's handle has it; the center takes it
    // from there within moments.
    let body = testkit::wait_until("the 2048-byte limit", Duration::from_secs(5), || {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let (status, body) = post_push(&http, &base, 3000).await;
            (status == 413).then_some(body)
        }
    })
    .await
    .unwrap();
    assert!(body.contains("2048"), "the error names the limit: {body}");

    // Valid TOML that fails validation: refused, reported to --wait, the 2048 limit stays.
    let refused = keeperctl_push(&endpoints, dir.path(), "max_body_bytes = 10\n").await;
    assert!(!refused.status.success());
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("max_body_bytes"), "{stderr}");
    assert_eq!(post_push(&http, &base, 3000).await.0, 413);
    assert_ne!(post_push(&http, &base, 1500).await.0, 413);
}
