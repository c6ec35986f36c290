#!/usr/bin/env bash
# Runs `longlink dev` (everything in one process on loopback defaults), installing and building
# what it needs first. Extra arguments go to `longlink dev` (e.g. `--data-dir /tmp/ll`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
exec cargo run --release --locked -p longlink -- dev "$@"
