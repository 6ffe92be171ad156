#!/usr/bin/env bash
# First honest measurement (issue: the engine): 100 sessions, 64-byte payloads,
# ping-pong (1 in flight) and pipelined (16 in flight), through the gateway
# (1 worker, pinned to core 0) and straight to the mock backend (the baseline).
# Load generator and mock backend share core 1.
# Usage: perf/first-run.sh [seconds]   (prints one line per run, then JSON lines)
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
cargo build --release --workspace --bins >/dev/null
BIN=target/release
BACKEND=127.0.0.1:29711
GW_PORT=28080
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
taskset -c 1 $BIN/mock-backend --listen $BACKEND --quiet >/dev/null &
sleep 0.3
CFG=$(mktemp)
cat > "$CFG" <<TOML
[server]
listen = "127.0.0.1:$GW_PORT"
admin_listen = "127.0.0.1:0"
workers = 1
cpus = [0]
[log]
level = "warn"
[[routes]]
server_type = 10
service_name = "bench"
strategy = "round_robin"
endpoints = ["$BACKEND"]
TOML
$BIN/game-gateway --config "$CFG" ${GW_ARGS:-} >/dev/null &
GW_PID=$!
sleep 0.5
# CPU time (utime+stime, in clock ticks) of a process.
cpu_ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
for inflight in 1 16; do
  taskset -c 1 $BIN/gw-load --mode direct --target $BACKEND --sessions 100 --inflight $inflight \
    --duration "$SECS" --warmup 2 --label "direct-100x$inflight" --json 2>/dev/null
  before=$(cpu_ticks $GW_PID)
  out=$(taskset -c 1 $BIN/gw-load --mode gateway --target 127.0.0.1:$GW_PORT --sessions 100 --inflight $inflight \
    --duration "$SECS" --warmup 2 --label "gateway-100x$inflight" --json 2>/dev/null)
  after=$(cpu_ticks $GW_PID)
  echo "$out"
  # Whole-run CPU (warm-up and drain included) over every frame forwarded
  # in the run, so this slightly overstates the per-message cost.
  python3 - "$out" "$before" "$after" "$TCK" "$SECS" <<'PY'
import json, sys
res = json.loads(sys.argv[1].splitlines()[-1])
ticks = int(sys.argv[3]) - int(sys.argv[2]); tck = int(sys.argv[4]); secs = float(sys.argv[5])
cpu_us = ticks * 1e6 / tck
msgs = res["msgs_per_sec"] * (secs + 2)
print(f"{res['label']}: gateway CPU {cpu_us/1e6:.2f}s over ~{msgs:.0f} msgs = {cpu_us/msgs:.2f} us/msg (upper bound)")
PY
done
rm -f "$CFG"
