#!/usr/bin/env bash
# Monitoring, end to end: a real Prometheus (Debian's `prometheus`) scrapes a
# live gateway with deploy/prometheus/alerts.yml loaded, the script induces
# failures through real client traffic, and asserts through Prometheus's HTTP
# API that the matching alerts fire (and that the others stay quiet). Then it
# checks that every metric the alerts and the Grafana dashboard use exists in
# the live gateway's first /metrics scrape (strict: none may appear only
# after its first increment).
#
# Everything runs on loopback ports chosen free at start; every loop is
# bounded; the processes started here are stopped on exit.
#
# Usage: scripts/test-prometheus.sh [--bin-dir DIR] [--keep]
#   --bin-dir DIR  game-gateway and mock-backend from DIR (or $GATEWAY_BIN_DIR);
#                  default: cargo build --release (CARGO_TARGET_DIR honoured)
#   --keep         keep the work directory (configs, logs, TSDB) for inspection
#
# Induced: routing errors (frames for a server type with no rule), a circuit
# opening (a server type routed to a closed loopback port), Redis unreachable
# (a [redis] url on a closed port), plus per-IP refusals, a handshake timeout,
# echo traffic and keep-alive so that most labelled series exist.
# The rules are a copy of alerts.yml with `for:` cut to 3s and a 1s evaluation
# interval; the expressions are unchanged.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

bin_dir=${GATEWAY_BIN_DIR:-} keep=0
while [ $# -gt 0 ]; do
  case "$1" in
    --bin-dir) bin_dir=$2; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
    *) echo "test-prometheus.sh: unknown argument $1" >&2; exit 2 ;;
  esac
done

# Alerts the induced conditions must fire, and alerts that must stay quiet.
MUST_FIRE=(GameGatewayHighErrorRate GameGatewayCircuitBreakerOpen GameGatewayRedisUnreachable GameGatewayConfigRefreshFailure)
MUST_NOT_FIRE=(GameGatewayDown GameGatewayAbsent GameGatewayWorkerUnresponsive GameGatewayHighConnectionCount
  GameGatewayAccessLogDropped GameGatewayConfigReloadRejected GameGatewayRouteSnapshotRejected
  GameGatewayRoutePropagationSlow GameGatewayDrainNotFinishing GameGatewayTlsCertificateExpiring)

