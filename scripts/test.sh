#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
# Extra arguments go to the test runner (e.g. `scripts/test.sh -p keeper`).
# cargo-nextest is used when present: every test runs in its own process and a hung test is
# killed after the timeout in .config/nextest.toml; plain `cargo test` is the fallback.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
# Integration tests of one crate start other crates' binaries (testkit::bin finds them).
cargo build --workspace --all-targets --locked
if cargo nextest --version >/dev/null 2>&1; then
    cargo nextest run --workspace --locked --no-tests=pass "$@"
    cargo test --workspace --locked --doc "$@"
else
    echo "cargo-nextest not found; running cargo test without per-test timeouts" >&2
    cargo test --workspace --locked "$@"
fi
