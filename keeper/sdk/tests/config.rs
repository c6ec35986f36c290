//! Typed config against a real 3-node keeper: delivery, rejection of bad documents, leader
//! failure, a dead endpoint, and gray releases.

mod common;

use std::time::Duration;

use common::*;
use keeper_sdk::Error;
use keeper_sdk::layout;
use keeper_sdk::layout::Canary;
use keeper_sdk::layout::Format;

/// No `deny_unknown_fields` on purpose: the SDK must refuse unknown fields by itself.
#[derive(Debug, PartialEq, serde::Deserialize, schemars::JsonSchema)]
struct Room {
    max_conns: u32,
    name: String,
}

#[derive(Debug, Default, PartialEq, serde::Deserialize, schemars::JsonSchema)]
#[serde(default)]
struct Tunables {
    level: u32,
}

fn room(max_conns: u32, name: &str) -> Room {
    Room {
        max_conns,
        name: name.into(),
    }
}

#[tokio::test]
async fn pushed_config_arrives_typed_and_bad_documents_are_not_applied() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let keeper = connect(cluster.endpoints(), "room-a", 10).await?;

    assert!(matches!(
        keeper.config::<Room>("room").await,
        Err(Error::NoConfig { service }) if service == "room"
    ));
    let defaults = keeper.config_or_default::<Tunables>("tunables").await?;
    assert_eq!(
        (defaults.version(), &*defaults.current()),
        (0, &Tunables::default())
    );

    push(
        &keeper,
        "room",
        1,
        Format::Toml,
        "max_conns = 10\nname = \"a\"\n",
    )
    .await?;
    let mut handle = keeper.config::<Room>("room").await?;
    assert_eq!((handle.version(), &*handle.current()), (1, &room(10, "a")));
    let schema = keeper
        .get(&layout::schema_key("room"))
        .await?
        .expect("schema published");
    assert!(String::from_utf8(schema.value)?.contains("max_conns"));
    assert!(wait_applied(&keeper, "room", "room-a", 1).await?.ok);

    // A good push arrives as a typed struct within a second.
    push(
        &keeper,
        "room",
        2,
        Format::Toml,
        "max_conns = 20\nname = \"b\"\n",
    )
    .await?;
    let v2 = tokio::time::timeout(Duration::from_secs(1), handle.changed()).await??;
    assert_eq!(*v2, room(20, "b"));
    assert_eq!(handle.version(), 2);

    // An unknown field: not applied, reported with the field's name.
    push(
        &keeper,
        "room",
        3,
        Format::Toml,
        "max_conns = 30\nname = \"c\"\nmax_con = 1\n",
    )
    .await?;
    let report = wait_applied(&keeper, "room", "room-a", 3).await?;
    assert!(!report.ok);
    assert!(
        report.error.as_deref().unwrap_or("").contains("max_con"),
        "{report:?}"
    );
    assert_eq!((handle.version(), &*handle.current()), (2, &room(20, "b")));

    // A wrong type: not applied either.
    push(
        &keeper,
        "room",
        4,
        Format::Toml,
        "max_conns = \"many\"\nname = \"d\"\n",
    )
    .await?;
    let report = wait_applied(&keeper, "room", "room-a", 4).await?;
    assert!(!report.ok);
    assert!(report.error.is_some());
    assert_eq!((handle.version(), &*handle.current()), (2, &room(20, "b")));

    // The next good version (JSON this time) applies, and changed() skips the bad ones.
    push(
        &keeper,
        "room",
        5,
        Format::Json,
        r#"{"max_conns": 50, "name": "e"}"#,
    )
    .await?;
    let v5 = tokio::time::timeout(Duration::from_secs(5), handle.changed()).await??;
    assert_eq!(*v5, room(50, "e"));
    assert_eq!(handle.version(), 5);
    assert!(wait_applied(&keeper, "room", "room-a", 5).await?.ok);

    // A validator refusing a value keeps the previous one too.
    let strict = connect(cluster.endpoints(), "room-strict", 10).await?;
    let strict_handle = strict
        .config_with::<Room>("room", |r| {
            if r.max_conns > 60 {
                Err(format!("max_conns {} is above 60", r.max_conns))
            } else {
                Ok(())
            }
        })
        .await?;
    push(
        &keeper,
        "room",
        6,
        Format::Json,
        r#"{"max_conns": 70, "name": "f"}"#,
    )
    .await?;
    let report = wait_applied(&strict, "room", "room-strict", 6).await?;
    assert!(!report.ok && report.error.unwrap().contains("above 60"));
    assert_eq!(strict_handle.version(), 5);
    Ok(())
}

