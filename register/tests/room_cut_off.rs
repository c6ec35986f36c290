//! A room cut off from the keeper (its discovery lease expires) but alive and reachable keeps its
//! sessions in the register: its devices are still connected, so a lookup must not call them
//! offline. Once the room really dies, its sessions go. Real keeper, register and room processes;
//! the room reaches the keeper through a TCP proxy in this test, which the test cuts.

use std::time::Duration;

use keeper_sdk::Keeper;
use keeper_sdk::layout;
use keeper_sdk::layout::ConfigDocument;
use keeper_sdk::layout::Format;
use longlink_client::Connection;
use longlink_client::Transport;
use longlink_proto::registerpb::LookupRequest;
use longlink_proto::registerpb::Status;
use longlink_proto::registerpb::register_client::RegisterClient;
use testkit::KeeperCluster;
use testkit::Process;
use testkit::free_port;
use testkit::wait_until;
use tokio::net::TcpListener;
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

const SECRET: &str = "cut-secret";

/// Forwards `listen` to `target` until `cut` is cancelled, then drops every connection and
/// stops accepting: a partition of whoever uses `listen` from `target`.
async fn proxy(listener: TcpListener, target: String, cut: CancellationToken) {
    loop {
        let (mut inbound, _) = tokio::select! {
            _ = cut.cancelled() => return,
            a = listener.accept() => match a { Ok(a) => a, Err(_) => return },
        };
        let (target, cut) = (target.clone(), cut.clone());
        tokio::spawn(async move {
            let Ok(mut outbound) = TcpStream::connect(&target).await else {
                return;
            };
            tokio::select! {
                _ = cut.cancelled() => {}
                _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
            }
        });
    }
}

async fn push_apps(keeper: &Keeper) {
    let doc = ConfigDocument {
        version: 1,
        format: Format::Toml,
        body: format!("[[apps]]\nid = \"demo\"\nsecret = \"{SECRET}\"\n"),
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
}

/// The conn ids the register holds for demo/alice, or `None` if it gave no OK answer.
async fn alice(register: &RegisterClient<Channel>) -> Option<Vec<u64>> {
    let r = register
        .clone()
        .lookup(LookupRequest {
            epoch: 0,
            app: "demo".into(),
            user: "alice".into(),
        })
        .await
        .ok()?
        .into_inner();
    (r.result?.status == Status::Ok as i32).then(|| r.sessions.iter().map(|s| s.conn_id).collect())
}

fn start(name: &str, dir: &std::path::Path, args: &[String]) -> Process {
    Process::start(
        name,
        &testkit::bin(name),
        args,
        &dir.join(format!("{name}.log")),
        &[],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_room_cut_off_from_the_keeper_keeps_its_sessions_until_it_dies() {
    let keepers = KeeperCluster::start(&testkit::bin("keeper"), 1, "")
        .await
        .unwrap();
    let endpoint = keepers.endpoints()[0].clone();
    let keeper = Keeper::connect(std::slice::from_ref(&endpoint))
        .await
        .unwrap();
    push_apps(&keeper).await;
    let dir = keepers.dir.path();
    let reg_addr = format!("127.0.0.1:{}", free_port());
    let _register = start(
        "register",
        dir,
        &[
            "--id".into(),
            "r1".into(),
            "--listen".into(),
            reg_addr.clone(),
            "--data-dir".into(),
            dir.join("r1").display().to_string(),
            "--keeper".into(),
            endpoint.clone(),
        ],
    );

    let via = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let via_addr = via.local_addr().unwrap().to_string();
    let cut = CancellationToken::new();
    tokio::spawn(proxy(via, endpoint.clone(), cut.clone()));
    let tcp = format!("127.0.0.1:{}", free_port());
    let mut room = start(
        "room",
        dir,
        &[
            "--id".into(),
            "room-a".into(),
            "--tcp".into(),
            tcp.clone(),
            "--ws".into(),
            format!("127.0.0.1:{}", free_port()),
            "--grpc".into(),
            format!("127.0.0.1:{}", free_port()),
            "--keeper".into(),
            via_addr,
        ],
    );

    let token = longlink_client::token("demo", "alice", None, SECRET, Duration::from_secs(600));
    let mut device = wait_until("alice logged in", Duration::from_secs(30), || {
        let (tcp, token) = (tcp.clone(), token.clone());
        async move {
            let mut c = Connection::connect(&tcp, Transport::Tcp).await.ok()?;
            c.auth(&token).await.ok()?;
            Some(c)
        }
    })
    .await
    .unwrap();
    let register = RegisterClient::connect(format!("http://{reg_addr}"))
        .await
        .unwrap();
    let held = wait_until("alice in the register", Duration::from_secs(10), || {
        let register = register.clone();
        async move { alice(&register).await.filter(|s| s.len() == 1) }
    })
    .await
    .unwrap();

    // Cut the room off from the keeper: its lease expires and it leaves discovery.
    cut.cancel();
    let key = layout::instance_key("room", "room-a");
    wait_until("room-a to leave discovery", Duration::from_secs(30), || {
        let (keeper, key) = (&keeper, key.clone());
        async move { keeper.get(&key).await.ok()?.is_none().then_some(()) }
    })
    .await
    .unwrap();
    // Through the register noticing, probing and deciding: alice is never reported offline.
    for _ in 0..40 {
        let now = alice(&register).await;
        assert_eq!(
            now.as_ref(),
            Some(&held),
            "alice's session while room-a is cut off"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    device.ping().await.expect("the device is still connected");

    // A room that stops answering is gone: its sessions are dropped.
    room.kill9();
    wait_until(
        "alice's session to be dropped with the dead room",
        Duration::from_secs(20),
        || {
            let register = register.clone();
            async move { alice(&register).await.filter(|s| s.is_empty()) }
        },
    )
    .await
    .unwrap();
}
