//! keeperctl end to end: the real binary against a real 3-node keeper.
//!
//! Build the keeper first: `cargo build -p keeper --bins` (testkit finds it next to the tests).

use std::path::Path;
use std::process::Output;
use std::time::Duration;

use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::Value;
use serde_json::json;
use testkit::KeeperCluster;
use testkit::wait_until;

/// The config type of the test service, as a real service would declare it.
#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct AppConfig {
    name: String,
    port: u16,
    server: Server,
}

#[derive(Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
#[allow(dead_code)]
struct Server {
    host: String,
    #[serde(default)]
    workers: u32,
}

const VALID_V1: &str = "name = \"svc\"\nport = 8080\n\n[server]\nhost = \"a.example\"\n";
const VALID_V2: &str =
    "name = \"svc\"\nport = 9090\n\n[server]\nhost = \"b.example\"\nworkers = 4\n";

async fn cluster() -> KeeperCluster {
    KeeperCluster::start(&testkit::bin("keeper"), 3, "")
        .await
        .expect("start a 3-node keeper")
}

fn endpoints(cluster: &KeeperCluster) -> String {
    cluster.endpoints().join(",")
}

/// Runs keeperctl with `args` against `endpoints` and returns its output.
async fn ctl(endpoints: &str, args: &[&str]) -> Output {
    tokio::process::Command::new(env!("CARGO_BIN_EXE_keeperctl"))
        .arg("--endpoints")
        .arg(endpoints)
        .args(args)
        .env_remove("KEEPER_ENDPOINTS")
        .output()
        .await
        .expect("run keeperctl")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Asserts exit code `code` and returns stdout.
fn expect(o: &Output, code: i32) -> String {
    assert_eq!(
        o.status.code(),
        Some(code),
        "exit status\n--- stdout\n{}\n--- stderr\n{}",
        stdout(o),
        stderr(o)
    );
    stdout(o)
}

fn json_of(o: &Output) -> Value {
    let text = expect(o, 0);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

async fn put_raw(cluster: &KeeperCluster, key: &str, value: &str) {
    let mut c = cluster.client().await.unwrap();
    c.put(key, value, None).await.unwrap();
}

async fn publish_schema(cluster: &KeeperCluster, service: &str) {
    let schema = serde_json::to_string(&schemars::schema_for!(AppConfig)).unwrap();
    put_raw(cluster, &format!("/schema/{service}"), &schema).await;
}

fn write(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path.display().to_string()
}

async fn history_versions(ep: &str, service: &str) -> Vec<u64> {
    let h = json_of(&ctl(ep, &["--json", "config", "history", service]).await);
    h["versions"]
        .as_array()
        .unwrap()
        .iter()
        .map(|d| d["version"].as_u64().unwrap())
        .collect()
}

async fn register_fake_instance(cluster: &KeeperCluster, service: &str, id: &str) {
    let info = json!({"id": id, "addrs": {"grpc": "127.0.0.1:1"}, "zone": "z1",
                      "started_at": "2026-01-01T00:00:00Z", "meta": {}});
    put_raw(
        cluster,
        &format!("/instances/{service}/{id}"),
        &info.to_string(),
    )
    .await;
}

/// Waits until the keeper holds `key` with a JSON `field` equal to `want`.
async fn wait_for_field(cluster: &KeeperCluster, key: &str, field: &str, want: Value) {
    wait_until(
        &format!("{key}.{field} == {want}"),
        Duration::from_secs(20),
        || {
            let want = want.clone();
            async move {
                let mut c = cluster.client().await.ok()?;
                let resp = c.get(key, None).await.ok()?;
                let kv = resp.kvs().first()?;
                let v: Value = serde_json::from_slice(kv.value()).ok()?;
                (v[field] == want).then_some(())
            }
        },
    )
    .await
    .unwrap();
}

#[tokio::test]
async fn kv_round_trip_with_json() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    let put = json_of(&ctl(&ep, &["--json", "kv", "put", "/t/a", "one"]).await);
    assert!(put["revision"].as_i64().unwrap() > 0);
    ctl(&ep, &["kv", "put", "/t/b", "two"]).await;
    let got = json_of(&ctl(&ep, &["--json", "kv", "get", "/t/a"]).await);
    assert_eq!(got["value"], "one");
    assert_eq!(got["key"], "/t/a");
    assert_eq!(expect(&ctl(&ep, &["kv", "get", "/t/b"]).await, 0), "two\n");
    let all = json_of(&ctl(&ep, &["--json", "kv", "get", "--prefix", "/t/"]).await);
    let keys: Vec<&str> = all["kvs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["key"].as_str().unwrap())
        .collect();
    assert_eq!(keys, vec!["/t/a", "/t/b"]);
    let del = json_of(&ctl(&ep, &["--json", "kv", "del", "--prefix", "/t/"]).await);
    assert_eq!(del["deleted"], 2);
    let missing = ctl(&ep, &["kv", "get", "/t/a"]).await;
    expect(&missing, 1);
    assert!(
        stderr(&missing).starts_with("error: key not found: /t/a"),
        "{}",
        stderr(&missing)
    );
}

#[tokio::test]
async fn kv_watch_prints_events_from_a_revision() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    let first = json_of(&ctl(&ep, &["--json", "kv", "put", "/w/x", "1"]).await)["revision"]
        .as_i64()
        .unwrap();
    ctl(&ep, &["kv", "put", "/w/y", "2"]).await;
    ctl(&ep, &["kv", "del", "/w/x"]).await;
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_keeperctl"))
        .args([
            "--endpoints",
            &ep,
            "--json",
            "kv",
            "watch",
            "/w/",
            "--prefix",
            "--rev",
        ])
        .arg(first.to_string())
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines =
        tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(child.stdout.take().unwrap()));
    let mut events = Vec::new();
    while events.len() < 3 {
        let line = tokio::time::timeout(Duration::from_secs(20), lines.next_line())
            .await
            .expect("watch output within 20 s")
            .unwrap()
            .expect("watch still running");
        let v: Value = serde_json::from_str(&line).unwrap();
        events.push(format!(
            "{} {}",
            v["type"].as_str().unwrap(),
            v["key"].as_str().unwrap()
        ));
    }
    assert_eq!(events, vec!["PUT /w/x", "PUT /w/y", "DELETE /w/x"]);
    child.kill().await.unwrap();
}

