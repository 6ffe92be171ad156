#!/usr/bin/env bash
# What one metrics scrape costs as the worker count grows: the admin thread
# asks every worker for a copy of its counters (WorkerCommand::Stats over its
# command channel, answered on the worker's next 20 ms tick), merges the
# copies and encodes the families. The gateway runs idle with N workers
# (unpinned: more workers than CPUs is fine, they only tick), SCRAPES
# /metrics requests are made one after another, and the script reports the
# time per scrape and the gateway's CPU per scrape, split into worker threads
# and the other threads (admin, control), its idle ticking over the same time
# subtracted.
#
# Usage: perf/scrape-cost.sh ["1 2 4 8 16 32 64 128"]   (worker counts)
# Environment: SCRAPES=500 (the other threads' CPU is read in clock ticks,
# 10 ms: 500 scrapes resolve 20 µs per scrape).
set -euo pipefail
cd "$(dirname "$0")/.."
NS=${1:-"1 2 4 8 16 32 64 128"}
SCRAPES=${SCRAPES:-500}
cargo build --release --bin game-gateway >/dev/null 2>&1 || cargo build --release --bin game-gateway
BIN=${CARGO_TARGET_DIR:-target}/release
TMP=$(mktemp -d)
GW_PID=
cleanup() { [ -n "$GW_PID" ] && kill "$GW_PID" 2>/dev/null; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
echo "| workers | scrape p50 ms | p99 ms | body bytes | worker CPU µs per scrape (all workers) | per worker | other threads µs per scrape |"
echo "|---:|---:|---:|---:|---:|---:|---:|"
for N in $NS; do
  ADMIN=127.0.0.1:$(free_port)
  cat > "$TMP/gw.toml" <<CFG
[server]
listen = "127.0.0.1:$(free_port)"
admin_listen = "$ADMIN"
workers = $N
[log]
level = "warn"
access_log = false
[[routes]]
server_type = 10
service_name = "bench"
strategy = "round_robin"
endpoints = ["127.0.0.1:9", "127.0.0.2:9", "127.0.0.3:9", "127.0.0.4:9"]
CFG
  $BIN/game-gateway --config "$TMP/gw.toml" >/dev/null 2>"$TMP/gw.log" & GW_PID=$!
  python3 - "$ADMIN" "$SCRAPES" "$GW_PID" "$(getconf CLK_TCK)" "$N" <<'PY'
import os, sys, time, urllib.request
admin, k, pid, tck, n = sys.argv[1], int(sys.argv[2]), sys.argv[3], int(sys.argv[4]), int(sys.argv[5])
def get(path):
    return urllib.request.urlopen(f"http://{admin}{path}", timeout=10).read()
for _ in range(100):
    try:
        get("/health"); break
    except Exception:
        time.sleep(0.1)
def ticks():
    # Worker threads: their CPU time in ns (schedstat, user + system). The
    # rest: the process's utime + stime (which keeps the time of threads
    # that ended: the admin server runs a thread per connection) minus the
    # workers'.
    w = 0.0
    for t in os.listdir(f"/proc/{pid}/task"):
        try:
            s = open(f"/proc/{pid}/task/{t}/stat").read()
            if s[s.index("(") + 1:s.rindex(")")].startswith("gw-worker"):
                w += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0]) / 1e9
        except (OSError, ValueError):
            pass
    s = open(f"/proc/{pid}/stat").read()
    f = s[s.rindex(")") + 2:].split()
    total = (int(f[11]) + int(f[12])) / tck
    return w, total - w
get("/metrics")
time.sleep(1)
a, t0 = ticks(), time.time(); time.sleep(3); b, t1 = ticks(), time.time()
iw, io = (b[0] - a[0]) / (t1 - t0), (b[1] - a[1]) / (t1 - t0)
a, s0 = ticks(), time.time()
lat, size = [], 0
for _ in range(k):
    t = time.time(); size = len(get("/metrics")); lat.append(time.time() - t)
wall = time.time() - s0
b = ticks()
w = max(0.0, (b[0] - a[0]) - iw * wall) * 1e6 / k
o = max(0.0, (b[1] - a[1]) - io * wall) * 1e6 / k
lat.sort()
print(f"| {n} | {1e3 * lat[len(lat) // 2]:.1f} | {1e3 * lat[int(len(lat) * 0.99) - 1]:.1f} | {size:,} | {w:,.0f} | {w / n:,.1f} | {o:,.0f} |")
PY
  kill "$GW_PID"; wait "$GW_PID" 2>/dev/null || true; GW_PID=
done
