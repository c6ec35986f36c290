//! Finds the workspace's binaries from tests of any crate (`CARGO_BIN_EXE_*` exists only inside
//! the crate that owns the binary).

use std::path::PathBuf;

/// Path of the workspace binary `name` (e.g. `"keeper"`), next to the running test executable.
///
/// Test executables live in `<target>/<profile>/deps/`; binaries in `<target>/<profile>/`.
/// `scripts/test.sh` builds every binary before running tests; when running one crate's tests by
/// hand, build the binaries it needs first (`cargo build -p keeper`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test executable is in <target>/<profile>/deps");
    let path = profile_dir.join(name);
    assert!(
        path.exists(),
        "binary {} not built: run `cargo build --workspace --bins` (scripts/test.sh does) first",
        path.display()
    );
    path
}
