#!/usr/bin/env bash
# Soak: the gateway (2 workers, release build) under modest mixed load with
# churn, route flips and config reloads, for DURATION seconds, on loopback.
#
# Usage: perf/soak.sh DURATION_SECONDS        (not run in CI)
#
# Load (gw-load, concurrently, a few thousand msgs/s in all so a shared
# 2-core machine is not saturated):
#   - open loop: 200 sessions x 10 msgs/s, for the whole run;
#   - idle: 200 sessions bound once, then still (held memory);
#   - churn: a 0.25 s burst of connect / one frame / reply / close every 5 s
#     (~400 sessions/s on average);
#   - probe: every 10 s, 5 fresh sessions x 50 msgs/s for 2 s: end-to-end
#     latency of the moment.
# Route changes: every FLIP_EVERY seconds (default 5) the config's [[routes]]
# is rewritten to point at the other of two mock backends and SIGHUP is sent;
# every third rewrite also changes a reloadable limit (a reload that is not a
# route change). idle_timeout is 1 h so the idle sessions stay held (with the
# default 120 s the gateway rightly closes them after two minutes).
# Every 10 s: RSS, open fds and threads of the gateway, its counters and the
# forward-latency histogram from /metrics, the last probe's percentiles ->
# perf/results/soak-<timestamp>/soak.csv. At the end perf/soak.py writes
# summary.md there: RSS slope (KiB/h, least squares over the second half),
# fd growth, p99 over time, errors and drops (and OUT/notes.md, if written,
# at the end: rerun `python3 perf/soak.py summarize OUT` after adding it).
set -euo pipefail
cd "$(dirname "$0")/.."
DURATION=${1:?usage: perf/soak.sh DURATION_SECONDS}
FLIP_EVERY=${FLIP_EVERY:-5}
SAMPLE_EVERY=10
case "$DURATION" in ''|*[!0-9]*) echo "DURATION_SECONDS must be a whole number" >&2; exit 2;; esac
[ "$DURATION" -ge 30 ] || { echo "DURATION_SECONDS must be at least 30" >&2; exit 2; }

TARGET=${CARGO_TARGET_DIR:-target}
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
BIN=$TARGET/release
OUT=perf/results/soak-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RUN=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$RUN"
}
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
BE_A=127.0.0.1:$(free_port)
BE_B=127.0.0.1:$(free_port)
GW=127.0.0.1:$(free_port)
ADMIN=127.0.0.1:$(free_port)

"$BIN/mock-backend" --listen "$BE_A" --quiet </dev/null >/dev/null 2>&1 & PIDS+=($!)
"$BIN/mock-backend" --listen "$BE_B" --quiet </dev/null >/dev/null 2>&1 & PIDS+=($!)

CFG=$RUN/gateway.toml
write_config() { # backend idle_timeout
  cat > "$CFG.tmp" <<TOML
[server]
listen = "$GW"
admin_listen = "$ADMIN"
workers = 2
drain_timeout = "2s"
[limits]
idle_timeout = "$2"
[log]
level = "warn"
access_log = false
[[routes]]
server_type = 10
service_name = "soak"
strategy = "round_robin"
endpoints = ["$1"]
on_backend_loss = "rebind"
TOML
  mv "$CFG.tmp" "$CFG"
}
write_config "$BE_A" 3600s
"$BIN/game-gateway" --config "$CFG" >"$RUN/gateway.stdout" 2>"$OUT/gateway.log" & GW_PID=$!; PIDS+=($GW_PID)
for _ in $(seq 1 100); do
  curl -fs "http://$ADMIN/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://$ADMIN/ready" >/dev/null || { echo "gateway did not become ready" >&2; cat "$OUT/gateway.log" >&2; exit 1; }

cat > "$OUT/README" <<TXT
soak: $DURATION s, started $(date -u +%FT%TZ) on $(uname -srm), $(nproc) cores
code: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src crates 2>/dev/null || echo " (with local changes)")
gateway $GW (admin $ADMIN) pid $GW_PID, 2 workers; backends $BE_A $BE_B
load: open loop 200x10/s; idle 200; churn 0.25 s burst every 5 s; probe 5x50/s for 2 s every 10 s
route flip + SIGHUP every $FLIP_EVERY s; every third also changes limits.idle_timeout
TXT

# Long-running loads: both end by themselves after warm-up + DURATION.
"$BIN/gw-load" --target "$GW" --rate 10 --sessions 200 --payload 64 --warmup 2 --duration "$DURATION" \
  --label open-200x10 --json >"$RUN/open.out" 2>"$OUT/open-progress.log" & OPEN_PID=$!; PIDS+=($OPEN_PID)
"$BIN/gw-load" --target "$GW" --idle --sessions 200 --warmup 2 --duration "$DURATION" \
  --label idle-200 --json >"$RUN/idle.out" 2>"$OUT/idle-progress.log" & IDLE_PID=$!; PIDS+=($IDLE_PID)

# Route flips and reloads.
(
  n=0
  while :; do
    sleep "$FLIP_EVERY"
    n=$((n + 1))
    be=$BE_A; [ $((n % 2)) = 1 ] && be=$BE_B
    idle=3600s; [ $((n % 3)) = 0 ] && idle=3601s
    write_config "$be" "$idle"
    kill -HUP "$GW_PID" 2>/dev/null || exit 0
    echo "$(date +%s) flip $n -> $be idle_timeout $idle" >>"$OUT/flips.log"
  done
) & FLIP_PID=$!; PIDS+=($FLIP_PID)

# Churn bursts.
(
  while :; do
    sleep 5
    "$BIN/gw-load" --target "$GW" --churn --sessions 1 --warmup 0 --duration 0.25 --label churn --json 2>/dev/null \
      | tail -1 >>"$OUT/churn.jsonl" || true
  done
) & CHURN_PID=$!; PIDS+=($CHURN_PID)

# Sample every 10 s (a probe first, then the sample that reads it).
T0=$(date +%s)
python3 perf/soak.py sample "$OUT" "$ADMIN" "$GW_PID" "$T0"
while :; do
  now=$(date +%s)
  [ $((now - T0)) -ge "$DURATION" ] && break
  "$BIN/gw-load" --target "$GW" --rate 50 --sessions 5 --warmup 0.5 --duration 2 --label "probe" --json 2>/dev/null \
    | tail -1 >>"$OUT/probes.jsonl" || true
  next=$((T0 + ( (now - T0) / SAMPLE_EVERY + 1) * SAMPLE_EVERY))
  while [ "$(date +%s)" -lt "$next" ]; do sleep 0.5; done
  python3 perf/soak.py sample "$OUT" "$ADMIN" "$GW_PID" "$T0"
done

kill "$FLIP_PID" "$CHURN_PID" 2>/dev/null || true
# The long loads end on their own (give them their warm-up and reply timeout).
for p in $OPEN_PID $IDLE_PID; do
  for _ in $(seq 1 40); do kill -0 "$p" 2>/dev/null || break; sleep 0.5; done
done
wait "$OPEN_PID" 2>/dev/null || true
wait "$IDLE_PID" 2>/dev/null || true
tail -1 "$RUN/open.out" >"$OUT/loads.jsonl" || true
tail -1 "$RUN/idle.out" >>"$OUT/loads.jsonl" || true
# Settled: one more sample with the load gone.
sleep 3
python3 perf/soak.py sample "$OUT" "$ADMIN" "$GW_PID" "$T0"
python3 perf/soak.py summarize "$OUT"
