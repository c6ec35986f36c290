//! The typed `register` config, pushed by an operator with the real `keeperctl` to a real keeper,
//! is applied live by a real register process; a document that fails the register's validation is
//! refused, reported back to `keeperctl --wait`, and the previous limits stay in force.

use std::path::Path;
use std::process::Command;
use std::process::Output;
use std::time::Duration;

use longlink_common::SlotMap;
use longlink_proto::registerpb::AttachRequest;
use longlink_proto::registerpb::Session;
use longlink_proto::registerpb::register_client::RegisterClient;
use testkit::KeeperCluster;
use testkit::Process;
use testkit::wait_until;
use tonic::transport::Channel;

fn keeperctl(endpoints: &[String], args: &[&str]) -> Output {
    Command::new(testkit::bin("keeperctl"))
        .arg("--endpoints")
        .arg(endpoints.join(","))
        .args(args)
        .output()
        .expect("run keeperctl")
}

fn push(endpoints: &[String], dir: &Path, name: &str, body: &str) -> Output {
    let file = dir.join(name);
    std::fs::write(&file, body).unwrap();
    keeperctl(
        endpoints,
        &[
            "config",
            "push",
            "register",
            file.to_str().unwrap(),
            "--wait",
            "--timeout",
            "30",
        ],
    )
}

/// Attaches `n` sessions at the map's epoch: `Ok` or the gRPC status message.
async fn attach(client: &mut RegisterClient<Channel>, epoch: u64, n: usize) -> Result<(), String> {
    let sessions = (0..n)
        .map(|i| Session {
            app: "demo".into(),
            user: format!("u{i}"),
            device: "phone".into(),
            room_id: "room-t".into(),
            conn_id: i as u64,
            ..Default::default()
        })
        .collect();
    client
        .attach(AttachRequest { epoch, sessions })
        .await
        .map(|_| ())
        .map_err(|s| s.message().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn keeperctl_push_changes_the_batch_limit_live_and_a_bad_document_is_refused() {
    let keepers = KeeperCluster::start(&testkit::bin("keeper"), 1, "")
        .await
        .unwrap();
    let endpoints = keepers.endpoints();
    let addr = format!("127.0.0.1:{}", testkit::free_port());
    let args: Vec<String> = [
        "--id",
        "r1",
        "--listen",
        &addr,
        "--data-dir",
        &keepers.dir.path().join("r1").display().to_string(),
        "--keeper",
        &endpoints.join(","),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _register = Process::start(
        "register",
        &testkit::bin("register"),
        &args,
        &keepers.dir.path().join("register.log"),
        &[],
    )
    .unwrap();
    let client = keepers.client().await.unwrap();
    let map = wait_until("r1 to own every slot", Duration::from_secs(30), || {
        let mut client = client.clone();
        async move {
            let resp = client.get("/register/slots", None).await.ok()?;
            let map: SlotMap = serde_json::from_slice(resp.kvs().first()?.value()).ok()?;
            map.slots.iter().all(|o| o == "r1").then_some(map)
        }
    })
    .await
    .unwrap();
    let mut register = wait_until("the register to serve", Duration::from_secs(30), || {
        let url = format!("http://{addr}");
        async move { RegisterClient::connect(url).await.ok() }
    })
    .await
    .unwrap();
    // The default limit (10 000) lets a 6-session batch through.
    wait_until("an attach to succeed", Duration::from_secs(30), || {
        let mut register = register.clone();
        async move { attach(&mut register, map.epoch, 6).await.ok() }
    })
    .await
    .unwrap();

    let dir = tempfile::tempdir().unwrap();
    let ok = push(&endpoints, dir.path(), "small.toml", "max_batch = 5\n");
    assert!(ok.status.success(), "push failed: {ok:?}");
    let refused = attach(&mut register, map.epoch, 6).await.unwrap_err();
    assert!(
        refused.contains('6') && refused.contains('5'),
        "the error names the size and the limit: {refused}"
    );
    attach(&mut register, map.epoch, 5).await.unwrap();

    // max_batch = 0 parses and matches the schema, but the register refuses it.
    let bad = push(&endpoints, dir.path(), "zero.toml", "max_batch = 0\n");
    assert!(!bad.status.success(), "a refused document must fail --wait");
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(stderr.contains("max_batch"), "{stderr}");
    assert!(attach(&mut register, map.epoch, 6).await.is_err());
    attach(&mut register, map.epoch, 5).await.unwrap();

    // An unknown key never reaches the register: keeperctl refuses it against the schema.
    let unknown = push(&endpoints, dir.path(), "typo.toml", "max_btach = 50\n");
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("max_btach"));
}