#[tokio::test]
async fn config_push_validate_get_history_rollback() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    let dir = tempfile::tempdir().unwrap();
    let v1 = write(dir.path(), "v1.toml", VALID_V1);

    // No schema published yet: refused unless --no-schema.
    let refused = ctl(&ep, &["config", "push", "svc", &v1]).await;
    expect(&refused, 1);
    assert!(
        stderr(&refused).contains("no schema"),
        "{}",
        stderr(&refused)
    );
    assert!(history_versions(&ep, "svc").await.is_empty());

    publish_schema(&cluster, "svc").await;
    let pushed = ctl(&ep, &["config", "push", "svc", &v1]).await;
    let text = expect(&pushed, 0);
    assert!(text.contains("+port = 8080"), "diff shown: {text}");
    assert!(!text.contains('\x1b'), "no colour off a terminal");
    assert!(text.contains("pushed svc version 1"), "{text}");
    assert_eq!(
        expect(&ctl(&ep, &["config", "get", "svc"]).await, 0),
        VALID_V1
    );

    // --dry-run shows the diff and pushes nothing.
    let v2 = write(dir.path(), "v2.toml", VALID_V2);
    let dry = ctl(&ep, &["config", "push", "svc", &v2, "--dry-run"]).await;
    let text = expect(&dry, 0);
    assert!(
        text.contains("-port = 8080") && text.contains("+port = 9090"),
        "{text}"
    );
    assert_eq!(history_versions(&ep, "svc").await, vec![1]);

    // Invalid files: exit 1 naming the field and the line; nothing pushed.
    let cases = [
        (
            "unknown.toml",
            "name = \"svc\"\nport = 1\ncolour = \"red\"\n[server]\nhost = \"h\"\n",
            "unknown field `colour`",
            "line 3",
        ),
        (
            "type.toml",
            "name = \"svc\"\nport = \"eighty\"\n[server]\nhost = \"h\"\n",
            "`port` has the wrong type",
            "line 2",
        ),
        (
            "missing.toml",
            "name = \"svc\"\nport = 1\n\n[server]\nworkers = 2\n",
            "missing required field `server.host`",
            "line 4",
        ),
        (
            "nested.json",
            "{\n  \"name\": \"svc\",\n  \"port\": 1,\n  \"server\": {\n    \"host\": \"h\",\n    \"workers\": \"many\"\n  }\n}\n",
            "`server.workers` has the wrong type",
            "line 6",
        ),
    ];
    for (name, body, field, line) in cases {
        let file = write(dir.path(), name, body);
        let bad = ctl(&ep, &["config", "push", "svc", &file]).await;
        expect(&bad, 1);
        let err = stderr(&bad);
        assert!(err.starts_with("error: "), "{err}");
        assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
        assert!(err.contains(field) && err.contains(line), "{name}: {err}");
        assert!(err.contains("nothing pushed"), "{err}");
    }
    assert_eq!(history_versions(&ep, "svc").await, vec![1]);

    // A JSON file is a document too.
    let v2json = write(
        dir.path(),
        "v2.json",
        "{\"name\": \"svc\", \"port\": 9090, \"server\": {\"host\": \"b.example\"}}\n",
    );
    expect(&ctl(&ep, &["config", "push", "svc", &v2]).await, 0);
    let doc = json_of(&ctl(&ep, &["--json", "config", "get", "svc"]).await);
    assert_eq!(doc["version"], 2);
    assert_eq!(doc["format"], "toml");
    assert_eq!(doc["body"], VALID_V2);
    expect(&ctl(&ep, &["config", "push", "svc", &v2json]).await, 0);
    assert_eq!(
        json_of(&ctl(&ep, &["--json", "config", "get", "svc"]).await)["format"],
        "json"
    );

    // History lists every version; get --version reads an old one.
    assert_eq!(history_versions(&ep, "svc").await, vec![1, 2, 3]);
    let table = expect(&ctl(&ep, &["config", "history", "svc"]).await, 0);
    assert!(
        table.contains("version") && table.contains("author"),
        "{table}"
    );
    assert_eq!(
        expect(
            &ctl(&ep, &["config", "get", "svc", "--version", "1"]).await,
            0
        ),
        VALID_V1
    );

    // rollback N pushes N's body as a new version.
    expect(&ctl(&ep, &["config", "rollback", "svc", "1"]).await, 0);
    let doc = json_of(&ctl(&ep, &["--json", "config", "get", "svc"]).await);
    assert_eq!(doc["version"], 4);
    assert_eq!(doc["body"], VALID_V1);
    assert_eq!(doc["format"], "toml");
    assert_eq!(history_versions(&ep, "svc").await, vec![1, 2, 3, 4]);
    // Rolling back to a version that never existed fails.
    expect(&ctl(&ep, &["config", "rollback", "svc", "99"]).await, 1);
    // Without a canary, rollback needs a version.
    expect(&ctl(&ep, &["config", "rollback", "svc"]).await, 1);
}

