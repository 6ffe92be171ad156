#!/usr/bin/env bash
# RSS per bound idle session: a 1-worker gateway, N sessions that each send
# one frame, get the reply, then hold still; (RSS with them - RSS before) / N.
#
# Usage: perf/idle-memory.sh [N=18000] [DRIVER=auto|io_uring|epoll]
# (N + a few must fit the open-file limit of both the gateway and gw-load.)
set -uo pipefail
cd "$(dirname "$0")/.."
N=${1:-18000}; DRV=${2:-auto}
BIN=${CARGO_TARGET_DIR:-target}/release
[ -x "$BIN/game-gateway" ] && [ -x "$BIN/gw-load" ] || cargo build --release --workspace --bins
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null; done; wait 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT
GW=127.0.0.1:28380; ADMIN=127.0.0.1:28390; MOCK=127.0.0.1:29731
cat > "$TMP/gw.toml" <<CFG
[server]
listen = "$GW"
admin_listen = "$ADMIN"
workers = 1
[log]
level = "warn"
access_log = false
[limits]
# N sessions open at once from one load thread: on a busy machine their
# first frames may take longer than the default 5 s.
handshake_timeout = "60s"
[[routes]]
server_type = 10
service_name = "bench"
strategy = "round_robin"
endpoints = ["$MOCK"]
CFG
$BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>&1 & PIDS+=($!)
$BIN/game-gateway --config "$TMP/gw.toml" --io-driver "$DRV" >/dev/null 2>"$TMP/gw.log" & PIDS+=($!); G=$!
sleep 1
rss() { awk '/VmRSS/ {print $2}' "/proc/$G/status"; }
base=$(rss)
$BIN/gw-load --target $GW --idle --sessions "$N" --duration 8 --warmup 16 --label idle > "$TMP/load.out" 2>&1 &
L=$!
sleep 22
peak=$(rss)
active=$(python3 -c "import urllib.request; print([l for l in urllib.request.urlopen('http://$ADMIN/metrics').read().decode().splitlines() if l.startswith('game_gateway_sessions_active ')][0].split()[1])")
wait $L
tail -1 "$TMP/load.out"
echo "driver=$DRV sessions=$N active=$active rss_before_kib=$base rss_kib=$peak bytes_per_session=$(( (peak - base) * 1024 / N ))"
[ "$active" = "$N" ] || { echo "only $active of $N sessions were up: the figure is not valid" >&2; exit 1; }
