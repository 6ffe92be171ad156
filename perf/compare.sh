#!/usr/bin/env bash
# Side-by-side: direct (no proxy), HAProxy (TCP mode, nbthread 1), nginx
# (stream, 1 worker) and game-gateway (1 worker), one after another in the
# same run. The proxy under test is pinned to core 0; the load generator and
# the backends share core 1.
#
# The gateway runs in each of its backend protocols: gate (our multiplexed
# protocol, to mock-backend; rows "gateway"), seed_tcp (the Go gateway's
# per-session TCP mode, to `gw-echo --mode seed_tcp`; rows "gateway-seed_tcp")
# and grpc (StreamPackets over HTTP/2, to `gw-echo --mode grpc`; rows
# "gateway-grpc"). The load picks the route by the server type in its frames'
# server_id: 10 = gate, 11 = seed_tcp, 12 = grpc.
#
# Usage: perf/compare.sh [SECONDS]          (default 10 s per load)
#        perf/compare.sh --tls [SECONDS]    TLS: gateway vs HAProxy `ssl crt` (compare-tls.sh)
# Needs: haproxy, nginx + libnginx-mod-stream (Debian packages).
# Writes: perf/results/<timestamp>/{results.jsonl,summary.md}; prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
# perf/compare.sh --tls [SECONDS]: the TLS side-by-side (perf/compare-tls.sh).
if [ "${1:-}" = --tls ]; then shift; exec perf/compare-tls.sh "$@"; fi
SECS=${1:-10}
WARM=2
command -v haproxy >/dev/null || { echo "haproxy missing: apt-get install haproxy" >&2; exit 1; }
command -v nginx >/dev/null || { echo "nginx missing: apt-get install nginx libnginx-mod-stream" >&2; exit 1; }
NGX_MOD=/usr/lib/nginx/modules/ngx_stream_module.so
[ -f "$NGX_MOD" ] || { echo "nginx stream module missing: apt-get install libnginx-mod-stream" >&2; exit 1; }
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
BIN=${CARGO_TARGET_DIR:-target}/release
OUT=perf/results/$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
TMP=$(mktemp -d)
ECHO=127.0.0.1:29800; MOCK=127.0.0.1:29711; SEED=127.0.0.1:29801; GRPC=127.0.0.1:29802
GW=127.0.0.1:28080; HAP=127.0.0.1:28081; NGX=127.0.0.1:28082; GW2=127.0.0.1:28083
GW_ADMIN=127.0.0.1:28090
# Server types of the gateway's routes, one per backend protocol.
ST_GATE=10; ST_SEED=11; ST_GRPC=12
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

taskset -c 1 $BIN/gw-echo --listen $ECHO >/dev/null & PIDS+=($!)
taskset -c 1 $BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>&1 & PIDS+=($!)
taskset -c 1 $BIN/gw-echo --mode seed_tcp --listen $SEED >/dev/null 2>>"$OUT/backends.log" & PIDS+=($!)
taskset -c 1 $BIN/gw-echo --mode grpc --listen $GRPC >/dev/null 2>>"$OUT/backends.log" & PIDS+=($!)

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

cat > "$TMP/nginx.conf" <<CFG
load_module $NGX_MOD;
daemon off;
master_process off;
worker_processes 1;
error_log $TMP/nginx-error.log warn;
pid $TMP/nginx.pid;
events { worker_connections 9000; }
stream {
  server { listen $NGX; proxy_pass $ECHO; }
}
CFG
taskset -c 0 nginx -c "$TMP/nginx.conf" -p "$TMP" >/dev/null 2>&1 & PIDS+=($!); NGX_PID=$!

gw_config() { # listen workers cpus admin
cat <<CFG
[server]
listen = "$1"
admin_listen = "$4"
workers = $2
cpus = [$3]
[log]
level = "warn"
access_log = false
[limits]
# The idle-memory run opens 18,000 sessions at once from one load thread;
# on a busy machine their first frames can take longer than the default 5 s.
handshake_timeout = "60s"
[backend]
# seed_tcp holds one backend connection per session: room for 1000x1.
seed_pool_max = 2000
[[routes]]
server_type = $ST_GATE
service_name = "bench"
strategy = "round_robin"
endpoints = ["$MOCK"]
[[routes]]
server_type = $ST_SEED
service_name = "bench-seed"
strategy = "round_robin"
endpoints = ["$SEED"]
backend_protocol = "seed_tcp"
[[routes]]
server_type = $ST_GRPC
service_name = "bench-grpc"
strategy = "round_robin"
endpoints = ["$GRPC"]
backend_protocol = "grpc"
CFG
}
gw_config $GW 1 0 $GW_ADMIN > "$TMP/gw.toml"
# GW_IO_DRIVER=epoll|io_uring picks the gateway's driver (default: auto).
DRV=${GW_IO_DRIVER:-auto}
# The gateway's warnings (backend losses, drops) go to the results.
$BIN/game-gateway --config "$TMP/gw.toml" --io-driver "$DRV" >/dev/null 2>"$OUT/gateway.log" & PIDS+=($!); GW_PID=$!
gw_config $GW2 2 "0, 1" 127.0.0.1:0 > "$TMP/gw2.toml"
$BIN/game-gateway --config "$TMP/gw2.toml" --io-driver "$DRV" >/dev/null 2>"$OUT/gateway2w.log" & PIDS+=($!); GW2_PID=$!
sleep 1

