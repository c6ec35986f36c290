#!/usr/bin/env bash
# Room benchmarks on this box with release binaries: many room processes each holding PER_ROOM
# idle authenticated connections at once (total held, RSS per connection), then a reconnect storm
# (handshakes/s against bare TCP connects in the same run) and a broadcast fan-out on one room.
#
#   scripts/bench-room.sh                      # 27 rooms x 19 000 connections (~513k)
#   ROOMS=2 PER_ROOM=5000 scripts/bench-room.sh   # a quick run
#   STORM_PROCS=8 scripts/bench-room.sh          # storm clients in 8 processes (default 4)
#   STORM_CONCURRENCY=64 scripts/bench-room.sh   # handshakes in flight per storm process (1024)
#
# One keeper, one register, ROOMS rooms and ROOMS `longlink-bench conns` processes (a process may
# hold at most 20 000 descriptors here), each bench on its own 127.x source addresses. Results
# (one JSON line per measurement, and the table) go to ${BENCH_OUT:-bench-out}/room-<time>/;
# processes and data are removed on every exit.
set -euo pipefail
cd "$(dirname "$0")/.."

ROOMS="${ROOMS:-27}"
PER_ROOM="${PER_ROOM:-19000}"
STORM="${STORM:-19000}"
STORM_PROCS="${STORM_PROCS:-4}"
FANOUT="${FANOUT:-10000}"
SECRET="bench-secret-$RANDOM$RANDOM"
log() { echo "bench-room: $*" >&2; }

scripts/setup.sh
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
# The one release crate set of every bench (docs/decisions.md, "One build").
log "building the workspace's binaries (release)"
cargo build --release --workspace --bins --locked
bin="$CARGO_TARGET_DIR/release"
ulimit -n 20000

work="$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/room-bench.XXXXXX")"
out="${BENCH_OUT:-bench-out}/room-$(date +%Y%m%d-%H%M%S)"
mkdir -p "$out"
pids=()
# The room listens with a backlog of 65 535, but the kernel caps it at net.core.somaxconn (4 096
# by default): a storm then overflows the accept queue, SYNs are dropped and each dropped connect
# waits a 1 s retransmit, which measures the host, not the room. As root, raise the caps for the
# run (docs/operations.md recommends the same for production rooms) and put them back afterwards.
saved_sysctl=()
if [[ $(id -u) == 0 ]]; then
  for key in net.core.somaxconn net.ipv4.tcp_max_syn_backlog; do
    saved_sysctl+=("$key=$(sysctl -n "$key")")
    sysctl -qw "$key=65535"
  done
fi

cleanup() {
  local status=$? pid kv
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  sleep 1
  for pid in "${pids[@]}"; do kill -KILL "$pid" 2>/dev/null || true; done
  for kv in "${saved_sysctl[@]}"; do sysctl -qw "$kv" || true; done
  if ((status)); then
    log "failed; logs kept in $work"
    rm -rf "$work/keeper" "$work/register"
  else
    rm -rf "$work"
  fi
}
trap cleanup EXIT

start() { # name, then the command
  local name=$1
  shift
  "$@" >"$work/$name.log" 2>&1 &
  echo "$!"
}

wait_port() { # host:port
  local i
  for i in $(seq 1 600); do
    (exec 3<>"/dev/tcp/${1%:*}/${1#*:}") 2>/dev/null && return 0
    sleep 0.1
  done
  log "$1 did not open; logs in $work"
  return 1
}

keeper=127.0.0.1:27379
ctl() { "$bin/keeperctl" --endpoints "$keeper" "$@"; }
export LONGLINK_LOG=warn
pids+=("$(start keeper "$bin/keeper" --id 1 --listen "$keeper" --data-dir "$work/keeper" \
  --initial-cluster "1=$keeper")")
wait_port "$keeper"
pids+=("$(start register "$bin/register" --id r1 --listen 127.0.0.1:27300 --data-dir "$work/register" \
  --keeper "$keeper")")
wait_port 127.0.0.1:27300

room_pids=()
for ((i = 0; i < ROOMS; i++)); do
  base=$((30000 + 3 * i))
  room_pids+=("$(start "room-$i" "$bin/room" --id "room-$i" --tcp "127.0.0.1:$base" \
    --ws "127.0.0.1:$((base + 1))" --grpc "127.0.0.1:$((base + 2))" --keeper "$keeper")")
done
pids+=("${room_pids[@]}")
for ((i = 0; i < ROOMS; i++)); do wait_port "127.0.0.1:$((30000 + 3 * i))"; done

# Idle connections are not closed during the run (3 heartbeats of 600 s); the bench app.
printf 'heartbeat_s = 600\nmax_connections_per_ip = 1000000\n' >"$work/room.toml"
printf '[[apps]]\nid = "bench"\nsecret = "%s"\n' "$SECRET" >"$work/apps.toml"
ctl config push room "$work/room.toml" --wait --timeout 60 >/dev/null
ctl config push apps "$work/apps.toml" --wait --timeout 60 >/dev/null
log "$ROOMS rooms up; connecting $PER_ROOM per room"

