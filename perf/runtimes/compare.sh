#!/usr/bin/env bash
# monoio vs glommio: the same minimal TCP forwarder (fwd_monoio.rs,
# fwd_glommio.rs: one pinned thread, one backend connection per client, one
# task per direction, 16 KiB reads, write_all, TCP_NODELAY) on each runtime,
# with HAProxy (tcp mode, nbthread 1) as the reference line, loaded exactly as
# perf/compare.sh loads HAProxy: the proxy under test pinned to core 0,
# gw-load (raw client frames, 64-byte payloads) and gw-echo on core 1, loads
# 100x1, 100x16 and 1000x1 (sessions x frames in flight), proxy CPU per
# message from /proc/PID/stat (utime+stime over the whole run / replies).
#
# Peers: monoio (io_uring, the gateway's tuned ring: SINGLE_ISSUER |
# COOP_TASKRUN | DEFER_TASKRUN), monoio-epoll (the same binary on monoio's
# legacy driver, our fallback), glommio (io_uring, the only driver it has),
# haproxy (if installed).
#
# Usage: perf/runtimes/compare.sh [SECONDS] [ROUNDS]   (default 10 s, 1 round)
# With ROUNDS > 1 every load runs ROUNDS times, the peers' order rotating per
# round, and the summary gives the median of the rounds and their range
# (perf/runtimes/summarize.py; give it several results.jsonl to pool runs).
# Wrap in `flock /tmp/gw-bench.lock` on a shared machine.
# Writes: perf/results/runtimes-<timestamp>/{results.jsonl,summary.md,*.log}.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-10}
ROUNDS=${2:-1}
WARM=2
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -p gw-perf >/dev/null 2>&1 || cargo build --release -p gw-perf
cargo build --release --manifest-path perf/runtimes/Cargo.toml >/dev/null 2>&1 \
  || cargo build --release --manifest-path perf/runtimes/Cargo.toml
BIN=$CARGO_TARGET_DIR/release
OUT=perf/results/runtimes-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
TMP=$(mktemp -d)
ECHO=127.0.0.1:29810
MON=127.0.0.1:28181; MONE=127.0.0.1:28182; GLM=127.0.0.1:28183; HAP=127.0.0.1:28184
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

taskset -c 1 $BIN/gw-echo --listen $ECHO >/dev/null 2>"$OUT/echo.log" & PIDS+=($!)
taskset -c 0 $BIN/fwd-monoio --listen $MON --backend $ECHO --cpu 0 2>"$OUT/fwd-monoio.log" & PIDS+=($!); MON_PID=$!
FWD_EPOLL=1 taskset -c 0 $BIN/fwd-monoio --listen $MONE --backend $ECHO --cpu 0 2>"$OUT/fwd-monoio-epoll.log" & PIDS+=($!); MONE_PID=$!
# glommio needs RLIMIT_MEMLOCK >= 512 KiB: fwd-glommio raises it itself and logs what it found.
taskset -c 0 $BIN/fwd-glommio --listen $GLM --backend $ECHO --cpu 0 2>"$OUT/fwd-glommio.log" & PIDS+=($!); GLM_PID=$!
PEERS="monoio monoio-epoll glommio"
if command -v haproxy >/dev/null; then
cat > "$TMP/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn 9000
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend game
  bind $HAP
  default_backend echo
backend echo
  server s1 $ECHO
CFG
  taskset -c 0 haproxy -db -f "$TMP/haproxy.cfg" >/dev/null 2>&1 & PIDS+=($!); HAP_PID=$!
  PEERS="$PEERS haproxy"
else
  echo "haproxy not installed: no reference line" | tee "$OUT/haproxy.log" >&2
fi
sleep 1
for p in $MON_PID $MONE_PID $GLM_PID; do
  kill -0 "$p" 2>/dev/null || { echo "a forwarder died at start:" >&2; cat "$OUT"/fwd-*.log >&2; exit 1; }
done

addr() { case $1 in monoio) echo $MON;; monoio-epoll) echo $MONE;; glommio) echo $GLM;; haproxy) echo $HAP;; esac; }
pidof_peer() { case $1 in monoio) echo $MON_PID;; monoio-epoll) echo $MONE_PID;; glommio) echo $GLM_PID;; haproxy) echo $HAP_PID;; esac; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)

# run PEER LOAD ROUND gw-load-args...
run() {
  local peer=$1 load=$2 round=$3; shift 3
  local pid; pid=$(pidof_peer "$peer")
  local before after out
  before=$(ticks "$pid")
  out=$(taskset -c 1 $BIN/gw-load --target "$(addr "$peer")" --duration "$SECS" --warmup $WARM \
        --label "$peer-$load" --json "$@" 2>/dev/null | tail -1) || true
  after=$(ticks "$pid")
  python3 - "$out" "$before" "$after" "$TCK" "$SECS" "$WARM" "$peer" "$load" "$round" >>"$RES" <<'PY'
import json, sys
out, before, after, tck, secs, warm = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
try:
    r = json.loads(out)
except Exception:
    r = {"error": out}
r.update(peer=sys.argv[7], load=sys.argv[8], round=int(sys.argv[9]))
cpu_s = (after - before) / tck
# CPU over the whole run (warm-up + measured + drain) divided by the
# messages of the whole run, estimated from the measured rate.
msgs = r.get("msgs_per_sec", 0) * (secs + warm)
r["proxy_cpu_s"] = cpu_s
r["cpu_us_per_msg"] = (cpu_s * 1e6 / msgs) if msgs else None
print(json.dumps(r))
PY
  tail -1 "$RES" | python3 -c '
import json, sys
r = json.load(sys.stdin); g = r.get
print("round %d %14s %-7s: %9.0f msgs/s p50=%sus p99=%sus p99.9=%sus cpu/msg=%s errors=%s missing=%s" % (
    g("round"), g("peer"), g("load"), g("msgs_per_sec", 0), g("p50_us"), g("p99_us"), g("p999_us"),
    None if g("cpu_us_per_msg") is None else round(g("cpu_us_per_msg"), 2), g("errors"), g("missing")))'
}

read -r -a PEER_ARR <<<"$PEERS"
for round in $(seq 1 "$ROUNDS"); do
  # Rotate the peers' order each round so no runtime always runs first.
  n=${#PEER_ARR[@]}; order=()
  for i in $(seq 0 $((n - 1))); do order+=("${PEER_ARR[$(((i + round - 1) % n))]}"); done
  for load in "100 1" "100 16" "1000 1"; do
    set -- $load; S=$1; K=$2
    for peer in "${order[@]}"; do run "$peer" "${S}x${K}" "$round" --sessions "$S" --inflight "$K"; done
  done
done
# Idle CPU: ticks of each forwarder over 3 s with no load (a spinning reactor would show here).
for peer in $PEERS; do
  p=$(pidof_peer "$peer"); b=$(ticks "$p"); sleep 3; a=$(ticks "$p")
  echo "{\"peer\": \"$peer\", \"load\": \"idle-3s\", \"proxy_cpu_s\": $(python3 -c "print(($a - $b) / $TCK)")}" >>"$RES"
done
for f in "$OUT"/*.log; do [ -s "$f" ] || rm -f "$f"; done

python3 perf/runtimes/summarize.py "$RES" > "$OUT/summary.md"
{ echo; echo "Forwarder start-up logs:"; echo
  for f in "$OUT"/fwd-*.log; do [ -f "$f" ] && { echo "    $(basename "$f"):"; sed 's/^/      /' "$f"; }; done; } >> "$OUT/summary.md"
echo
cat "$OUT/summary.md"
