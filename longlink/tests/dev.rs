//! The quickstart, end to end through the real binaries: `longlink dev` as a process, then
//! `longlink token`, `longlink listen` and `longlink push` as separate processes; the listener
//! must print the pushed payload. `longlink dev` uses the fixed loopback ports of DESIGN.md §8.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use testkit::Process;
use testkit::wait_until;

const BIN: &str = env!("CARGO_BIN_EXE_longlink");

fn run(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .env("LONGLINK_LOG", "warn")
        .output()
        .expect("run longlink")
}

fn start(name: &str, args: &[&str], dir: &Path) -> Process {
    let args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    Process::start(
        name,
        Path::new(BIN),
        &args,
        &dir.join(format!("{name}.log")),
        &[],
    )
    .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn dev_token_listen_push_delivers_the_payload() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let mut dev = start(
        "dev",
        &["dev", "--data-dir", data.to_str().unwrap()],
        dir.path(),
    );
    let banner = wait_until(
        "longlink dev to print its banner",
        Duration::from_secs(90),
        || {
            let text = std::fs::read_to_string(&dev.log).unwrap_or_default();
            async move { text.contains("longlink dev is running").then_some(text) }
        },
    )
    .await
    .unwrap();
    assert!(banner.contains("API key: demo-"), "{banner}");

    // A token is a JWT signed with the demo app's secret.
    let token = run(&["token", "--app", "demo", "--user", "alice"]);
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap();
    assert_eq!(token.trim().split('.').count(), 3, "not a JWT: {token}");
    let unknown = run(&["token", "--app", "nope", "--user", "alice"]);
    assert!(!unknown.status.success());
    assert!(String::from_utf8_lossy(&unknown.stderr).contains("no app \"nope\""));

    let mut listener = start(
        "listen",
        &[
            "listen", "--app", "demo", "--user", "alice", "--json", "--count", "1",
        ],
        dir.path(),
    );
    wait_until("the listener to connect", Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&listener.log).unwrap_or_default();
        async move { text.contains("listening as demo/alice").then_some(()) }
    })
    .await
    .unwrap();

    let push = run(&[
        "push",
        "--app",
        "demo",
        "--user",
        "alice",
        r#"{"hello":"world"}"#,
    ]);
    assert!(push.status.success(), "{push:?}");
    let answer: serde_json::Value = serde_json::from_slice(&push.stdout).unwrap();
    assert_eq!(answer["sessions"], 1, "{answer}");

    let line = wait_until(
        "the listener to print the message",
        Duration::from_secs(30),
        || {
            let text = std::fs::read_to_string(&listener.log).unwrap_or_default();
            async move {
                text.lines()
                    .find(|l| l.starts_with('{') && l.contains("payload"))
                    .map(str::to_string)
            }
        },
    )
    .await
    .unwrap();
    let message: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(message["payload"], serde_json::json!({"hello": "world"}));
    assert_eq!(message["app"], "demo");
    wait_until(
        "the listener to exit after one message",
        Duration::from_secs(10),
        || {
            let running = listener.is_running();
            async move { (!running).then_some(()) }
        },
    )
    .await
    .unwrap();

    // Ctrl-C (SIGTERM here) stops everything cleanly; a restart keeps the seeded app.
    let code = dev.terminate(Duration::from_secs(30)).unwrap();
    assert_eq!(code, Some(0), "{}", dev.log_tail(30));
    let first_key = banner
        .lines()
        .find_map(|l| l.split("API key: ").nth(1))
        .unwrap()
        .trim()
        .to_string();
    let mut dev = start(
        "dev-again",
        &["dev", "--data-dir", data.to_str().unwrap()],
        dir.path(),
    );
    let again = wait_until(
        "the restarted dev to print its banner",
        Duration::from_secs(90),
        || {
            let text = std::fs::read_to_string(&dev.log).unwrap_or_default();
            async move { text.contains("longlink dev is running").then_some(text) }
        },
    )
    .await
    .unwrap();
    assert!(
        again.contains(&first_key),
        "the demo key changed across a restart"
    );
    dev.terminate(Duration::from_secs(30)).unwrap();
}