#[tokio::test]
async fn config_push_wait_reports_applied_and_errors() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    let dir = tempfile::tempdir().unwrap();
    publish_schema(&cluster, "svc").await;
    register_fake_instance(&cluster, "svc", "i1").await;
    register_fake_instance(&cluster, "svc", "i2").await;

    // Both instances apply version 1: exit 0.
    let v1 = write(dir.path(), "v1.toml", VALID_V1);
    let ep2 = ep.clone();
    let push = tokio::spawn(async move {
        ctl(
            &ep2,
            &["--timeout", "30", "config", "push", "svc", &v1, "--wait"],
        )
        .await
    });
    wait_for_field(&cluster, "/config/svc", "version", json!(1)).await;
    put_raw(&cluster, "/applied/svc/i1", r#"{"version":1,"ok":true}"#).await;
    assert!(!push.is_finished(), "must wait for i2 as well");
    put_raw(&cluster, "/applied/svc/i2", r#"{"version":1,"ok":true}"#).await;
    let out = push.await.unwrap();
    let text = expect(&out, 0);
    assert!(
        text.contains("2 instance(s) of svc applied version 1"),
        "{text}"
    );

    // `services` shows who runs which version.
    let services = json_of(&ctl(&ep, &["--json", "services", "svc"]).await);
    let rows = services.as_array().unwrap();
    assert_eq!(rows.len(), 2);
    assert_eq!(rows[0]["id"], "i1");
    assert_eq!(rows[0]["applied"]["version"], 1);
    assert_eq!(rows[0]["addrs"]["grpc"], "127.0.0.1:1");
    let table = expect(&ctl(&ep, &["services"]).await, 0);
    assert!(
        table.contains("i2") && table.contains("grpc=127.0.0.1:1"),
        "{table}"
    );

    // i2 rejects version 2: exit 1 naming i2 and its error.
    let v2 = write(dir.path(), "v2.toml", VALID_V2);
    let ep2 = ep.clone();
    let push = tokio::spawn(async move {
        ctl(
            &ep2,
            &["--timeout", "30", "config", "push", "svc", &v2, "--wait"],
        )
        .await
    });
    wait_for_field(&cluster, "/config/svc", "version", json!(2)).await;
    put_raw(&cluster, "/applied/svc/i1", r#"{"version":2,"ok":true}"#).await;
    put_raw(
        &cluster,
        "/applied/svc/i2",
        r#"{"version":2,"ok":false,"error":"port 9090 is taken"}"#,
    )
    .await;
    let out = push.await.unwrap();
    expect(&out, 1);
    let err = stderr(&out);
    assert!(err.contains("i2: port 9090 is taken"), "{err}");
    assert!(!err.contains("i1"), "i1 applied: {err}");
    let table = expect(&ctl(&ep, &["services", "svc"]).await, 0);
    assert!(table.contains("error: port 9090 is taken"), "{table}");

    // Nobody reports version 3: timeout, exit 1 listing who has not applied.
    let v3 = write(dir.path(), "v3.toml", &VALID_V2.replace("9090", "9191"));
    let out = ctl(
        &ep,
        &["--timeout", "1", "config", "push", "svc", &v3, "--wait"],
    )
    .await;
    expect(&out, 1);
    let err = stderr(&out);
    assert!(
        err.contains("timed out") && err.contains("i1 (at version 2)") && err.contains("i2"),
        "{err}"
    );
}

#[tokio::test]
async fn canary_push_promote_and_withdraw() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    let dir = tempfile::tempdir().unwrap();
    publish_schema(&cluster, "svc").await;
    for id in ["c1", "c2", "c3"] {
        register_fake_instance(&cluster, "svc", id).await;
    }
    let v1 = write(dir.path(), "v1.toml", VALID_V1);
    expect(&ctl(&ep, &["config", "push", "svc", &v1]).await, 0);

    // A canary to c1 waits for c1 only.
    let v2 = write(dir.path(), "v2.toml", VALID_V2);
    let ep2 = ep.clone();
    let v2c = v2.clone();
    let push = tokio::spawn(async move {
        ctl(
            &ep2,
            &[
                "--timeout",
                "30",
                "config",
                "push",
                "svc",
                &v2c,
                "--canary",
                "c1",
                "--wait",
            ],
        )
        .await
    });
    wait_for_field(&cluster, "/config-canary/svc", "instances", json!(["c1"])).await;
    put_raw(&cluster, "/applied/svc/c1", r#"{"version":2,"ok":true}"#).await;
    let text = expect(&push.await.unwrap(), 0);
    assert!(
        text.contains("1 instance(s) of svc applied version 2"),
        "{text}"
    );
    // The current config is untouched; the canary holds version 2.
    assert_eq!(
        json_of(&ctl(&ep, &["--json", "config", "get", "svc"]).await)["version"],
        1
    );
    let history = json_of(&ctl(&ep, &["--json", "config", "history", "svc"]).await);
    assert_eq!(history["canary"]["doc"]["version"], 2);
    assert_eq!(history["canary"]["instances"], json!(["c1"]));
    // A plain push is refused while a canary is pending.
    let refused = ctl(&ep, &["config", "push", "svc", &v2]).await;
    expect(&refused, 1);
    assert!(stderr(&refused).contains("canary"), "{}", stderr(&refused));

    // Promote: version 2 for everyone, canary gone, history has it.
    expect(&ctl(&ep, &["config", "promote", "svc"]).await, 0);
    let doc = json_of(&ctl(&ep, &["--json", "config", "get", "svc"]).await);
    assert_eq!(
        (doc["version"].clone(), doc["body"].clone()),
        (json!(2), json!(VALID_V2))
    );
    let history = json_of(&ctl(&ep, &["--json", "config", "history", "svc"]).await);
    assert!(history["canary"].is_null());
    assert_eq!(history_versions(&ep, "svc").await, vec![1, 2]);
    expect(&ctl(&ep, &["config", "promote", "svc"]).await, 1);

    // A percentage canary, withdrawn by rollback without a version.
    expect(
        &ctl(
            &ep,
            &["config", "push", "svc", &v1, "--canary-percent", "50"],
        )
        .await,
        0,
    );
    let history = json_of(&ctl(&ep, &["--json", "config", "history", "svc"]).await);
    assert_eq!(history["canary"]["percent"], 50);
    assert_eq!(history["canary"]["doc"]["version"], 3);
    expect(&ctl(&ep, &["config", "rollback", "svc"]).await, 0);
    let history = json_of(&ctl(&ep, &["--json", "config", "history", "svc"]).await);
    assert!(history["canary"].is_null());
    assert_eq!(
        json_of(&ctl(&ep, &["--json", "config", "get", "svc"]).await)["version"],
        2
    );
    assert_eq!(history_versions(&ep, "svc").await, vec![1, 2]);
}

#[tokio::test]
async fn member_list_and_status_with_json() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    let members = json_of(&ctl(&ep, &["--json", "member", "list"]).await);
    let ids: Vec<u64> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["is_learner"] == false)
    );
    let table = expect(&ctl(&ep, &["member", "list"]).await, 0);
    assert!(table.contains("voter"), "{table}");

    let leader = cluster.leader().await.unwrap();
    let status = json_of(&ctl(&ep, &["--json", "status"]).await);
    assert_eq!(status["leader"], leader);
    let rows = status["endpoints"].as_array().unwrap();
    assert_eq!(rows.len(), 3);
    assert!(
        rows.iter()
            .all(|r| r["reachable"] == true && r["raft_term"].as_u64().unwrap() > 0)
    );
    assert_eq!(rows.iter().filter(|r| r["is_leader"] == true).count(), 1);

    // A dead endpoint is listed as unreachable; the leader is still known: exit 0.
    let dead = format!("127.0.0.1:{}", testkit::free_port());
    let status = json_of(&ctl(&format!("{ep},{dead}"), &["--json", "status"]).await);
    let rows = status["endpoints"].as_array().unwrap();
    assert_eq!(rows[3]["reachable"], false);
    assert!(rows[3]["error"].as_str().unwrap().contains(&dead));

    // An address that is already a member is refused, and nothing changes.
    let taken = ep.split(',').next().unwrap();
    let refused = ctl(&ep, &["member", "add", taken]).await;
    expect(&refused, 1);
    assert!(
        stderr(&refused).contains("peerURL exists"),
        "{}",
        stderr(&refused)
    );
    let again = json_of(&ctl(&ep, &["--json", "member", "list"]).await);
    assert_eq!(again.as_array().unwrap().len(), 3);
}

