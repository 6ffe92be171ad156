#!/usr/bin/env bash
# Route propagation under load: from a Redis PUBLISH to every worker serving
# the new snapshot, over CHANGES route changes (default 1000), with no frame
# lost or misrouted. Loopback only; bounded (the change phase stops after
# 200 s whatever CHANGES says; a run of 1000 takes about a minute).
#
# Usage: perf/route-propagation.sh [CHANGES]        (not run in CI)
#
# Setup: a redis-server of its own (temp dir, free port); four mock backends,
# group A (A1, A2) and group B (B1, B2), each tagging its echoes with its
# address (mock-backend --tag); the gateway (release build, 2 workers) with
# [redis] on that server (refresh_interval 10 s) and a static rule sending
# server type 10 to group A.
# Load, both on server type 10 (so every change moves them):
#   - gw-routeprop's own 32 sessions x 200 frames/s (open loop, 6,400/s),
#     each frame numbered and timed, each reply tagged by its backend;
#   - gw-load, open loop 200 sessions x 10 frames/s (2,000/s), counting
#     missing replies.
# Changes: gw-routeprop flips server type 10 between group B and group A,
# each flip one MULTI/SET/PUBLISH/EXEC, paced 20-50 ms publish to publish
# (and never before every worker confirmed the previous one: see
# perf/routeprop.rs). It measures each change from the EXEC to the last
# worker's own apply time (/status route_applied_at_unix_us), reads the
# gateway's game_gateway_route_propagation_seconds before and after, and
# checks every frame: lost (no reply) or misrouted (answered by a group no
# snapshot in force during its flight routes to; see docs in routeprop.rs
# and PERFORMANCE.md "Route propagation").
# Results: perf/results/route-propagation-<timestamp>/ (summary.md,
# result.json, changes.csv, gateway.log, the load's output).
set -euo pipefail
cd "$(dirname "$0")/.."
CHANGES=${1:-1000}
case "$CHANGES" in ''|*[!0-9]*) echo "CHANGES must be a whole number" >&2; exit 2;; esac
[ "$CHANGES" -ge 1 ] && [ "$CHANGES" -le 5000 ] || { echo "CHANGES must be 1..5000" >&2; exit 2; }

TARGET=${CARGO_TARGET_DIR:-target}
if [ -z "${ROUTEPROP_LOCKED:-}" ]; then
  # Build outside the benchmark lock; measure inside it.
  cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
  command -v redis-server >/dev/null || { echo "redis-server is needed (apt-get install redis-server)" >&2; exit 2; }
  ROUTEPROP_LOCKED=1 exec flock /tmp/gw-bench.lock "$0" "$@"
fi
BIN=$TARGET/release
OUT=perf/results/route-propagation-$(date -u +%Y%m%d-%H%M%S)
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
REDIS_PORT=$(free_port)
A1=127.0.0.1:$(free_port); A2=127.0.0.1:$(free_port)
B1=127.0.0.1:$(free_port); B2=127.0.0.1:$(free_port)
GW=127.0.0.1:$(free_port)
ADMIN=127.0.0.1:$(free_port)

redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save "" --appendonly no --dir "$RUN" \
  >"$RUN/redis.log" 2>&1 & PIDS+=($!)
for be in "$A1" "$A2" "$B1" "$B2"; do
  "$BIN/mock-backend" --listen "$be" --tag "$be" --quiet </dev/null >/dev/null 2>&1 & PIDS+=($!)
done
for _ in $(seq 1 50); do
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break
  sleep 0.1
done

CFG=$RUN/gateway.toml
cat >"$CFG" <<TOML
[server]
listen = "$GW"
admin_listen = "$ADMIN"
workers = 2
drain_timeout = "2s"
[redis]
url = "redis://127.0.0.1:$REDIS_PORT/0"
refresh_interval = "10s"
[log]
level = "warn"
access_log = false
[[routes]]
server_type = 10
service_name = "routeprop"
strategy = "round_robin"
endpoints = ["$A1", "$A2"]
TOML
"$BIN/game-gateway" --config "$CFG" >"$RUN/gateway.stdout" 2>"$OUT/gateway.log" & GW_PID=$!; PIDS+=("$GW_PID")
for _ in $(seq 1 100); do
  curl -fs "http://$ADMIN/ready" >/dev/null 2>&1 && break
  sleep 0.1
done
curl -fs "http://$ADMIN/ready" >/dev/null || { echo "gateway did not become ready" >&2; cat "$OUT/gateway.log" >&2; exit 1; }

