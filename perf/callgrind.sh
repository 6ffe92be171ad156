#!/usr/bin/env bash
# User-space instructions per forwarded message, counted by valgrind's
# callgrind: repeatable to a fraction of a percent whatever else the machine
# does, so a regression shows as a number.
#
# The gateway (1 worker, epoll: valgrind does not model io_uring) runs under
# callgrind twice per shape, forwarding R1 and then R2 rounds of echo
# messages through mock-backend. The difference divided by the extra
# messages is the marginal cost of one message (client frame in + backend
# frame out + reply in + client frame out), with start-up, session set-up and
# shutdown cancelled out. Two shapes:
#
# - 1x1: one session, one frame in flight: every message is its own client
#   read, backend write, backend read and client write (the worst case, and
#   the figure PERFORMANCE.md has tracked since the restructure);
# - 8x16: 8 sessions; each round writes 16 frames on every session and then
#   reads the 128 replies. The gateway is stopped (SIGSTOP) while the round's
#   frames are written and continued (SIGCONT) once all are in, so it finds
#   all 8 sessions readable at one wake-up whatever the machine's speed: one
#   read of 16 frames per session, one backend write and one backend read of
#   128 frames, one write per session. That is the batched path at its best
#   and as repeatable as 1x1; the per-message figure shows what batching saves.
#
# Each shape is measured REPEAT times (default 2) and the spread (max - min
# over the mean) is printed: the check that the figure is deterministic.
# The worker's 20 ms tick (timers, command channel, sweeps) runs by
# wall-clock time, not per message, so a run that valgrind executes slower
# (a busy machine) counts more ticks: about 90,000 instructions per second of
# wall time here. The script measures that idle rate (the gateway idle under
# callgrind for IDLE1 and IDLE2 seconds) and the wall time of every run's
# message loop, and also reports the figure with the ticks taken out
# ("tick-corrected"): that one does not depend on how fast the run went.
#
# WS=1: the sessions are WebSocket ones (upgrade, then each frame as one
# masked binary message; replies come as binary messages), so the difference
# to the default run is the WebSocket layer's cost per message.
#
# Usage: perf/callgrind.sh [GATEWAY_BINARY]   (default: builds target/release/game-gateway)
# Environment: SHAPES="1x1 8x16" (SESSIONSxINFLIGHT), REPEAT=2, IDLE1=2 IDLE2=8,
#   R1_1x1=2000 R2_1x1=6000 (rounds for shape 1x1; R1_<shape>/R2_<shape> for any
#   shape; default 200/600 rounds for batched shapes), KEEP=<dir> keeps the
#   callgrind outputs (for callgrind_annotate), MOCK_BIN, WS=1 (WebSocket),
#   UPGRADE=1 (with [server] upgrade_socket: live upgrade on, whose backend
#   reads are cancellable).
# Needs: valgrind, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
SHAPES=${SHAPES:-"1x1 8x16"}
REPEAT=${REPEAT:-2}
T=${CARGO_TARGET_DIR:-target}
if [ $# -ge 1 ]; then
  GW_BIN=$1
else
  cargo build --release -p game-gateway -p mock-backend >/dev/null 2>&1 || cargo build --release -p game-gateway -p mock-backend
  GW_BIN=$T/release/game-gateway
fi
MOCK_BIN=${MOCK_BIN:-$T/release/mock-backend}
[ -x "$MOCK_BIN" ] || cargo build --release -p mock-backend >/dev/null 2>&1 || cargo build --release -p mock-backend
[ -x "$MOCK_BIN" ] || { echo "mock-backend not found at $MOCK_BIN (set MOCK_BIN or CARGO_TARGET_DIR)" >&2; exit 1; }
command -v valgrind >/dev/null || { echo "valgrind missing: apt-get install valgrind" >&2; exit 1; }
TMP=$(mktemp -d)
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; [ -n "${KEEP:-}" ] && mkdir -p "$KEEP" && cp "$TMP"/cg.* "$KEEP"/ 2>/dev/null; rm -rf "$TMP"; }
trap cleanup EXIT

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
MOCK=127.0.0.1:$(free_port)
"$MOCK_BIN" --listen "$MOCK" --quiet >/dev/null 2>&1 & PIDS+=($!)

total() { grep -E '^(summary|totals):' "$1" | head -1 | awk '{print $2}'; }

