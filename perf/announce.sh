#!/usr/bin/env bash
# Realm-wide announcement fan-out: one backend ANNOUNCE (opcode 10, filter
# all, 64-byte payload) to N idle bound sessions, timed from the backend's
# send to the last client's receipt, with the target's CPU time per
# delivered frame; beside it the ceiling, gw-rawcast, a raw writer holding
# the same N sockets and writing the same client frame to each.
#
# Targets, for each N in $SESSIONS:
#   gw1w       gateway, 1 worker, pinned to CPU 0 (taskset -c 0)
#   gw2w       gateway, 2 workers on CPUs 0 and 1 (the second shares core 1
#              with the client side)
#   raw-tasks  gw-rawcast on CPU 0, one writer task per socket (the
#              gateway's shape: woken, then write_all through the runtime)
#   raw-syscall gw-rawcast on CPU 0, one write(2) per socket in a loop
# The client side (gw-announce: N sessions on one monoio thread, and the
# gateway's backend) runs on CPU 1, in its own process (N sockets each side,
# under the per-process open-file limit).
# Then, for each N in $PASSIVE_SESSIONS, the same targets with passive
# sessions (bound, then not reading: no reader to wake per frame), for the
# sender's CPU per frame alone; no timings there.
#
# Usage: perf/announce.sh [ROUNDS]     (default 5 measured + 1 warm-up)
# Env:   SESSIONS="10000 18000"  TARGETS="gw1w gw2w raw-tasks raw-syscall"
#        PASSIVE_SESSIONS="10000"  PASSIVE_TARGETS="gw1w raw-tasks raw-syscall"
#        GW_IO_DRIVER=auto|io_uring|epoll (gateway; gw-rawcast gets the same)
#        CARGO_TARGET_DIR (where the release binaries are built)
# Writes: perf/results/announce-<UTC timestamp>/{results.jsonl,summary.md,
#         logs}; prints the summary.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${1:-5}
SESSIONS=${SESSIONS:-"10000 18000"}
TARGETS=${TARGETS:-"gw1w gw2w raw-tasks raw-syscall"}
PASSIVE_SESSIONS=${PASSIVE_SESSIONS-"10000"}
PASSIVE_TARGETS=${PASSIVE_TARGETS:-"gw1w raw-tasks raw-syscall"}
DRV=${GW_IO_DRIVER:-auto}
case $DRV in auto) RAW_DRV=auto ;; io_uring) RAW_DRV=io-uring ;; epoll) RAW_DRV=epoll ;; *) echo "GW_IO_DRIVER: auto|io_uring|epoll" >&2; exit 2 ;; esac
PAYLOAD=64

cargo build --release -p game-gateway --bin game-gateway -p gw-perf --bin gw-announce --bin gw-rawcast >/dev/null 2>&1 \
  || cargo build --release -p game-gateway --bin game-gateway -p gw-perf --bin gw-announce --bin gw-rawcast
BIN=${CARGO_TARGET_DIR:-target}/release
OUT=perf/results/announce-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT/logs"
RES="$OUT/results.jsonl"
: > "$RES"
TMP=$(mktemp -d)
TARGET_PID=
cleanup() {
  [ -n "$TARGET_PID" ] && kill -KILL "$TARGET_PID" 2>/dev/null || true
  rm -rf "$TMP"
}
trap cleanup EXIT

NOFILE=$(ulimit -n)

# Waits (at most 10 s) until a log file holds a line matching $2.
wait_for_line() {
  for _ in $(seq 1 100); do grep -q "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "timed out waiting for '$2' in $1" >&2; return 1
}

# Stops the target: SIGTERM, then SIGKILL after 10 s.
stop_target() {
  local pid=$1
  kill -TERM "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  kill -KILL "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  TARGET_PID=
}

gw_config() { # listen workers cpus backend
cat <<CFG
[server]
listen = "$1"
admin_listen = "127.0.0.1:0"
workers = $2
cpus = [$3]
drain_timeout = "1s"
[limits]
idle_timeout = "10m"
[log]
level = "warn"
access_log = false
[[routes]]
server_type = 10
service_name = "announce"
strategy = "round_robin"
endpoints = ["$4"]
CFG
}

