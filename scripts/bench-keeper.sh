#!/usr/bin/env bash
# Benchmarks a 3-node keeper cluster against a 3-node etcd cluster on loopback with the same
# workload (keeper-bench), one system at a time, and prints the comparison table.
#
#   scripts/bench-keeper.sh                  # full run (5 s per phase)
#   scripts/bench-keeper.sh --duration 2s    # extra arguments go to `keeper-bench run`
#   BENCH_SYSTEMS=etcd scripts/bench-keeper.sh   # only one system (keeper, etcd, or both)
#   KEEPER_CONFIG=my.toml scripts/bench-keeper.sh # keeper settings other than the defaults
#   BENCH_BIN=/tmp/keeper-bench-before scripts/bench-keeper.sh # another load generator binary
#   KEEPER_BIN=/tmp/keeper-before scripts/bench-keeper.sh       # another keeper binary
#   BENCH_ROUNDS=5 scripts/bench-keeper.sh --put-clients 64 --get-clients 0 --watch-connections 0
#                                            # 5 rounds of puts at 64 clients; medians
#
# With BENCH_ROUNDS above 1 the systems take turns (keeper first in odd rounds, etcd first in
# even ones), each run on a fresh cluster, and the table shows each side's median and the median
# of the rounds' ratios with their range: a shared or noisy machine drifts over minutes, and
# runs that follow each other see the same drift.
#
# Results (JSON per system, the table, the table as JSON) are kept in
# ${BENCH_OUT:-bench-out}/keeper-vs-etcd-<time>/. Server data and logs live in a temporary
# directory under ${BENCH_TMPDIR:-/var/tmp} (on disk, not tmpfs: fsync must cost what it costs),
# removed on every exit, as are all processes this script started.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "bench-keeper: $*" >&2; }

read -r -a systems <<<"${BENCH_SYSTEMS:-keeper etcd}"
for s in "${systems[@]}"; do
  [[ $s == keeper || $s == etcd ]] || { log "BENCH_SYSTEMS: unknown system '$s' (keeper, etcd)"; exit 2; }
done
wants() { [[ " ${systems[*]} " == *" $1 "* ]]; }
rounds="${BENCH_ROUNDS:-1}"
[[ $rounds =~ ^[1-9][0-9]*$ ]] || { log "BENCH_ROUNDS: '$rounds' is not a positive number of rounds"; exit 2; }

scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
export ETCDCTL_API=3

# etcd-client's build script runs protoc; without a system one, use the vendored protoc that
# proto/ already depends on (fetching sources unpacks it into the cargo registry).
if [[ -z "${PROTOC:-}" ]] && ! command -v protoc >/dev/null 2>&1; then
  case "$(uname -m)" in
    x86_64) arch=x86_64 ;;
    aarch64) arch=aarch_64 ;;
    *) log "no protoc for $(uname -m): install protobuf-compiler"; exit 1 ;;
  esac
  cargo fetch --locked --quiet
  PROTOC="$(find "${CARGO_HOME:-$HOME/.cargo}/registry/src" -path "*/protoc-bin-vendored-linux-$arch-*/bin/protoc" \
    2>/dev/null | sort -V | tail -n 1)"
  [[ -n $PROTOC ]] || { log "no protoc found: install protobuf-compiler or set PROTOC"; exit 1; }
  export PROTOC
fi

# Every bench builds the same release crate set, so RocksDB is compiled once (docs/decisions.md).
log "building the workspace's binaries (release; target dir $CARGO_TARGET_DIR)"
cargo build --release --workspace --bins --locked
bin="$CARGO_TARGET_DIR/release"

work="$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/keeper-bench.XXXXXX")"
out="${BENCH_OUT:-bench-out}/keeper-vs-etcd-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
pids=()

# Stops every process still in `pids`: TERM, up to 10 s to exit, then KILL.
stop_all() {
  local pid i
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${pids[@]}"; do
    for ((i = 0; i < 100; i++)); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
      log "pid $pid ignored SIGTERM for 10 s, killing it"
      kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || true
  done
  pids=()
}

