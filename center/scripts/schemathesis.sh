#!/usr/bin/env bash
# Fuzzes center's HTTP API from its own OpenAPI document with schemathesis and fails on any 5xx
# or response that does not match the document. Runs a keeper-less center (examples/standalone.rs:
# app demo with key k-demo, in-process stand-ins for one register and one room, so every
# operation runs its whole path and a 5xx is a bug, not a missing dependency).
#
#   center/scripts/schemathesis.sh                 # needs python3; installs schemathesis in a venv
#   ST_MAX_EXAMPLES=500 center/scripts/schemathesis.sh
#   center/scripts/schemathesis.sh --seed 1       # extra arguments go to `st run`
# Exits 3 when schemathesis cannot be installed.
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-/var/tmp/longlink-target}"
venv="${ST_VENV:-/var/tmp/center-st-venv}"
if [[ ! -x $venv/bin/st ]]; then
  # Exit 3: the tool could not be installed (no PyPI), which is not a finding about the API.
  if ! { python3 -m venv "$venv" && "$venv/bin/pip" install -q schemathesis; }; then
    rm -rf "$venv"
    echo "schemathesis: cannot install it from PyPI into $venv" >&2
    exit 3
  fi
fi

# The one debug crate set (docs/decisions.md, "One build"); examples are among --all-targets.
cargo build --workspace --all-targets --locked
port="${ST_PORT:-18080}"
"$CARGO_TARGET_DIR/debug/examples/standalone" "127.0.0.1:$port" "127.0.0.1:$((port + 1))" &
pid=$!
trap 'kill $pid 2>/dev/null || true' EXIT
for _ in $(seq 100); do curl -sf "http://127.0.0.1:$port/healthz" >/dev/null && break; sleep 0.1; done

"$venv/bin/st" --config-file center/scripts/schemathesis.toml run "http://127.0.0.1:$port/openapi.json" \
  --header "Authorization: Bearer k-demo" \
  --checks all \
  --generation-database none \
  --max-examples "${ST_MAX_EXAMPLES:-100}" \
  "$@"
