//! The harness against the real system: namespaces and partitions are real and removed on every
//! exit path, short keeper / register / push runs under faults are valid, and the harness catches
//! a keeper whose reads skip ReadIndex. Needs root.

use std::path::Path;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use jepsen_tests::net;

const HARNESS: &str = env!("CARGO_BIN_EXE_jepsen-tests");

/// Where the workspace build put the binaries under test (next to the harness).
fn bin_dir() -> PathBuf {
    Path::new(HARNESS).parent().unwrap().to_path_buf()
}

/// Whether `ip` in namespace `ns` can open a TCP connection to `addr` within a second.
fn can_connect(ns: &str, addr: &str) -> bool {
    let (host, port) = addr.split_once(':').unwrap();
    Command::new("ip")
        .args([
            "netns",
            "exec",
            ns,
            "timeout",
            "1",
            "bash",
            "-c",
            &format!("echo > /dev/tcp/{host}/{port}"),
        ])
        .stderr(std::process::Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false)
}

#[test]
fn partitions_are_real_and_everything_is_removed_on_drop() {
    let prefix = net::own_prefix();
    let network = net::Network::create(&prefix, 2).expect("create namespaces (needs root)");
    assert_eq!(net::namespaces(&prefix).unwrap().len(), 2);
    // A listener in n2 (it stays running: cleanup must kill it).
    let n2 = network.nodes[1].clone();
    let mut listener = Command::new("ip")
        .args(["netns", "exec", &n2.ns, "python3", "-c"])
        .arg(format!(
            "import socket,time\ns=socket.socket()\ns.bind(('{}',7000))\ns.listen(64)\ntime.sleep(600)",
            n2.ip
        ))
        .spawn()
        .expect("start a listener");
    let addr = format!("{}:7000", n2.ip);
    let reachable = (0..50).any(|_| {
        let ok = can_connect(&network.nodes[0].ns, &addr);
        if !ok {
            std::thread::sleep(Duration::from_millis(100));
        }
        ok
    });
    assert!(reachable, "n1 cannot reach n2 before any partition");

    network.drop_from(1, 0).unwrap();
    assert_eq!(network.rules().unwrap(), vec![(1, 0)]);
    assert!(
        !can_connect(&network.nodes[0].ns, &addr),
        "n2 still accepts packets from n1 behind a DROP rule"
    );
    network.heal().unwrap();
    assert!(network.rules().unwrap().is_empty());
    assert!(can_connect(&network.nodes[0].ns, &addr));

    drop(network);
    assert!(net::namespaces(&prefix).unwrap().is_empty());
    assert!(
        net::links(&prefix).unwrap().is_empty(),
        "links left: {:?}",
        net::links(&prefix).unwrap()
    );
    // Cleanup SIGKILLed the listener inside the namespace.
    let status = (0..100)
        .find_map(|_| {
            let s = listener.try_wait().unwrap();
            if s.is_none() {
                std::thread::sleep(Duration::from_millis(50));
            }
            s
        })
        .expect("process in a removed namespace survived");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(9), "{status:?}");
}

/// Runs `jepsen-tests <args> --out <a temp dir>` and returns its stdout, its stderr and the
/// directory of its first run (and the temp dir holding it), after asserting it exited 0.
fn harness_run(args: &[&str]) -> (String, String, PathBuf, tempfile::TempDir) {
    let out_dir = tempfile::tempdir().unwrap();
    let out = Command::new(HARNESS)
        .args(args)
        .arg("--out")
        .arg(out_dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{stderr}\n{}",
        node_log_tails(out_dir.path())
    );
    let run = std::fs::read_dir(out_dir.path())
        .unwrap()
        .next()
        .unwrap()
        .unwrap()
        .path()
        .join("run-1");
    (stdout, stderr, run, out_dir)
}

