//! room as a real process with a real keeper (and a real register): config and apps from the
//! keeper applied live, registration in discovery, sessions in the register, digest repair, drain.
//!
//! Needs the `keeper` and `register` binaries built in the same target dir
//! (`cargo build -p keeper -p register`); the room binary is built with these tests.

mod common;

use std::path::Path;
use std::time::Duration;

use common::*;
use keeper_sdk::Keeper;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::Format;
use longlink_client::Connection;
use longlink_client::Frame;
use longlink_client::Transport;
use longlink_proto::registerpb;
use longlink_proto::registerpb::register_client::RegisterClient;
use longlink_proto::roompb;
use longlink_proto::roompb::room_client::RoomClient;
use testkit::KeeperCluster;
use testkit::Process;
use testkit::free_port;
use testkit::wait_until;

const APPS: &str = r#"
[[apps]]
id = "demo"
secret = "demo-secret"

[[apps]]
id = "other"
secret = "other-secret"
"#;

/// Pushes `body` as the next version of `service`'s config document.
async fn push_config(k: &Keeper, service: &str, body: &str) {
    let key = keeper_sdk::layout::config_key(service);
    let (current, rev) = match k.get(&key).await.unwrap() {
        Some(kv) => (
            serde_json::from_slice::<ConfigDocument>(&kv.value)
                .unwrap()
                .version,
            kv.mod_revision,
        ),
        None => (0, 0),
    };
    let doc = ConfigDocument {
        version: current + 1,
        format: Format::Toml,
        body: body.to_string(),
        updated_at: keeper_sdk::layout::now_rfc3339(),
        author: "room-tests".into(),
    };
    let json = serde_json::to_vec(&doc).unwrap();
    k.put(
        &keeper_sdk::layout::config_history_key(service, doc.version),
        json.clone(),
    )
    .await
    .unwrap();
    assert!(k.cas(&key, rev, json).await.unwrap(), "config push raced");
}

struct RoomProc {
    process: Process,
    id: String,
    tcp: String,
    ws: String,
    grpc: String,
}

fn start_room(dir: &Path, id: &str, keeper: &str) -> RoomProc {
    let (tcp, ws, grpc) = (
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
        format!("127.0.0.1:{}", free_port()),
    );
    let args = vec![
        "--id".into(),
        id.into(),
        "--tcp".into(),
        tcp.clone(),
        "--ws".into(),
        ws.clone(),
        "--grpc".into(),
        grpc.clone(),
        "--keeper".into(),
        keeper.into(),
    ];
    let process = Process::start(
        id,
        Path::new(env!("CARGO_BIN_EXE_room")),
        &args,
        &dir.join(format!("{id}.log")),
        &[],
    )
    .unwrap();
    RoomProc {
        process,
        id: id.into(),
        tcp,
        ws,
        grpc,
    }
}

async fn in_discovery(k: &Keeper, service: &str, id: &str) -> bool {
    k.get(&keeper_sdk::layout::instance_key(service, id))
        .await
        .ok()
        .flatten()
        .is_some()
}

async fn login(addr: &str, user: &str) -> Option<(Connection, longlink_proto::clientpb::Welcome)> {
    let mut c = Connection::connect(addr, Transport::Tcp).await.ok()?;
    let w = c.auth(&token("demo", user, None, SECRET)).await.ok()?;
    Some((c, w))
}

/// Starts register `reg1` and waits until the slot controller gave it every slot.
async fn start_register(keepers: &KeeperCluster, k: &Keeper, endpoint: &str) -> (Process, String) {
    let reg_addr = format!("127.0.0.1:{}", free_port());
    let process = Process::start(
        "register",
        &testkit::bin("register"),
        &[
            "--id".into(),
            "reg1".into(),
            "--listen".into(),
            reg_addr.clone(),
            "--data-dir".into(),
            keepers.dir.path().join("reg1").display().to_string(),
            "--keeper".into(),
            endpoint.to_string(),
        ],
        &keepers.dir.path().join("register.log"),
        &[],
    )
    .unwrap();
    wait_until(
        "slot map owned by reg1",
        Duration::from_secs(30),
        || async {
            let kv = k.get("/register/slots").await.ok()??;
            let map: longlink_common::SlotMap = serde_json::from_slice(&kv.value).ok()?;
            map.slots.iter().all(|o| o == "reg1").then_some(())
        },
    )
    .await
    .unwrap();
    (process, reg_addr)
}