# One run: start the target, run gw-announce against it, stop the target.
PORT=28300
run() { # target N [passive]
  local t=$1 n=$2 label="$1-$2" workers=1 mode=()
  if [ "${3:-}" = passive ]; then label="$1-passive-$2"; mode=(--passive --idle-ms 2000); fi
  PORT=$((PORT + 1))
  local listen=127.0.0.1:$PORT backend=127.0.0.1:$((PORT + 1000)) control=127.0.0.1:$((PORT + 2000))
  local log="$OUT/logs/$label.target.log"
  if [ $((n + 200)) -gt "$NOFILE" ]; then
    echo "skip $label: open-file limit $NOFILE is below $n sessions + 200" >&2
    return 0
  fi
  case $t in
    gw1w)
      gw_config "$listen" 1 0 "$backend" > "$TMP/$label.toml"
      taskset -c 0 "$BIN/game-gateway" --config "$TMP/$label.toml" --io-driver "$DRV" >"$log" 2>&1 &
      TARGET_PID=$!; wait_for_line "$log" "listening on" ;;
    gw2w)
      workers=2
      gw_config "$listen" 2 "0, 1" "$backend" > "$TMP/$label.toml"
      taskset -c 0,1 "$BIN/game-gateway" --config "$TMP/$label.toml" --io-driver "$DRV" >"$log" 2>&1 &
      TARGET_PID=$!; wait_for_line "$log" "listening on" ;;
    raw-tasks|raw-syscall)
      taskset -c 0 "$BIN/gw-rawcast" --listen "$listen" --control "$control" --style "${t#raw-}" --driver "$RAW_DRV" >"$log" 2>&1 &
      TARGET_PID=$!; wait_for_line "$log" "listening on" ;;
    *) echo "unknown target $t" >&2; return 1 ;;
  esac
  local trig=(--trigger backend --backend-listen "$backend")
  case $t in raw-*) trig=(--trigger raw --control "$control") ;; esac
  echo "== $label: $(head -c 300 "$log" | grep -o 'io_driver [a-z_]*\|driver [a-z_]*' | head -1), loadavg $(cut -d' ' -f1-3 /proc/loadavg)" >&2
  timeout 400 taskset -c 1 "$BIN/gw-announce" --target "$listen" "${trig[@]}" --pid "$TARGET_PID" \
    --sessions "$n" --rounds "$ROUNDS" --warmup-rounds 1 --payload $PAYLOAD --workers $workers --label "$label" "${mode[@]}" \
    > "$TMP/out.jsonl" 2> >(tee "$OUT/logs/$label.client.log" >&2) || echo "gw-announce $label failed (exit $?)" >&2
  local drv
  drv=$(grep -o 'io_driver [a-z_]*\|driver [a-z_]*' "$log" | head -1 | awk '{print $2}')
  python3 - "$drv" "$TMP/out.jsonl" >> "$RES" <<'PY'
import json, sys
for line in open(sys.argv[2]):
    line = line.strip()
    if not line.startswith("{"):
        continue
    r = json.loads(line)
    r["io_driver"] = sys.argv[1]
    print(json.dumps(r))
PY
  stop_target "$TARGET_PID"
  sleep 1
}

for n in $SESSIONS; do
  for t in $TARGETS; do
    run "$t" "$n"
  done
done
for n in $PASSIVE_SESSIONS; do
  for t in $PASSIVE_TARGETS; do
    run "$t" "$n" passive
  done
done

python3 - "$RES" "$ROUNDS" "$NOFILE" > "$OUT/summary.md" <<'PY'
import json, sys, platform, subprocess, datetime, os
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
summ = {r["label"]: r for r in rows if r.get("summary")}
rounds = {}
for r in rows:
    if not r.get("summary"):
        rounds.setdefault(r["label"], []).append(r)
def f(v, fmt="{:,.0f}"):
    return "-" if v is None or v != v else fmt.format(v)
cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/Model name: *//p'"], capture_output=True, text=True).stdout.strip()
out = []
out.append(f"# Announcement fan-out\n")
out.append(f"Run: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC, {cpu}, {os.cpu_count()} CPUs, Linux {platform.release()}; "
           f"open-file limit {sys.argv[3]} per process; {sys.argv[2]} measured announcements per row (after 1 warm-up), medians; "
           f"payload 64 bytes (client frame 72 bytes). Target on CPU 0 (gw2w: CPUs 0 and 1), client side on CPU 1.\n")
env = " ".join(f'{k}="{os.environ[k]}"' for k in ["GW_IO_DRIVER", "SESSIONS", "TARGETS", "PASSIVE_SESSIONS", "PASSIVE_TARGETS"] if k in os.environ)
out.append("Command: `" + (env + " " if env else "") + "perf/announce.sh " + sys.argv[2] + "`\n")
out.append("- **frames/s** = N / (send -> last receipt); **per core** divides by the workers. **fan-out frames/s** = frames of a worker / (its first -> last receipt): the delivery rate without the wait before the first frame.")
out.append("- **CPU µs/frame** = target process CPU time over the announcement (sum of /proc/PID/task/*/schedstat, ns) / N, less its idle rate over the same window; **frames per CPU-s** = its inverse: what one fully available core would deliver. The /proc/PID/stat tick figure (10 ms ticks) is beside it.")
out.append("- **waited** = time the process was runnable but another task had its CPU (schedstat field 2), over the announcement window. The machine is shared: wall-clock figures move with other load (1-minute load average shown); CPU per frame is the steadier figure.\n")
out.append("| target | N | driver | send -> first ms | send -> last ms | frames/s | frames/s per core | fan-out frames/s per worker (sessions) | CPU µs/frame | (stat ticks) | frames per CPU-s | best round: send -> last ms, CPU µs/frame | target CPU / waited ms | client CPU / waited ms | load avg | delivered |")
out.append("|---|---:|---|---:|---:|---:|---:|---|---:|---:|---:|---|---|---|---|---|")
for label, s in summ.items():
    if s.get("passive"):
        continue
    n = s["sessions"]
    t = label.rsplit("-", 1)[0]
    fan = " / ".join(f(g.get("fanout_frames_per_sec")) + f" ({g.get('sessions')})" for g in s.get("groups", []))
    out.append(f"| {t} | {n:,} | {s.get('io_driver','?')} | {f(s.get('send_to_first_ms'), '{:.1f}')} | {f(s.get('send_to_last_ms'), '{:.1f}')} | "
               f"{f(s.get('frames_per_sec'))} | {f(s.get('frames_per_sec_per_core'))} | {fan} | "
               f"{f(s.get('cpu_us_per_frame_net_idle'), '{:.2f}')} | {f(s.get('cpu_us_per_frame_ticks'), '{:.1f}')} | {f(s.get('frames_per_cpu_sec'))} | "
               f"{f(s.get('best_send_to_last_ms'), '{:.1f}')}, {f(s.get('best_cpu_us_per_frame_net_idle'), '{:.2f}')} | "
               f"{f(s.get('cpu_ms'), '{:.0f}')} / {f(s.get('target_wait_ms'), '{:.0f}')} | {f(s.get('client_cpu_ms'), '{:.0f}')} / {f(s.get('client_wait_ms'), '{:.0f}')} | "
               f"{f(s.get('loadavg_before'), '{:.1f}')}->{f(s.get('loadavg_after'), '{:.1f}')} | {'all' if s.get('all_delivered') else 'NO'} |")
