#!/usr/bin/env bash
# Keeper CPU per put. Starts 3 keepers on loopback, runs keeper-bench's put phases against them,
# stops at the end of the last put phase and prints the keepers' CPU time (utime + stime from
# /proc/<pid>/stat, whole run including warm-ups) per 1000 measured puts, their context switches
# and the machine's idle share, and the load generator's own CPU per 1000 puts. Throughput of single runs moves ±10% on a small box; CPU per put
# resolves 5% differences. Compare two binaries or settings by alternating runs of this script
# (docs/benchmarks.md, sessions 8 and 9).
#
#   scripts/keeper-put-cpu.sh                                    # puts at 64 clients for 10 s
#   scripts/keeper-put-cpu.sh --put-clients 16,64 --duration 5s  # arguments go to keeper-bench run
#   KEEPER_BIN=/tmp/keeper-before scripts/keeper-put-cpu.sh      # another keeper binary
#   BENCH_BIN=/tmp/keeper-bench-before scripts/keeper-put-cpu.sh # another keeper-bench binary
#   CLIENTS_ON=leader scripts/keeper-put-cpu.sh                  # or followers; default all
#   KEEPER_CONFIG=my.toml KEEP_LOGS=/tmp/logs scripts/keeper-put-cpu.sh
#   TRACE_FLUSHERS=3 scripts/keeper-put-cpu.sh                   # + the journal's syscall times
#
# TRACE_FLUSHERS=N records the three flusher threads' pwrite and fdatasync calls for N seconds from
# the 2nd second of the last put phase (perf tracepoints) and prints their latency percentiles and
# the flushers' idle time between syncs (docs/benchmarks.md, session 19).
# Needs release binaries (scripts/bench-keeper.sh builds them). Data and logs live in a temporary
# directory under ${BENCH_TMPDIR:-/var/tmp}, removed on exit with every process started here;
# KEEP_LOGS copies the keepers' logs out first (after they stopped, so a keeper built with
# --features runtime-stats has logged its Raft stats).
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "keeper-put-cpu: $*" >&2; }

bin="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}/release"
keeper="${KEEPER_BIN:-$bin/keeper}"
bench="${BENCH_BIN:-$bin/keeper-bench}"
for b in "$keeper" "$bench"; do
  [[ -x $b ]] || { log "$b not found: build with scripts/bench-keeper.sh or cargo build --release --workspace --bins"; exit 1; }
done
clients_on="${CLIENTS_ON:-all}"
[[ $clients_on == all || $clients_on == leader || $clients_on == followers ]] ||
  { log "CLIENTS_ON: '$clients_on' is not all, leader or followers"; exit 2; }

args=("$@")
[[ " ${args[*]} " == *" --put-clients "* ]] || args=(--put-clients 64 "${args[@]}")
[[ " ${args[*]} " == *" --duration "* ]] || args=(--duration 10s "${args[@]}")
last=""
for ((i = 0; i < ${#args[@]}; i++)); do
  [[ ${args[i]} == --put-clients ]] && last="${args[i + 1]##*,}"
done

work="$(mktemp -d "${BENCH_TMPDIR:-/var/tmp}/keeper-put-cpu.XXXXXX")"
keepers=()
bench_pid=""
cleanup() {
  local pid i
  trap - EXIT INT TERM
  if [[ -n ${tracer_pid:-} ]]; then
    pkill -P "$tracer_pid" 2>/dev/null || true
    kill "$tracer_pid" 2>/dev/null || true
  fi
  [[ -n $bench_pid ]] && kill -TERM "$bench_pid" 2>/dev/null || true
  for pid in "${keepers[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  for pid in "${keepers[@]}"; do
    for ((i = 0; i < 100; i++)); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [[ -n ${KEEP_LOGS:-} ]]; then
    mkdir -p "$KEEP_LOGS" && cp "$work"/k*.log "$KEEP_LOGS"/ 2>/dev/null || true
  fi
  rm -rf "$work"
}
trap cleanup EXIT INT TERM

endpoints=(127.0.0.1:23791 127.0.0.1:23792 127.0.0.1:23793)
members="1=${endpoints[0]},2=${endpoints[1]},3=${endpoints[2]}"
for i in 1 2 3; do
  "$keeper" --id "$i" --listen "${endpoints[i - 1]}" --data-dir "$work/k$i" --initial-cluster "$members" \
    ${KEEPER_CONFIG:+--config "$KEEPER_CONFIG"} >"$work/k$i.log" 2>&1 &
  keepers+=($!)
done
all="$(IFS=,; echo "${endpoints[*]}")"
for ((i = 0; ; i++)); do
  ETCDCTL_API=3 etcdctl --endpoints="$all" endpoint health >/dev/null 2>&1 && break
  ((i < 120)) || { log "the keepers did not become healthy in 60 s (logs in $work)"; exit 1; }
  sleep 0.5
done

leader="$(ETCDCTL_API=3 etcdctl --endpoints="$all" endpoint status -w json | python3 -c '
import json, sys
print(next(e["Endpoint"] for e in json.load(sys.stdin) if e["Status"]["leader"] == e["Status"]["header"]["member_id"]))')"
case $clients_on in
  all) targets="$all" ;;
  leader) targets="$leader" ;;
  followers) targets="$(printf '%s\n' "${endpoints[@]}" | grep -vx "$leader" | paste -sd,)" ;;
esac
log "leader $leader; clients on $clients_on ($targets); bench ${args[*]}"

