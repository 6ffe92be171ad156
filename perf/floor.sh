#!/usr/bin/env bash
# The loopback floor: what receiving each client message and sending it back
# costs by itself, beside the gateway and HAProxy, in interleaved rounds on
# the same machine. Each server under test runs alone on core 0; the load
# generator and the backends share core 1 (as in perf/compare.sh).
#
#   floor     gw-floor-echo: one thread, edge-triggered epoll, direct recv/send,
#             nothing else (the cheapest possible client side of any proxy)
#   echo      gw-echo: the same echo on monoio's io_uring (the runtime's cost)
#   gateway   the gateway (1 worker) to mock-backend over the gate protocol
#   haproxy   HAProxy (nbthread 1, mode tcp) to gw-echo on core 1
# and, when nginx is installed, the same for WebSocket (rows "ws-*", loads
# with `gw-load --ws`): ws-floor (gw-floor-echo --ws), ws-gateway (the same
# gateway), ws-nginx (nginx's WebSocket proxy, one worker, to
# `gw-echo --mode ws` on core 1), as perf/compare-ws.sh sets them up.
#
# A proxy must do at least the floor's work for every message, so floor /
# HAProxy bounds from below the CPU ratio any proxy can reach against HAProxy
# on this harness (floor / nginx likewise for WebSocket). With `perf` installed it also counts, per message, the
# packets each server sends (net:net_dev_xmit, pure ACKs included) and its
# send and receive calls (in a separate, shorter pass: tracing slows the
# servers, so these passes give no CPU figures).
#
# PROFILE=1 also samples where each TCP server's CPU goes at 100x1 (`perf
# record -g`, software clock: a VM may have no PMU) into profile-<server>.txt
# (functions by inclusive share). COUNTS=0 skips the counts pass; ROUNDS=0
# skips the CPU rounds.
#
# Usage: perf/floor.sh [SECONDS] [ROUNDS]      (default 8 s, 2 rounds)
#        GW_IO_DRIVER=epoll perf/floor.sh      (the gateway's driver)
# On a shared machine: flock /tmp/gw-bench.lock perf/floor.sh
# Writes: perf/results/floor-<timestamp>/{results.jsonl,counts.txt,summary.md}
set -uo pipefail
cd "$(dirname "$0")/.."
command -v haproxy >/dev/null || { echo "haproxy missing: apt-get install haproxy" >&2; exit 1; }
cargo build --release -p game-gateway -p gw-perf -p mock-backend >/dev/null 2>&1 ||
  cargo build --release -p game-gateway -p gw-perf -p mock-backend || exit 1
