//! The README's failover tour through `scripts/cluster.sh`: 3 keepers, 2 registers, 2 rooms and a
//! center as separate processes on the fixed loopback ports. A `longlink listen` device gets a
//! push, the register owning its slot is killed with SIGKILL, presence never says "offline" while
//! the slot moves and finds the session again at the new owner, and a second push arrives.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::process::Output;
use std::sync::Arc;
use std::sync::Mutex;
use std::time::Duration;

use longlink_common::SlotMap;
use longlink_common::slot_of;
use testkit::Process;
use testkit::wait_until;

const LONGLINK: &str = env!("CARGO_BIN_EXE_longlink");
const KEEPERS: &str = "127.0.0.1:7379,127.0.0.1:7380,127.0.0.1:7381";
/// The demo key of `config/apps.toml`, which `cluster.sh up` seeds.
const API_KEY: &str = "demo-local-key";

/// Runs `cluster.sh` with the state in a temp dir; `down` runs on drop, also when a test fails.
struct Cluster {
    dir: PathBuf,
}

impl Cluster {
    fn script(&self, verb: &str) -> Output {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster.sh");
        let bins = testkit::bin("keeper").parent().unwrap().to_path_buf();
        Command::new(script)
            .arg(verb)
            .env("LONGLINK_CLUSTER_DIR", &self.dir)
            .env("LONGLINK_BIN_DIR", bins)
            .env("LONGLINK_LOG", "info")
            .output()
            .expect("run scripts/cluster.sh")
    }

    fn pid(&self, name: &str) -> u32 {
        let text = std::fs::read_to_string(self.dir.join(format!("{name}.pid"))).unwrap();
        text.trim().parse().unwrap()
    }

    fn logs(&self) -> String {
        let mut all = String::new();
        for entry in std::fs::read_dir(&self.dir).unwrap().flatten() {
            let path = entry.path();
            if path.extension().is_some_and(|e| e == "log") {
                let text = std::fs::read_to_string(&path).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(15).collect();
                all.push_str(&format!("== {}\n", path.display()));
                for line in tail.into_iter().rev() {
                    all.push_str(line);
                    all.push('\n');
                }
            }
        }
        all
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let out = self.script("down");
        if !out.status.success() {
            eprintln!("cluster.sh down: {}", String::from_utf8_lossy(&out.stderr));
        }
    }
}

fn longlink(args: &[&str]) -> Output {
    Command::new(LONGLINK)
        .args(args)
        .env("LONGLINK_LOG", "warn")
        .output()
        .expect("run longlink")
}

fn keeperctl(args: &[&str]) -> Output {
    Command::new(testkit::bin("keeperctl"))
        .args(["--endpoints", KEEPERS])
        .args(args)
        .output()
        .expect("run keeperctl")
}

fn push(payload: &str) -> serde_json::Value {
    let out = longlink(&["push", "--app", "demo", "--user", "alice", payload]);
    assert!(out.status.success(), "{out:?}");
    serde_json::from_slice(&out.stdout).unwrap()
}

/// The payloads the listener printed so far, in order.
fn received(log: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    text.lines()
        .filter(|l| l.starts_with('{'))
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .map(|m| m["payload"].clone())
        .collect()
}

/// Presence of demo/alice: `Some(online)` for a 200 answer, `None` for a retryable 503.
async fn presence(http: &reqwest::Client) -> anyhow::Result<Option<bool>> {
    let response = http
        .get("http://127.0.0.1:8080/v1/apps/demo/users/alice")
        .bearer_auth(API_KEY)
        .send()
        .await?;
    let status = response.status();
    let body: serde_json::Value = response.json().await?;
    match status.as_u16() {
        200 => Ok(Some(body["online"].as_bool().unwrap())),
        503 => Ok(None),
        other => anyhow::bail!("presence answered {other}: {body}"),
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn cluster_script_survives_killing_the_register_of_a_listening_user() {
    let tmp = tempfile::tempdir().unwrap();
    let cluster = Cluster {
        dir: tmp.path().join("cluster"),
    };
    let up = cluster.script("up");
    assert!(
        up.status.success(),
        "cluster.sh up failed: {}\n{}",
        String::from_utf8_lossy(&up.stderr),
        cluster.logs()
    );
    let status = String::from_utf8_lossy(&cluster.script("status").stdout).into_owned();
    for name in ["keeper-3", "register-2", "room-2", "center-1"] {
        assert!(
            status.contains(&format!("{name} running")),
            "{name}: {status}"
        );
    }

    // The rooms apply the seeded apps config asynchronously: retry the device until it is in.
    let listen_log = tmp.path().join("listen.log");
    let args: Vec<String> = ["listen", "--app", "demo", "--user", "alice", "--json"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    let mut listener = None;
    wait_until("the listener to connect", Duration::from_secs(60), || {
        let connected = std::fs::read_to_string(&listen_log)
            .unwrap_or_default()
            .contains("listening as demo/alice");
        let running = listener.as_mut().is_some_and(Process::is_running);
        if !connected && !running {
            listener = Some(
                Process::start("listen", Path::new(LONGLINK), &args, &listen_log, &[]).unwrap(),
            );
        }
        async move { connected.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));

    assert_eq!(push(r#"{"n":1}"#)["sessions"], 1);
    wait_until("the first push to arrive", Duration::from_secs(30), || {
        let got = received(&listen_log);
        async move { (got == [serde_json::json!({"n": 1})]).then_some(()) }
    })
    .await
    .unwrap();

    // SIGKILL the register that owns alice's slot.
    let slots = keeperctl(&["kv", "get", "/register/slots"]);
    assert!(slots.status.success(), "{slots:?}");
    let map: SlotMap = serde_json::from_slice(&slots.stdout).unwrap();
    let owner = map.slots[slot_of("demo", "alice") as usize].clone();
    assert!(owner.starts_with("register-"), "{owner}");
    let kill = Command::new("kill")
        .args(["-9", &cluster.pid(&owner).to_string()])
        .status()
        .unwrap();
    assert!(kill.success());

    // While the slot moves, presence may answer "unavailable, retry" but never "offline".
    let http = reqwest::Client::new();
    let answers = Arc::new(Mutex::new(Vec::new()));
    wait_until(
        "alice's slot to have a new owner that knows her session",
        Duration::from_secs(60),
        || {
            let (http, answers, killed) = (http.clone(), answers.clone(), owner.clone());
            async move {
                let online = presence(&http).await.expect("presence");
                answers.lock().unwrap().push(online);
                let out = keeperctl(&["kv", "get", "/register/slots"]);
                let map: SlotMap = serde_json::from_slice(&out.stdout).ok()?;
                let now = &map.slots[slot_of("demo", "alice") as usize];
                (*now != killed && online == Some(true)).then_some(())
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let answers = answers.lock().unwrap().clone();
    assert!(
        !answers.contains(&Some(false)),
        "presence said offline during the failover: {answers:?}"
    );
    assert!(listener.as_mut().unwrap().is_running());
    assert_eq!(push(r#"{"n":2}"#)["sessions"], 1);
    wait_until("the second push to arrive", Duration::from_secs(30), || {
        let got = received(&listen_log);
        async move { (got.len() == 2).then_some(got) }
    })
    .await
    .unwrap();
    drop(cluster);
}
