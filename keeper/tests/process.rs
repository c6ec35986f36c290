//! The keeper binary as an operator meets it: clean exit on SIGTERM, a one-line reason and a
//! non-zero exit when it cannot start.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::KeeperCluster;

const BIN: &str = env!("CARGO_BIN_EXE_keeper");

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_shuts_down_cleanly_and_restart_keeps_data() {
    let mut c = KeeperCluster::start(Path::new(BIN), 1, "").await.unwrap();
    let mut client = c.client().await.unwrap();
    client.put("kept", "1", None).await.unwrap();
    drop(client);
    let mut process = c.nodes[0].process.take().unwrap();
    let code = process.terminate(Duration::from_secs(10)).unwrap();
    assert_eq!(
        code,
        Some(0),
        "keeper exited with {code:?} after SIGTERM:\n{}",
        process.log_tail(20)
    );
    c.start_node(1).unwrap();
    c.leader().await.unwrap();
    let mut client = c.client().await.unwrap();
    assert_eq!(client.get("kept", None).await.unwrap().kvs().len(), 1);
}

/// A follower keeps a stream open to the leader for the writes it forwards; SIGTERM must still
/// stop the leader promptly (a graceful server shutdown waits for open streams), and the others
/// go on without it.
#[tokio::test(flavor = "multi_thread")]
async fn sigterm_stops_a_leader_that_followers_forward_writes_to() {
    let mut c = KeeperCluster::start(Path::new(BIN), 3, "").await.unwrap();
    let leader = c.leader().await.unwrap();
    let followers: Vec<u64> = (1..=3).filter(|id| *id != leader).collect();
    for follower in &followers {
        let mut client = c.client_for(&[*follower]).await.unwrap();
        client
            .put("through", follower.to_string(), None)
            .await
            .unwrap();
    }
    let index = c.nodes.iter().position(|n| n.id == leader).unwrap();
    let mut process = c.nodes[index].process.take().unwrap();
    let code = process.terminate(Duration::from_secs(10));
    assert_eq!(
        code.as_ref().ok(),
        Some(&Some(0)),
        "the leader did not stop cleanly on SIGTERM ({code:?}):\n{}",
        process.log_tail(20)
    );
    let mut client = c.client_for(&followers).await.unwrap();
    client.put("after", "1", None).await.unwrap();
    assert_eq!(client.get("through", None).await.unwrap().kvs().len(), 1);
}

/// A storage failure stops Raft for good. The node must then exit, loudly, instead of keeping
/// its port open and failing every request (a half-alive node).
#[tokio::test(flavor = "multi_thread")]
async fn a_storage_failure_ends_the_process_with_the_reason() {
    let mut c = KeeperCluster::start(Path::new(BIN), 1, "snapshot_every = 20")
        .await
        .unwrap();
    // The first snapshot cannot create its temporary file where a directory stands.
    let blocker = c.dir.path().join("node-1").join("raft-snapshot.tmp");
    std::fs::create_dir_all(&blocker).unwrap();
    let mut client = c.client().await.unwrap();
    for i in 0..40 {
        if client.put(format!("k{i}"), "v", None).await.is_err() {
            break;
        }
    }
    let process = c.nodes[0].process.as_mut().unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while process.is_running() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "keeper still running 30 s after its snapshot failed:\n{}",
            process.log_tail(20)
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let log = process.log_tail(usize::MAX);
    assert!(
        log.contains("raft stopped on a fatal error") && log.contains("raft-snapshot"),
        "no reason in the log:\n{log}"
    );
}

#[test]
fn taken_port_and_bad_flags_fail_with_a_reason() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = taken.local_addr().unwrap().to_string();
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(BIN)
        .args(["--id", "1", "--listen", &addr, "--data-dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("cannot listen on") && stderr.contains(&addr),
        "{stderr}"
    );

    let out = Command::new(BIN)
        .args(["--id", "2", "--initial-cluster", "1=127.0.0.1:1"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("does not list this node's id 2"),
        "{stderr}"
    );
}