run() { # SESSIONS INFLIGHT ROUNDS TAG [IDLE_SECONDS] -> "instructions wall_seconds"
  local s=$1 k=$2 rounds=$3 tag=$4 idle=${5:-0} port admin
  port=$(free_port); admin=$(free_port)
  cat > "$TMP/gw.toml" <<CFG
[server]
listen = "127.0.0.1:$port"
admin_listen = "127.0.0.1:$admin"
workers = 1
io_driver = "epoll"
drain_timeout = "1s"
$( [ "${UPGRADE:-0}" = 1 ] && echo "upgrade_socket = \"$TMP/upgrade.sock\"" )
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
  valgrind --tool=callgrind --callgrind-out-file="$TMP/cg.$tag" "$GW_BIN" --config "$TMP/gw.toml" >/dev/null 2>"$TMP/vg.$tag.log" &
  local vg=$!
  local wall
  wall=$(python3 - "$port" "$s" "$k" "$rounds" "$idle" "$vg" "${WS:-0}" <<'PY'
import os, signal, socket, struct, sys, time
port, nsess, k, rounds = map(int, sys.argv[1:5])
idle, gw = float(sys.argv[5]), int(sys.argv[6])
ws = sys.argv[7] == "1"
hold = nsess * k > 1
def stopped():
    # Every thread of the gateway in the stopped state.
    deadline = time.time() + 10
    while time.time() < deadline:
        states = []
        for t in os.listdir(f"/proc/{gw}/task"):
            try:
                st = open(f"/proc/{gw}/task/{t}/stat").read()
                states.append(st[st.rindex(")") + 2])
            except OSError:
                pass
        if states and all(x in "Tt" for x in states):
            return
        time.sleep(0.0005)
    sys.exit("gateway did not stop")
deadline = time.time() + 120
socks = []
while len(socks) < nsess:
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=60)
    except OSError:
        if time.time() > deadline:
            sys.exit("gateway did not start")
        time.sleep(0.2)
        continue
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    socks.append(s)
sid = (1 << 16) | (10 << 8)
payload = b"x" * 64
frame = struct.pack("<HHI", len(payload), 7, sid) + payload
if ws:
    for s in socks:
        s.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            c = s.recv(1)
            if not c:
                sys.exit("connection closed during the upgrade")
            head += c
        if not head.startswith(b"HTTP/1.1 101"):
            sys.exit("upgrade refused")
    mask = b"\x11\x22\x33\x44"
    # One masked binary message per client frame (payload < 126 bytes).
    frame = bytes([0x82, 0x80 | len(frame)]) + mask + bytes(c ^ mask[i % 4] for i, c in enumerate(frame))
burst = frame * k
if idle:
    # Idle-rate run: connected (the gateway is up), nothing sent.
    t0 = time.time()
    time.sleep(idle)
    print(time.time() - t0)
    sys.exit(0)
t0 = time.time()
def recv_exact(s, n):
    b = b""
    while len(b) < n:
        c = s.recv(n - len(b))
        if not c:
            sys.exit("connection closed")
        b += c
    return b
for _ in range(rounds):
    # Every session's frames for the round in one write each (the gateway
    # held still meanwhile when batching), then every reply.
    if hold:
        os.kill(gw, signal.SIGSTOP)
        stopped()
    for s in socks:
        s.sendall(burst)
    if hold:
        os.kill(gw, signal.SIGCONT)
    for s in socks:
        for _ in range(k):
            if ws:
                b0, b1 = recv_exact(s, 2)
                if b0 != 0x82 or b1 >= 126:
                    sys.exit("unexpected reply frame")
                recv_exact(s, b1)
                continue
            ln, _, _ = struct.unpack("<HHI", recv_exact(s, 8))
            recv_exact(s, ln)
wall = time.time() - t0
for s in socks:
    s.close()
print(wall)
PY
)
  kill -TERM "$vg"
  wait "$vg" || true
  echo "$(total "$TMP/cg.$tag") $wall"
}

echo "callgrind: $GW_BIN"
# Instructions per second of wall time while idle (the tick).
read -r i1 w1 < <(run 1 1 0 idle.a "${IDLE1:-2}")
read -r i2 w2 < <(run 1 1 0 idle.b "${IDLE2:-8}")
IDLE_RATE=$(python3 -c "print(max(0.0, ($i2 - $i1) / ($w2 - $w1)))")
printf '  idle: %.0f instructions per second of wall time (the 20 ms tick)\n' "$IDLE_RATE"
SUMMARY=()
for shape in $SHAPES; do
  S=${shape%x*}; K=${shape#*x}
  r1v=R1_$shape; r2v=R2_$shape
  if [ "$shape" = 1x1 ]; then d1=${N1:-2000}; d2=${N2:-6000}; else d1=200; d2=600; fi
  R1=${!r1v:-$d1}; R2=${!r2v:-$d2}
  MSGS=$(( (R2 - R1) * S * K ))
  PER=(); NOTICK=()
  for rep in $(seq "$REPEAT"); do
    read -r a wa < <(run "$S" "$K" "$R1" "$shape.$R1.$rep")
    read -r b wb < <(run "$S" "$K" "$R2" "$shape.$R2.$rep")
    per=$(python3 -c "print(f'{($b - $a) / $MSGS:.1f}')")
    notick=$(python3 -c "print(f'{(($b - $IDLE_RATE * $wb) - ($a - $IDLE_RATE * $wa)) / $MSGS:.1f}')")
    printf '  %s run %s: %s rounds %s instr (%.1f s), %s rounds %s instr (%.1f s): %s per message, %s tick-corrected\n' \
      "$shape" "$rep" "$R1" "$a" "$wa" "$R2" "$b" "$wb" "$per" "$notick"
    PER+=("$per"); NOTICK+=("$notick")
  done
  line=$(python3 - "$shape" "$S" "$K" "${PER[*]}" "${NOTICK[*]}" <<'PY'
import sys
shape, s, k = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
per = [float(x) for x in sys.argv[4].split()]
nt = [float(x) for x in sys.argv[5].split()]
def spread(v):
    m = sum(v) / len(v)
    return m, (max(v) - min(v)) / m * 100 if m else 0.0
m, sp = spread(per)
m2, sp2 = spread(nt)
what = "1 session, 1 frame in flight" if (s, k) == (1, 1) else f"{s} sessions x {k} frames in flight"
print(f"  {shape} ({what}): {m:,.0f} instructions per message (spread {sp:.2f} % over {len(per)} runs); "
      f"tick-corrected {m2:,.0f} (spread {sp2:.2f} %)")
PY
)
  SUMMARY+=("$line")
done
echo "instructions per forwarded message (client->backend->client$([ "${WS:-0}" = 1 ] && echo ', WebSocket')), user space:"
for l in "${SUMMARY[@]}"; do echo "$l"; done
