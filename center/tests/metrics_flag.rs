//! The `center` binary with `--metrics ADDR`: one recorder, rendered both by the API's own
//! `GET /metrics` and by the `--metrics` listener, so both show the same request counters.

mod common;

use std::time::Duration;

use keeper_sdk::Keeper;
use keeper_sdk::layout;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::Format;
use testkit::Process;
use testkit::free_port;
use testkit::wait_until;

async fn body(url: String) -> Option<String> {
    let r = reqwest::get(url).await.ok()?;
    r.status().is_success().then_some(())?;
    r.text().await.ok()
}

#[tokio::test(flavor = "multi_thread")]
async fn metrics_flag_serves_the_same_recorder_as_the_api() {
    let keepers = testkit::KeeperCluster::start(&testkit::bin("keeper"), 1, "")
        .await
        .unwrap();
    let endpoints = keepers.endpoints();
    let keeper = Keeper::connect(&endpoints).await.unwrap();
    let doc = ConfigDocument {
        version: 1,
        format: Format::Json,
        body: serde_json::to_string(&common::two_apps()).unwrap(),
        updated_at: layout::now_rfc3339(),
        author: "test".into(),
    };
    keeper
        .put(
            &layout::config_key("apps"),
            serde_json::to_vec(&doc).unwrap(),
        )
        .await
        .unwrap();
    let (http, metrics) = (free_port(), free_port());
    let args: Vec<String> = [
        "--id",
        "center-m",
        "--http",
        &format!("127.0.0.1:{http}"),
        "--grpc",
        &format!("127.0.0.1:{}", free_port()),
        "--keeper",
        &endpoints.join(","),
        "--metrics",
        &format!("127.0.0.1:{metrics}"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _center = Process::start(
        "center",
        &testkit::bin("center"),
        &args,
        &keepers.dir.path().join("center.log"),
        &[],
    )
    .unwrap();
    let api = format!("http://127.0.0.1:{http}");
    wait_until("center serving", Duration::from_secs(30), || {
        body(format!("{api}/healthz"))
    })
    .await
    .unwrap();
    // An unauthorized request: counted under its route and status.
    let answer = reqwest::get(format!("{api}/v1/apps/demo/users/alice"))
        .await
        .unwrap();
    assert_eq!(answer.status(), 401);
    let wanted = "center_http_requests_total";
    let (own, flag) = wait_until(
        "both renderings to count it",
        Duration::from_secs(10),
        || {
            let (own, flag) = (
                format!("{api}/metrics"),
                format!("http://127.0.0.1:{metrics}/metrics"),
            );
            async move {
                let own = body(own).await?;
                let flag = body(flag).await?;
                (own.contains(wanted) && flag.contains(wanted)).then_some((own, flag))
            }
        },
    )
    .await
    .unwrap();
    let line = |text: &str| {
        text.lines()
            .find(|l| l.starts_with(wanted) && l.contains("status=\"401\""))
            .map(str::to_string)
    };
    assert!(line(&own).is_some(), "{own}");
    assert_eq!(
        line(&own),
        line(&flag),
        "one recorder behind both listeners"
    );
}
