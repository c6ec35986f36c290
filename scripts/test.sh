#!/usr/bin/env bash
# The test command: installs what the tests need, then runs every test of the workspace.
# Extra arguments go to `cargo test` (e.g. `scripts/test.sh -p keeper`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
cargo test --workspace --locked "$@"