/// The last lines of every node log under `dir`: a failed run's evidence, which would otherwise
/// go with the temporary directory.
fn node_log_tails(dir: &Path) -> String {
    const LINES: usize = 40;
    let mut logs = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(d) = pending.pop() {
        for item in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = item.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                logs.push(path);
            }
        }
    }
    logs.sort();
    let mut out = String::new();
    for log in logs {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let tail = &lines[lines.len().saturating_sub(LINES)..];
        out.push_str(&format!(
            "---- {} (last {LINES} lines) ----\n",
            log.display()
        ));
        for line in tail {
            out.push_str(line);
            out.push('\n');
        }
    }
    out
}

/// Runs `<workload> --time 8` with `nemesis` every 2-3 s (plus `extra` flags); asserts a valid
/// verdict, the fault injected and healed, and the evidence files (`files` besides the history,
/// nemesis log, verdict and keeper log). The binary itself fails on leftover namespaces.
fn short_run(workload: &str, nemesis: &str, extra: &[&str], files: &[&str]) {
    let mut args = vec![
        workload,
        "--time",
        "8",
        "--nemesis",
        nemesis,
        "--interval",
        "2-3",
    ];
    args.extend(extra);
    let (stdout, stderr, run, _out_dir) = harness_run(&args);
    assert!(stdout.contains("valid"), "{stdout}");
    assert!(
        stderr.contains(&format!("{nemesis} start")),
        "no fault injected: {stderr}"
    );
    let always = [
        "history.jsonl",
        "nemesis.log",
        "verdict.json",
        "keeper-n1.log",
    ];
    for file in always.iter().chain(files) {
        assert!(
            run.join(file).exists(),
            "{file} missing in {}",
            run.display()
        );
    }
    let nemesis_log = std::fs::read_to_string(run.join("nemesis.log")).unwrap();
    assert!(
        nemesis_log.contains(nemesis) && nemesis_log.contains("heal"),
        "{nemesis_log}"
    );
}

/// Asserts the workspace binaries the service workloads start are built.
fn assert_service_bins() {
    let bin_dir = bin_dir();
    for bin in ["keeper", "register", "room", "center"] {
        assert!(
            bin_dir.join(bin).exists(),
            "{bin} missing in {}: build the workspace first (cargo build --workspace --all-targets)",
            bin_dir.display()
        );
    }
}

#[test]
fn short_register_run_under_kills_is_valid() {
    assert_service_bins();
    short_run("register", "kill", &[], &["r1.log", "r2.log", "r3.log"]);
}

#[test]
fn short_push_run_under_pauses_is_valid() {
    assert_service_bins();
    short_run("push", "pause", &[], &["room-1.log", "center-1.log"]);
}

#[test]
fn short_keeper_run_under_partitions_is_valid_and_leaves_nothing() {
    assert_service_bins();
    short_run("keeper", "partition", &[], &["watch.jsonl"]);
}

/// Starts the keepers with `--unsafe-stale-reads` (compiled into the workspace's test build) and
/// checks the harness reports the stale reads as a linearizability violation. Whether a 20 s run
/// happens to read from a lagging node depends on where the faults fall, so up to three runs get
/// the chance; a keeper without the flag is never reported in any run (the CI runs check that).
#[test]
fn broken_keeper_stale_reads_are_caught() {
    assert_service_bins();
    let mut misses = Vec::new();
    for _ in 0..3 {
        let out_dir = tempfile::tempdir().unwrap();
        let out = Command::new(HARNESS)
            .args([
                "keeper",
                "--broken-keeper",
                "--expect-anomaly",
                "--time",
                "20",
                "--nemesis",
                "partition,pause",
                "--interval",
                "3-5",
                "--out",
            ])
            .arg(out_dir.path())
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        if stdout.contains("expected a linearizability anomaly: caught") {
            assert!(out.status.success(), "{stdout}\n{stderr}");
            assert!(stderr.contains("not linearizable"), "{stderr}");
            return;
        }
        misses.push(stdout);
    }
    panic!(
        "stale reads were not caught in 3 runs:\n{}",
        misses.join("\n")
    );
}
