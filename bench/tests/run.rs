//! keeper-bench end to end: a short run of every phase against a real 3-node keeper cluster.

use std::process::Command;

use testkit::KeeperCluster;

const BENCH: &str = env!("CARGO_BIN_EXE_keeper-bench");

#[tokio::test(flavor = "multi_thread")]
async fn a_short_run_measures_every_phase_and_writes_what_it_counts() {
    let cluster = KeeperCluster::start(&testkit::bin("keeper"), 3, "")
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("keeper.json");
    let endpoints = cluster.endpoints().join(",");
    let run = tokio::task::spawn_blocking({
        let out = out.clone();
        move || {
            Command::new(BENCH)
                .args(["run", "--system", "keeper", "--endpoints", &endpoints])
                .arg("--out")
                .arg(&out)
                .args([
                    "--put-clients",
                    "1,20",
                    "--warmup",
                    "200ms",
                    "--duration",
                    "500ms",
                ])
                .args(["--get-clients", "20", "--get-keys", "50"])
                .args(["--watch-connections", "2", "--watches-per-connection", "5"])
                .args(["--watch-events", "20", "--watch-rate", "100"])
                .output()
                .unwrap()
        }
    })
    .await
    .unwrap();
    assert!(
        run.status.success(),
        "keeper-bench failed:\n{}",
        String::from_utf8_lossy(&run.stderr)
    );

    let results: serde_json::Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let phases = results["phases"].as_array().unwrap();
    let names: Vec<&str> = phases.iter().map(|p| p["name"].as_str().unwrap()).collect();
    assert_eq!(
        names,
        [
            "put c=1",
            "put c=20",
            "get linearizable c=20",
            "get serializable c=20"
        ]
    );
    for phase in phases {
        assert!(
            phase["ops"].as_u64().unwrap() > 0,
            "nothing measured: {phase}"
        );
        assert_eq!(phase["errors"].as_u64(), Some(0), "{phase}");
    }
    // 20 clients share 16 connections.
    assert_eq!(phases[1]["clients"].as_u64(), Some(20));
    assert_eq!(phases[1]["connections"].as_u64(), Some(16));
    assert!(results["watch"].is_object(), "no watch result: {results}");

    // Every counted put is a key in the cluster (warm-up puts add more).
    let counted: u64 = phases[..2].iter().map(|p| p["ops"].as_u64().unwrap()).sum();
    let mut client = cluster.client().await.unwrap();
    let written = client
        .get(
            "bench/put/",
            Some(
                etcd_client::GetOptions::new()
                    .with_prefix()
                    .with_count_only(),
            ),
        )
        .await
        .unwrap()
        .count() as u64;
    assert!(
        written >= counted,
        "{counted} puts counted, {written} keys written"
    );
}
