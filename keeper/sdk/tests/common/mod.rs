//! Helpers for the SDK's integration tests: a real 3-node keeper, SDK clients on it, and
//! config pushes written raw, the way keeperctl writes them.
#![allow(dead_code)]

use std::path::PathBuf;
use std::time::Duration;

use keeper_sdk::ConnectOptions;
use keeper_sdk::Keeper;
use keeper_sdk::layout;
use keeper_sdk::layout::AppliedReport;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::Format;
use testkit::KeeperCluster;

pub async fn cluster() -> anyhow::Result<KeeperCluster> {
    KeeperCluster::start(&testkit::bin("keeper"), 3, "").await
}

/// Endpoints of the running nodes with node `first` first (the SDK starts on the first one).
pub fn endpoints_starting_with(cluster: &KeeperCluster, first: u64) -> Vec<String> {
    let mut eps = vec![cluster.node(first).addr.clone()];
    eps.extend(
        cluster
            .nodes
            .iter()
            .filter(|n| n.id != first)
            .map(|n| n.addr.clone()),
    );
    eps
}

pub async fn connect(endpoints: Vec<String>, instance: &str, ttl: i64) -> anyhow::Result<Keeper> {
    let opts = ConnectOptions {
        endpoints,
        instance: Some(instance.to_string()),
        request_timeout: Duration::from_secs(15),
        lease_ttl_s: ttl,
    };
    Ok(Keeper::connect_with(opts).await?)
}

pub fn document(version: u64, format: Format, body: &str) -> ConfigDocument {
    ConfigDocument {
        version,
        format,
        body: body.to_string(),
        updated_at: layout::now_rfc3339(),
        author: "test".into(),
    }
}

/// Writes version `version` as keeperctl does (current + history), without any validation.
pub async fn push(
    keeper: &Keeper,
    service: &str,
    version: u64,
    format: Format,
    body: &str,
) -> anyhow::Result<()> {
    let doc = serde_json::to_vec(&document(version, format, body))?;
    keeper
        .put(&layout::config_history_key(service, version), doc.clone())
        .await?;
    keeper.put(&layout::config_key(service), doc).await?;
    Ok(())
}

pub async fn applied(keeper: &Keeper, service: &str, instance: &str) -> Option<AppliedReport> {
    let kv = keeper
        .get(&layout::applied_key(service, instance))
        .await
        .ok()??;
    kv.json().ok()
}

/// Waits until `/applied/{service}/{instance}` reports `version`, and returns the report.
pub async fn wait_applied(
    keeper: &Keeper,
    service: &str,
    instance: &str,
    version: u64,
) -> anyhow::Result<AppliedReport> {
    testkit::wait_until(
        &format!("{instance} to report version {version} of {service}"),
        Duration::from_secs(20),
        || async move {
            applied(keeper, service, instance)
                .await
                .filter(|r| r.version == version)
        },
    )
    .await
}

/// An example binary of this crate (cargo builds examples along with the tests).
pub fn example(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable");
    let dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable in <target>/<profile>/deps");
    let path = dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build -p keeper-sdk --examples` first",
        path.display()
    );
    path
}
