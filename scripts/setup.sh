#!/usr/bin/env bash
# Installs the system packages Longlink needs to build and test, if they are missing.
# Idempotent: a machine that has them all is left alone (no apt-get update).
set -euo pipefail

packages=(
  libclang-dev   # bindgen for the rocksdb crate (RocksDB is built from source)
  g++ make       # RocksDB's C++ build
  etcd-client    # etcdctl: the keeper's compatibility tests drive it
  etcd-server    # etcd: the keeper benchmark's baseline
  iproute2 iptables  # jepsen-tests: network namespaces and partitions
  curl               # scripts/cluster.sh health checks
  python3 python3-venv  # center/scripts/schemathesis.sh (schemathesis comes from PyPI)
  protobuf-compiler libprotobuf-dev  # protoc + well-known types for the etcd-client crate (tests only; our own protos use a vendored protoc)
)

missing=()
for p in "${packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "setup: cargo not found; install the Rust toolchain (rustup) first" >&2
  exit 1
fi