. perf/lib.sh

for load in "100 1" "100 16" "1000 1"; do
  set -- $load; S=$1; K=$2
  run "direct-${S}x${K}" $ECHO - --sessions $S --inflight $K
  run "haproxy-${S}x${K}" $HAP $HAP_PID --sessions $S --inflight $K
  run "nginx-${S}x${K}" $NGX $NGX_PID --sessions $S --inflight $K
  run "gateway-${S}x${K}" $GW $GW_PID --sessions $S --inflight $K
  run "gateway-seed_tcp-${S}x${K}" $GW $GW_PID --sessions $S --inflight $K --server-type $ST_SEED
  run "gateway-grpc-${S}x${K}" $GW $GW_PID --sessions $S --inflight $K --server-type $ST_GRPC
done

# p99 at half of HAProxy's peak (100 sessions, open loop).
PEAK=$(python3 -c "import json; print(max(json.loads(l)['msgs_per_sec'] for l in open('$RES') if json.loads(l).get('label')=='haproxy-100x1'))")
RATE=$(python3 -c "print(round($PEAK/2/100, 1))")
run "haproxy-open-half" $HAP $HAP_PID --sessions 100 --rate "$RATE"
run "gateway-open-half" $GW $GW_PID --sessions 100 --rate "$RATE"

# Session churn: connect, one frame, reply, close.
run "haproxy-churn" $HAP $HAP_PID --sessions 50 --churn
run "gateway-churn" $GW $GW_PID --sessions 50 --churn

# 1 vs 2 workers (the 2-worker gateway shares core 1 with the load).
run "gateway2w-100x16" $GW2 $GW2_PID --sessions 100 --inflight 16

# Idle memory: RSS delta over 18,000 bound idle sessions (1 worker; the
# open-file limit here is 20,000).
IDLE=${IDLE:-18000}
base=$(rss_kb $GW_PID)
taskset -c 1 $BIN/gw-load --target $GW --idle --sessions $IDLE --duration 8 --warmup 16 --label idle >/dev/null 2>&1 &
LOADPID=$!
sleep 22
peak=$(rss_kb $GW_PID)
wait $LOADPID || true
python3 - "$base" "$peak" "$IDLE" >>"$RES" <<'PY'
import json, sys
base, peak, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(json.dumps({"label": "gateway-idle-memory", "sessions": n, "rss_base_kb": base, "rss_kb": peak, "bytes_per_session": (peak - base) * 1024 / n}))
PY
tail -1 "$RES"

# The 1-worker gateway's counters after every run (drops, backend errors).
curl -sf "http://$GW_ADMIN/metrics" > "$OUT/gateway-metrics.txt" 2>/dev/null \
  || python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://$GW_ADMIN/metrics').read().decode())" > "$OUT/gateway-metrics.txt" 2>/dev/null || true
for f in backends.log gateway.log gateway2w.log; do [ -s "$OUT/$f" ] || rm -f "$OUT/$f"; done

python3 - "$RES" "$SECS" > "$OUT/summary.md" <<'PY'
import json, sys, platform, subprocess, datetime
rows = {json.loads(l)["label"]: json.loads(l) for l in open(sys.argv[1])}
def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)
out = []
kern = platform.release()
cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/Model name: *//p'"], capture_output=True, text=True).stdout.strip()
import os
out.append(f"Run: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {cpu}, Linux {kern}, gateway io_driver {os.environ.get('GW_IO_DRIVER', 'auto')}, {sys.argv[2]} s per load, 64-byte payloads.\n")
out.append("| load | peer | msgs/s | p50 µs | p99 µs | p99.9 µs | proxy CPU µs/msg |")
out.append("|---|---|---:|---:|---:|---:|---:|")
for load in ["100x1", "100x16", "1000x1"]:
    for peer in ["direct", "haproxy", "nginx", "gateway", "gateway-seed_tcp", "gateway-grpc"]:
        r = rows.get(f"{peer}-{load}", {})
        out.append(f"| {load} | {peer} | {f(r.get('msgs_per_sec'))} | {f(r.get('p50_us'))} | {f(r.get('p99_us'))} | {f(r.get('p999_us'))} | {f(r.get('cpu_us_per_msg'), '{:.2f}')} |")