rss_kib() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
before=()
for ((i = 0; i < ROOMS; i++)); do before+=("$(rss_kib "${room_pids[$i]}")"); done

# Every bench connects, then holds (600 s at most) until this script has measured.
bench_pids=()
for ((i = 0; i < ROOMS; i++)); do
  sources=$(printf '127.%d.0.1,127.%d.0.2' $((i + 1)) $((i + 1)))
  "$bin/longlink-bench" --addr "127.0.0.1:$((30000 + 3 * i))" --app bench --secret "$SECRET" \
    --sources "$sources" --user-prefix "r$i" --json \
    conns --n "$PER_ROOM" --hold-s 600 >"$work/bench-$i.json" 2>"$work/bench-$i.err" &
  bench_pids+=("$!")
  pids+=("$!")
done
started=$(date +%s)
while true; do
  connected=$(cat "$work"/bench-*.json 2>/dev/null | grep -c '"mode":"conns"' || true)
  for p in "${bench_pids[@]}"; do
    if ! kill -0 "$p" 2>/dev/null; then
      log "a bench process exited early:"
      tail -n 3 "$work"/bench-*.err >&2
      exit 1
    fi
  done
  printf '\rbench-room: %d/%d rooms fully connected (%ds)' "$connected" "$ROOMS" $(($(date +%s) - started)) >&2
  ((connected == ROOMS)) && break
  sleep 1
done
echo >&2
connect_s=$(($(date +%s) - started))
sleep 10 # handshake state freed, allocator settled
after=()
for ((i = 0; i < ROOMS; i++)); do after+=("$(rss_kib "${room_pids[$i]}")"); done
kill -TERM "${bench_pids[@]}" 2>/dev/null || true
wait "${bench_pids[@]}" 2>/dev/null || true

total=$((ROOMS * PER_ROOM))
python3 - "$out/results.jsonl" "$PER_ROOM" "$total" "$connect_s" "${before[*]}" "${after[*]}" <<'PY'
import json, statistics, sys
path, per, total, secs = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
before = [int(x) for x in sys.argv[5].split()]
after = [int(x) for x in sys.argv[6].split()]
per_conn = sorted((a - b) * 1024 / per for a, b in zip(after, before))
row = {"mode": "held", "rooms": len(before), "per_room": per, "total": total,
       "connect_s": secs, "bytes_per_conn_median": statistics.median(per_conn),
       "bytes_per_conn_max": per_conn[-1], "rooms_rss_mib": sum(after) / 1024}
with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")
print(f"held: {total} connections across {len(before)} rooms, all connected within {secs} s")
print(f"room RSS per idle authenticated connection: median {row['bytes_per_conn_median']:.0f} B, "
      f"max {row['bytes_per_conn_max']:.0f} B (at {per} per room); rooms' RSS {row['rooms_rss_mib']:.0f} MiB")
PY

# Storm and fan-out against room-0, now empty again.
log "storm: $STORM clients at once from $STORM_PROCS processes (and as many bare TCP connects)"
# One process is limited by its own connects (bind to a source address, 1 024 in flight); several
# processes on their own 127.x addresses, started together, each take STORM / STORM_PROCS. Their
# rates are combined as total / slowest process's time, per phase.
storm_pids=()
for ((p = 0; p < STORM_PROCS; p++)); do
  "$bin/longlink-bench" --addr 127.0.0.1:30000 --app bench --secret "$SECRET" \
    --sources "127.$((200 + p)).0.1,127.$((200 + p)).0.2" --user-prefix "storm$p" --concurrency "${STORM_CONCURRENCY:-1024}" \
    --json storm --n $((STORM / STORM_PROCS)) >"$work/storm-$p.json" 2>"$work/storm-$p.err" &
  storm_pids+=("$!")
  pids+=("$!")
done
for p in "${storm_pids[@]}"; do
  wait "$p" || { log "a storm process failed:"; tail -n 3 "$work"/storm-*.err >&2; exit 1; }
done
python3 - "$work" "$STORM_PROCS" <<'PY' | tee -a "$out/results.jsonl"
import glob, json, sys
rows = [json.loads(open(f).read().strip().splitlines()[-1]) for f in sorted(glob.glob(sys.argv[1] + "/storm-*.json"))]
n = sum(r["n"] for r in rows)
hs = n / max(r["n"] / r["handshakes_per_s"] for r in rows)
tcp = n / max(r["n"] / r["tcp_connects_per_s"] for r in rows)
print(json.dumps({"mode": "storm", "procs": int(sys.argv[2]), "n": n, "handshakes_per_s": hs,
                  "tcp_connects_per_s": tcp, "ratio": hs / tcp}))
PY
log "fanout: broadcast to $FANOUT connections, 10 rounds"
"$bin/longlink-bench" --addr 127.0.0.1:30000 --app bench --secret "$SECRET" \
  --sources 127.251.0.1 --user-prefix fan \
  --json fanout --n "$FANOUT" --grpc 127.0.0.1:30002 --rounds 10 | tee -a "$out/results.jsonl"
log "results in $out/results.jsonl"
