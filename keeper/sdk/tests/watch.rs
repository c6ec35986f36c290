//! Raw watches against a real 3-node keeper: no gap and no repeat across a kill of the node the
//! watch is on; a start below the compacted history is a typed error.

mod common;

use std::time::Duration;

use common::*;
use keeper_sdk::Error;
use keeper_sdk::EventKind;

#[tokio::test]
async fn watch_resumes_without_gaps_after_its_node_is_killed() -> anyhow::Result<()> {
    let mut cluster = cluster().await?;
    let leader = cluster.leader().await?;
    let watcher = connect(endpoints_starting_with(&cluster, leader), "w", 10).await?;
    let mut events = watcher.watch_prefix("/w/", 0).await?;
    for i in 0..5 {
        watcher.put(&format!("/w/{i}"), format!("{i}")).await?;
    }
    let mut seen = Vec::new();
    while seen.len() < 5 {
        let batch = tokio::time::timeout(Duration::from_secs(10), events.next()).await??;
        seen.extend(batch);
    }
    cluster.kill9(leader);
    let writer = connect(cluster.endpoints(), "writer", 10).await?;
    for i in 5..10 {
        writer.put(&format!("/w/{i}"), format!("{i}")).await?;
    }
    writer.delete("/w/0", false).await?;
    while seen.len() < 11 {
        let batch = tokio::time::timeout(Duration::from_secs(20), events.next()).await??;
        seen.extend(batch);
    }
    let keys: Vec<String> = seen.iter().map(|e| e.kv.key.clone()).collect();
    let mut expected: Vec<String> = (0..10).map(|i| format!("/w/{i}")).collect();
    expected.push("/w/0".into());
    assert_eq!(keys, expected, "every event once, in order");
    assert_eq!(seen[10].kind, EventKind::Delete);
    assert!(seen.windows(2).all(|w| w[0].revision < w[1].revision));
    assert_eq!(events.revision(), seen[10].revision);
    Ok(())
}

#[tokio::test]
async fn watching_compacted_history_is_a_typed_error() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let k = connect(cluster.endpoints(), "w", 10).await?;
    for i in 0..5 {
        k.put("/c/key", format!("{i}")).await?;
    }
    let last = k.put("/c/key", "last").await?;
    k.clients()
        .kv
        .compact(longlink_proto::etcdserverpb::CompactionRequest {
            revision: last,
            physical: false,
        })
        .await?;
    let mut events = k.watch_prefix("/c/", 2).await?;
    let r = tokio::time::timeout(Duration::from_secs(10), events.next()).await?;
    assert!(
        matches!(r, Err(Error::Compacted { compact_revision }) if compact_revision >= last - 1),
        "{r:?}"
    );
    Ok(())
}