#[tokio::test]
async fn config_updates_survive_a_leader_kill() -> anyhow::Result<()> {
    let mut cluster = cluster().await?;
    let leader = cluster.leader().await?;
    // The subscriber talks to the leader first, so the kill cuts its watch.
    let subscriber = connect(endpoints_starting_with(&cluster, leader), "sub", 10).await?;
    push(
        &subscriber,
        "svc",
        1,
        Format::Toml,
        "max_conns = 1\nname = \"one\"\n",
    )
    .await?;
    let mut handle = subscriber.config::<Room>("svc").await?;
    assert_eq!(handle.version(), 1);

    cluster.kill9(leader);
    // Pushed while the old leader is dead, through the survivors.
    let pusher = connect(cluster.endpoints(), "pusher", 10).await?;
    push(
        &pusher,
        "svc",
        2,
        Format::Toml,
        "max_conns = 2\nname = \"two\"\n",
    )
    .await?;
    let v2 = tokio::time::timeout(Duration::from_secs(20), handle.changed()).await??;
    assert_eq!(*v2, room(2, "two"));
    assert!(wait_applied(&pusher, "svc", "sub", 2).await?.ok);
    Ok(())
}

#[tokio::test]
async fn config_works_with_one_endpoint_dead_from_the_start() -> anyhow::Result<()> {
    let mut cluster = cluster().await?;
    let dead = cluster.nodes[0].id;
    let endpoints = endpoints_starting_with(&cluster, dead);
    cluster.kill9(dead);
    let keeper = connect(endpoints, "survivor", 10).await?;
    push(
        &keeper,
        "svc",
        1,
        Format::Toml,
        "max_conns = 1\nname = \"one\"\n",
    )
    .await?;
    let mut handle = keeper.config::<Room>("svc").await?;
    push(
        &keeper,
        "svc",
        2,
        Format::Toml,
        "max_conns = 2\nname = \"two\"\n",
    )
    .await?;
    let v2 = tokio::time::timeout(Duration::from_secs(10), handle.changed()).await??;
    assert_eq!(*v2, room(2, "two"));
    assert!(wait_applied(&keeper, "svc", "survivor", 2).await?.ok);
    Ok(())
}

#[tokio::test]
async fn canary_reaches_only_its_instances_and_rollback_and_promote_work() -> anyhow::Result<()> {
    let cluster = cluster().await?;
    let a = connect(cluster.endpoints(), "inst-a", 10).await?;
    let b = connect(cluster.endpoints(), "inst-b", 10).await?;
    push(
        &a,
        "gray",
        1,
        Format::Toml,
        "max_conns = 1\nname = \"stable\"\n",
    )
    .await?;
    let mut ha = a.config::<Room>("gray").await?;
    let mut hb = b.config::<Room>("gray").await?;

    let canary = |version: u64, body: &str| Canary {
        doc: document(version, Format::Toml, body),
        instances: vec!["inst-a".into()],
        percent: None,
    };
    let c2 = canary(2, "max_conns = 2\nname = \"canary\"\n");
    a.put(&layout::config_canary_key("gray"), serde_json::to_vec(&c2)?)
        .await?;
    let got = tokio::time::timeout(Duration::from_secs(5), ha.changed()).await??;
    assert_eq!(*got, room(2, "canary"));
    assert!(wait_applied(&a, "gray", "inst-a", 2).await?.ok);
    assert_eq!(hb.version(), 1);
    assert_eq!(
        applied(&a, "gray", "inst-b").await.map(|r| r.version),
        Some(1)
    );

    // Rollback: deleting the canary sends inst-a back to the service's document.
    a.delete(&layout::config_canary_key("gray"), false).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), ha.changed()).await??;
    assert_eq!(*got, room(1, "stable"));
    assert!(wait_applied(&a, "gray", "inst-a", 1).await?.ok);

    // Promote: one txn puts the canary document as the config and deletes the canary.
    let c3 = canary(3, "max_conns = 3\nname = \"next\"\n");
    a.put(&layout::config_canary_key("gray"), serde_json::to_vec(&c3)?)
        .await?;
    tokio::time::timeout(Duration::from_secs(5), ha.changed()).await??;
    assert_eq!(ha.version(), 3);
    promote(&a, "gray", &c3).await?;
    let got = tokio::time::timeout(Duration::from_secs(5), hb.changed()).await??;
    assert_eq!(*got, room(3, "next"));
    assert!(wait_applied(&a, "gray", "inst-b", 3).await?.ok);
    assert_eq!(ha.version(), 3);
    Ok(())
}

async fn promote(
    keeper: &keeper_sdk::Keeper,
    service: &str,
    canary: &Canary,
) -> anyhow::Result<()> {
    use longlink_proto::etcdserverpb::DeleteRangeRequest;
    use longlink_proto::etcdserverpb::PutRequest;
    use longlink_proto::etcdserverpb::RequestOp;
    use longlink_proto::etcdserverpb::TxnRequest;
    use longlink_proto::etcdserverpb::request_op::Request;
    let doc = serde_json::to_vec(&canary.doc)?;
    let put = |key: String| RequestOp {
        request: Some(Request::RequestPut(PutRequest {
            key: key.into_bytes(),
            value: doc.clone(),
            ..Default::default()
        })),
    };
    let resp = keeper
        .txn(TxnRequest {
            compare: vec![],
            success: vec![
                put(layout::config_key(service)),
                put(layout::config_history_key(service, canary.doc.version)),
                RequestOp {
                    request: Some(Request::RequestDeleteRange(DeleteRangeRequest {
                        key: layout::config_canary_key(service).into_bytes(),
                        ..Default::default()
                    })),
                },
            ],
            failure: vec![],
        })
        .await?;
    anyhow::ensure!(resp.succeeded);
    Ok(())
}
