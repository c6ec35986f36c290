//! Push, broadcast, presence and kick through real gRPC sockets to stand-in registers and rooms
//! (tonic servers in this test speaking register.proto and room.proto): batching per register
//! and per room, WRONG_OWNER re-routing, QoS 1 retries, broadcast progress with bounded retries.

mod common;

use std::collections::BTreeMap;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::AtomicU32;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use longlink_common::SlotMap;
use longlink_common::slot_of;
use longlink_proto::registerpb;
use longlink_proto::registerpb::register_server::Register;
use longlink_proto::registerpb::register_server::RegisterServer;
use longlink_proto::roompb;
use longlink_proto::roompb::room_server::Room;
use longlink_proto::roompb::room_server::RoomServer;
use serde_json::json;
use tonic::Request;
use tonic::Response;
use tonic::Status;

type Sessions = Arc<Mutex<HashMap<(String, String), Vec<registerpb::Session>>>>;

/// A register owning the slots for which `owns` holds; others answer WRONG_OWNER -> `other`.
#[derive(Clone)]
struct FakeRegister {
    owns: Arc<dyn Fn(u16) -> bool + Send + Sync>,
    other: String,
    sessions: Sessions,
    batches: Arc<AtomicU32>,
}

#[tonic::async_trait]
impl Register for FakeRegister {
    async fn lookup_batch(
        &self,
        request: Request<registerpb::LookupBatchRequest>,
    ) -> Result<Response<registerpb::LookupBatchResponse>, Status> {
        self.batches.fetch_add(1, Ordering::SeqCst);
        let sessions = self.sessions.lock().unwrap();
        let results = request
            .into_inner()
            .users
            .into_iter()
            .map(|u| {
                if (self.owns)(slot_of(&u.app, &u.user)) {
                    registerpb::LookupResponse {
                        result: Some(registerpb::ItemResult::default()),
                        sessions: sessions.get(&(u.app, u.user)).cloned().unwrap_or_default(),
                        rebuilding: false,
                    }
                } else {
                    registerpb::LookupResponse {
                        result: Some(registerpb::ItemResult {
                            status: registerpb::Status::WrongOwner as i32,
                            owner: self.other.clone(),
                            epoch: 2,
                            message: String::new(),
                        }),
                        ..Default::default()
                    }
                }
            })
            .collect();
        Ok(Response::new(registerpb::LookupBatchResponse { results }))
    }
    async fn lookup(
        &self,
        _: Request<registerpb::LookupRequest>,
    ) -> Result<Response<registerpb::LookupResponse>, Status> {
        Err(Status::unimplemented("center uses LookupBatch"))
    }
    async fn attach(
        &self,
        _: Request<registerpb::AttachRequest>,
    ) -> Result<Response<registerpb::AttachResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn detach(
        &self,
        _: Request<registerpb::DetachRequest>,
    ) -> Result<Response<registerpb::DetachResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn sync(
        &self,
        _: Request<registerpb::SyncRequest>,
    ) -> Result<Response<registerpb::SyncResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn digest(
        &self,
        _: Request<registerpb::DigestRequest>,
    ) -> Result<Response<registerpb::DigestResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn stats(
        &self,
        _: Request<registerpb::StatsRequest>,
    ) -> Result<Response<registerpb::StatsResponse>, Status> {
        Err(Status::unimplemented(""))
    }
    async fn slot_status(
        &self,
        _: Request<registerpb::SlotStatusRequest>,
    ) -> Result<Response<registerpb::SlotStatusResponse>, Status> {
        Err(Status::unimplemented(""))
    }
}

