#!/usr/bin/env bash
# WebSocket side-by-side: nginx proxying WebSocket (http block, one worker,
# master_process off) to a WebSocket echo, against the gateway's WebSocket
# path (1 worker, to mock-backend over the gate protocol), with the load
# generator straight to the WebSocket echo as the reference ("direct"), and
# the same gateway's plain TCP path as a second reference ("gateway-tcp":
# the same frames without WebSocket, so the difference is the WebSocket
# layer's cost).
# Same layout as perf/compare.sh: the proxy under test alone on core 0, the
# load generator and the backends on core 1.
#
# Every client frame (8-byte header, 64-byte payload) goes out as one masked
# binary WebSocket message; every reply comes back as one binary message
# holding one client frame (`gw-load --ws`). Loads: 100x1, 100x16, 1000x1
# (sessions x frames in flight, closed loop).
#
# CPU per message: the proxy's utime + stime from /proc/PID/stat over the
# whole run (warm-up included) divided by the run's replies (measured rate x
# run time), as compare.sh does.
#
# Usage: perf/compare-ws.sh [SECONDS]     (default 10 s per load)
# On a shared machine run it under the benchmark lock:
#   flock /tmp/gw-bench.lock perf/compare-ws.sh 10
# (the script takes no lock itself, so a caller already holding it can run it).
# Env: GW_IO_DRIVER=epoll|io_uring (gateway driver, default auto);
#      WS_OUT=dir (results directory, default perf/results/ws-<timestamp>);
#      GW_BIN=path (a gateway binary to measure instead of the fresh build).
# Writes: $WS_OUT/{results.jsonl,summary.md}; prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
WARM=2
command -v nginx >/dev/null || { echo "nginx missing: apt-get install nginx" >&2; exit 1; }
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
BIN=${CARGO_TARGET_DIR:-target}/release
OUT=${WS_OUT:-perf/results/ws-$(date -u +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
: > "$RES"
TMP=$(mktemp -d)
# Free ports picked now: other work on a shared machine must not reach these
# servers (a stray client of the backends would show in their CPU figures).
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
WSECHO=127.0.0.1:$(free_port); MOCK=127.0.0.1:$(free_port)
GW=127.0.0.1:$(free_port); NGX=127.0.0.1:$(free_port); GW_ADMIN=127.0.0.1:$(free_port)
PIDS=()
# Proxies first (started last), so none logs its backend going away.
cleanup() { for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill "${PIDS[i]}" 2>/dev/null || true; sleep 0.1; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

taskset -c 1 $BIN/gw-echo --mode ws --listen $WSECHO >/dev/null 2>>"$OUT/backends.log" & PIDS+=($!); ECHO_PID=$!
taskset -c 1 $BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>>"$OUT/backends.log" & PIDS+=($!); MOCK_PID=$!

. perf/nginx_ws.sh
nginx_ws_conf "$TMP" "$NGX" "$WSECHO"
taskset -c 0 nginx -c "$TMP/nginx.conf" -p "$TMP" >/dev/null 2>>"$OUT/nginx.log" & PIDS+=($!); NGX_PID=$!

cat > "$TMP/gw.toml" <<CFG
[server]
listen = "$GW"
admin_listen = "$GW_ADMIN"
workers = 1
cpus = [0]
[log]
level = "warn"
access_log = false
[[routes]]
server_type = 10
service_name = "bench"
strategy = "round_robin"
endpoints = ["$MOCK"]
CFG
DRV=${GW_IO_DRIVER:-auto}
GW_BIN=${GW_BIN:-$BIN/game-gateway}
$GW_BIN --config "$TMP/gw.toml" --io-driver "$DRV" >/dev/null 2>"$OUT/gateway.log" & PIDS+=($!); GW_PID=$!
sleep 1
for p in $ECHO_PID $MOCK_PID $NGX_PID $GW_PID; do
  kill -0 "$p" 2>/dev/null || { echo "a server did not start; see $OUT/*.log" >&2; cat "$TMP/nginx-error.log" >&2 2>/dev/null; exit 1; }
done

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
TCK=$(getconf CLK_TCK)
# The machine is shared: its load and busy CPU over the runs go in the summary.
cpu_busy_total() { awk '/^cpu / {print $2+$3+$4+$7+$8+$9, $2+$3+$4+$5+$6+$7+$8+$9}' /proc/stat; }
# Ticks of this run's own processes: the servers, and the waited children
# (load generators) of this shell.
own_ticks() { local t; t=$(awk '{print $16+$17}' /proc/$$/stat); for p in $ECHO_PID $MOCK_PID $NGX_PID $GW_PID; do t=$((t + $(ticks "$p"))); done; echo $t; }
LOAD0=$(cut -d' ' -f1-3 /proc/loadavg); read -r BUSY0 TOTAL0 < <(cpu_busy_total); OWN0=$(own_ticks)

# run LABEL TARGET PROXY_PID(or -) BACKEND_PID gw-load-args...
# (WebSocket unless WS=0.)
run() {
  local label=$1 target=$2 pid=$3 bpid=$4; shift 4
  local before=0 after=0 bbefore bafter
  [ "$pid" != - ] && before=$(ticks "$pid")
  bbefore=$(ticks "$bpid")
  local out
  out=$(taskset -c 1 $BIN/gw-load $([ "${WS:-1}" = 1 ] && echo --ws) --target "$target" --duration "$SECS" --warmup $WARM --label "$label" --json "$@" 2>"$TMP/load.err" | tail -1) || true
  [ "$pid" != - ] && after=$(ticks "$pid")
  bafter=$(ticks "$bpid")
  grep -v '^\[' "$TMP/load.err" | head -5 >> "$OUT/load-errors.log" || true
  python3 - "$out" "$before" "$after" "$bbefore" "$bafter" "$TCK" "$SECS" "$WARM" >>"$RES" <<'PY'
import json, sys
out = sys.argv[1]
before, after, bbefore, bafter, tck = map(int, sys.argv[2:7])
secs, warm = float(sys.argv[7]), float(sys.argv[8])
try:
    r = json.loads(out)
except Exception:
    r = {"label": "?", "error": out}
# CPU over the whole run (warm-up + measured + drain) divided by the
# messages of the whole run, estimated from the measured rate.
msgs = r.get("msgs_per_sec", 0) * (secs + warm)
cpu_s = (after - before) / tck
r["proxy_cpu_s"] = cpu_s
r["cpu_us_per_msg"] = (cpu_s * 1e6 / msgs) if msgs and after else None
r["backend_cpu_us_per_msg"] = ((bafter - bbefore) / tck * 1e6 / msgs) if msgs else None
print(json.dumps(r))
PY
  tail -1 "$RES" | python3 -c '
import json, sys
r = json.load(sys.stdin)
g = r.get
print("%18s: %10.0f msgs/s p50=%sus p99=%sus p99.9=%sus cpu/msg=%s backend cpu/msg=%s errors=%s missing=%s" % (
    g("label"), g("msgs_per_sec", 0), g("p50_us"), g("p99_us"), g("p999_us"),
    g("cpu_us_per_msg"), g("backend_cpu_us_per_msg"), g("errors"), g("missing")))'
}

for load in "100 1" "100 16" "1000 1"; do
  set -- $load; S=$1; K=$2
  run "direct-ws-${S}x${K}" $WSECHO - $ECHO_PID --sessions $S --inflight $K
  run "nginx-ws-${S}x${K}" $NGX $NGX_PID $ECHO_PID --sessions $S --inflight $K
  run "gateway-ws-${S}x${K}" $GW $GW_PID $MOCK_PID --sessions $S --inflight $K
  WS=0 run "gateway-tcp-${S}x${K}" $GW $GW_PID $MOCK_PID --sessions $S --inflight $K
done

LOAD1=$(cut -d' ' -f1-3 /proc/loadavg); read -r BUSY1 TOTAL1 < <(cpu_busy_total); OWN1=$(own_ticks)
MACHINE="load average $LOAD0 at the start, $LOAD1 at the end; other processes used $(( 100 * (BUSY1 - BUSY0 - OWN1 + OWN0) / (TOTAL1 - TOTAL0) ))% of all CPU time during the runs, this run $(( 100 * (OWN1 - OWN0) / (TOTAL1 - TOTAL0) ))%"
curl -sf "http://$GW_ADMIN/metrics" > "$OUT/gateway-metrics.txt" 2>/dev/null \
  || python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://$GW_ADMIN/metrics').read().decode())" > "$OUT/gateway-metrics.txt" 2>/dev/null || true
cp "$TMP/nginx-error.log" "$OUT/nginx-error.log" 2>/dev/null || true
for f in backends.log gateway.log nginx.log nginx-error.log load-errors.log; do [ -s "$OUT/$f" ] || rm -f "$OUT/$f"; done

python3 - "$RES" "$SECS" "$GW_BIN" "$(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src crates || echo -dirty)" "$MACHINE" > "$OUT/summary.md" <<'PY'
import json, sys, os, platform, subprocess, datetime
rows = {json.loads(l)["label"]: json.loads(l) for l in open(sys.argv[1])}
def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)
loads = ["100x1", "100x16", "1000x1"]
out = []
cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/Model name: *//p'"], capture_output=True, text=True).stdout.strip()
ngx = subprocess.run(["nginx", "-v"], capture_output=True, text=True).stderr.strip().replace("nginx version: ", "")
out.append(f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} CPUs (shared with other work), Linux {platform.release()}, {ngx}, gateway io_driver {os.environ.get('GW_IO_DRIVER', 'auto')}, {sys.argv[2]} s per load, gateway {sys.argv[3]} (tree {sys.argv[4]}), 64-byte payloads in 72-byte client frames, one WebSocket binary message each (gateway-tcp: the same frames on plain TCP). Machine: {sys.argv[5]}.\n")
out.append("| load | peer | msgs/s | p50 µs | p99 µs | p99.9 µs | proxy CPU µs/msg | backend CPU µs/msg |")
out.append("|---|---|---:|---:|---:|---:|---:|---:|")
for load in loads:
    for peer in ["direct-ws", "nginx-ws", "gateway-ws", "gateway-tcp"]:
        r = rows.get(f"{peer}-{load}", {})
        out.append(f"| {load} | {peer} | {f(r.get('msgs_per_sec'))} | {f(r.get('p50_us'))} | {f(r.get('p99_us'))} | {f(r.get('p999_us'))} | {f(r.get('cpu_us_per_msg'), '{:.2f}')} | {f(r.get('backend_cpu_us_per_msg'), '{:.2f}')} |")
out.append("")
out.append("| gateway-ws / nginx-ws | msgs/s | CPU per msg | goal CPU ≤ 0.6x |")
out.append("|---|---:|---:|---|")
for load in loads:
    g, p = rows.get(f"gateway-ws-{load}", {}), rows.get(f"nginx-ws-{load}", {})
    r1 = g.get("msgs_per_sec", 0) / p["msgs_per_sec"] if p.get("msgs_per_sec") else None
    r2 = g["cpu_us_per_msg"] / p["cpu_us_per_msg"] if g.get("cpu_us_per_msg") and p.get("cpu_us_per_msg") else None
    ok = "-" if r2 is None else ("met" if r2 <= 0.6 else "missed")
    out.append(f"| {load} | {f(r1, '{:.2f}')} | {f(r2, '{:.2f}')} | {ok} |")
out.append("")
out.append("| gateway-ws / gateway-tcp (the WebSocket layer) | msgs/s | CPU per msg |")
out.append("|---|---:|---:|")
for load in loads:
    g, p = rows.get(f"gateway-ws-{load}", {}), rows.get(f"gateway-tcp-{load}", {})
    r1 = g.get("msgs_per_sec", 0) / p["msgs_per_sec"] if p.get("msgs_per_sec") else None
    r2 = g["cpu_us_per_msg"] / p["cpu_us_per_msg"] if g.get("cpu_us_per_msg") and p.get("cpu_us_per_msg") else None
    out.append(f"| {load} | {f(r1, '{:.2f}')} | {f(r2, '{:.2f}')} |")
bad = [(k, r.get("errors"), r.get("missing")) for k, r in rows.items() if r.get("errors") or r.get("missing") or r.get("error")]
out.append("")
if bad:
    out.append("Runs with errors or missing replies: " + ", ".join(f"{k} (errors {e}, missing {m})" for k, e, m in bad) + ".")
else:
    out.append("Every run: 0 errors, 0 missing replies.")
print("\n".join(out))
PY
echo
cat "$OUT/summary.md"
