#!/usr/bin/env bash
# User-space instructions per forwarded message, counted by valgrind's
# callgrind: repeatable to a fraction of a percent whatever else the machine
# does, so a regression shows as a number.
#
# The gateway (1 worker, epoll: valgrind does not model io_uring) runs under
# callgrind twice, forwarding N1 and then N2 echo round trips over one session
# with one frame in flight (a deterministic read/write pattern). The
# difference divided by N2 - N1 is the marginal cost of one message (client
# frame in + backend frame out + reply in + client frame out), with start-up,
# session set-up and shutdown cancelled out.
#
# WS=1: the session is a WebSocket one (upgrade, then each frame as one
# masked binary message; replies come as binary messages), so the difference
# to the default run is the WebSocket layer's cost per round trip.
#
# Usage: perf/callgrind.sh [GATEWAY_BINARY]   (default target/release/game-gateway)
# Needs: valgrind, python3; builds the release binaries when no binary is given.
set -euo pipefail
cd "$(dirname "$0")/.."
N1=${N1:-2000}
N2=${N2:-6000}
if [ $# -ge 1 ]; then
  GW_BIN=$1
else
  cargo build --release --bin game-gateway --bin mock-backend >/dev/null 2>&1 || cargo build --release --bin game-gateway --bin mock-backend
  GW_BIN=target/release/game-gateway
fi
MOCK_BIN=${MOCK_BIN:-target/release/mock-backend}
[ -x "$MOCK_BIN" ] || cargo build --release --bin mock-backend >/dev/null 2>&1
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install valgrind" >&2; exit 1; }
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && cp "$TMP"/cg.* "$KEEP"/ 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=127.0.0.1:$(free_port)
"$MOCK_BIN" --listen "$MOCK" --quiet >/dev/null 2>&1 & PIDS+=($!)

run() { # N -> total Ir
  local n=$1 port admin
  port=$(free_port); admin=$(free_port)
  cat > "$TMP/gw.toml" <<CFG
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
workers = 1
io_driver = "epoll"
drain_timeout = "1s"
[log]
level = "error"
access_log = false
[[routes]]
server_type = 10
world_id = 0
service_name = "echo"
strategy = "round_robin"
endpoints = ["$MOCK"]
CFG
  valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$n" "$GW_BIN" --config "$TMP/gw.toml" >/dev/null 2>"$TMP/vg.$n.log" &
  local vg=$!
  python3 - "$port" "$n" "${WS:-0}" <<'PY'
import socket, struct, sys, time
port, n, ws = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
deadline = time.time() + 120
while True:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=30)
        break
    except OSError:
        if time.time() > deadline:
            sys.exit("gateway did not start")
        time.sleep(0.2)
s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
sid = (1 << 16) | (10 << 8)
payload = b"x" * 64
frame = struct.pack("<HHI", len(payload), 7, sid) + payload
def recv_exact(k):
    b = b""
    while len(b) < k:
        c = s.recv(k - len(b))
        if not c:
            sys.exit("connection closed")
        b += c
    return b
if ws:
    s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
              b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    head = b""
    while not head.endswith(b"\r\n\r\n"):
        head += recv_exact(1)
    if not head.startswith(b"HTTP/1.1 101"):
        sys.exit("upgrade refused")
    mask = b"\x11\x22\x33\x44"
    # Masked binary message, payload < 126 bytes.
    frame = bytes([0x82, 0x80 | len(frame)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(frame))
for _ in range(n):
    s.sendall(frame)
    if ws:
        b0, b1 = recv_exact(2)
        if b0 != 0x82 or b1 >= 126:
            sys.exit("unexpected reply frame")
        recv_exact(b1)
        continue
    ln, _, _ = struct.unpack("<HHI", recv_exact(8))
    recv_exact(ln)
s.close()
PY
  kill -TERM "$vg"
  wait "$vg" || true
  grep -E '^(summary|totals):' "$TMP/cg.$n" | head -1 | awk '{print $2}'
}

a=$(run "$N1")
b=$(run "$N2")
per=$(( (b - a) / (N2 - N1) ))
echo "callgrind: $GW_BIN"
echo "  $N1 round trips: $a instructions; $N2 round trips: $b instructions"
echo "  instructions per forwarded round trip (client->backend->client$([ "${WS:-0}" = 1 ] && echo ', WebSocket')): $per"
