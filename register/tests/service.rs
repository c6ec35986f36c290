//! The gRPC service over a real socket, fenced against a slot map given by the test (no keeper):
//! per-item statuses, rebuilding semantics, Sync, Digest, limits and the lease gate.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use std::time::Instant;

use longlink_common::Digest;
use longlink_common::SLOTS;
use longlink_common::SlotMap;
use longlink_common::slot_of;
use longlink_proto::registerpb::register_client::RegisterClient;
use longlink_proto::registerpb::*;
use register::Node;
use register::RegisterConfig;
use register::gate::LeaseGate;
use register::store::Store;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

struct Harness {
    node: Arc<Node>,
    client: RegisterClient<Channel>,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn start(gate: LeaseGate) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let config = RegisterConfig {
        max_batch: 1000,
        rebuild_timeout_ms: 60_000,
        ..Default::default()
    };
    let node = Arc::new(Node::new("r1", store, Arc::new(gate), config));
    node.set_live_rooms(BTreeSet::new()).unwrap();
    // r1 owns the lower half at epoch 1; with no live rooms its slots are ready at once.
    node.apply_map(half_map(1)).unwrap();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = CancellationToken::new();
    tokio::spawn(register::service::serve(
        node.clone(),
        listener,
        stop.clone(),
    ));
    let client = RegisterClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    Harness {
        node,
        client,
        _dir: dir,
        stop,
    }
}

fn half_map(epoch: u64) -> SlotMap {
    SlotMap {
        epoch,
        slots: (0..SLOTS)
            .map(|s| if s < SLOTS / 2 { "r1" } else { "r2" }.to_string())
            .collect(),
        since: Vec::new(),
        leases: Default::default(),
    }
}

/// A user whose slot satisfies `pred`, with a distinct name per `n`.
fn user_where(n: usize, pred: impl Fn(u16) -> bool) -> String {
    (0..)
        .map(|i| format!("user-{n}-{i}"))
        .find(|u| pred(slot_of("demo", u)))
        .unwrap()
}

fn session(user: &str, room: &str, conn: u64) -> Session {
    Session {
        app: "demo".into(),
        user: user.into(),
        room_id: room.into(),
        conn_id: conn,
        device: "phone".into(),
        ..Default::default()
    }
}

fn status(r: &Option<ItemResult>) -> Status {
    Status::try_from(r.as_ref().unwrap().status).unwrap()
}

