#!/usr/bin/env bash
# A local multi-process Longlink on loopback for trying failover by hand:
# 3 keepers, 2 registers, 2 rooms and 1 center, each its own process.
#
#   scripts/cluster.sh up       # build, start everything, seed the demo app, print where things are
#   scripts/cluster.sh status   # which processes run, and the keeper's view (keeperctl)
#   scripts/cluster.sh down     # stop everything (SIGTERM, then SIGKILL after 10 s); data is kept
#   scripts/cluster.sh clean    # down, then remove the data
#
# State (data, logs, pids) lives in ${LONGLINK_CLUSTER_DIR:-./cluster}. With LONGLINK_BIN_DIR set
# (the tests do), `up` uses the binaries there and neither installs nor builds anything. The ports are those of
# `longlink dev` (keeper 7379, register 7300, room 7100-7102, center 8080-8081) plus neighbours for
# the second and third instances, so `longlink listen/push` work against it unchanged; do not
# run it next to `longlink dev`.
set -euo pipefail
cd "$(dirname "$0")/.."

dir="${LONGLINK_CLUSTER_DIR:-./cluster}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
bin="${LONGLINK_BIN_DIR:-$CARGO_TARGET_DIR/debug}"
keepers="127.0.0.1:7379,127.0.0.1:7380,127.0.0.1:7381"

log() { echo "cluster: $*" >&2; }

# name -> command line
procs() {
  local members="1=127.0.0.1:7379,2=127.0.0.1:7380,3=127.0.0.1:7381"
  for i in 1 2 3; do
    echo "keeper-$i|$bin/keeper --id $i --listen 127.0.0.1:$((7378 + i)) --data-dir $dir/keeper-$i --initial-cluster $members"
  done
  for i in 1 2; do
    echo "register-$i|$bin/register --id register-$i --listen 127.0.0.1:$((7299 + i)) --data-dir $dir/register-$i --keeper $keepers"
  done
  echo "room-1|$bin/room --id room-1 --tcp 127.0.0.1:7100 --ws 127.0.0.1:7101 --grpc 127.0.0.1:7102 --keeper $keepers"
  echo "room-2|$bin/room --id room-2 --tcp 127.0.0.1:7110 --ws 127.0.0.1:7111 --grpc 127.0.0.1:7112 --keeper $keepers"
  echo "center-1|$bin/center --id center-1 --http 127.0.0.1:8080 --grpc 127.0.0.1:8081 --keeper $keepers"
}

running() { [[ -f "$dir/$1.pid" ]] && kill -0 "$(cat "$dir/$1.pid")" 2>/dev/null; }

start() {
  local name=$1 cmd=$2
  if running "$name"; then log "$name already running"; return; fi
  # shellcheck disable=SC2086
  nohup $cmd >>"$dir/$name.log" 2>&1 &
  echo $! >"$dir/$name.pid"
}

wait_for() {
  local what=$1 check=$2 i
  for i in $(seq 1 300); do
    if eval "$check" >/dev/null 2>&1; then return 0; fi
    sleep 0.1
  done
  log "$what did not come up; see $dir/*.log"
  return 1
}

up() {
  if [[ -z ${LONGLINK_BIN_DIR:-} ]]; then
    scripts/setup.sh
    # The same crate set as scripts/test.sh and dev.sh, so RocksDB is built once (docs/decisions.md).
    cargo build --workspace --all-targets --locked
  fi
  mkdir -p "$dir"
  while IFS='|' read -r name cmd; do
    [[ $name == keeper-* ]] && start "$name" "$cmd"
  done < <(procs)
  wait_for "the keeper cluster" "$bin/keeperctl --endpoints $keepers status"
  while IFS='|' read -r name cmd; do
    [[ $name != keeper-* ]] && start "$name" "$cmd"
  done < <(procs)
  wait_for "center" "curl -sf http://127.0.0.1:8080/healthz"
  # room and center publish the apps schema when they start; seed the demo app once.
  if ! "$bin/keeperctl" --endpoints "$keepers" config get apps >/dev/null 2>&1; then
    wait_for "the apps schema" "$bin/keeperctl --endpoints $keepers kv get /schema/apps | grep -q apps"
    "$bin/keeperctl" --endpoints "$keepers" config push apps config/apps.toml
  fi
  status
  cat <<MSG

Try: longlink listen --app demo --user alice   (in another terminal)
     longlink push --app demo --user alice '{"hello":"cluster"}'
     kill -9 \$(cat $dir/register-1.pid)          # sessions move to register-2
     scripts/cluster.sh down
MSG
}

status() {
  local name cmd
  while IFS='|' read -r name cmd; do
    if running "$name"; then echo "$name running (pid $(cat "$dir/$name.pid"))"; else echo "$name stopped"; fi
  done < <(procs)
  "$bin/keeperctl" --endpoints "$keepers" status || true
  "$bin/keeperctl" --endpoints "$keepers" services || true
}

down() {
  local name cmd pids=()
  while IFS='|' read -r name cmd; do
    if running "$name"; then kill -TERM "$(cat "$dir/$name.pid")" && pids+=("$(cat "$dir/$name.pid")"); fi
  done < <(procs)
  for _ in $(seq 1 100); do
    local alive=0 p
    for p in "${pids[@]}"; do kill -0 "$p" 2>/dev/null && alive=1; done
    [[ $alive == 0 ]] && break
    sleep 0.1
  done
  for p in "${pids[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  rm -f "$dir"/*.pid
  log "stopped; data kept in $dir"
}

case "${1:-}" in
  up) up ;;
  status) status ;;
  down) down ;;
  clean) down; rm -rf "$dir"; log "removed $dir" ;;
  *) echo "usage: $0 up|status|down|clean" >&2; exit 2 ;;
esac
