#!/usr/bin/env bash
# Runs `longlink dev` (everything in one process on loopback defaults), installing and building
# what it needs first. Extra arguments go to `longlink dev` (e.g. `--data-dir /tmp/ll`).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
# The dev profile shares its build (RocksDB included) with scripts/test.sh; a release build of
# RocksDB alone takes most of half an hour on two cores.
# Building the whole workspace (not just -p longlink) keeps cargo's feature set identical to the
# test build, so RocksDB's C++ is compiled once for both (docs/decisions.md, "One build").
cargo build --locked --workspace --all-targets
exec "$CARGO_TARGET_DIR/debug/longlink" dev "$@"