/// A room that records calls; `fail_pushes`/`fail_broadcasts` fail that many calls first.
#[derive(Clone, Default)]
struct FakeRoom {
    fail_pushes: Arc<AtomicU32>,
    /// Pushes answered with nothing delivered (the user's connection already gone).
    miss_pushes: Arc<AtomicU32>,
    fail_broadcasts: Arc<AtomicU32>,
    broadcast_delivers: u32,
    pushes: Arc<Mutex<Vec<roompb::PushRequest>>>,
    broadcasts: Arc<Mutex<Vec<roompb::BroadcastRequest>>>,
    kicks: Arc<Mutex<Vec<roompb::KickRequest>>>,
    /// When set, each Push waits for a permit (to hold calls in flight).
    hold: Option<Arc<tokio::sync::Semaphore>>,
    /// Pushes being handled now, and the most ever at once.
    inflight: Arc<AtomicU32>,
    max_inflight: Arc<AtomicU32>,
}

fn take_failure(counter: &AtomicU32) -> bool {
    counter
        .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
        .is_ok()
}

#[tonic::async_trait]
impl Room for FakeRoom {
    async fn push(
        &self,
        request: Request<roompb::PushRequest>,
    ) -> Result<Response<roompb::PushResponse>, Status> {
        let r = request.into_inner();
        let n = r.items.len() as u32;
        self.pushes.lock().unwrap().push(r);
        let now = self.inflight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_inflight.fetch_max(now, Ordering::SeqCst);
        if let Some(hold) = &self.hold {
            hold.acquire().await.unwrap().forget();
        }
        self.inflight.fetch_sub(1, Ordering::SeqCst);
        if take_failure(&self.fail_pushes) {
            return Err(Status::unavailable("room overloaded"));
        }
        let each = u32::from(!take_failure(&self.miss_pushes));
        Ok(Response::new(roompb::PushResponse {
            delivered: n * each,
            per_item: vec![each; n as usize],
            ..Default::default()
        }))
    }
    async fn broadcast(
        &self,
        request: Request<roompb::BroadcastRequest>,
    ) -> Result<Response<roompb::BroadcastResponse>, Status> {
        self.broadcasts.lock().unwrap().push(request.into_inner());
        if take_failure(&self.fail_broadcasts) {
            return Err(Status::unavailable("room busy"));
        }
        Ok(Response::new(roompb::BroadcastResponse {
            delivered: self.broadcast_delivers,
            dropped: 1,
        }))
    }
    async fn kick(
        &self,
        request: Request<roompb::KickRequest>,
    ) -> Result<Response<roompb::KickResponse>, Status> {
        self.kicks.lock().unwrap().push(request.into_inner());
        Ok(Response::new(roompb::KickResponse { kicked: 1 }))
    }
    async fn stats(
        &self,
        _: Request<roompb::StatsRequest>,
    ) -> Result<Response<roompb::StatsResponse>, Status> {
        Err(Status::unimplemented(""))
    }
}

async fn serve_grpc(router: tonic::transport::server::Router) -> String {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    tokio::spawn(
        router.serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener)),
    );
    addr
}

struct Cluster {
    h: Harness,
    rooms: Vec<FakeRoom>,
    regs: Vec<FakeRegister>,
    sessions: Sessions,
}

/// Two registers (reg-a: even slots, reg-b: odd slots) and `rooms` rooms. With `stale_map`,
/// center's slot map names reg-a for every slot, so odd slots come back WRONG_OWNER -> reg-b.
async fn cluster(rooms: Vec<FakeRoom>, stale_map: bool) -> Cluster {
    cluster_with(test_config(), rooms, stale_map).await
}