#[tokio::test]
async fn command_is_queued_and_acknowledged() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    register_fake_instance(&cluster, "svc", "i1").await;

    let sent = json_of(&ctl(&ep, &["--json", "command", "svc", "i1", "reload"]).await);
    assert_eq!(sent["seq"], 1);
    let ep2 = ep.clone();
    let wait = tokio::spawn(async move {
        ctl(
            &ep2,
            &[
                "--timeout",
                "30",
                "command",
                "svc",
                "i1",
                "drain",
                "--arg",
                "wave=10",
                "--wait",
            ],
        )
        .await
    });
    let key2 = "/commands/svc/i1/00000000000000000002";
    wait_for_field(&cluster, key2, "verb", json!("drain")).await;
    let mut c = cluster.client().await.unwrap();
    let doc: Value =
        serde_json::from_slice(c.get(key2, None).await.unwrap().kvs()[0].value()).unwrap();
    assert_eq!(doc["args"], json!({"wave": "10"}));
    assert_eq!(doc["seq"], 2);
    put_raw(
        &cluster,
        "/command-acks/svc/i1/00000000000000000002",
        r#"{"ok":true,"message":"draining","at":"2026-01-01T00:00:00Z"}"#,
    )
    .await;
    let text = expect(&wait.await.unwrap(), 0);
    assert!(
        text.contains("acknowledged command 2: ok draining"),
        "{text}"
    );

    // A refused command exits 1 with the instance's message.
    let ep2 = ep.clone();
    let wait = tokio::spawn(async move {
        ctl(
            &ep2,
            &["--timeout", "30", "command", "svc", "i1", "dump", "--wait"],
        )
        .await
    });
    wait_for_field(
        &cluster,
        "/commands/svc/i1/00000000000000000003",
        "verb",
        json!("dump"),
    )
    .await;
    put_raw(
        &cluster,
        "/command-acks/svc/i1/00000000000000000003",
        r#"{"ok":false,"message":"disk full","at":"2026-01-01T00:00:00Z"}"#,
    )
    .await;
    let out = wait.await.unwrap();
    expect(&out, 1);
    assert!(stderr(&out).contains("disk full"), "{}", stderr(&out));

    // No ack in time: exit 1.
    let out = ctl(
        &ep,
        &[
            "--timeout",
            "0.5",
            "command",
            "svc",
            "i1",
            "reload",
            "--wait",
        ],
    )
    .await;
    expect(&out, 1);
    assert!(
        stderr(&out).contains("no acknowledgement of command 4"),
        "{}",
        stderr(&out)
    );
}

