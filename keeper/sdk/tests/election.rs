//! Leader election against a real 3-node keeper: one leader at a time, fencing revisions grow,
//! and an externally revoked lease ends leadership.

mod common;

use std::time::Duration;

use common::*;
use keeper_sdk::layout;

#[tokio::test]
async fn second_candidate_leads_with_a_larger_revision_after_resign() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let k1 = connect(cluster.endpoints(), "c1", 5).await?;
    let k2 = connect(cluster.endpoints(), "c2", 5).await?;
    let first = k1.elect("slots", "candidate-1").await?;
    assert!(first.is_leader());
    assert_eq!(k1.leader("slots").await?.as_deref(), Some("candidate-1"));

    let waiting = tokio::spawn(async move { k2.elect("slots", "candidate-2").await });
    // The second candidate's key shows up, but it does not lead while the first does.
    testkit::wait_until(
        "second candidate campaigning",
        Duration::from_secs(5),
        || {
            let k = &k1;
            async move {
                let (kvs, _) = k.get_prefix(&layout::election_prefix("slots")).await.ok()?;
                (kvs.len() == 2).then_some(())
            }
        },
    )
    .await?;
    assert!(!waiting.is_finished());
    assert_eq!(k1.leader("slots").await?.as_deref(), Some("candidate-1"));

    let first_revision = first.revision();
    first.resign().await?;
    let second = tokio::time::timeout(Duration::from_secs(10), waiting).await???;
    assert!(second.is_leader());
    assert!(
        second.revision() > first_revision,
        "fencing revision must grow"
    );
    assert_eq!(k1.leader("slots").await?.as_deref(), Some("candidate-2"));

    drop(second);
    testkit::wait_until("no leader after drop", Duration::from_secs(10), || {
        let k = &k1;
        async move { k.leader("slots").await.ok()?.is_none().then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn leadership_is_lost_when_its_lease_is_revoked() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let k = connect(cluster.endpoints(), "c1", 5).await?;
    let other = connect(cluster.endpoints(), "admin", 5).await?;
    let leading = k.elect("ctl", "me").await?;
    let (kvs, _) = other.get_prefix(&layout::election_prefix("ctl")).await?;
    let lease = kvs[0].lease;
    assert!(lease != 0);
    other.lease_revoke(lease).await?;
    tokio::time::timeout(Duration::from_secs(10), leading.lost()).await?;
    assert!(!leading.is_leader());
    Ok(())
}
