#!/usr/bin/env bash
# Scaling run: the gateway with N = 1, 2, 4, 8, ... pinned workers (up to
# half of the machine's cores), the load generators (several gw-load
# processes, one pinned per core) and mock-backend on the other half. For each
# N and each load it measures msgs/s, the gateway's CPU per message and how
# busy both halves were, and prints a scaling table with the efficiency
# against N = 1. See docs/SCALING.md for what to expect and why.
#
# Same approach as perf/compare.sh: the gateway's CPU time (user + system,
# all its threads; worker threads and the rest also separately), divided by
# the replies. Here it is read per thread from /proc/PID/task/*/schedstat
# (ns resolution; utime + stime ticks where schedstat is missing) and over
# the measured window only (sampled after the warm-up and at the end of the
# measured seconds), since several load processes run at once. Loads are "SxK": S sessions per worker (so S x N in all) with K
# frames in flight each, 64-byte payloads; "Cxchurn": C churning sessions per
# worker (connect, one frame, reply, close), access log on (to ACCESS_LOG).
#
# Usage: perf/scaling.sh [SECONDS]                     (default 10 s per load)
# Environment:
#   LOADS="100x1 100x16"   loads to run at every N (add e.g. "1000x1", "50xchurn")
#   WORKER_CPUS=0-31       CPUs for the workers (worker i on the i-th); default:
#                          the first half of the physical cores (one hardware
#                          thread each), in CPU order
#   LOAD_CPUS=32-63        CPUs for gw-load and mock-backend; default: every
#                          hardware thread of the other half of the cores
#   MAX_N=32               largest N (default: the number of worker CPUs)
#   NS="1 2 4 8"           the exact list of N (overrides MAX_N)
#   WARM=2                 warm-up seconds per load
#   SCRAPES=50             /metrics scrapes per N with the gateway idle (0: none)
#   ACCESS_LOG=/dev/null   access-log path for churn loads
#   GW_IO_DRIVER=auto      the gateway's io_driver (auto | io_uring | epoll)
# Writes perf/results/scaling-<timestamp>/{results.jsonl,summary.md,topology.txt}.
#
# Runs on any machine with 2 or more CPUs; on 2 CPUs it is a smoke test
# (N = 1 only, load on the other CPU, like perf/compare.sh). Loopback only:
# NIC queues, IRQ affinity and the wire are not in these numbers.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
WARM=${WARM:-2}
LOADS=${LOADS:-"100x1 100x16"}
SCRAPES=${SCRAPES:-50}
ACCESS_LOG=${ACCESS_LOG:-/dev/null}
DRV=${GW_IO_DRIVER:-auto}
# Many sessions at large N: as many descriptors as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
# The access log only matters for churn (closed-loop sessions end after the run).
case " $LOADS " in *churn*) ALOG=true ;; *) ALOG=false ;; esac
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
BIN=${CARGO_TARGET_DIR:-target}/release
OUT=perf/results/scaling-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
TMP=$(mktemp -d)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