#[tokio::test]
async fn usage_errors_exit_2() {
    for args in [
        vec!["kv"],
        vec!["kv", "frobnicate"],
        vec!["config", "push", "svc"],
        vec!["command", "s", "i", "v", "--arg", "novalue"],
        vec![
            "config",
            "push",
            "s",
            "f.toml",
            "--canary",
            "a",
            "--canary-percent",
            "5",
        ],
        vec!["--timeout", "soon", "status"],
    ] {
        let out = ctl("127.0.0.1:1", &args).await;
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
    }
}

#[tokio::test]
async fn unreachable_endpoints_exit_1_with_a_clear_message() {
    let dead = format!("127.0.0.1:{}", testkit::free_port());
    let out = ctl(&dead, &["--timeout", "2", "kv", "get", "/x"]).await;
    expect(&out, 1);
    let err = stderr(&out);
    assert!(
        err.starts_with("error: cannot reach the keeper at"),
        "{err}"
    );
    assert!(err.contains(&dead), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let out = ctl(&dead, &["--timeout", "2", "status"]).await;
    expect(&out, 1);
    assert!(stderr(&out).contains("no leader"), "{}", stderr(&out));
}

#[tokio::test]
async fn member_add_promote_remove_a_real_node() {
    let mut cluster = cluster().await;
    let ep = endpoints(&cluster);
    let addr = cluster.define_joiner(4).unwrap();
    let added = json_of(&ctl(&ep, &["--json", "member", "add", &addr]).await);
    assert_eq!(added["added"]["id"], 4, "{added}");
    let learner = added["members"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["id"] == 4)
        .expect("member 4 listed")
        .clone();
    assert_eq!(learner["is_learner"], true);
    cluster.start_node(4).unwrap();
    // The keeper refuses to promote a learner that has not caught up: retry until it has.
    let ep2 = ep.clone();
    wait_until("member 4 promoted", Duration::from_secs(30), || {
        let ep2 = ep2.clone();
        async move {
            let out = ctl(&ep2, &["member", "promote", "4"]).await;
            (out.status.code() == Some(0)).then_some(())
        }
    })
    .await
    .unwrap();
    let members = json_of(&ctl(&ep, &["--json", "member", "list"]).await);
    assert_eq!(members.as_array().unwrap().len(), 4);
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["is_learner"] == false)
    );
    expect(&ctl(&ep, &["member", "remove", "4"]).await, 0);
    let members = json_of(&ctl(&ep, &["--json", "member", "list"]).await);
    let ids: Vec<u64> = members
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids, vec![1, 2, 3]);
    expect(&ctl(&ep, &["member", "remove", "4"]).await, 1);
    // A removed member's id is not issued again.
    let addr = cluster.define_joiner(5).unwrap();
    let text = expect(&ctl(&ep, &["member", "add", &addr]).await, 0);
    assert!(
        text.contains("added member 5") && text.contains("--id 5"),
        "{text}"
    );
}