cleanup() {
  local status=$?
  trap - EXIT INT TERM
  stop_all
  if ((status != 0)); then
    for f in "$work"/*.log; do
      [[ -e $f ]] || continue
      echo "---- last lines of $(basename "$f") ----" >&2
      tail -n 20 "$f" >&2
    done
    log "failed (exit $status); partial results, if any, in $out"
  fi
  rm -rf "$work"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Runs a command in the background and records its pid. Until it execs, the forked child would
# run this script's traps on TERM (and with them `cleanup`), so it drops them first.
launch() {
  (
    trap - EXIT TERM
    exec "$@"
  ) &
  pids+=("$!")
}

port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Polls `etcdctl endpoint health` (a quorum read, so it needs an elected leader) on every
# endpoint, failing early if a server process died.
wait_healthy() {
  local name=$1 endpoints=$2 pid i
  for ((i = 0; i < 120; i++)); do
    for pid in "${pids[@]}"; do
      kill -0 "$pid" 2>/dev/null || { log "$name: process $pid exited during startup"; return 1; }
    done
    if etcdctl --endpoints="$endpoints" --dial-timeout=1s --command-timeout=2s endpoint health >/dev/null 2>&1; then
      log "$name: all 3 endpoints healthy after $((i / 2)) s"
      return 0
    fi
    sleep 0.5
  done
  log "$name: not healthy after 60 s"
  etcdctl --endpoints="$endpoints" endpoint health >&2 || true
  return 1
}

start_keeper() {
  local i port members=""
  for i in 1 2 3; do members+="${members:+,}$i=127.0.0.1:2379$i"; done
  for i in 1 2 3; do
    port=2379$i
    port_free "$port" || { log "port $port is already in use"; return 1; }
    launch "${KEEPER_BIN:-$bin/keeper}" --id "$i" --listen "127.0.0.1:$port" --data-dir "$work/keeper-$i" \
      --initial-cluster "$members" ${KEEPER_CONFIG:+--config "$KEEPER_CONFIG"} >"$work/keeper-$i.log" 2>&1
  done
}

start_etcd() {
  local i port members=""
  for i in 1 2 3; do members+="${members:+,}n$i=http://127.0.0.1:2480$i"; done
  for i in 1 2 3; do
    for port in "2479$i" "2480$i"; do
      port_free "$port" || { log "port $port is already in use"; return 1; }
    done
    launch etcd --name "n$i" --data-dir "$work/etcd-$i" \
      --listen-client-urls "http://127.0.0.1:2479$i" --advertise-client-urls "http://127.0.0.1:2479$i" \
      --listen-peer-urls "http://127.0.0.1:2480$i" --initial-advertise-peer-urls "http://127.0.0.1:2480$i" \
      --initial-cluster "$members" --initial-cluster-token keeper-bench --initial-cluster-state new \
      --logger zap --log-outputs stderr >"$work/etcd-$i.log" 2>&1
  done
}

# Starts one system, waits for it, runs the workload against it (results in $out/<file>), stops
# it.
measure() {
  local name=$1 endpoints=$2 file=$3
  shift 3
  log "$name: starting 3 nodes"
  "start_$name"
  wait_healthy "$name" "$endpoints"
  log "$name: running keeper-bench"
  # In the background so that INT/TERM reach the trap at once instead of after the run.
  launch "${BENCH_BIN:-$bin/keeper-bench}" run --system "$name" --endpoints "$endpoints" --out "$out/$file" "$@"
  wait "$!"
  log "$name: stopping"
  stop_all
}

fs="$(df -PT "$work" | awk 'NR == 2 { print $2 }')"
log "machine: $(nproc) cores, data in $work ($fs), $(etcd --version | head -n 1)"
[[ $fs != tmpfs ]] || log "warning: $work is on tmpfs, fsync is free there; set BENCH_TMPDIR to a disk"

# The disk's latency for a synced 4 KiB append, what a WAL write costs (dd with O_DSYNC, 500
# writes). It moves several-fold on a shared host, and the systems feel it differently (keeper's
# group commit shares one sync among many writes), so it is logged with every round and kept in
# $out/disk.txt next to the results.
probe_disk() {
  local when=$1 secs
  secs="$(LC_ALL=C dd if=/dev/zero of="$work/disk-probe" bs=4096 count=500 oflag=dsync 2>&1 |
    awk '/copied/ { for (i = 1; i <= NF; i++) if ($i ~ /^s,?$/) print $(i - 1) }')"
  rm -f "$work/disk-probe"
  [[ -n $secs ]] || { log "disk probe failed"; return 0; }
  awk -v s="$secs" -v w="$when" 'BEGIN { printf "%s: synced 4 KiB append %.0f us\n", w, s / 500 * 1e6 }' |
    tee -a "$out/disk.txt" >&2
}
probe_disk "before round 1"

declare -A endpoints_of=(
  [keeper]=127.0.0.1:23791,127.0.0.1:23792,127.0.0.1:23793
  [etcd]=127.0.0.1:24791,127.0.0.1:24792,127.0.0.1:24793
)
for ((round = 1; round <= rounds; round++)); do
  order=(keeper etcd)
  ((round % 2 == 1)) || order=(etcd keeper)
  for name in "${order[@]}"; do
    wants "$name" || continue
    file="$name.json"
    if ((rounds > 1)); then
      log "round $round of $rounds: $name"
      file="$name-$(printf %03d "$round").json"
    fi
    measure "$name" "${endpoints_of[$name]}" "$file" "$@"
  done
  probe_disk "after round $round"
done

# keeper files first, then etcd, each in round order: report pairs the i-th of each.
results=()
for name in keeper etcd; do
  for f in "$out/$name".json "$out/$name"-*.json; do
    if [[ -e $f ]]; then results+=("$f"); fi
  done
done
"$bin/keeper-bench" report --json "${results[@]}" >"$out/report.json"
"$bin/keeper-bench" report "${results[@]}" | tee "$out/report.md"
log "results in $out"