# CPU ticks (utime + stime) of the given processes.
ticks_of() {
  local total=0 pid fields
  for pid in "$@"; do
    # Fields after the ")" that closes the command name: utime and stime are the 12th and 13th.
    read -r -a fields <<<"$(sed 's/^.*) //' "/proc/$pid/stat")"
    total=$((total + fields[11] + fields[12]))
  done
  echo "$total"
}
cpu_ticks() { ticks_of "${keepers[@]}"; }
switches() {
  cat /proc/"${keepers[0]}"/task/*/status /proc/"${keepers[1]}"/task/*/status \
    /proc/"${keepers[2]}"/task/*/status 2>/dev/null | awk '/ctxt_switches/ { s += $2 } END { print s }'
}
machine() { awk '/^cpu / { print $2 + $3 + $4 + $5 + $6 + $7 + $8, $5 }' /proc/stat; }

trace_seconds="${TRACE_FLUSHERS:-}"
if [[ -n $trace_seconds ]]; then
  [[ $trace_seconds =~ ^[1-9][0-9]*$ ]] || { log "TRACE_FLUSHERS: '$trace_seconds' is not a number of seconds"; exit 2; }
  command -v perf >/dev/null || { log "TRACE_FLUSHERS needs perf (apt-get install linux-perf)"; exit 2; }
fi
# Records the flusher threads' journal syscalls for $trace_seconds once the last put phase has
# measured for a second.
trace_flushers() {
  local tids
  until grep -q "put c=$last: [1-9][0-9]*\.[0-9]s/" "$work/bench.txt" 2>/dev/null; do
    kill -0 "$bench_pid" 2>/dev/null || return 0
    sleep 0.1
  done
  tids="$(grep -lx raft-log-flush /proc/{"${keepers[0]}","${keepers[1]}","${keepers[2]}"}/task/*/comm |
    cut -d/ -f5 | paste -sd,)"
  perf record -q -t "$tids" -o "$work/flush.data" \
    -e syscalls:sys_enter_pwrite64,syscalls:sys_exit_pwrite64,syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync \
    -- sleep "$trace_seconds" >/dev/null 2>&1
}
flush_report() {
  perf script -i "$work/flush.data" -F tid,time,event 2>/dev/null | python3 -c '
import collections, sys
state, took = collections.defaultdict(dict), collections.defaultdict(list)
for line in sys.stdin:
    tid, at, event = line.split()[:3]
    at, event, s = float(at.rstrip(":")), event.rstrip(":"), state[tid]
    call = "pwrite" if "pwrite" in event else "fdatasync"
    if "enter" in event:
        if call == "pwrite" and "synced" in s:
            took["idle between syncs"].append(at - s["synced"])
        s[call] = at
    elif call in s:
        took[call].append(at - s.pop(call))
        if call == "fdatasync":
            s["synced"] = at
for name in ("pwrite", "fdatasync", "idle between syncs"):
    v = sorted(took[name])
    if v:
        p = lambda q: v[min(len(v) - 1, int(len(v) * q))] * 1e6
        print(f"flushers {name}: {len(v)} calls, p50 {p(0.5):.0f} us, p90 {p(0.9):.0f} us, "
              f"p99 {p(0.99):.0f} us, mean {sum(v) / len(v) * 1e6:.0f} us")'
}

ticks0="$(cpu_ticks)"; switches0="$(switches)"; read -r all0 idle0 <<<"$(machine)"
"$bench" run --system keeper --endpoints "$targets" --out "$work/bench.json" "${args[@]}" >"$work/bench.txt" 2>&1 &
bench_pid=$!
tracer_pid=""
if [[ -n $trace_seconds ]]; then
  trace_flushers &
  tracer_pid=$!
fi
while kill -0 "$bench_pid" 2>/dev/null; do
  grep -q "put c=$last: done" "$work/bench.txt" && break
  sleep 0.2
done
ticks1="$(cpu_ticks)"; switches1="$(switches)"; read -r all1 idle1 <<<"$(machine)"
bench_ticks="$(ticks_of "$bench_pid")"
kill -TERM "$bench_pid" 2>/dev/null || true
wait "$bench_pid" 2>/dev/null || true
bench_pid=""

grep -E "put c=[0-9]+: done" "$work/bench.txt" | sed 's/^.*put /put /' || { log "no put phase finished:"; tail -n 20 "$work/bench.txt" >&2; exit 1; }
puts="$(grep -oE "put c=[0-9]+: done: [0-9]+ ops" "$work/bench.txt" | awk '{ s += $4 } END { print s + 0 }')"
((puts > 0)) || { log "no puts were measured"; exit 1; }
awk -v t=$((ticks1 - ticks0)) -v hz="$(getconf CLK_TCK)" -v p="$puts" -v s=$((switches1 - switches0)) \
  -v a=$((all1 - all0)) -v i=$((idle1 - idle0)) -v b="$bench_ticks" 'BEGIN {
  printf "keeper CPU: %.2f s for %d puts = %.2f ticks (1/%d s) per 1000 puts; context switches %d; machine idle %.1f%%\n",
    t / hz, p, t * 1000 / p, hz, s, 100 * i / a
  printf "keeper-bench CPU (whole run): %.2f ticks per 1000 puts\n", b * 1000 / p }'
if [[ -n $tracer_pid ]]; then
  wait "$tracer_pid" || true
  if [[ -s $work/flush.data ]]; then flush_report; else log "no flusher trace (the phase ended first?)"; fi
fi