#[tokio::test]
async fn items_are_fenced_one_by_one() {
    let mut h = start(LeaseGate::always_open()).await;
    let mine = user_where(0, |s| s < SLOTS / 2);
    let theirs = user_where(1, |s| s >= SLOTS / 2);
    let resp = h
        .client
        .attach(AttachRequest {
            epoch: 1,
            sessions: vec![
                session(&mine, "roomA", 1),
                session(&theirs, "roomA", 2),
                session("", "roomA", 3),
            ],
        })
        .await
        .unwrap()
        .into_inner();
    let st: Vec<Status> = resp
        .results
        .iter()
        .map(|r| Status::try_from(r.status).unwrap())
        .collect();
    assert_eq!(st, vec![Status::Ok, Status::WrongOwner, Status::Invalid]);
    assert_eq!(resp.results[1].owner, "r2");
    assert_eq!(resp.results[1].epoch, 1);
    assert!(resp.results[2].message.contains("user is empty"));

    let found = h
        .client
        .lookup(LookupRequest {
            epoch: 1,
            app: "demo".into(),
            user: mine.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&found.result), Status::Ok);
    assert_eq!(found.sessions, vec![session(&mine, "roomA", 1)]);

    // A caller routing by a newer epoch than ours is told to retry, not answered.
    let ahead = h
        .client
        .lookup(LookupRequest {
            epoch: 2,
            app: "demo".into(),
            user: mine.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&ahead.result), Status::Unavailable);

    let batch = h
        .client
        .lookup_batch(LookupBatchRequest {
            epoch: 1,
            users: vec![
                User {
                    app: "demo".into(),
                    user: mine.clone(),
                },
                User {
                    app: "demo".into(),
                    user: theirs.clone(),
                },
            ],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&batch.results[0].result), Status::Ok);
    assert_eq!(status(&batch.results[1].result), Status::WrongOwner);

    let detach = h
        .client
        .detach(DetachRequest {
            epoch: 1,
            sessions: vec![SessionKey {
                app: "demo".into(),
                user: mine.clone(),
                room_id: "roomA".into(),
                conn_id: 1,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(Status::try_from(detach.results[0].status), Ok(Status::Ok));
    let gone = h
        .client
        .lookup(LookupRequest {
            epoch: 1,
            app: "demo".into(),
            user: mine,
        })
        .await
        .unwrap()
        .into_inner();
    // Ready slot, no sessions: offline is the authoritative answer.
    assert_eq!(status(&gone.result), Status::Ok);
    assert!(gone.sessions.is_empty());

    // Oversized batches are refused whole, naming the limit.
    let big = vec![session("x", "roomA", 1); 1001];
    let err = h
        .client
        .attach(AttachRequest {
            epoch: 1,
            sessions: big,
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("limit of 1000"), "{}", err.message());
}

#[tokio::test]
async fn moved_slot_answers_unavailable_until_rooms_synced() {
    let mut h = start(LeaseGate::always_open()).await;
    h.node
        .set_live_rooms(BTreeSet::from(["roomA".to_string(), "roomB".to_string()]))
        .unwrap();
    // Epoch 2: r1 also gets the slot of `moved`.
    let moved = user_where(2, |s| s >= SLOTS / 2);
    let slot = slot_of("demo", &moved);
    let mut map = half_map(2);
    map.slots[usize::from(slot)] = "r1".into();
    h.node.apply_map(map).unwrap();

    let lookup = |c: &mut RegisterClient<Channel>, user: String| {
        let mut c = c.clone();
        async move {
            c.lookup(LookupRequest {
                epoch: 2,
                app: "demo".into(),
                user,
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    let miss = lookup(&mut h.client, moved.clone()).await;
    assert_eq!(
        status(&miss.result),
        Status::Unavailable,
        "a miss while rebuilding is not offline"
    );
    assert!(miss.result.unwrap().message.contains("rebuilding"));

    // Room A re-sends its sessions in the slot.
    let other = user_where(3, |s| s == slot);
    let synced = h
        .client
        .sync(SyncRequest {
            epoch: 2,
            room_id: "roomA".into(),
            slot: u32::from(slot),
            sessions: vec![session(&moved, "roomA", 7)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&synced.result), Status::Ok);
    assert_eq!(synced.stored, 1);
    let hit = lookup(&mut h.client, moved.clone()).await;
    assert_eq!(status(&hit.result), Status::Ok);
    assert!(hit.rebuilding);
    assert_eq!(hit.sessions.len(), 1);
    // Room B has not synced: a miss is still unavailable.
    assert_eq!(
        status(&lookup(&mut h.client, other.clone()).await.result),
        Status::Unavailable
    );

    // Room B proves by digest that it has nothing there: the slot is ready.
    let digest = h
        .client
        .digest(DigestRequest {
            epoch: 2,
            room_id: "roomB".into(),
            slots: vec![SlotDigest {
                slot: u32::from(slot),
                digest: 0,
                count: 0,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert!(digest.mismatched.is_empty());
    let offline = lookup(&mut h.client, other).await;
    assert_eq!(status(&offline.result), Status::Ok);
    assert!(offline.sessions.is_empty() && !offline.rebuilding);

    // Room A's digest matches what it synced; a wrong one is reported with the register's view.
    let mut mine = Digest::default();
    mine.add("demo", &moved, 7);
    let ask = |digest: u64, count: u64| DigestRequest {
        epoch: 2,
        room_id: "roomA".into(),
        slots: vec![SlotDigest {
            slot: u32::from(slot),
            digest,
            count,
        }],
    };
    let ok = h.client.digest(ask(mine.digest, mine.count)).await.unwrap();
    assert!(ok.into_inner().mismatched.is_empty());
    let bad = h
        .client
        .digest(ask(mine.digest ^ 1, 1))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(bad.mismatched.len(), 1);
    assert_eq!(bad.mismatched[0].digest, mine.digest);
    assert_eq!(bad.mismatched[0].count, 1);

    // A sync with a session of another slot is refused whole.
    let wrong = h
        .client
        .sync(SyncRequest {
            epoch: 2,
            room_id: "roomA".into(),
            slot: u32::from(slot),
            sessions: vec![session(&user_where(4, |s| s != slot), "roomA", 1)],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&wrong.result), Status::Invalid);

    // Room A leaves discovery: its sessions are dropped.
    h.node
        .set_live_rooms(BTreeSet::from(["roomB".to_string()]))
        .unwrap();
    let after = lookup(&mut h.client, moved).await;
    assert_eq!(status(&after.result), Status::Ok);
    assert!(after.sessions.is_empty());

    let foreign = if slot == 1023 { 1022 } else { 1023 };
    let slots = h
        .client
        .slot_status(SlotStatusRequest {
            slots: vec![u32::from(slot), 0, foreign],
        })
        .await
        .unwrap()
        .into_inner();
    let states: Vec<&str> = slots.slots.iter().map(|s| s.state.as_str()).collect();
    assert_eq!(states, vec!["ready", "ready", "not_owned"]);
    assert_eq!(slots.slots[2].owner, "r2");
}

#[tokio::test]
async fn closed_gate_refuses_everything() {
    let gate = LeaseGate::new();
    gate.renewed(Instant::now(), Duration::from_secs(60));
    let mut h = start(gate).await;
    let mine = user_where(5, |s| s < SLOTS / 2);
    let attach = |c: &RegisterClient<Channel>| {
        let mut c = c.clone();
        let s = session(&mine, "roomA", 1);
        async move {
            c.attach(AttachRequest {
                epoch: 1,
                sessions: vec![s],
            })
            .await
            .unwrap()
            .into_inner()
        }
    };
    assert_eq!(attach(&h.client).await.results[0].status, Status::Ok as i32);
    h.node.gate().close();
    assert_eq!(
        attach(&h.client).await.results[0].status,
        Status::Unavailable as i32
    );
    let l = h
        .client
        .lookup(LookupRequest {
            epoch: 1,
            app: "demo".into(),
            user: mine.clone(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&l.result), Status::Unavailable);
    let s = h
        .client
        .sync(SyncRequest {
            epoch: 1,
            room_id: "roomA".into(),
            slot: u32::from(slot_of("demo", &mine)),
            sessions: vec![],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(status(&s.result), Status::Unavailable);
    assert!(
        !h.client
            .stats(StatsRequest {})
            .await
            .unwrap()
            .into_inner()
            .serving
    );
}