BIN=${CARGO_TARGET_DIR:-target}/release
SECS=${1:-8}; ROUNDS=${2:-2}; WARM=2; DRV=${GW_IO_DRIVER:-auto}
OUT=perf/results/floor-$(date -u +%Y%m%d-%H%M%S); mkdir -p "$OUT"; RES=$OUT/results.jsonl; : >"$RES"
TMP=$(mktemp -d)
PIDS=()
cleanup() { for ((i=${#PIDS[@]}-1; i>=0; i--)); do kill "${PIDS[i]}" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
FLOOR=127.0.0.1:$(free_port); ECHO0=127.0.0.1:$(free_port); ECHO1=127.0.0.1:$(free_port)
MOCK=127.0.0.1:$(free_port); GW=127.0.0.1:$(free_port); HAP=127.0.0.1:$(free_port)

taskset -c 1 $BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>&1 & PIDS+=($!)
taskset -c 1 $BIN/gw-echo --listen $ECHO1 >/dev/null 2>&1 & PIDS+=($!)
taskset -c 0 $BIN/gw-floor-echo --listen $FLOOR >/dev/null 2>&1 & PIDS+=($!); FPID=$!
taskset -c 0 $BIN/gw-echo --listen $ECHO0 >/dev/null 2>&1 & PIDS+=($!); EPID=$!
printf '[server]\nlisten = "%s"\nadmin_listen = "127.0.0.1:0"\nworkers = 1\ncpus = [0]\n[log]\nlevel = "warn"\naccess_log = false\n[[routes]]\nserver_type = 10\nservice_name = "b"\nstrategy = "round_robin"\nendpoints = ["%s"]\n' $GW $MOCK >"$TMP/gw.toml"
$BIN/game-gateway --config "$TMP/gw.toml" --io-driver "$DRV" >/dev/null 2>&1 & PIDS+=($!); GPID=$!
. perf/lib.sh
haproxy_tcp_conf $HAP $ECHO1 >"$TMP/h.cfg"
taskset -c 0 haproxy -db -f "$TMP/h.cfg" >/dev/null 2>&1 & PIDS+=($!); HPID=$!
# name address pid gw-load-flags
SERVERS=("floor $FLOOR $FPID" "echo $ECHO0 $EPID" "gateway $GW $GPID" "haproxy $HAP $HPID")
if command -v nginx >/dev/null; then
  WSFLOOR=127.0.0.1:$(free_port); WSECHO=127.0.0.1:$(free_port); NGX=127.0.0.1:$(free_port)
  taskset -c 1 $BIN/gw-echo --mode ws --listen $WSECHO >/dev/null 2>&1 & PIDS+=($!)
  taskset -c 0 $BIN/gw-floor-echo --ws --listen $WSFLOOR >/dev/null 2>&1 & PIDS+=($!); WFPID=$!
  . perf/nginx_ws.sh
  nginx_ws_conf "$TMP" "$NGX" "$WSECHO"
  taskset -c 0 nginx -c "$TMP/nginx.conf" -p "$TMP" >/dev/null 2>&1 & PIDS+=($!); NPID=$!
  SERVERS+=("ws-floor $WSFLOOR $WFPID --ws" "ws-gateway $GW $GPID --ws" "ws-nginx $NGX $NPID --ws")
fi
sleep 1
LOADS=("100 1" "100 16" "1000 1")
for r in $(seq 1 "$ROUNDS"); do
  for load in "${LOADS[@]}"; do
    set -- $load; s=$1; i=$2
    for srv in "${SERVERS[@]}"; do
      set -- $srv
      run "$1-${s}x$i" "$2" "$3" --sessions "$s" --inflight "$i" ${4:-} >/dev/null
    done
  done
done

# Counts per message, one short traced pass per server and load.
# Each event is probed on its own (a kernel without one of them must not
# lose the others); the counts pass is skipped without `perf`.
EV=
if command -v perf >/dev/null; then
  for e in net:net_dev_xmit syscalls:sys_enter_sendto syscalls:sys_enter_recvfrom syscalls:sys_enter_writev \
    syscalls:sys_enter_write syscalls:sys_enter_read syscalls:sys_enter_readv syscalls:sys_enter_epoll_wait \
    syscalls:sys_enter_io_uring_enter io_uring:io_uring_submit_req; do
    perf stat -e "$e" -- true >/dev/null 2>&1 && EV=${EV:+$EV,}$e || echo "perf: no event $e here; its column stays empty" >&2
  done
fi
if [ -n "$EV" ] && [ "${COUNTS:-1}" != 0 ]; then
  for load in "${LOADS[@]}"; do
    set -- $load; s=$1; i=$2
    for srv in "${SERVERS[@]}"; do
      set -- $srv
      taskset -c 1 $BIN/gw-load --target "$2" --duration 5 --warmup 1 --sessions "$s" --inflight "$i" ${4:-} --json >"$TMP/load.json" 2>/dev/null & L=$!
      sleep 2
      perf stat -x, -e $EV -p "$3" -o "$TMP/stat.txt" -- sleep 3 >/dev/null 2>&1
      wait $L
      python3 - "$1-${s}x$i" "$TMP/load.json" "$TMP/stat.txt" >>"$OUT/counts.txt" <<'PY'
import json, sys
label, load, stat = sys.argv[1:]
r = json.loads(open(load).read().strip().splitlines()[-1]); m = r["msgs_per_sec"] * 3
c = {}
for l in open(stat):
    p = l.strip().split(",")
    if len(p) > 2 and p[0].isdigit():
        c[p[2].split(":")[-1]] = int(p[0]) / m
print(json.dumps({"label": label, "per_msg": c}))
PY
    done
  done
fi

if [ "${PROFILE:-0}" = 1 ] && command -v perf >/dev/null; then
  for srv in "${SERVERS[@]:0:4}"; do
    set -- $srv
    taskset -c 1 $BIN/gw-load --target "$2" --duration 7 --warmup 1 --sessions 100 --inflight 1 >/dev/null 2>&1 & L=$!
    sleep 2
    perf record -F 2000 -g -p "$3" -o "$TMP/perf.data" -- sleep 4 >/dev/null 2>&1
    wait $L
    { echo "# $1 at 100x1: perf record -F 2000 -g (software clock), 4 s; inclusive share by function"
      perf report -i "$TMP/perf.data" --children --sort sym -g none --stdio 2>/dev/null | grep -v '^#' | grep '%' | head -60
    } >"$OUT/profile-$1.txt"
  done
fi

python3 - "$RES" "$OUT/counts.txt" <<'PY' | tee "$OUT/summary.md"
import json, sys, collections, os
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    r = json.loads(l)
    if r.get("cpu_us_per_msg"):
        d[r["label"]].append(r)
counts = {}
if os.path.exists(sys.argv[2]):
    for l in open(sys.argv[2]):
        r = json.loads(l); counts[r["label"]] = r["per_msg"]
mean = lambda xs: sum(xs) / len(xs) if xs else float("nan")
print("| load | server | CPU µs/msg (rounds) | of it kernel | msgs/s | vs HAProxy (nginx for ws-) | packets sent/msg | send calls/msg | recv calls/msg | context switches/msg (machine) | core 1 idle |")
print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
for load in ["100x1", "100x16", "1000x1"]:
  for srvs, ref in [(["floor", "echo", "gateway", "haproxy"], "haproxy"), (["ws-floor", "ws-gateway", "ws-nginx"], "ws-nginx")]:
    h = mean([r["cpu_us_per_msg"] for r in d[ref + "-" + load]])
    for srv in srvs:
        rs = d[srv + "-" + load]
        if not rs:
            continue
        cpu = mean([r["cpu_us_per_msg"] for r in rs])
        sys_ = mean([r["sys_us_per_msg"] for r in rs])
        c = counts.get(srv + "-" + load, {})
        f = lambda *ks: "%.3f" % sum(c.get(k, 0) for k in ks) if c else "-"
        print(f"| {load} | {srv} | {cpu:.3f} ({' / '.join('%.2f' % r['cpu_us_per_msg'] for r in rs)}) | {100 * sys_ / cpu:.0f} % | "
              f"{mean([r['msgs_per_sec'] for r in rs]):,.0f} | {cpu / h:.2f} | {f('net_dev_xmit')} | {f('sys_enter_sendto', 'sys_enter_writev', 'sys_enter_write')} | {f('sys_enter_recvfrom', 'sys_enter_read', 'sys_enter_readv')} | "
              f"{mean([r.get('ctxt_per_msg') or 0 for r in rs]):.3f} | {mean([r.get('core1_idle_pct') or 0 for r in rs]):.0f} % |")
print()
for load in ["100x1", "100x16", "1000x1"]:
    for floor, gw, ref in [("floor", "gateway", "haproxy"), ("ws-floor", "ws-gateway", "ws-nginx")]:
        m = {k: mean([r["cpu_us_per_msg"] for r in d[k + "-" + load]]) for k in (floor, gw, ref)}
        if m[ref] == m[ref]:
            print(f"{load}: {floor}/{ref} {m[floor] / m[ref]:.2f}  {gw}/{ref} {m[gw] / m[ref]:.2f}  {gw}/{floor} {m[gw] / m[floor]:.2f}")
print()
print("io_uring operations per message (sends and receives the kernel ran for the server, not counted above):",
      ", ".join(f"{k} {v['io_uring_submit_req']:.3f}" for k, v in counts.items() if v.get("io_uring_submit_req")) or "none")
PY
echo "results: $OUT"