async fn cluster_with(
    config: center::CenterConfig,
    rooms: Vec<FakeRoom>,
    stale_map: bool,
) -> Cluster {
    let sessions: Sessions = Arc::default();
    let regs = vec![
        FakeRegister {
            owns: Arc::new(|s| s % 2 == 0),
            other: "reg-b".into(),
            sessions: sessions.clone(),
            batches: Arc::default(),
        },
        FakeRegister {
            owns: Arc::new(|s| s % 2 == 1),
            other: "reg-a".into(),
            sessions: sessions.clone(),
            batches: Arc::default(),
        },
    ];
    let mut reg_addrs = BTreeMap::new();
    for (name, reg) in ["reg-a", "reg-b"].iter().zip(&regs) {
        let addr = serve_grpc(
            tonic::transport::Server::builder().add_service(RegisterServer::new(reg.clone())),
        )
        .await;
        reg_addrs.insert(name.to_string(), addr);
    }
    let mut live = vec![];
    for (i, room) in rooms.iter().enumerate() {
        let addr = serve_grpc(
            tonic::transport::Server::builder().add_service(RoomServer::new(room.clone())),
        )
        .await;
        live.push(center::rooms::Room {
            id: format!("room-{}", i + 1),
            tcp: Some("127.0.0.1:1".into()),
            ws: None,
            grpc: Some(addr),
        });
    }
    let h = start(config, two_apps(), live).await;
    h.registers.send_replace(Arc::new(reg_addrs));
    let mut map = SlotMap::empty();
    map.epoch = 1;
    for (s, owner) in map.slots.iter_mut().enumerate() {
        *owner = if stale_map || s % 2 == 0 {
            "reg-a".into()
        } else {
            "reg-b".into()
        };
    }
    h.slots.send_replace(Arc::new(map));
    Cluster {
        h,
        rooms,
        regs,
        sessions,
    }
}

fn online(sessions: &Sessions, user: &str, room: &str, conn_id: u64) {
    sessions
        .lock()
        .unwrap()
        .entry(("demo".into(), user.into()))
        .or_default()
        .push(registerpb::Session {
            app: "demo".into(),
            user: user.into(),
            device: format!("dev-{conn_id}"),
            room_id: room.into(),
            conn_id,
            connected_at_ms: 1_700_000_000_000,
            client_ip: "127.0.0.1".into(),
            platform: "test".into(),
        });
}

