//! `register-bench` as an operator runs it, at a tiny size: it finishes, prints its table, and
//! leaves nothing behind in the directory it was given.

use std::process::Command;

#[test]
fn a_small_run_prints_its_table_and_leaves_its_directory_empty() {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_register-bench"))
        .args(["--sessions", "2000", "--batch", "100", "--clients", "2"])
        .args(["--lookups", "200", "--dir"])
        .arg(dir.path())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "register-bench failed: {}\n{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    for row in [
        "| sessions | 2000 |",
        "lookups/s (2 clients)",
        "rebuild of 2000 sessions",
    ] {
        assert!(stdout.contains(row), "no '{row}' in:\n{stdout}");
    }
    let left: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(left.is_empty(), "register-bench left {left:?} behind");
}