cat >"$OUT/README" <<TXT
route propagation: $CHANGES changes, started $(date -u +%FT%TZ) on $(uname -srm), $(nproc) cores
code: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- src crates perf 2>/dev/null || echo " (with local changes)")
gateway $GW (admin $ADMIN) pid $GW_PID, 2 workers, redis 127.0.0.1:$REDIS_PORT (refresh_interval 10 s)
group A: $A1 $A2; group B: $B1 $B2 (server type 10, round_robin)
load: gw-routeprop 32 sessions x 200/s; gw-load open loop 200 sessions x 10/s
machine load average at the start: $(cut -d' ' -f1-3 /proc/loadavg) (other work on the cores perturbs the workers' tick)
TXT

# The steady load runs from before the first change until after the last;
# it ends by itself (warm-up 1 s + its duration).
LOAD_SECS=$(( CHANGES * 70 / 1000 + 10 ))
[ "$LOAD_SECS" -gt 240 ] && LOAD_SECS=240
"$BIN/gw-load" --target "$GW" --rate 10 --sessions 200 --payload 64 --warmup 1 --duration "$LOAD_SECS" \
  --label steady-200x10 --json >"$RUN/load.out" 2>"$OUT/load-progress.log" & LOAD_PID=$!; PIDS+=("$LOAD_PID")
sleep 2

rc=0
"$BIN/gw-routeprop" --gateway "$GW" --admin "$ADMIN" --redis "127.0.0.1:$REDIS_PORT" \
  --group-a "$A1,$A2" --group-b "$B1,$B2" --changes "$CHANGES" --sessions 32 --rate 200 \
  --out "$OUT" >"$RUN/routeprop.json" 2>"$OUT/routeprop.log" || rc=$?
# Stop the steady load now (SIGINT is not handled: its summary is lost, so
# let it finish by itself unless it would outlast the bound).
for _ in $(seq 1 $(( (LOAD_SECS + 10) * 2 ))); do kill -0 "$LOAD_PID" 2>/dev/null || break; sleep 0.5; done
wait "$LOAD_PID" 2>/dev/null || true
tail -1 "$RUN/load.out" >"$OUT/load.jsonl" || true
echo "machine load average at the end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$OUT/README"
curl -fs "http://$ADMIN/metrics" >"$OUT/metrics.txt" || true
curl -fs "http://$ADMIN/status" >"$OUT/status.json" || true

python3 - "$OUT" "$rc" <<'PY'
import json, os, sys
out, rc = sys.argv[1], int(sys.argv[2])
r = json.load(open(os.path.join(out, "result.json")))
try:
    load = json.loads(open(os.path.join(out, "load.jsonl")).read().strip() or "{}")
except (OSError, ValueError):
    load = {}
readme = open(os.path.join(out, "README")).read().strip()
def row(name, s):
    return f"| {name} | {s['n']} | {s['p50_ms']:.1f} | {s['p90_ms']:.1f} | {s['p99_ms']:.1f} | {s['max_ms']:.1f} |"
f = r["frames"]
L = [f"# Route propagation {os.path.basename(out)}", "", "```", readme, "```", "",
     f"{r['changes_done']} of {r['changes_requested']} changes in {r['change_phase_seconds']} s "
     f"({r['changes_per_second']}/s); {r['workers']} workers" + (f"; FAILURE: {r['failure']}" if r["failure"] else ""), "",
     "| propagation (ms) | changes | p50 | p90 | p99 | max |", "|---|---:|---:|---:|---:|---:|",
     row("PUBLISH -> last worker serving it (driver clock vs workers' apply times)", r["propagation_from_publish_last_worker"]),
     row("PUBLISH -> each worker (per worker)", r["propagation_from_publish_per_worker"]),
     row("notify received -> last worker (the gateway's own measure)", r["gateway_measure_last_worker"]),
     row("PUBLISH -> slowest session's first frame to the new group (client view)", r["client_view_slowest_session"]),
     "",
     f"- gateway histogram `game_gateway_route_propagation_seconds` over the run: count {r['gateway_histogram']['count']:.0f}, "
     f"mean {1000 * r['gateway_histogram']['sum_seconds'] / max(r['gateway_histogram']['count'], 1):.1f} ms; buckets "
     + ", ".join(f"le {b['le']}: {b['count']:.0f}" for b in r["gateway_histogram"]["buckets"] if b["le"] in ("0.01", "0.025", "0.05", "0.1", "+Inf")),
     f"- driver frames: sent {f['sent']:,}, replies {f['replies']:,}, **lost {f['lost']}**, duplicates {f['duplicates']}, "
     f"**misrouted {f['misrouted']}** (unknown backend {f['unknown_backend']}); steady {f['steady']:,}, in transition "
     f"{f['in_transition']:,} ({f['in_transition_new_group']:,} to the new group, {f['in_transition_old_group']:,} to the old)",
     f"- gw-load steady load: " + (f"{load.get('msgs_per_sec', 0):,.0f} msgs/s, replies {load.get('replies', 0):,}, "
                                    f"**missing {load.get('missing')}**, errors {load.get('errors')}, p99 {load.get('p99_us')} µs"
                                    if load else "no summary"),
     f"- gateway drops during the run: {r['gateway_drops_during_run'] or 'none'}",
     f"- changes paced by the confirmation (the next publish waited for /status): {r['paced_by_confirmation']}",
     f"- driver errors: {r['error_count']}" + (f" (first: {r['errors'][:3]})" if r["errors"] else ""),
     f"- exit status of gw-routeprop: {rc}"]
text = "\n".join(L) + "\n"
open(os.path.join(out, "summary.md"), "w").write(text)
print(text)
PY
echo "results in $OUT"
exit "$rc"