/// A one-node keeper with the test apps pushed: the cluster, a client and its endpoint.
async fn keeper_with_apps() -> (KeeperCluster, Keeper, String) {
    let keepers = KeeperCluster::start(&testkit::bin("keeper"), 1, "")
        .await
        .unwrap();
    let endpoint = keepers.endpoints()[0].clone();
    let k = Keeper::connect(std::slice::from_ref(&endpoint))
        .await
        .unwrap();
    push_config(&k, "apps", APPS).await;
    (keepers, k, endpoint)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keeper_config_is_live_and_sessions_live_in_the_register() {
    let (keepers, k, endpoint) = keeper_with_apps().await;

    let (_register, reg_addr) = start_register(&keepers, &k, &endpoint).await;

    let room = start_room(keepers.dir.path(), "room-a", &endpoint);
    wait_until("room-a in discovery", Duration::from_secs(30), || async {
        in_discovery(&k, "room", "room-a").await.then_some(())
    })
    .await
    .unwrap();
    let info: keeper_sdk::InstanceInfo = serde_json::from_slice(
        &k.get(&keeper_sdk::layout::instance_key("room", "room-a"))
            .await
            .unwrap()
            .unwrap()
            .value,
    )
    .unwrap();
    assert_eq!(info.addrs.get("tcp"), Some(&room.tcp));
    assert_eq!(info.addrs.get("ws"), Some(&room.ws));
    assert_eq!(info.addrs.get("grpc"), Some(&room.grpc));

    // apps from the keeper: demo tokens are accepted.
    let (mut c, w) = wait_until(
        "login with keeper-provided apps",
        Duration::from_secs(20),
        || login(&room.tcp, "alice"),
    )
    .await
    .unwrap();

    // The session is in the register after welcome...
    let mut reg = RegisterClient::connect(format!("http://{reg_addr}"))
        .await
        .unwrap();
    let lookup = |mut reg: RegisterClient<tonic::transport::Channel>| async move {
        reg.lookup(registerpb::LookupRequest {
            epoch: 0,
            app: "demo".into(),
            user: "alice".into(),
        })
        .await
        .ok()
        .map(|r| r.into_inner())
    };
    let found = lookup(reg.clone()).await.expect("lookup answers");
    assert_eq!(found.result.unwrap().status, registerpb::Status::Ok as i32);
    assert_eq!(found.sessions.len(), 1, "{:?}", found.sessions);
    assert_eq!(found.sessions[0].room_id, "room-a");
    assert_eq!(found.sessions[0].conn_id, w.conn_id);

    // ... and gone after close.
    c.ping().await.unwrap();
    drop(c);
    wait_until("session detached", Duration::from_secs(10), || {
        let reg = reg.clone();
        async move {
            let r = lookup(reg).await?;
            (r.result?.status == registerpb::Status::Ok as i32 && r.sessions.is_empty())
                .then_some(())
        }
    })
    .await
    .unwrap();

    // A refused login leaves nothing in the register.
    let mut bad = Connection::connect(&room.tcp, Transport::Tcp)
        .await
        .unwrap();
    bad.send(&Frame::Auth(longlink_proto::clientpb::Auth {
        token: token("demo", "mallory", None, "wrong"),
    }))
    .await
    .unwrap();
    expect_error_then_close(&mut bad, "unauthorized").await;
    let r = reg
        .lookup(registerpb::LookupRequest {
            epoch: 0,
            app: "demo".into(),
            user: "mallory".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(r.sessions.is_empty());

    // A live limit change pushed through the keeper: small max frame.
    push_config(&k, "room", "max_frame_bytes = 400\n").await;
    wait_until(
        "max_frame_bytes = 400 applied",
        Duration::from_secs(20),
        || async {
            let (mut c, _) = login(&room.tcp, "bob").await?;
            c.uplink(vec![b'x'; 1000]).await.ok()?;
            // A pong means the uplink was accepted: not applied yet.
            c.ping().await.ok()?;
            match tokio::time::timeout(Duration::from_secs(2), c.recv()).await {
                Ok(Ok(Some(Frame::Error(e)))) if e.code == "frame_too_large" => Some(()),
                _ => None,
            }
        },
    )
    .await
    .unwrap();
    // A document that parses but fails validation (max_frame_bytes below 64) is not applied.
    push_config(&k, "room", "max_frame_bytes = 1\n").await;
    let report = wait_until(
        "room-a processed version 2 of room",
        Duration::from_secs(20),
        || async {
            let kv = k.get("/applied/room/room-a").await.ok()??;
            let report: serde_json::Value = serde_json::from_slice(&kv.value).ok()?;
            (report["version"].as_u64()? >= 2).then_some(report)
        },
    )
    .await
    .unwrap();
    // The refusal is reported where `keeperctl config push --wait` and `services` look.
    assert_eq!(report["ok"], false, "{report}");
    assert!(
        report["error"]
            .as_str()
            .unwrap()
            .contains("max_frame_bytes"),
        "{report}"
    );
    let (mut c, _) = login(&room.tcp, "carol")
        .await
        .expect("auth frames still fit");
    c.uplink(vec![b'x'; 300]).await.unwrap();
    c.ping().await.unwrap();
    assert_eq!(
        next(&mut c).await,
        Some(Frame::Pong),
        "300 bytes fit in 400"
    );
    c.uplink(vec![b'x'; 1000]).await.unwrap();
    expect_error_then_close(&mut c, "frame_too_large").await;
    drop(room);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_moves_clients_to_another_room_and_leaves_discovery() {
    let (keepers, k, endpoint) = keeper_with_apps().await;
    let (_register, _) = start_register(&keepers, &k, &endpoint).await;
    let mut a = start_room(keepers.dir.path(), "room-a", &endpoint);
    let b = start_room(keepers.dir.path(), "room-b", &endpoint);
    for id in ["room-a", "room-b"] {
        wait_until("rooms in discovery", Duration::from_secs(30), || async {
            in_discovery(&k, "room", id).await.then_some(())
        })
        .await
        .unwrap();
    }
    let mut clients = vec![];
    for i in 0..5 {
        let user = format!("u{i}");
        let c = wait_until("login to room-a", Duration::from_secs(20), || {
            login(&a.tcp, &user)
        })
        .await
        .unwrap();
        clients.push(c.0);
    }
    let doc = keeper_sdk::layout::CommandDoc {
        seq: 1,
        verb: "drain".into(),
        args: serde_json::Value::Null,
        issued_at: keeper_sdk::layout::now_rfc3339(),
    };
    k.put(
        &keeper_sdk::layout::command_key("room", &a.id, 1),
        serde_json::to_vec(&doc).unwrap(),
    )
    .await
    .unwrap();
    for c in &mut clients {
        match next(c).await {
            Some(Frame::Kick(kick)) => {
                assert_eq!(kick.reason, "drain");
                assert_eq!(kick.reconnect, vec![b.tcp.clone()]);
            }
            other => panic!("expected a drain kick, got {other:?}"),
        }
    }
    wait_until(
        "room-a leaves discovery",
        Duration::from_secs(20),
        || async { (!in_discovery(&k, "room", "room-a").await).then_some(()) },
    )
    .await
    .unwrap();
    wait_until("room-a exits", Duration::from_secs(20), || {
        let running = a.process.is_running();
        async move { (!running).then_some(()) }
    })
    .await
    .unwrap();
    let _ = &b.ws;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_session_the_register_lost_is_repaired_by_the_digest() {
    let (keepers, k, endpoint) = keeper_with_apps().await;
    // Rounds 2 s apart: the lookup right after the Detach below lands between two of them.
    push_config(&k, "room", "digest_interval_s = 2\n").await;
    let (_register, reg_addr) = start_register(&keepers, &k, &endpoint).await;
    let room = start_room(keepers.dir.path(), "room-a", &endpoint);
    // A token with a platform: it travels with the session through Attach and Sync.
    let token = longlink_client::sign(
        &longlink_client::Claims {
            app: "demo".into(),
            sub: "alice".into(),
            dev: Some("phone".into()),
            plat: Some("ios".into()),
            exp: 4_000_000_000,
        },
        SECRET,
    );
    let (_alice, welcome) = wait_until("login", Duration::from_secs(30), || {
        let (tcp, token) = (room.tcp.clone(), token.clone());
        async move {
            let mut c = Connection::connect(&tcp, Transport::Tcp).await.ok()?;
            let w = c.auth(&token).await.ok()?;
            Some((c, w))
        }
    })
    .await
    .unwrap();
    let mut reg = RegisterClient::connect(format!("http://{reg_addr}"))
        .await
        .unwrap();
    let sessions = |mut reg: RegisterClient<tonic::transport::Channel>| async move {
        let r = reg
            .lookup(registerpb::LookupRequest {
                epoch: 0,
                app: "demo".into(),
                user: "alice".into(),
            })
            .await
            .ok()?
            .into_inner();
        (r.result?.status == registerpb::Status::Ok as i32).then_some(r.sessions)
    };
    let attached = sessions(reg.clone()).await.unwrap();
    assert_eq!(attached.len(), 1);
    assert_eq!(attached[0].platform, "ios");

    // The register loses the session behind the room's back (as after a lost Detach race or a
    // restored backup); the room still holds the connection.
    let kv = k.get("/register/slots").await.unwrap().unwrap();
    let map: longlink_common::SlotMap = serde_json::from_slice(&kv.value).unwrap();
    let detached = reg
        .detach(registerpb::DetachRequest {
            epoch: map.epoch,
            sessions: vec![registerpb::SessionKey {
                app: "demo".into(),
                user: "alice".into(),
                room_id: "room-a".into(),
                conn_id: welcome.conn_id,
            }],
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(detached.results[0].status, registerpb::Status::Ok as i32);
    assert!(sessions(reg.clone()).await.unwrap().is_empty());

    // The next digest round sees the mismatch and re-syncs the slot.
    let back = wait_until(
        "the digest to restore alice's session",
        Duration::from_secs(20),
        || {
            let reg = reg.clone();
            async move { sessions(reg).await.filter(|s| !s.is_empty()) }
        },
    )
    .await
    .unwrap();
    assert_eq!(back[0].conn_id, welcome.conn_id);
    assert_eq!(back[0].room_id, "room-a");
    assert_eq!(back[0].platform, "ios");
    drop(room);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn device_events_no_center_takes_are_counted_in_stats() {
    let (keepers, k, endpoint) = keeper_with_apps().await;
    // demo now has a webhook, so its presence events go to the coordinator; no center runs.
    let hooked = APPS.replacen(
        "secret = \"demo-secret\"",
        "secret = \"demo-secret\"\nwebhook_url = \"http://127.0.0.1:9/hook\"",
        1,
    );
    push_config(&k, "apps", &hooked).await;
    let (_register, _) = start_register(&keepers, &k, &endpoint).await;
    let room = start_room(keepers.dir.path(), "room-a", &endpoint);
    let (c, _) = wait_until("login to room-a", Duration::from_secs(20), || {
        login(&room.tcp, "alice")
    })
    .await
    .unwrap();
    drop(c);
    let client = RoomClient::connect(format!("http://{}", room.grpc))
        .await
        .unwrap();
    // Online and offline are each given up after every attempt found no center.
    let stats = wait_until("events counted as failed", Duration::from_secs(30), || {
        let mut client = client.clone();
        async move {
            let s = client
                .stats(roompb::StatsRequest {})
                .await
                .ok()?
                .into_inner();
            (s.events_failed >= 2).then_some(s)
        }
    })
    .await
    .unwrap();
    assert_eq!(stats.presence_drops, 0, "the queue never filled: {stats:?}");
    assert_eq!(stats.connections, 0);
}