apt_need=()
command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1 || apt_need+=(prometheus)
command -v curl >/dev/null 2>&1 || apt_need+=(curl)
command -v python3 >/dev/null 2>&1 || apt_need+=(python3)
command -v openssl >/dev/null 2>&1 || apt_need+=(openssl)
if [ ${#apt_need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing (apt): ${apt_need[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${apt_need[@]}" >/dev/null
  else
    echo "test-prometheus.sh: needs the Debian packages ${apt_need[*]}" >&2
    exit 1
  fi
fi
python3 -c 'import yaml' 2>/dev/null || scripts/pip-install.sh pyyaml

if [ -z "$bin_dir" ]; then
  cargo build --release --locked -p game-gateway -p mock-backend --bin game-gateway --bin mock-backend 2>&1 | tail -n 2
  bin_dir="${CARGO_TARGET_DIR:-$ROOT/target}/release"
fi
GW="$bin_dir/game-gateway" MOCK="$bin_dir/mock-backend"
[ -x "$GW" ] && [ -x "$MOCK" ] || { echo "no game-gateway / mock-backend in $bin_dir" >&2; exit 1; }

WORK=$(mktemp -d /tmp/test-prometheus.XXXXXX)
PIDS=()
cleanup() {
  local rc=$?
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -9 "$pid" 2>/dev/null || true
  done
  if [ "$keep" = 1 ] || [ $rc != 0 ]; then
    echo "work directory kept: $WORK"
  else
    rm -rf "$WORK"
  fi
}
trap cleanup EXIT

fail() { echo "FAIL: $*" >&2; for f in "$WORK"/*.err; do echo "--- $f"; tail -n 20 "$f"; done >&2; exit 1; }

# The mock backend and the gateway bind port 0 and print what they got. The
# other ports (Prometheus; a dead backend and a dead Redis, where nothing may
# listen) are picked free below the kernel's ephemeral range, so that other
# programs' outgoing connections cannot take them meanwhile.
read -r PROM DEAD DEADREDIS < <(python3 - <<'EOF'
import random, socket
lo, hi = map(int, open("/proc/sys/net/ipv4/ip_local_port_range").read().split())
pool = list(range(20000, lo)) if lo > 21000 else list(range(hi + 1, 65535))
random.shuffle(pool)
picked = []
for p in pool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", p))
    except OSError:
        continue
    finally:
        s.close()
    picked.append(p)
    if len(picked) == 3:
        break
print(*picked)
EOF
)
wait_line() { # file sed-expression seconds -> the captured text
  local i v
  for ((i = 0; i < $3 * 10; i++)); do
    v=$(sed -n "$2" "$1" 2>/dev/null | head -n 1)
    [ -n "$v" ] && { echo "$v"; return 0; }
    sleep 0.1
  done
  return 1
}

# --- the gateway and its backend -----------------------------------------------------------
"$MOCK" --listen 127.0.0.1:0 --quiet < /dev/null > "$WORK/mock.out" 2> "$WORK/mock.err" &
PIDS+=($!)
MOCKP=$(wait_line "$WORK/mock.out" 's/^mock-backend listening on 127.0.0.1:\([0-9]*\).*/\1/p' 10) \
  || fail "mock-backend did not start"

# A 30-day self-signed certificate: TLS optional beside the plaintext
# traffic, so the certificate-expiry series exists and its alert stays quiet.
openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -days 30 \
  -subj /CN=localhost -addext subjectAltName=DNS:localhost \
  -keyout "$WORK/tls.key" -out "$WORK/tls.pem" 2> "$WORK/openssl.err" || fail "openssl could not make a certificate"

cat > "$WORK/gateway.toml" <<EOF
[tls]
mode = "optional"

[[tls.certificates]]
cert = "$WORK/tls.pem"
key = "$WORK/tls.key"

[server]
listen = "127.0.0.1:0"
admin_listen = "127.0.0.1:0"
workers = 1
drain_timeout = "1s"

[limits]
max_connections_per_ip = 20
handshake_timeout = "1s"

[backend]
dial_timeout = "500ms"
circuit_failure_threshold = 2
circuit_open_duration = "60s"
reconnect_backoff_min = "50ms"
reconnect_backoff_max = "200ms"
keepalive_interval = "1s"
keepalive_timeout = "1s"

# Nothing listens here: Redis unreachable.
[redis]
url = "redis://127.0.0.1:$DEADREDIS/0"
refresh_interval = "1s"

# Echo traffic.
[[routes]]
server_type = 10
service_name = "account"
strategy = "round_robin"
endpoints = ["127.0.0.1:$MOCKP"]

# Nothing listens here: dials fail, the circuit opens.
[[routes]]
server_type = 30
service_name = "dead"
strategy = "round_robin"
endpoints = ["127.0.0.1:$DEAD"]

# No rule for server type 99: routing errors.

[log]
level = "warn"
format = "text"
access_log = true
access_log_path = "$WORK/access.log"
EOF
"$GW" --check-config --config "$WORK/gateway.toml" > /dev/null || fail "test config invalid"

"$GW" --config "$WORK/gateway.toml" > "$WORK/gateway.out" 2> "$WORK/gateway.err" &
PIDS+=($!)
line=$(wait_line "$WORK/gateway.out" '/^game-gateway listening on /p' 20) || fail "the gateway did not start"
GAME=$(sed 's/^game-gateway listening on 127.0.0.1:\([0-9]*\) .*/\1/' <<< "$line")
ADMIN=$(sed 's/.* admin 127.0.0.1:\([0-9]*\) .*/\1/' <<< "$line")
echo "ports: game $GAME admin $ADMIN mock $MOCKP prometheus $PROM dead backend $DEAD dead redis $DEADREDIS"

wait_http() { # url what seconds
  local i
  for ((i = 0; i < $3 * 10; i++)); do
    curl -fs -o /dev/null "$1" && return 0
    sleep 0.1
  done
  fail "$2 not answering at $1 after $3s"
}
wait_http "http://127.0.0.1:$ADMIN/ready" "gateway /ready" 20
curl -fs "http://127.0.0.1:$ADMIN/metrics" > "$WORK/metrics-start.txt"

# --- Prometheus -----------------------------------------------------------------------------------
python3 - "$ROOT/deploy/prometheus/alerts.yml" "$WORK/rules.yml" <<'EOF'
import sys, yaml
doc = yaml.safe_load(open(sys.argv[1]))
for g in doc["groups"]:
    g["interval"] = "1s"
    for r in g["rules"]:
        if "for" in r:
            r["for"] = "3s"
yaml.safe_dump(doc, open(sys.argv[2], "w"), sort_keys=False)
EOF
cat > "$WORK/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 900ms
  evaluation_interval: 1s
rule_files:
  - rules.yml
scrape_configs:
  - job_name: game-gateway
    static_configs:
      - targets: ["127.0.0.1:$ADMIN"]
EOF
promtool check config "$WORK/prometheus.yml" > /dev/null || fail "prometheus config invalid"
prometheus --config.file="$WORK/prometheus.yml" --storage.tsdb.path="$WORK/tsdb" \
  --web.listen-address="127.0.0.1:$PROM" > "$WORK/prometheus.out" 2> "$WORK/prometheus.err" &
PIDS+=($!)
wait_http "http://127.0.0.1:$PROM/-/ready" "prometheus" 30
PROM_URL="http://127.0.0.1:$PROM"

prom_query() { # PromQL -> first value or empty
  curl -fsG "$PROM_URL/api/v1/query" --data-urlencode "query=$1" \
    | python3 -c 'import json,sys; r=json.load(sys.stdin)["data"]["result"]; print(r[0]["value"][1] if r else "")'
}
for _ in $(seq 1 30); do
  [ "$(prom_query 'up{job="game-gateway"}')" = 1 ] && break
  sleep 1
done
[ "$(prom_query 'up{job="game-gateway"}')" = 1 ] || fail "Prometheus does not scrape the gateway"
echo "prometheus scrapes the gateway (up == 1)"

# --- traffic ------------------------------------------------------------------------------------------
cat > "$WORK/client.py" <<'EOF'
"""Game clients: client frame = u16 payload_len, u16 msg_id, u32 server_id (LE);
server_id = world << 16 | server_type << 8 | inst."""
import socket, struct, sys, time

HOST, PORT = "127.0.0.1", int(sys.argv[1])
mode, n = sys.argv[2], int(sys.argv[3]) if len(sys.argv) > 3 else 1

def frame(server_type, msg_id=7, payload=b"ping", world=1, inst=1):
    sid = (world << 16) | (server_type << 8) | inst
    return struct.pack("<HHI", len(payload), msg_id, sid) + payload

def conn():
    s = socket.create_connection((HOST, PORT), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s

if mode == "echo":            # n round trips through the mock backend
    s = conn()
    for i in range(n):
        s.sendall(frame(10, msg_id=i, payload=b"hello %d" % i))
        hdr = b""
        while len(hdr) < 8:
            chunk = s.recv(8 - len(hdr))
            if not chunk:
                sys.exit("echo: closed")
            hdr += chunk
        length = struct.unpack("<H", hdr[:2])[0]
        body = b""
        while len(body) < length:
            body += s.recv(length - len(body))
    s.close()
elif mode == "no_rule":       # n frames for server type 99 (no rule): routing errors
    s = conn()
    batch = frame(99) * 1000
    for _ in range(n // 1000):
        s.sendall(batch)
    s.sendall(frame(99) * (n % 1000))
    time.sleep(0.5)
    s.close()
elif mode == "dead":          # sessions for server type 30: dials to a closed port
    # A session bound to a backend that is lost is closed (reason 7), so every
    # attempt is a new connection; 0.3s apart, past the redial backoff.
    for _ in range(n):
        try:
            s = conn()
            s.sendall(frame(30))
            time.sleep(0.3)
            s.close()
        except OSError:
            time.sleep(0.3)
elif mode == "per_ip":        # n connections at once: above max_connections_per_ip
    socks = []
    for _ in range(n):
        try:
            socks.append(conn())
        except OSError:
            pass
    time.sleep(1)
    for s in socks:
        s.close()
elif mode == "silent":        # connect, send nothing: handshake timeout
    s = conn()
    s.settimeout(5)
    try:
        s.recv(1)
    except OSError:
        pass
    s.close()
EOF
client() { timeout 30 python3 "$WORK/client.py" "$GAME" "$@"; }

echo "traffic: echo, first routing errors, dead backend, per-IP refusals, a silent connection"
client echo 20 || fail "echo through the gateway failed"
client no_rule 10
client dead 10 &
dead_pid=$!
client per_ip 25 || true
client silent || true
wait "$dead_pid" || true
sleep 3   # a few scrapes with the error counters at their first values
echo "traffic: 30000 frames with no rule"
client no_rule 30000

# --- alerts ----------------------------------------------------------------------------------------
alerts_state() {
  curl -fs "$PROM_URL/api/v1/alerts" | python3 -c '
import json, sys
for a in json.load(sys.stdin)["data"]["alerts"]:
    print(a["labels"]["alertname"], a["state"], a["labels"].get("backend", ""), a["labels"].get("instance", ""))'
}
firing_ok=0
for i in $(seq 1 45); do
  alerts_state > "$WORK/alerts.txt"
  missing=()
  for a in "${MUST_FIRE[@]}"; do grep -q "^$a firing" "$WORK/alerts.txt" || missing+=("$a"); done
  if [ ${#missing[@]} = 0 ]; then firing_ok=1; break; fi
  [ $((i % 5)) = 0 ] && echo "  waiting for: ${missing[*]}"
  sleep 2
done
echo "alerts (name state backend instance):"
sed 's/^/  /' "$WORK/alerts.txt"
[ "$firing_ok" = 1 ] || fail "alerts not firing: ${missing[*]}"
for a in "${MUST_NOT_FIRE[@]}"; do
  if grep -q "^$a " "$WORK/alerts.txt"; then fail "$a is active but nothing induced it"; fi
done
grep -q "^GameGatewayCircuitBreakerOpen firing 127.0.0.1:$DEAD " "$WORK/alerts.txt" \
  || fail "the circuit alert is not for the dead backend 127.0.0.1:$DEAD"
echo "PASS: ${MUST_FIRE[*]} fire; ${MUST_NOT_FIRE[*]} stay quiet"

# Every rule evaluates without error.
curl -fs "$PROM_URL/api/v1/rules" | python3 -c '
import json, sys
rules = [r for g in json.load(sys.stdin)["data"]["groups"] for r in g["rules"]]
bad = [(r["name"], r.get("lastError")) for r in rules if r["health"] != "ok"]
print(f"rules loaded: {len(rules)}, unhealthy: {bad or 0}")
sys.exit(1 if bad or not rules else 0)' || fail "a rule does not evaluate"

# --- metric names --------------------------------------------------------------------------------
curl -fs "http://127.0.0.1:$ADMIN/metrics" > "$WORK/metrics-end.txt"
python3 "$ROOT/deploy/tools/deploycheck.py" metric-names "$ROOT/deploy/prometheus/alerts.yml" \
  "$ROOT/deploy/kubernetes/components/monitoring/game-gateway-dashboard.json" > "$WORK/used.txt"
families() { sed -n 's/^# TYPE \([a-z0-9_]*\) .*/\1/p' "$1" | sort -u; }
families "$WORK/metrics-start.txt" > "$WORK/at-start.txt"
families "$WORK/metrics-end.txt" > "$WORK/at-end.txt"
grep -rhoE '"game_gateway_[a-z0-9_]+"' src 2>/dev/null | tr -d '"' | sort -u > "$WORK/in-source.txt" || true
# Strict: every family the alerts and the dashboard use is in the first
# scrape of a fresh gateway (labelled families with their known label values
# at zero: configured backends, rule server types, reasons), so that rate()
# sees the first increment and no panel starts empty.
late=() unknown=()
while read -r m; do
  if grep -qx "$m" "$WORK/at-start.txt"; then continue; fi
  if grep -qx "$m" "$WORK/at-end.txt"; then late+=("$m"); continue; fi
  unknown+=("$m")
done < "$WORK/used.txt"
echo "metrics used by the alerts and the dashboard: $(wc -l < "$WORK/used.txt")"
echo "  in /metrics from the first scrape: $(grep -cxFf "$WORK/at-start.txt" "$WORK/used.txt")"
for m in "${late[@]}"; do echo "    $m: only after its first increment"; done
for m in "${unknown[@]}"; do
  if grep -qx "$m" "$WORK/in-source.txt"; then
    echo "    $m: named in src/ but no series appeared in this test"
  else
    echo "    $m: not in the gateway's source at all"
  fi
done
if [ ${#late[@]} -gt 0 ] || [ ${#unknown[@]} -gt 0 ]; then
  fail "metrics used by alerts/dashboard missing from a fresh gateway's /metrics: ${late[*]} ${unknown[*]}"
fi
grep -qx 'game_gateway_draining 0' "$WORK/metrics-start.txt" || fail "game_gateway_draining is not 0 on a running gateway"
echo "PASS: every metric the alerts and dashboard use is exported from the first scrape"
echo "test-prometheus: 2 passed, 0 failed"
