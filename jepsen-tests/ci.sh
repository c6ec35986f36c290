#!/usr/bin/env bash
# Short jepsen-tests runs for CI: 2 keeper runs of ~20 s with every nemesis, one register and one
# push run of ~20 s with every nemesis. (The checkers' unit tests and the harness tests, including
# the broken keeper, run with the workspace's tests in scripts/test.sh.) Exits non-zero on any
# anomaly, leaves no namespace, link, rule or process behind, and prints how long it took.
# Needs root (network namespaces, iptables). Override with JEPSEN_RUNS / JEPSEN_TIME.
set -euo pipefail
cd "$(dirname "$0")"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
start=$(date +%s)
if [ "$(id -u)" != 0 ]; then
  echo "jepsen-tests ci: needs root (network namespaces and iptables)" >&2
  exit 1
fi

# The same crate set as scripts/test.sh, so RocksDB is not rebuilt for another feature set; the
# harness and the binaries it starts end up side by side.
(cd .. && cargo build --workspace --all-targets --locked)

bin="$CARGO_TARGET_DIR/debug/jepsen-tests"
out=$(mktemp -d /var/tmp/longlink-jepsen-ci.XXXXXX)
status=0
"$bin" keeper \
  --runs "${JEPSEN_RUNS:-2}" --time "${JEPSEN_TIME:-20}" \
  --nemesis partition,kill,pause,member \
  --out "$out" || status=$?
for workload in register push; do
  "$bin" "$workload" \
    --runs 1 --time "${JEPSEN_TIME:-20}" \
    --nemesis partition,kill,pause \
    --out "$out" || status=$?
done
# Belt and braces: remove anything a crashed harness left (only prefixes of dead harnesses).
"$bin" cleanup >/dev/null || true

if [ "$status" = 0 ]; then
  rm -rf "$out"
else
  echo "jepsen-tests ci: histories, logs and verdicts kept in $out" >&2
fi
echo "jepsen-tests ci: exit $status after $(( $(date +%s) - start ))s"
exit "$status"
