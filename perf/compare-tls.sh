#!/usr/bin/env bash
# TLS side-by-side: game-gateway terminating TLS (rustls, `[tls] mode =
# "required"`) vs HAProxy terminating TLS (`bind ... ssl crt`, OpenSSL), both
# on the same certificate (ECDSA P-256, signed by a throw-away CA made here)
# and both behind the same rustls client (`gw-load --tls`), so both negotiate
# the same protocol and cipher suite (TLS 1.3, the client's first choice).
# Plaintext behind: HAProxy forwards to `gw-echo`, the gateway to
# `mock-backend`, as in perf/compare.sh. The proxy under test runs alone on
# core 0; the load generator and the backends share core 1.
#
# Measured:
#   - established sessions: 100x1, 100x16 and 1000x1 (sessions x frames in
#     flight), CPU per message of the proxy;
#   - handshakes: churn (connect, full handshake, one frame, reply, close),
#     CPU per session of the proxy and the handshakes per second that CPU
#     allows on one core (1e6 / µs per handshake); again with resumption
#     (TLS 1.3 tickets);
#   - idle memory per bound idle TLS session (the gateway).
#
# Usage: perf/compare-tls.sh [SECONDS]   (or perf/compare.sh --tls [SECONDS])
# Needs: haproxy, openssl (Debian packages).
# Writes: perf/results/tls-<timestamp>/{results.jsonl,summary.md}.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-10}
WARM=2
command -v haproxy >/dev/null || { echo "haproxy missing: apt-get install haproxy" >&2; exit 1; }
command -v openssl >/dev/null || { echo "openssl missing: apt-get install openssl" >&2; exit 1; }
cargo build --release --workspace --bins >/dev/null 2>&1 || cargo build --release --workspace --bins
BIN=${CARGO_TARGET_DIR:-target}/release
OUT=perf/results/tls-$(date -u +%Y%m%d-%H%M%S)
mkdir -p "$OUT"
RES="$OUT/results.jsonl"
TMP=$(mktemp -d)
ECHO=127.0.0.1:29820; MOCK=127.0.0.1:29721
GW=127.0.0.1:28180; HAP=127.0.0.1:28181; GW_ADMIN=127.0.0.1:28190
PIDS=()
cleanup() { for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$TMP"; }
trap cleanup EXIT

# A CA and a leaf for localhost / 127.0.0.1 (ECDSA P-256, as most sites).
openssl ecparam -name prime256v1 -genkey -noout -out "$TMP/ca.key" 2>/dev/null
openssl req -x509 -new -key "$TMP/ca.key" -subj "/CN=gw-perf test CA" -days 2 -out "$TMP/ca.pem" 2>/dev/null
openssl ecparam -name prime256v1 -genkey -noout -out "$TMP/leaf.ec.key" 2>/dev/null
openssl pkcs8 -topk8 -nocrypt -in "$TMP/leaf.ec.key" -out "$TMP/leaf.key"
openssl req -new -key "$TMP/leaf.key" -subj "/CN=localhost" -out "$TMP/leaf.csr" 2>/dev/null
printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n' > "$TMP/leaf.ext"
openssl x509 -req -in "$TMP/leaf.csr" -CA "$TMP/ca.pem" -CAkey "$TMP/ca.key" -CAcreateserial -days 2 \
  -extfile "$TMP/leaf.ext" -out "$TMP/leaf.pem" 2>/dev/null
cat "$TMP/leaf.pem" "$TMP/leaf.key" > "$TMP/haproxy.pem"

taskset -c 1 $BIN/gw-echo --listen $ECHO >/dev/null & PIDS+=($!)
taskset -c 1 $BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>&1 & PIDS+=($!)

cat > "$TMP/haproxy.cfg" <<CFG
global
  nbthread 1
  maxconn 9000
  ssl-default-bind-options ssl-min-ver TLSv1.2
defaults
  mode tcp
  timeout connect 5s
  timeout client 120s
  timeout server 120s
frontend game
  bind $HAP ssl crt $TMP/haproxy.pem
  default_backend echo
backend echo
  server s1 $ECHO
CFG
taskset -c 0 haproxy -db -f "$TMP/haproxy.cfg" >/dev/null 2>"$OUT/haproxy.log" & PIDS+=($!); HAP_PID=$!

cat > "$TMP/gw.toml" <<CFG
[server]
listen = "$GW"
admin_listen = "$GW_ADMIN"
workers = 1
cpus = [0]
[log]
level = "warn"
access_log = false
[tls]
mode = "required"
[[tls.certificates]]
cert = "$TMP/leaf.pem"
key = "$TMP/leaf.key"
[[routes]]
server_type = 10
service_name = "bench"
strategy = "round_robin"
endpoints = ["$MOCK"]
CFG
DRV=${GW_IO_DRIVER:-auto}
$BIN/game-gateway --config "$TMP/gw.toml" --io-driver "$DRV" >/dev/null 2>"$OUT/gateway.log" & PIDS+=($!); GW_PID=$!
sleep 1

. perf/lib.sh
TLSARGS=(--tls --tls-ca "$TMP/ca.pem" --tls-sni localhost)

for load in "100 1" "100 16" "1000 1"; do
  set -- $load; S=$1; K=$2
  run "direct-${S}x${K}" $ECHO - --sessions $S --inflight $K
  run "haproxy-tls-${S}x${K}" $HAP $HAP_PID --sessions $S --inflight $K "${TLSARGS[@]}"
  run "gateway-tls-${S}x${K}" $GW $GW_PID --sessions $S --inflight $K "${TLSARGS[@]}"
done
# Handshakes: full (no resumption), then resumed (TLS 1.3 tickets).
run "haproxy-tls-churn" $HAP $HAP_PID --sessions 50 --churn "${TLSARGS[@]}"
run "gateway-tls-churn" $GW $GW_PID --sessions 50 --churn "${TLSARGS[@]}"
run "haproxy-tls-churn-resume" $HAP $HAP_PID --sessions 50 --churn --tls-resume "${TLSARGS[@]}"
run "gateway-tls-churn-resume" $GW $GW_PID --sessions 50 --churn --tls-resume "${TLSARGS[@]}"

# Idle memory per bound idle TLS session (the gateway; 5,000 sessions).
IDLE=5000
base=$(rss_kb $GW_PID)
taskset -c 1 $BIN/gw-load --target $GW --idle --sessions $IDLE --duration 6 --warmup 6 --label idle "${TLSARGS[@]}" >/dev/null 2>&1 &
LOADPID=$!
sleep 10
peak=$(rss_kb $GW_PID)
wait $LOADPID || true
python3 - "$base" "$peak" "$IDLE" >>"$RES" <<'PY'
import json, sys
base, peak, n = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
print(json.dumps({"label": "gateway-tls-idle-memory", "sessions": n, "rss_base_kb": base, "rss_kb": peak, "bytes_per_session": (peak - base) * 1024 / n}))
PY
curl -sf "http://$GW_ADMIN/metrics" 2>/dev/null | grep -E '^game_gateway_(protocol_errors|tls)' > "$OUT/gateway-tls-metrics.txt" || true
for f in haproxy.log gateway.log; do [ -s "$OUT/$f" ] || rm -f "$OUT/$f"; done

python3 - "$RES" "$SECS" > "$OUT/summary.md" <<'PY'
import json, sys, platform, subprocess, datetime, os
rows = {json.loads(l)["label"]: json.loads(l) for l in open(sys.argv[1])}
def f(v, fmt="{:,.0f}"):
    return "-" if v is None else fmt.format(v)
def ratio(a, b):
    return a / b if a and b else None
out = []
cpu = subprocess.run(["sh", "-c", "lscpu | sed -n 's/Model name: *//p'"], capture_output=True, text=True).stdout.strip()
out.append(f"Run: {datetime.datetime.utcnow():%Y-%m-%d %H:%M} UTC, {cpu}, Linux {platform.release()}, gateway io_driver {os.environ.get('GW_IO_DRIVER', 'auto')}, {sys.argv[2]} s per load, 64-byte payloads, TLS 1.3 (rustls client), ECDSA P-256 certificate.\n")
out.append("| load | peer | msgs/s | p50 µs | p99 µs | p99.9 µs | proxy CPU µs/msg |")
out.append("|---|---|---:|---:|---:|---:|---:|")
for load in ["100x1", "100x16", "1000x1"]:
    for peer in ["direct", "haproxy-tls", "gateway-tls"]:
        r = rows.get(f"{peer}-{load}", {})
        out.append(f"| {load} | {peer} | {f(r.get('msgs_per_sec'))} | {f(r.get('p50_us'))} | {f(r.get('p99_us'))} | {f(r.get('p999_us'))} | {f(r.get('cpu_us_per_msg'), '{:.2f}')} |")
out.append("")
out.append("| gateway / haproxy (TLS) | msgs/s | CPU per msg |")
out.append("|---|---:|---:|")
for load in ["100x1", "100x16", "1000x1"]:
    g, h = rows.get(f"gateway-tls-{load}", {}), rows.get(f"haproxy-tls-{load}", {})
    out.append(f"| {load} | {f(ratio(g.get('msgs_per_sec'), h.get('msgs_per_sec')), '{:.2f}')} | {f(ratio(g.get('cpu_us_per_msg'), h.get('cpu_us_per_msg')), '{:.2f}')} |")
out.append("")
out.append("| handshakes (50 churn loops) | peer | handshakes/s seen | proxy CPU µs each | handshakes/s per core (1e6 / CPU) |")
out.append("|---|---|---:|---:|---:|")
for kind, label in [("churn", "full"), ("churn-resume", "resumed")]:
    for peer in ["haproxy", "gateway"]:
        r = rows.get(f"{peer}-tls-{kind}", {})
        c = r.get("cpu_us_per_session")
        out.append(f"| {label} | {peer} | {f(r.get('sessions_per_sec'))} | {f(c, '{:.1f}')} | {f(1e6 / c if c else None)} |")
bad = [(k, r.get("errors"), r.get("missing")) for k, r in rows.items() if r.get("errors") or r.get("missing")]
if bad:
    out.append("")
    out.append("Runs with errors or missing replies: " + ", ".join(f"{k} (errors {e}, missing {m})" for k, e, m in bad) + ".")
m = rows.get("gateway-tls-idle-memory", {})
out.append("")
out.append(f"Idle memory: {f(m.get('bytes_per_session'), '{:,.0f}')} bytes RSS per bound idle TLS session ({m.get('sessions')} sessions, {m.get('rss_base_kb')} -> {m.get('rss_kb')} KiB).")
print("\n".join(out))
PY
echo
cat "$OUT/summary.md"
