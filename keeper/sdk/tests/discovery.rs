//! Registration and discovery against a real 3-node keeper: revoke on drop, expiry after the
//! owner dies, survival across a leader kill, and re-registration after a lease loss.

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use keeper_sdk::Instance;
use keeper_sdk::layout;

fn instance(id: &str) -> Instance {
    Instance {
        id: id.into(),
        addrs: BTreeMap::from([("grpc".to_string(), "127.0.0.1:7102".to_string())]),
        zone: "z1".into(),
        meta: BTreeMap::new(),
    }
}

fn ids(d: &keeper_sdk::Discovery) -> Vec<String> {
    d.instances().iter().map(|i| i.id.clone()).collect()
}

#[tokio::test]
async fn discover_sees_registration_and_its_removal_on_drop() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    // A long TTL: the key can only vanish quickly through the revoke on drop.
    let owner = connect(cluster.endpoints(), "owner", 60).await?;
    let watcher = connect(cluster.endpoints(), "watcher", 60).await?;
    let mut discovery = watcher.discover("room").await?;
    assert!(discovery.instances().is_empty());

    let reg = owner.register("room", instance("r1")).await?;
    assert!(reg.lease_id() != 0);
    let seen = tokio::time::timeout(Duration::from_secs(5), discovery.changed()).await??;
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].id, "r1");
    assert_eq!(seen[0].addrs["grpc"], "127.0.0.1:7102");
    assert_eq!(seen[0].zone, "z1");
    assert_eq!(seen[0].lease, reg.lease_id(), "the lease the key is on");
    let loaded = watcher.discover("room").await?;
    assert_eq!(loaded.instances()[0].lease, reg.lease_id());
    assert!(!*reg.lost().borrow());

    let second = owner.register("room", instance("r2")).await?;
    testkit::wait_until("r2 discovered", Duration::from_secs(5), || {
        let d = &discovery;
        async move { (ids(d) == ["r1", "r2"]).then_some(()) }
    })
    .await?;

    drop(reg);
    testkit::wait_until("r1 gone after drop", Duration::from_secs(5), || {
        let d = &discovery;
        async move { (ids(d) == ["r2"]).then_some(()) }
    })
    .await?;
    second.shutdown().await?;
    assert!(
        owner
            .get(&layout::instance_key("room", "r2"))
            .await?
            .is_none()
    );
    Ok(())
}

#[tokio::test]
async fn registration_of_a_killed_process_expires_after_its_ttl() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let watcher = connect(cluster.endpoints(), "watcher", 10).await?;
    let discovery = watcher.discover("svc").await?;
    let log = cluster.dir.path().join("child.log");
    let mut child = testkit::Process::start(
        "sdk_child",
        &example("sdk_child"),
        &[
            "--endpoints".into(),
            cluster.endpoints().join(","),
            "--register".into(),
            "svc:child-1".into(),
            "--ttl".into(),
            "2".into(),
        ],
        &log,
        &[],
    )?;
    testkit::wait_until("child registered", Duration::from_secs(20), || {
        let d = &discovery;
        async move { (ids(d) == ["child-1"]).then_some(()) }
    })
    .await?;
    let kv = watcher
        .get(&layout::instance_key("svc", "child-1"))
        .await?
        .expect("registered");
    assert!(kv.lease != 0, "instance keys are leased");

    // kill -9: nothing revokes the lease; only its TTL ends it.
    child.kill9();
    testkit::wait_until("child gone after its TTL", Duration::from_secs(15), || {
        let d = &discovery;
        async move { ids(d).is_empty().then_some(()) }
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn registration_survives_leader_kill_and_comes_back_after_revoke() -> anyhow::Result<()> {
    let mut cluster = cluster().await?;
    let leader = cluster.leader().await?;
    let owner = connect(endpoints_starting_with(&cluster, leader), "owner", 5).await?;
    let reg = owner.register("svc", instance("keep-me")).await?;
    let first_lease = reg.lease_id();

    cluster.kill9(leader);
    cluster.leader().await?;
    let watcher = connect(cluster.endpoints(), "watcher", 5).await?;
    let discovery = watcher.discover("svc").await?;
    // Several TTLs after the kill, the registration is still there on the same lease:
    // keep-alives moved to a surviving node.
    tokio::time::sleep(Duration::from_secs(2 * 5)).await;
    assert_eq!(ids(&discovery), ["keep-me"]);
    let kv = watcher
        .get(&layout::instance_key("svc", "keep-me"))
        .await?
        .expect("still registered");
    assert_eq!(kv.lease, first_lease);
    assert_eq!(discovery.instances()[0].lease, first_lease);
    assert!(!*reg.lost().borrow());

    // Revoked behind its back: the key goes, then comes back on a new lease.
    watcher.lease_revoke(first_lease).await?;
    let renewed = testkit::wait_until(
        "re-registered on a new lease",
        Duration::from_secs(15),
        || {
            let w = &watcher;
            async move {
                let kv = w
                    .get(&layout::instance_key("svc", "keep-me"))
                    .await
                    .ok()??;
                (kv.lease != first_lease).then_some(kv.lease)
            }
        },
    )
    .await?;
    assert_eq!(reg.lease_id(), renewed);
    testkit::wait_until(
        "discovery shows it again, on the new lease",
        Duration::from_secs(5),
        || {
            let d = &discovery;
            async move {
                let list = d.instances();
                (list.len() == 1 && list[0].lease == renewed).then_some(())
            }
        },
    )
    .await?;
    Ok(())
}
