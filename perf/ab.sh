#!/usr/bin/env bash
# A/B: two gateway binaries (A, B) and HAProxy, interleaved in rounds on the
# same machine in the same minutes, so a change's CPU per message can be told
# from the machine's noise. Each proxy runs alone on core 0 in turn; the load
# generator and the backends share core 1 (as in perf/compare.sh).
#
# Usage: A=old/game-gateway B=target/release/game-gateway [ROUNDS=2] [SECS=8]
#        [GW_IO_DRIVER=epoll] [LOADS="100x1 100x16 1000x1 100x1@800"] perf/ab.sh
# A load is SESSIONSxINFLIGHT, closed loop, or SESSIONSxINFLIGHT@RATE: open
# loop (paced), RATE frames a second per session (gw-load --rate).
# Writes: perf/results/ab-<timestamp>/results.jsonl; prints per-run figures
# and the CPU ratios A/HAProxy, B/HAProxy and B/A per load.
set -uo pipefail
cd "$(dirname "$0")/.."
command -v haproxy >/dev/null || { echo "haproxy missing: apt-get install haproxy" >&2; exit 1; }
BIN=${CARGO_TARGET_DIR:-target}/release
[ -x "$BIN/gw-load" ] || cargo build --release -p gw-perf -p mock-backend
A=${A:?A=path of the first gateway binary}; B=${B:-$BIN/game-gateway}
SECS=${SECS:-8}; WARM=2; ROUNDS=${ROUNDS:-2}; DRV=${GW_IO_DRIVER:-auto}
OUT=perf/results/ab-$(date -u +%Y%m%d-%H%M%S); mkdir -p "$OUT"; RES=$OUT/results.jsonl
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
MOCK=127.0.0.1:29741; ECHO=127.0.0.1:29742; GA=127.0.0.1:28501; GB=127.0.0.1:28502; HAP=127.0.0.1:28503
taskset -c 1 $BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>&1 & PIDS+=($!)
taskset -c 1 $BIN/gw-echo --listen $ECHO >/dev/null 2>&1 & PIDS+=($!)
cfg() { printf '[server]\nlisten = "%s"\nadmin_listen = "127.0.0.1:0"\nworkers = 1\ncpus = [0]\n[log]\nlevel = "warn"\naccess_log = false\n[[routes]]\nserver_type = 10\nservice_name = "b"\nstrategy = "round_robin"\nendpoints = ["%s"]\n' "$1" "$MOCK"; }
cfg $GA > "$TMP/a.toml"; cfg $GB > "$TMP/b.toml"
"$A" --config "$TMP/a.toml" --io-driver "$DRV" >/dev/null 2>&1 & PIDS+=($!); APID=$!
"$B" --config "$TMP/b.toml" --io-driver "$DRV" >/dev/null 2>&1 & PIDS+=($!); BPID=$!
. perf/lib.sh
haproxy_tcp_conf $HAP $ECHO > "$TMP/h.cfg"
taskset -c 0 haproxy -db -f "$TMP/h.cfg" >/dev/null 2>&1 & PIDS+=($!); HPID=$!
sleep 1
for r in $(seq 1 "$ROUNDS"); do
  for load in ${LOADS:-100x1 100x16 1000x1}; do
    shape=${load%@*}; rate=0
    [ "$shape" != "$load" ] && rate=${load#*@}
    s=${shape%x*}; f=${shape#*x}
    run "haproxy-$load" $HAP $HPID --sessions $s --inflight $f --rate $rate >/dev/null
    run "A-$load" $GA $APID --sessions $s --inflight $f --rate $rate >/dev/null
    run "B-$load" $GB $BPID --sessions $s --inflight $f --rate $rate >/dev/null
  done
done
python3 - "$RES" <<'PY' | tee "$OUT/summary.txt"
import json, sys, collections
d = collections.defaultdict(list)
for l in open(sys.argv[1]):
    r = json.loads(l)
    d[r["label"]].append((r.get("cpu_us_per_msg") or 0, r.get("msgs_per_sec", 0)))
for k in sorted(d):
    print(k, " ".join("%.3f µs/msg (%.0f msgs/s)" % x for x in d[k]))
loads = sorted({k.split("-", 1)[1] for k in d})
for load in loads:
    h, a, b = (sum(x[0] for x in d[p + "-" + load]) for p in ("haproxy", "A", "B"))
    if h and a and b:
        print(f"{load}: A/haproxy {a / h:.2f}  B/haproxy {b / h:.2f}  B/A {b / a:.2f}")
PY