#[tokio::test]
async fn multicast_to_1000_users_is_one_lookup_per_register_and_one_push_per_room() {
    let c = cluster(vec![FakeRoom::default(), FakeRoom::default()], false).await;
    let users: Vec<String> = (0..1000).map(|i| format!("u{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        match i % 4 {
            0 => online(&c.sessions, u, "room-1", i as u64),
            1 => online(&c.sessions, u, "room-2", i as u64),
            _ => {}
        }
    }
    let a =
        c.h.post(
            "/v1/apps/demo/push",
            Some("k-demo"),
            json!({"users": users, "payload": {"hi": [1, 2]}, "qos": 0}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["sessions"], 500);
    assert_eq!(
        (
            a.json["users_online"].as_u64(),
            a.json["users_offline"].as_u64()
        ),
        (Some(500), Some(500))
    );
    assert_eq!(a.json["users_unknown"], 0);
    for reg in &c.regs {
        assert_eq!(
            reg.batches.load(Ordering::SeqCst),
            1,
            "one LookupBatch per register"
        );
    }
    for (i, room) in c.rooms.iter().enumerate() {
        let pushes = room.pushes.lock().unwrap();
        assert_eq!(pushes.len(), 1, "one Push per room");
        assert_eq!(pushes[0].items.len(), 250);
        let item = &pushes[0].items[0];
        let user_n: usize = item.user[1..].parse().unwrap();
        assert_eq!(user_n % 4, i, "room-{} got a user of another room", i + 1);
        let m = item.message.as_ref().unwrap();
        assert_eq!(m.payload, br#"{"hi":[1,2]}"#);
        assert_eq!((m.qos, m.id.as_str()), (0, a.json["id"].as_str().unwrap()));
        assert_eq!(item.app, "demo");
    }
    c.h.stop().await;
}

#[tokio::test]
async fn a_batch_of_unicasts_is_one_lookup_per_register_and_one_push_per_room() {
    let c = cluster(vec![FakeRoom::default(), FakeRoom::default()], false).await;
    // u0..u999: even users on room-1, odd on room-2, every fourth also on room-1 (two rooms).
    for i in 0..1000u64 {
        let u = format!("u{i}");
        online(
            &c.sessions,
            &u,
            if i % 2 == 0 { "room-1" } else { "room-2" },
            i,
        );
        if i % 4 == 1 {
            online(&c.sessions, &u, "room-1", 10_000 + i);
        }
    }
    let messages: Vec<_> = (0..1000)
        .map(|i| json!({"users": [format!("u{i}")], "payload": {"n": i}}))
        .collect();
    let a =
        c.h.post(
            "/v1/apps/demo/push/batch",
            Some("k-demo"),
            json!({ "messages": messages }),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let results = a.json["results"].as_array().unwrap();
    assert_eq!(results.len(), 1000);
    for (i, r) in results.iter().enumerate() {
        let sessions = if i % 4 == 1 { 2 } else { 1 };
        assert_eq!(r["sessions"], sessions, "message {i}: {r}");
        assert_eq!(r["users_online"], 1, "message {i}: {r}");
    }
    for reg in &c.regs {
        assert_eq!(
            reg.batches.load(Ordering::SeqCst),
            1,
            "one LookupBatch per register"
        );
    }
    let ids: std::collections::HashMap<&str, usize> = results
        .iter()
        .enumerate()
        .map(|(i, r)| (r["id"].as_str().unwrap(), i))
        .collect();
    for (r, room) in c.rooms.iter().enumerate() {
        let pushes = room.pushes.lock().unwrap();
        assert_eq!(pushes.len(), 1, "one Push per room");
        assert_eq!(pushes[0].items.len(), if r == 0 { 750 } else { 500 });
        for item in &pushes[0].items {
            // Each item carries its own message: the id and payload of that user's message.
            let n: usize = item.user[1..].parse().unwrap();
            let m = item.message.as_ref().unwrap();
            assert_eq!(
                ids[m.id.as_str()],
                n,
                "{} got another user's message",
                item.user
            );
            assert_eq!(m.payload, format!("{{\"n\":{n}}}").into_bytes());
        }
    }
    c.h.stop().await;
}

#[tokio::test]
async fn wrong_owner_answers_are_followed() {
    let c = cluster(vec![FakeRoom::default()], true).await;
    let users: Vec<String> = (0..40).map(|i| format!("w{i}")).collect();
    for (i, u) in users.iter().enumerate() {
        online(&c.sessions, u, "room-1", i as u64);
    }
    let a =
        c.h.post(
            "/v1/apps/demo/push",
            Some("k-demo"),
            json!({"users": users, "payload": 1}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["users_online"], 40, "{}", a.text);
    assert!(
        c.regs[1].batches.load(Ordering::SeqCst) >= 1,
        "reg-b asked after WRONG_OWNER"
    );
    c.h.stop().await;
}

/// Pushes a QoS 1 message to alice (online at `room`) and waits for center to send it to the
/// room a second time; returns the push's answer and the message of that second `Push`.
async fn qos1_push_and_retry(room: FakeRoom) -> (serde_json::Value, roompb::Message) {
    let c = cluster(vec![room], false).await;
    online(&c.sessions, "alice", "room-1", 1);
    let a =
        c.h.post(
            "/v1/apps/demo/push",
            Some("k-demo"),
            json!({"users": ["alice"], "payload": "x", "qos": 1, "ttl_s": 30}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let pushes = c.rooms[0].pushes.clone();
    testkit::wait_until("QoS 1 retry", Duration::from_secs(10), || {
        let n = pushes.lock().unwrap().len();
        async move { (n >= 2).then_some(()) }
    })
    .await
    .unwrap();
    let retried = pushes.lock().unwrap()[1].items[0].message.clone().unwrap();
    c.h.stop().await;
    (a.json, retried)
}

#[tokio::test]
async fn qos1_is_retried_after_a_room_failure() {
    let room = FakeRoom::default();
    room.fail_pushes.store(1, Ordering::SeqCst);
    let (answer, retried) = qos1_push_and_retry(room).await;
    assert_eq!(
        (answer["sessions"].as_u64(), answer["retrying"].as_u64()),
        (Some(0), Some(1))
    );
    assert_eq!(retried.id, answer["id"].as_str().unwrap());
    assert_eq!(retried.qos, 1);
}

/// The lookup found a session, but by the time the push reached the room the user's connection
/// was gone (a device reconnecting): nothing was delivered, so QoS 1 must try again.
#[tokio::test]
async fn qos1_is_retried_when_the_room_no_longer_has_the_user() {
    let room = FakeRoom::default();
    room.miss_pushes.store(1, Ordering::SeqCst);
    let (answer, retried) = qos1_push_and_retry(room).await;
    assert_eq!(
        (
            answer["users_online"].as_u64(),
            answer["sessions"].as_u64(),
            answer["retrying"].as_u64()
        ),
        (Some(1), Some(0), Some(1))
    );
    assert_eq!(retried.id, answer["id"].as_str().unwrap());
}

#[tokio::test]
async fn broadcast_progress_retries_failed_rooms_a_bounded_number_of_times() {
    let ok = FakeRoom {
        broadcast_delivers: 10,
        ..FakeRoom::default()
    };
    let flaky = FakeRoom {
        broadcast_delivers: 5,
        ..FakeRoom::default()
    };
    flaky.fail_broadcasts.store(2, Ordering::SeqCst);
    let dead = FakeRoom::default();
    dead.fail_broadcasts.store(u32::MAX, Ordering::SeqCst);
    let c = cluster(vec![ok, flaky, dead], false).await;
    let a =
        c.h.post(
            "/v1/apps/demo/push",
            Some("k-demo"),
            json!({"all": true, "payload": {"news": 1}}),
        )
        .await;
    assert_eq!(a.status, 202, "{}", a.text);
    assert_eq!(a.json["rooms"], 3);
    let progress = a.json["progress"].as_str().unwrap().to_owned();
    let h = &c.h;
    let path = progress.as_str();
    let status = testkit::wait_until("broadcast done", Duration::from_secs(15), || async move {
        let s = h.get(path, Some("k-demo")).await;
        assert_eq!(s.status, 200, "{}", s.text);
        (s.json["state"] == "done").then_some(s.json)
    })
    .await
    .unwrap();
    assert_eq!(status["rooms_total"], 3);
    assert_eq!(
        (
            status["rooms_done"].as_u64(),
            status["rooms_failed"].as_u64()
        ),
        (Some(2), Some(1))
    );
    assert_eq!(
        (status["connections"].as_u64(), status["dropped"].as_u64()),
        (Some(15), Some(2))
    );
    // 1 + broadcast_retries (3) attempts for the dead room, then it is given up.
    assert_eq!(c.rooms[2].broadcasts.lock().unwrap().len(), 4);
    assert_eq!(c.rooms[1].broadcasts.lock().unwrap().len(), 3);
    let b = c.rooms[0].broadcasts.lock().unwrap()[0].clone();
    assert_eq!(b.app, "demo");
    assert_eq!(b.message.as_ref().unwrap().payload, br#"{"news":1}"#);
    // Another app cannot read it.
    h.get(&progress.replace("/demo/", "/other/"), Some("k-other"))
        .await
        .error(404, "not_found");
    c.h.stop().await;
}

#[tokio::test]
async fn presence_and_kick() {
    let c = cluster(vec![FakeRoom::default(), FakeRoom::default()], false).await;
    online(&c.sessions, "bob", "room-1", 11);
    online(&c.sessions, "bob", "room-2", 22);
    let a = c.h.get("/v1/apps/demo/users/bob", Some("k-demo")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["online"], true);
    let sessions = a.json["sessions"].as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    assert_eq!(
        (
            sessions[0]["room"].as_str(),
            sessions[0]["conn_id"].as_str()
        ),
        (Some("room-1"), Some("11"))
    );
    let a = c.h.get("/v1/apps/demo/users/nobody", Some("k-demo")).await;
    assert_eq!(
        (
            a.json["online"].as_bool(),
            a.json["sessions"].as_array().unwrap().len()
        ),
        (Some(false), 0)
    );

    let a =
        c.h.post(
            "/v1/apps/demo/users/bob/kick",
            Some("k-demo"),
            json!({"reason": "bye"}),
        )
        .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json["kicked"], 2);
    for room in &c.rooms {
        let kicks = room.kicks.lock().unwrap();
        assert_eq!(kicks.len(), 1);
        assert_eq!(
            (kicks[0].user.as_str(), kicks[0].reason.as_str()),
            ("bob", "bye")
        );
    }
    // A kick without a body works too.
    let a =
        c.h.send("POST", "/v1/apps/demo/users/bob/kick", Some("k-demo"), None)
            .await;
    assert_eq!(a.status, 200, "{}", a.text);

    // No register owns the slot: presence is unknown (503), never "offline".
    c.h.slots.send_replace(Arc::new(SlotMap::empty()));
    c.h.get("/v1/apps/demo/users/bob", Some("k-demo"))
        .await
        .error(503, "unavailable");
    c.h.stop().await;
}

#[tokio::test]
async fn flow_control_caps_calls_in_flight_and_fails_fast_past_the_waiters() {
    let hold = Arc::new(tokio::sync::Semaphore::new(0));
    let room = FakeRoom {
        hold: Some(hold.clone()),
        ..FakeRoom::default()
    };
    let mut config = test_config();
    config.fanout.room_inflight = 2;
    config.fanout.room_waiters = 2;
    let c = cluster_with(config, vec![room], false).await;
    online(&c.sessions, "alice", "room-1", 1);
    let h = Arc::new(c.h);
    let push = |h: Arc<common::Harness>| {
        tokio::spawn(async move {
            h.post(
                "/v1/apps/demo/push",
                Some("k-demo"),
                json!({"users": ["alice"], "payload": 1}),
            )
            .await
            .json
        })
    };
    // Two calls reach the room one after the other and are held there: both RPC slots busy.
    let pushes = c.rooms[0].pushes.clone();
    let mut calls = vec![];
    for n in 1..=2 {
        calls.push(push(h.clone()));
        testkit::wait_until("a push in the room", Duration::from_secs(10), || {
            let seen = pushes.lock().unwrap().len();
            async move { (seen == n).then_some(()) }
        })
        .await
        .unwrap();
    }
    // Of four more, two wait their turn (and then share one Push); two fail fast.
    calls.extend((0..4).map(|_| push(h.clone())));
    let finished = testkit::wait_until("two calls refused", Duration::from_secs(10), || {
        let done: Vec<usize> = calls
            .iter()
            .enumerate()
            .filter(|(_, c)| c.is_finished())
            .map(|(i, _)| i)
            .collect();
        async move { (done.len() == 2).then_some(done) }
    })
    .await
    .unwrap();
    hold.add_permits(100);
    let mut sessions = vec![];
    for (i, call) in calls.into_iter().enumerate() {
        let answer = call.await.unwrap();
        sessions.push((finished.contains(&i), answer["sessions"].as_u64().unwrap()));
    }
    for (refused, n) in &sessions {
        assert_eq!(*n, if *refused { 0 } else { 1 }, "{sessions:?}");
    }
    assert_eq!(c.rooms[0].max_inflight.load(Ordering::SeqCst), 2);
    let items: Vec<usize> = pushes
        .lock()
        .unwrap()
        .iter()
        .map(|p| p.items.len())
        .collect();
    assert_eq!(
        items,
        vec![1, 1, 2],
        "the two waiting calls were merged into one Push"
    );
}