out.append("")
passive = [(l, s) for l, s in summ.items() if s.get("passive")]
if passive:
    out.append("Passive sessions (bound, then not reading during the announcement; frames read back afterwards): the sender's CPU per frame without waking a reader per frame.\n")
    out.append("| target | N | CPU µs/frame | (stat ticks) | frames per CPU-s | best round CPU µs/frame | target CPU / waited ms | idle CPU µs/ms | load avg | delivered |")
    out.append("|---|---:|---:|---:|---:|---:|---|---:|---|---|")
    for label, s in passive:
        out.append(f"| {label.rsplit('-', 2)[0]} | {s['sessions']:,} | {f(s.get('cpu_us_per_frame_net_idle'), '{:.2f}')} | {f(s.get('cpu_us_per_frame_ticks'), '{:.1f}')} | "
                   f"{f(s.get('frames_per_cpu_sec'))} | {f(s.get('best_cpu_us_per_frame_net_idle'), '{:.2f}')} | {f(s.get('cpu_ms'), '{:.0f}')} / {f(s.get('target_wait_ms'), '{:.0f}')} | "
                   f"{f(s.get('idle_cpu_us_per_ms'), '{:.1f}')} | {f(s.get('loadavg_before'), '{:.1f}')}->{f(s.get('loadavg_after'), '{:.1f}')} | {'all' if s.get('all_delivered') else 'NO'} |")
    out.append("")
out.append("| N | gateway 1w / raw-tasks CPU per frame | gateway 1w / raw-syscall CPU per frame | gateway 1w / raw-tasks frames/s |")
out.append("|---:|---:|---:|---:|")
def ratio(a, b, k):
    return a[k] / b[k] if a.get(k) and b.get(k) else None
ns = sorted({s["sessions"] for s in summ.values() if not s.get("passive")})
pns = sorted({s["sessions"] for s in summ.values() if s.get("passive")})
for n, p in [(n, "") for n in ns] + [(n, "passive-") for n in pns]:
    g = summ.get(f"gw1w-{p}{n}", {}); rt = summ.get(f"raw-tasks-{p}{n}", {}); rs = summ.get(f"raw-syscall-{p}{n}", {})
    out.append(f"| {n:,}{' passive' if p else ''} | {f(ratio(g, rt, 'cpu_us_per_frame_net_idle'), '{:.2f}')} | {f(ratio(g, rs, 'cpu_us_per_frame_net_idle'), '{:.2f}')} | {f(ratio(g, rt, 'frames_per_sec'), '{:.2f}')} |")
out.append("")
out.append("Every round (warm-up marked w):\n")
out.append("| run | round | send -> first ms | send -> last ms | frames/s | target CPU ms | target waited ms | CPU µs/frame (net idle) | client CPU ms | client waited ms |")
out.append("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for label, rs in rounds.items():
    for r in rs:
        out.append(f"| {label} | {r['round']}{' w' if r.get('warmup') else ''} | {f(r.get('send_to_first_ms'), '{:.1f}')} | {f(r.get('send_to_last_ms'), '{:.1f}')} | "
                   f"{f(r.get('frames_per_sec'))} | {f(r.get('cpu_ms'), '{:.1f}')} | {f(r.get('target_wait_ms'), '{:.1f}')} | {f(r.get('cpu_us_per_frame_net_idle'), '{:.2f}')} | "
                   f"{f(r.get('client_cpu_ms'), '{:.1f}')} | {f(r.get('client_wait_ms'), '{:.1f}')} |")
print("\n".join(out))
PY
echo
cat "$OUT/summary.md"
echo
echo "results: $OUT"
