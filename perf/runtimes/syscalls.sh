#!/usr/bin/env bash
# Syscalls per forwarded message for each forwarder (strace -c -f attached
# for one short 100x1 load; strace slows the forwarder, so only the counts
# per message mean anything, not the rates). Same pinning as compare.sh.
# Usage: perf/runtimes/syscalls.sh [SECONDS]   (default 3)
# Writes: perf/results/runtimes-syscalls-<timestamp>/{<peer>.strace,summary.md}.
set -euo pipefail
cd "$(dirname "$0")/../.."
SECS=${1:-3}
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -p gw-perf >/dev/null 2>&1
cargo build --release --manifest-path perf/runtimes/Cargo.toml >/dev/null 2>&1
BIN=$CARGO_TARGET_DIR/release
OUT=perf/results/runtimes-syscalls-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
ECHO=127.0.0.1:29820; FWD=127.0.0.1:28185
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT
taskset -c 1 $BIN/gw-echo --listen $ECHO >/dev/null 2>&1 & PIDS+=($!)
echo "| forwarder | replies | syscalls per message (top 4) |" > "$OUT/summary.md"
echo "|---|---:|---|" >> "$OUT/summary.md"
for peer in monoio monoio-epoll glommio; do
  env_=(); bin=fwd-monoio
  [ $peer = monoio-epoll ] && env_=(FWD_EPOLL=1)
  [ $peer = glommio ] && bin=fwd-glommio
  env "${env_[@]}" taskset -c 0 $BIN/$bin --listen $FWD --backend $ECHO --cpu 0 2>/dev/null & fpid=$!
  sleep 1
  strace -c -f -p $fpid -o "$OUT/$peer.strace" & spid=$!
  sleep 0.5
  replies=$(taskset -c 1 $BIN/gw-load --target $FWD --duration "$SECS" --warmup 0 --sessions 100 --inflight 1 --json 2>/dev/null \
    | tail -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["replies"])')
  kill -INT $spid; wait $spid 2>/dev/null || true
  kill $fpid; wait $fpid 2>/dev/null || true
  python3 - "$OUT/$peer.strace" "$replies" "$peer" >> "$OUT/summary.md" <<'PY'
import sys
path, replies, peer = sys.argv[1], int(sys.argv[2]), sys.argv[3]
rows = []
for line in open(path):
    p = line.split()
    if len(p) >= 5 and p[0][0].isdigit() and p[-1] != "total":
        rows.append((int(p[3]), p[-1]))
rows.sort(reverse=True)
total = sum(c for c, _ in rows)
top = ", ".join(f"{n} {c / replies:.2f}" for c, n in rows[:4])
print(f"| {peer} | {replies:,} | {total / replies:.2f} total: {top} |")
PY
done
cat "$OUT/summary.md"
