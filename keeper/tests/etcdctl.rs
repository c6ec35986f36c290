//! Stock `etcdctl` (API v3) against a 3-node keeper: the wire compatibility users rely on.

use std::path::Path;
use std::process::Command;
use std::process::Output;
use std::time::Duration;

use testkit::KeeperCluster;
use testkit::wait_until;

const BIN: &str = env!("CARGO_BIN_EXE_keeper");

struct Ctl {
    endpoints: String,
}

impl Ctl {
    fn run(&self, args: &[&str]) -> Output {
        Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", self.endpoints))
            .arg("--command-timeout=10s")
            .args(args)
            .output()
            .expect("etcdctl is installed (scripts/setup.sh installs etcd-client)")
    }

    /// Runs and returns stdout, failing the test on a non-zero exit.
    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout).unwrap()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn etcdctl_speaks_to_keeper() {
    let cluster = KeeperCluster::start(Path::new(BIN), 3, "min_lease_ttl_s = 1\n")
        .await
        .unwrap();
    let ctl = Ctl {
        endpoints: cluster.endpoints().join(","),
    };

    assert_eq!(ctl.ok(&["put", "/cfg/a", "1"]).trim(), "OK");
    ctl.ok(&["put", "/cfg/b", "2"]);
    ctl.ok(&["put", "/other", "3"]);
    assert_eq!(
        ctl.ok(&["get", "--prefix", "/cfg/"]),
        "/cfg/a\n1\n/cfg/b\n2\n"
    );
    assert_eq!(
        ctl.ok(&["get", "--prefix", "/cfg/", "--keys-only"])
            .split_whitespace()
            .collect::<Vec<_>>(),
        ["/cfg/a", "/cfg/b"]
    );
    assert_eq!(ctl.ok(&["del", "/cfg/a"]).trim(), "1");
    assert_eq!(ctl.ok(&["get", "/cfg/a"]), "");

    // JSON output carries the header revision; watch from an older revision replays history.
    let json = ctl.ok(&["get", "/cfg/b", "-w", "json"]);
    let revision: i64 = json
        .split("\"revision\":")
        .nth(1)
        .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no revision in {json}"));
    let mut watch = std::process::Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .arg(format!("--endpoints={}", ctl.endpoints))
        .args(["watch", "--prefix", "/cfg/", "--rev", "1"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = watch.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::BufRead;
        std::io::BufReader::new(stdout)
            .lines()
            .take(9)
            .collect::<Result<Vec<_>, _>>()
    });
    let lines = tokio::task::spawn_blocking(move || lines.join().unwrap())
        .await
        .unwrap()
        .unwrap();
    let _ = watch.kill();
    let _ = watch.wait();
    assert_eq!(
        lines,
        [
            "PUT", "/cfg/a", "1", "PUT", "/cfg/b", "2", "DELETE", "/cfg/a", ""
        ],
        "history replay of watch --rev 1"
    );
    assert!(revision >= 4);

    // Transactions (compare-and-swap) read from stdin in etcdctl's interactive syntax.
    let txn = |input: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new("etcdctl")
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", ctl.endpoints))
            .arg("txn")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(input.as_bytes())
            .unwrap();
        String::from_utf8(child.wait_with_output().unwrap().stdout).unwrap()
    };
    let out = txn("value(\"/cfg/b\") = \"2\"\n\nput /cfg/b 20\n\nput /cfg/b lost\n\n");
    assert!(out.starts_with("SUCCESS"), "{out}");
    let out = txn("value(\"/cfg/b\") = \"2\"\n\nput /cfg/b 30\n\nget /cfg/b\n\n");
    assert!(out.starts_with("FAILURE"), "{out}");
    assert!(out.contains("20"), "{out}");

    // Leases: a key disappears when its lease is revoked, and when it expires.
    let granted = ctl.ok(&["lease", "grant", "30"]);
    let lease = granted.split_whitespace().nth(1).unwrap().to_string();
    ctl.ok(&["put", "--lease", &lease, "/leased", "x"]);
    let keepalive = ctl.ok(&["lease", "keep-alive", "--once", &lease]);
    assert!(keepalive.contains("keepalived with TTL(30)"), "{keepalive}");
    let ttl = ctl.ok(&["lease", "timetolive", "--keys", &lease]);
    assert!(
        ttl.contains("granted with TTL(30s)") && ttl.contains("/leased"),
        "{ttl}"
    );
    ctl.ok(&["lease", "revoke", &lease]);
    assert_eq!(ctl.ok(&["get", "/leased"]), "");

    let granted = ctl.ok(&["lease", "grant", "1"]);
    let lease = granted.split_whitespace().nth(1).unwrap().to_string();
    ctl.ok(&["put", "--lease", &lease, "/expiring", "x"]);
    wait_until(
        "the 1 s lease to expire",
        Duration::from_secs(10),
        || async { ctl.ok(&["get", "/expiring"]).is_empty().then_some(()) },
    )
    .await
    .unwrap();

    // Membership and status.
    let members = ctl.ok(&["member", "list"]);
    assert_eq!(members.lines().count(), 3, "{members}");
    assert!(members.contains("started, keeper-1"), "{members}");
    let status = ctl.ok(&["endpoint", "status", "-w", "table"]);
    for endpoint in cluster.endpoints() {
        assert!(status.contains(&endpoint), "{status}");
    }
    let leaders = status
        .lines()
        .filter(|l| l.split('|').nth(5).map(str::trim) == Some("true"))
        .count();
    assert_eq!(leaders, 1, "exactly one endpoint is leader:\n{status}");
}
