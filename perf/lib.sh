# Shared by perf/compare*.sh: CPU ticks and RSS of a process, and `run`,
# which runs one gw-load and appends its JSON line (with the proxy's CPU per
# message) to $RES. Expects BIN, SECS, WARM and RES to be set.

# haproxy_tcp_conf LISTEN BACKEND: HAProxy in TCP mode, one thread, one
# server (as perf/ab.sh and perf/floor.sh run it), on stdout.
haproxy_tcp_conf() {
  printf 'global\n  nbthread 1\n  maxconn 9000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 120s\n  timeout server 120s\nfrontend g\n  bind %s\n  default_backend e\nbackend e\n  server s1 %s\n' "$1" "$2"
}

ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
# user and system ticks apart: "utime stime"
ticks2() { awk '{print $14, $15}' "/proc/$1/stat"; }
# The machine's context switches, and core 1's (the load side's) idle and
# total ticks: "ctxt idle1 total1".
machine() { awk '$1 == "ctxt" {c = $2} $1 == "cpu1" {i = $5 + $6; t = $2+$3+$4+$5+$6+$7+$8+$9} END {print c, i, t}' /proc/stat; }
rss_kb() { awk '/VmRSS/ {print $2}' "/proc/$1/status"; }
TCK=$(getconf CLK_TCK)

# run LABEL TARGET PID(or -) gw-load-args...
run() {
  local label=$1 target=$2 pid=$3; shift 3
  local before="0 0" after="0 0" m0 m1
  [ "$pid" != - ] && before=$(ticks2 "$pid")
  m0=$(machine)
  local out
  out=$(taskset -c 1 $BIN/gw-load --target "$target" --duration "$SECS" --warmup $WARM --label "$label" --json "$@" 2>/dev/null | tail -1) || true
  [ "$pid" != - ] && after=$(ticks2 "$pid")
  m1=$(machine)
  python3 - "$out" "$before" "$after" "$TCK" "$SECS" "$WARM" "$m0" "$m1" >>"$RES" <<'PY'
import json, sys
out, tck, secs, warm = sys.argv[1], int(sys.argv[4]), float(sys.argv[5]), float(sys.argv[6])
(ub, sb), (ua, sa) = (map(int, sys.argv[2].split())), (map(int, sys.argv[3].split()))
before, after = ub + sb, ua + sa
try:
    r = json.loads(out)
except Exception:
    r = {"label": "?", "error": out}
cpu_s = (after - before) / tck
# CPU over the whole run (warm-up + measured + drain) divided by the
# messages of the whole run, estimated from the measured rate.
msgs = r.get("msgs_per_sec", 0) * (secs + warm)
sess = r.get("sessions_per_sec", 0) * (secs + warm)
r["proxy_cpu_s"] = cpu_s
r["cpu_us_per_msg"] = (cpu_s * 1e6 / msgs) if msgs and after else None
r["cpu_us_per_session"] = (cpu_s * 1e6 / sess) if sess and after else None
# The kernel's share (stime): on loopback most of a proxy's CPU.
r["sys_us_per_msg"] = ((sa - sb) / tck * 1e6 / msgs) if msgs and after else None
# The whole machine's context switches per message, and how idle the load
# side's core was (over the whole run).
(c0, i0, t0), (c1, i1, t1) = (map(int, sys.argv[7].split())), (map(int, sys.argv[8].split()))
r["ctxt_per_msg"] = ((c1 - c0) / msgs) if msgs else None
r["core1_idle_pct"] = (100 * (i1 - i0) / (t1 - t0)) if t1 > t0 else None
print(json.dumps(r))
PY
  tail -1 "$RES" | python3 -c '
import json, sys
r = json.load(sys.stdin)
g = r.get
print("%24s: %10.0f msgs/s %8.0f sess/s p50=%sus p99=%sus p99.9=%sus cpu/msg=%s errors=%s missing=%s" % (
    g("label"), g("msgs_per_sec", 0), g("sessions_per_sec", 0), g("p50_us"), g("p99_us"), g("p999_us"),
    g("cpu_us_per_msg"), g("errors"), g("missing")))'
}