# --- CPU halves -------------------------------------------------------------
# Physical cores in CPU order (package, core); workers get one hardware thread
# of each core in the first half, the load every thread of the second half.
read -r DEF_W DEF_L < <(python3 - <<'PY'
import os
cpus = sorted(os.sched_getaffinity(0))
def topo(c, f):
    try:
        return open(f"/sys/devices/system/cpu/cpu{c}/topology/{f}").read().strip()
    except OSError:
        return str(c)
cores = {}
for c in cpus:
    cores.setdefault((topo(c, "physical_package_id"), topo(c, "core_id")), []).append(c)
order = sorted(cores.values(), key=lambda t: min(t))
if len(order) < 2:  # one core with SMT siblings, or no topology: split threads
    order = [[c] for c in cpus]
half = len(order) // 2
w = [t[0] for t in order[:half]]
l = [c for t in order[half:] for c in t]
print(",".join(map(str, w)), ",".join(map(str, l)))
PY
)
expand() { python3 -c '
import sys
out = []
for p in sys.argv[1].split(","):
    if "-" in p:
        a, b = p.split("-"); out += range(int(a), int(b) + 1)
    elif p:
        out.append(int(p))
print(" ".join(map(str, out)))' "$1"; }
read -r -a WCPUS <<<"$(expand "${WORKER_CPUS:-$DEF_W}")"
read -r -a LCPUS <<<"$(expand "${LOAD_CPUS:-$DEF_L}")"
[ ${#WCPUS[@]} -ge 1 ] && [ ${#LCPUS[@]} -ge 1 ] || { echo "need at least 2 CPUs (one for the gateway, one for the load)" >&2; exit 1; }
MAX_N=${MAX_N:-${#WCPUS[@]}}
[ "$MAX_N" -le ${#WCPUS[@]} ] || MAX_N=${#WCPUS[@]}
if [ -z "${NS:-}" ]; then
  NS=""; n=1
  while [ "$n" -le "$MAX_N" ]; do NS="$NS $n"; n=$((n * 2)); done
  # The largest N even when it is not a power of two.
  [ $((n / 2)) -eq "$MAX_N" ] || NS="$NS $MAX_N"
fi
LOAD_LIST=$(IFS=,; echo "${LCPUS[*]}")
{
  echo "worker CPUs: ${WCPUS[*]}"
  echo "load CPUs:   ${LCPUS[*]}"
  echo "N:          $NS"
  echo "loads:       $LOADS"
  lscpu 2>/dev/null || true
  for c in "${WCPUS[@]}"; do
    echo "cpu$c node=$(ls -d /sys/devices/system/cpu/cpu$c/node* 2>/dev/null | sed 's/.*node//' | head -1) core=$(cat /sys/devices/system/cpu/cpu$c/topology/core_id 2>/dev/null) pkg=$(cat /sys/devices/system/cpu/cpu$c/topology/physical_package_id 2>/dev/null) l3=$(cat /sys/devices/system/cpu/cpu$c/cache/index3/shared_cpu_list 2>/dev/null)"
  done
  echo "irqbalance: $(pgrep -x irqbalance >/dev/null && echo running || echo not running)"
  echo "kernel: $(uname -r)"
} > "$OUT/topology.txt"
echo "scaling: workers on CPUs ${WCPUS[*]}; load and backend on ${LCPUS[*]}; N =$NS; loads: $LOADS; $SECS s each"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=127.0.0.1:$(free_port)
# One thread per backend connection: one per worker.
taskset -c "$LOAD_LIST" $BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>&1 & PIDS+=($!)

TCK=$(getconf CLK_TCK)
# CPU time (ns) of the worker threads and of the rest of PID. Workers: the
# kernel's per-thread run time (/proc/PID/task/TID/schedstat: user + system,
# what utime + stime count, at ns resolution; utime + stime ticks where it is
# missing). The rest: the process's utime + stime (/proc/PID/stat, which
# keeps the time of threads that ended: the admin server runs a thread per
# connection) minus the workers'.
thread_cpu() {
  python3 - "$1" "$TCK" <<'PY'
import os, sys
pid, tck = sys.argv[1], int(sys.argv[2])
w = 0
for t in os.listdir(f"/proc/{pid}/task"):
    try:
        s = open(f"/proc/{pid}/task/{t}/stat").read()
        if not s[s.index("(") + 1:s.rindex(")")].startswith("gw-worker"):
            continue
        try:
            w += int(open(f"/proc/{pid}/task/{t}/schedstat").read().split()[0])
        except (OSError, ValueError, IndexError):
            f = s[s.rindex(")") + 2:].split()
            w += (int(f[11]) + int(f[12])) * 1_000_000_000 // tck
    except OSError:
        continue
s = open(f"/proc/{pid}/stat").read()
f = s[s.rindex(")") + 2:].split()
total = (int(f[11]) + int(f[12])) * 1_000_000_000 // tck
print(w, max(0, total - w))
PY
}
# Busy and total jiffies of a CPU list (busy = all but idle, iowait, steal).
cpu_busy() {
  python3 - "$1" <<'PY'
import sys
want = set(sys.argv[1].split(","))
busy = tot = 0
for l in open("/proc/stat"):
    f = l.split()
    if f[0].startswith("cpu") and f[0][3:] in want:
        v = list(map(int, f[1:9]))
        tot += sum(v)
        busy += sum(v) - v[3] - v[4] - v[7]
print(busy, tot)
PY
}
status() { python3 -c "import urllib.request,sys; sys.stdout.write(urllib.request.urlopen('http://$1/status', timeout=10).read().decode())" 2>/dev/null || echo '{}'; }

for N in $NS; do
  W=("${WCPUS[@]:0:$N}")
  WLIST=$(IFS=,; echo "${W[*]}")
  PORT=$(free_port); ADMIN=127.0.0.1:$(free_port)
  cat > "$TMP/gw.toml" <<CFG
[server]
listen = "127.0.0.1:$PORT"
admin_listen = "$ADMIN"
workers = $N
cpus = [$WLIST]
[log]
level = "warn"
access_log = $ALOG
access_log_path = "$ACCESS_LOG"
[[routes]]
server_type = 10
service_name = "bench"
strategy = "round_robin"
endpoints = ["$MOCK"]
CFG
  taskset -c "$WLIST" $BIN/game-gateway --config "$TMP/gw.toml" --io-driver "$DRV" >/dev/null 2>>"$OUT/gateway.log" &
  GW_PID=$!; PIDS+=("$GW_PID")
  for _ in $(seq 50); do status "$ADMIN" | grep -q '"worker"' && break; sleep 0.2; done

  for load in $LOADS; do
    S=${load%x*}; K=${load#*x}
    TOTAL=$((S * N))
    P=${#LCPUS[@]}; [ "$P" -le "$TOTAL" ] || P=$TOTAL
    LOADARGS=(--inflight "$K"); KIND=closed
    if [ "$K" = churn ]; then LOADARGS=(--churn); KIND=churn; fi
    status "$ADMIN" > "$TMP/st0.json"
    LP=()
    for i in $(seq 0 $((P - 1))); do
      s=$(( TOTAL / P + (i < TOTAL % P ? 1 : 0) ))
      taskset -c "${LCPUS[$i]}" $BIN/gw-load --target 127.0.0.1:$PORT --sessions "$s" "${LOADARGS[@]}" \
        --duration "$SECS" --warmup "$WARM" --json --label "n$N-$load-p$i" >"$TMP/load.$i" 2>/dev/null &
      LP+=($!)
    done
    sleep "$WARM"
    read -r w0 o0 < <(thread_cpu $GW_PID); read -r wb0 wt0 < <(cpu_busy "$WLIST"); read -r lb0 lt0 < <(cpu_busy "$LOAD_LIST")
    sleep "$SECS"
    read -r w1 o1 < <(thread_cpu $GW_PID); read -r wb1 wt1 < <(cpu_busy "$WLIST"); read -r lb1 lt1 < <(cpu_busy "$LOAD_LIST")
    for p in "${LP[@]}"; do wait "$p" || true; done
    status "$ADMIN" > "$TMP/st1.json"
    python3 - "$TMP" "$P" "$N" "$load" "$KIND" "$SECS" 1000000000 "$w0" "$w1" "$o0" "$o1" "$wb0" "$wb1" "$wt0" "$wt1" "$lb0" "$lb1" "$lt0" "$lt1" >>"$RES" <<'PY'
import json, sys
tmp, P, N, load, kind = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
secs, tck = float(sys.argv[6]), int(sys.argv[7])
w0, w1, o0, o1, wb0, wb1, wt0, wt1, lb0, lb1, lt0, lt1 = map(int, sys.argv[8:20])
rate = churn = errors = missing = 0.0
p99 = 0
for i in range(P):
    try:
        r = json.loads(open(f"{tmp}/load.{i}").read().strip().splitlines()[-1])
    except Exception:
        errors += 1
        continue
    rate += r.get("msgs_per_sec", 0); churn += r.get("sessions_per_sec", 0)
    errors += r.get("errors", 0); missing += r.get("missing", 0)
    p99 = max(p99, r.get("p99_us", 0))
def per_worker(path):
    try:
        return [w.get("messages_in") or 0 for w in json.load(open(path)).get("workers", [])]
    except Exception:
        return []
a, b = per_worker(f"{tmp}/st0.json"), per_worker(f"{tmp}/st1.json")
d = [y - x for x, y in zip(a, b)]
imb = (max(d) / (sum(d) / len(d))) if d and sum(d) else None
cpu_w, cpu_o = (w1 - w0) / tck, (o1 - o0) / tck
unit = churn if kind == "churn" else rate
out = {
    "n": N, "load": load, "kind": kind, "load_procs": P, "msgs_per_sec": rate, "sessions_per_sec": churn,
    "p99_us_worst_proc": p99, "errors": errors, "missing": missing,
    "gw_cpu_s": cpu_w + cpu_o, "worker_cpu_s": cpu_w, "other_threads_cpu_s": cpu_o,
    "cpu_us_per_unit": (cpu_w + cpu_o) * 1e6 / (unit * secs) if unit else None,
    "worker_cores_busy": (wb1 - wb0) / (wt1 - wt0) if wt1 > wt0 else None,
    "load_cores_busy": (lb1 - lb0) / (lt1 - lt0) if lt1 > lt0 else None,
    "worker_msgs_max_over_mean": imb,
}
print(json.dumps(out))
PY
    tail -1 "$RES" | python3 -c '
import json, sys
r = json.load(sys.stdin)
f = lambda v, s="{:.2f}": "-" if v is None else s.format(v)
print("N=%-3d %-10s %12s msgs/s %10s sess/s  cpu/%s=%s us  worker cores %s%%  load cores %s%%  imbalance %s  errors=%d missing=%d" % (
    r["n"], r["load"], f(r["msgs_per_sec"], "{:,.0f}"), f(r["sessions_per_sec"], "{:,.0f}"),
    "session" if r["kind"] == "churn" else "msg", f(r["cpu_us_per_unit"]),
    f(r["worker_cores_busy"] and 100 * r["worker_cores_busy"], "{:.0f}"), f(r["load_cores_busy"] and 100 * r["load_cores_busy"], "{:.0f}"),
    f(r["worker_msgs_max_over_mean"]), r["errors"], r["missing"]))'
  done

  # Stats collection: SCRAPES /metrics scrapes, one after another, the
  # gateway otherwise idle: time per scrape and the gateway's CPU per scrape
  # (its idle ticking over the same time subtracted).
  if [ "$SCRAPES" -gt 0 ]; then
    sleep 1
    read -r w0 o0 < <(thread_cpu $GW_PID); t0=$(date +%s.%N)
    sleep 3
    read -r w1 o1 < <(thread_cpu $GW_PID); t1=$(date +%s.%N)
    read -r sw0 so0 < <(thread_cpu $GW_PID); s0=$(date +%s.%N)
    taskset -c "$LOAD_LIST" python3 - "$ADMIN" "$SCRAPES" > "$TMP/scrape.json" <<'PY'
import json, sys, time, urllib.request
admin, k = sys.argv[1], int(sys.argv[2])
lat, size = [], 0
for _ in range(k):
    t = time.time()
    size = len(urllib.request.urlopen(f"http://{admin}/metrics", timeout=10).read())
    lat.append(time.time() - t)
lat.sort()
print(json.dumps({"body_bytes": size, "p50": lat[len(lat) // 2], "max": lat[-1]}))
PY
    read -r sw1 so1 < <(thread_cpu $GW_PID); s1=$(date +%s.%N)
    python3 - "$TMP/scrape.json" "$SCRAPES" "$N" "$w0" "$o0" "$w1" "$o1" "$t0" "$t1" "$sw0" "$so0" "$sw1" "$so1" "$s0" "$s1" >>"$RES" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
k, n = int(sys.argv[2]), int(sys.argv[3])
w0, o0, w1, o1 = map(int, sys.argv[4:8]); t0, t1 = map(float, sys.argv[8:10])
sw0, so0, sw1, so1 = map(int, sys.argv[10:14]); s0, s1 = map(float, sys.argv[14:16])
# Idle ticking over the scrapes' wall time subtracted.
iw, io = (w1 - w0) / (t1 - t0), (o1 - o0) / (t1 - t0)
w = max(0.0, (sw1 - sw0) - iw * (s1 - s0)) / 1e3 / k
o = max(0.0, (so1 - so0) - io * (s1 - s0)) / 1e3 / k
print(json.dumps({"n": n, "load": "scrape", "kind": "scrape", "scrapes": k, "body_bytes": r["body_bytes"],
                  "scrape_ms_p50": 1e3 * r["p50"], "scrape_ms_max": 1e3 * r["max"],
                  "worker_cpu_us_per_scrape": w, "other_cpu_us_per_scrape": o}))
PY
    tail -1 "$RES" | python3 -c '
import json, sys
r = json.load(sys.stdin)
print("N=%-3d scrape      %d x /metrics (%d bytes): p50 %.1f ms, max %.1f ms; CPU per scrape: workers %.0f us, other threads %.0f us" % (
    r["n"], r["scrapes"], r["body_bytes"], r["scrape_ms_p50"], r["scrape_ms_max"], r["worker_cpu_us_per_scrape"], r["other_cpu_us_per_scrape"]))'
  fi
  kill "$GW_PID" 2>/dev/null || true
  wait "$GW_PID" 2>/dev/null || true
done
[ -s "$OUT/gateway.log" ] || rm -f "$OUT/gateway.log"

python3 - "$RES" "$SECS" "$DRV" > "$OUT/summary.md" <<'PY'
import json, sys, datetime, platform, subprocess
rows = [json.loads(l) for l in open(sys.argv[1])]
cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/Model name: *//p'"], capture_output=True, text=True).stdout.strip()
f = lambda v, s="{:,.0f}": "-" if v is None else s.format(v)
out = [f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, Linux {platform.release()}, "
       f"io_driver {sys.argv[3]}, {sys.argv[2]} s per load, 64-byte payloads, loopback.\n"]
out.append("| N | load | msgs/s (sess/s for churn) | per worker | efficiency | gateway CPU µs/msg | CPU efficiency | worker cores busy | load cores busy | worker max/mean | errors+missing |")
out.append("|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
base = {}
for r in rows:
    if r["kind"] == "scrape":
        continue
    v = r["sessions_per_sec"] if r["kind"] == "churn" else r["msgs_per_sec"]
    if r["load"] not in base:
        base[r["load"]] = (r["n"], v, r["cpu_us_per_unit"])
    n0, v0, c0 = base[r["load"]]
    eff = (v / r["n"]) / (v0 / n0) if v0 else None
    ceff = c0 / r["cpu_us_per_unit"] if c0 and r["cpu_us_per_unit"] else None
    out.append(f"| {r['n']} | {r['load']} | {f(v)} | {f(v / r['n'])} | {f(eff, '{:.2f}')} | {f(r['cpu_us_per_unit'], '{:.2f}')} | "
               f"{f(ceff, '{:.2f}')} | {f(r['worker_cores_busy'] and 100 * r['worker_cores_busy'], '{:.0f} %')} | "
               f"{f(r['load_cores_busy'] and 100 * r['load_cores_busy'], '{:.0f} %')} | {f(r['worker_msgs_max_over_mean'], '{:.2f}')} | "
               f"{int(r['errors'] + r['missing'])} |")
sc = [r for r in rows if r["kind"] == "scrape"]
if sc:
    out.append("")
    out.append("| N | /metrics scrape p50 ms | max ms | body bytes | worker CPU µs per scrape (all workers) | other threads µs per scrape |")
    out.append("|---:|---:|---:|---:|---:|---:|")
    for r in sc:
        out.append(f"| {r['n']} | {r['scrape_ms_p50']:.1f} | {r['scrape_ms_max']:.1f} | {r['body_bytes']:,} | {r['worker_cpu_us_per_scrape']:,.0f} | {r['other_cpu_us_per_scrape']:,.0f} |")
out.append("")
out.append("efficiency = (msgs/s per worker at N) / (msgs/s per worker at the smallest N); CPU efficiency = CPU per message at the smallest N / at N. "
           "A load-cores-busy figure near 100 % with worker cores below it means the load side, not the gateway, set the rate: "
           "read the CPU columns then. worker max/mean: messages handled by the busiest worker over the mean (SO_REUSEPORT balance).")
print("\n".join(out))
PY
echo
cat "$OUT/summary.md"
echo "results: $OUT"
