#!/usr/bin/env bash
# Runs `longlink dev` (everything in one process on loopback defaults), installing and building
# what it needs first. Extra arguments go to `longlink dev` (e.g. `--data-dir /tmp/ll`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
# The dev profile shares its build (RocksDB included) with scripts/test.sh; a release build of
# RocksDB alone takes most of half an hour on two cores.
exec cargo run --locked -p longlink -- dev "$@"