#[tokio::test]
async fn sdk_instance_applies_pushes_and_rejects_raw_invalid_documents() {
    let cluster = cluster().await;
    let ep = endpoints(&cluster);
    let dir = tempfile::tempdir().unwrap();
    publish_schema(&cluster, "svc").await;
    let v1 = write(dir.path(), "v1.toml", VALID_V1);
    expect(&ctl(&ep, &["config", "push", "svc", &v1]).await, 0);

    let mut opts = keeper_sdk::ConnectOptions::new(&cluster.endpoints());
    opts.instance = Some("i1".into());
    let keeper = keeper_sdk::Keeper::connect_with(opts).await.unwrap();
    let handle = keeper.config::<AppConfig>("svc").await.unwrap();
    assert_eq!(handle.current().port, 8080);
    let _registration = keeper
        .register(
            "svc",
            keeper_sdk::Instance {
                id: "i1".into(),
                addrs: [("grpc".to_string(), "127.0.0.1:2".to_string())].into(),
                zone: "z".into(),
                meta: Default::default(),
            },
        )
        .await
        .unwrap();

    // keeperctl --wait returns once the real SDK instance applied the new version.
    let v2 = write(dir.path(), "v2.toml", VALID_V2);
    let out = ctl(
        &ep,
        &["--timeout", "30", "config", "push", "svc", &v2, "--wait"],
    )
    .await;
    let text = expect(&out, 0);
    assert!(
        text.contains("1 instance(s) of svc applied version 2"),
        "{text}"
    );
    wait_until(
        "the SDK handle at version 2",
        Duration::from_secs(1),
        || {
            let ok = handle.version() == 2;
            async move { ok.then_some(()) }
        },
    )
    .await
    .unwrap();
    assert_eq!(handle.current().port, 9090);

    // A document written raw (bypassing keeperctl's validation) is rejected by the SDK: the
    // instance keeps version 2 and `services` shows its error.
    let bad = json!({"version": 3, "format": "toml", "body": "name = \"svc\"\nport = \"x\"\n[server]\nhost = \"h\"\n",
                     "updated_at": "2026-01-01T00:00:00Z", "author": "raw"});
    put_raw(&cluster, "/config/svc", &bad.to_string()).await;
    wait_for_field(&cluster, "/applied/svc/i1", "version", json!(3)).await;
    let rows = json_of(&ctl(&ep, &["--json", "services", "svc"]).await);
    assert_eq!(rows[0]["id"], "i1");
    assert_eq!(rows[0]["applied"]["ok"], false);
    let table = expect(&ctl(&ep, &["services", "svc"]).await, 0);
    assert!(table.contains("error:"), "{table}");
    assert_eq!(handle.current().port, 9090, "previous value kept");
}