out.append("")
out.append("| ratio gateway / peer | load | msgs/s | CPU per msg |")
out.append("|---|---|---:|---:|")
for peer in ["haproxy", "nginx"]:
    for load in ["100x1", "100x16", "1000x1"]:
        g, p = rows.get(f"gateway-{load}", {}), rows.get(f"{peer}-{load}", {})
        r1 = g.get("msgs_per_sec", 0) / p["msgs_per_sec"] if p.get("msgs_per_sec") else None
        r2 = g["cpu_us_per_msg"] / p["cpu_us_per_msg"] if g.get("cpu_us_per_msg") and p.get("cpu_us_per_msg") else None
        out.append(f"| gateway / {peer} | {load} | {f(r1, '{:.2f}')} | {f(r2, '{:.2f}')} |")
out.append("")
out.append("Gateway backend protocols (gate: mock-backend; seed_tcp and grpc: gw-echo in that mode); \"gate\" is the gateway rows above.\n")
out.append("| ratio mode / peer | load | msgs/s | CPU per msg |")
out.append("|---|---|---:|---:|")
for mode in ["seed_tcp", "grpc"]:
    for peer, plabel in [("gateway", "gate"), ("haproxy", "haproxy")]:
        for load in ["100x1", "100x16", "1000x1"]:
            g, p = rows.get(f"gateway-{mode}-{load}", {}), rows.get(f"{peer}-{load}", {})
            if not g:
                continue
            r1 = g.get("msgs_per_sec", 0) / p["msgs_per_sec"] if p.get("msgs_per_sec") else None
            r2 = g["cpu_us_per_msg"] / p["cpu_us_per_msg"] if g.get("cpu_us_per_msg") and p.get("cpu_us_per_msg") else None
            out.append(f"| {mode} / {plabel} | {load} | {f(r1, '{:.2f}')} | {f(r2, '{:.2f}')} |")
bad = [(k, r.get("errors"), r.get("missing")) for k, r in rows.items() if r.get("errors") or r.get("missing")]
if bad:
    out.append("")
    out.append("Runs with errors or missing replies: " + ", ".join(f"{k} (errors {e}, missing {m})" for k, e, m in bad) + ".")
out.append("")
h, g = rows.get("haproxy-open-half", {}), rows.get("gateway-open-half", {})
out.append(f"Open loop at half of HAProxy's 100x1 peak ({f(h.get('rate'), '{:.1f}')} frames/s per session, 100 sessions): p99 HAProxy {f(h.get('p99_us'))} µs, gateway {f(g.get('p99_us'))} µs; p99.9 {f(h.get('p999_us'))} / {f(g.get('p999_us'))} µs.\n")
h, g = rows.get("haproxy-churn", {}), rows.get("gateway-churn", {})
ratio = g.get("sessions_per_sec", 0) / h["sessions_per_sec"] if h.get("sessions_per_sec") else None
out.append(f"Session churn (50 loops of connect, one frame, reply, close): HAProxy {f(h.get('sessions_per_sec'))}/s ({f(h.get('cpu_us_per_session'), '{:.1f}')} µs CPU each), gateway {f(g.get('sessions_per_sec'))}/s ({f(g.get('cpu_us_per_session'), '{:.1f}')} µs CPU each); ratio {f(ratio, '{:.2f}')}.\n")
w1, w2 = rows.get("gateway-100x16", {}), rows.get("gateway2w-100x16", {})
out.append(f"1 vs 2 workers at 100x16: {f(w1.get('msgs_per_sec'))} vs {f(w2.get('msgs_per_sec'))} msgs/s (the second worker shares core 1 with the load generator and backends).\n")
m = rows.get("gateway-idle-memory", {})
out.append(f"Idle memory: {f(m.get('bytes_per_session'), '{:,.0f}')} bytes RSS per bound idle session ({m.get('sessions')} sessions, {m.get('rss_base_kb')} -> {m.get('rss_kb')} KiB).")
print("\n".join(out))
PY
echo
cat "$OUT/summary.md"
