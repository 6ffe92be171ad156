#!/usr/bin/env bash
# sysc.sh: syscalls / io_uring ops / context switches per message, nginx-ws vs gateway-ws vs gateway-tcp
BIN=/work/target-wsbench/release
MOCK=127.0.0.1:29762; WSECHO=127.0.0.1:29863; GW=127.0.0.1:28495; GWE=127.0.0.1:28496; NGX=127.0.0.1:28497
TMP=$(mktemp -d)
taskset -c 1 $BIN/mock-backend --listen $MOCK --quiet >/dev/null 2>&1 & MP=$!
taskset -c 1 $BIN/gw-echo --mode ws --listen $WSECHO >/dev/null 2>&1 & EP=$!
cat > $TMP/nginx.conf <<CFG
daemon off; master_process off; worker_processes 1;
error_log $TMP/err.log warn; pid $TMP/nginx.pid;
events { worker_connections 9000; }
http { access_log off; client_body_temp_path $TMP/b; proxy_temp_path $TMP/p; fastcgi_temp_path $TMP/f; uwsgi_temp_path $TMP/u; scgi_temp_path $TMP/s;
  server { listen $NGX; location / { proxy_pass http://$WSECHO; proxy_http_version 1.1; proxy_set_header Upgrade \$http_upgrade; proxy_set_header Connection "upgrade"; } } }
CFG
taskset -c 0 nginx -c $TMP/nginx.conf -p $TMP >/dev/null 2>&1 & NP=$!
for d in io_uring epoll; do
  port=$GW; [ $d = epoll ] && port=$GWE
  cat > $TMP/gw-$d.toml <<CFG
[server]
listen = "$port"
admin_listen = "127.0.0.1:0"
workers = 1
cpus = [0]
[log]
level = "warn"
access_log = false
[[routes]]
server_type = 10
service_name = "bench"
strategy = "round_robin"
endpoints = ["$MOCK"]
CFG
  $BIN/game-gateway --config $TMP/gw-$d.toml --io-driver $d >/dev/null 2>/dev/null &
  [ $d = epoll ] && GEP=$! || GIP=$!
done
sleep 1
meas() { # label target pid wsflag S K
  local label=$1 target=$2 pid=$3 ws=$4 S=$5 K=$6
  taskset -c 1 $BIN/gw-load $ws --target $target --sessions $S --inflight $K --duration 6 --warmup 1 --json 2>/dev/null | tail -1 > $TMP/load.json &
  local lp=$!
  sleep 2
  local t0=$(awk '{print $14+$15}' /proc/$pid/stat)
  perf stat -x, -e raw_syscalls:sys_enter,io_uring:io_uring_submit_req,sched:sched_switch,context-switches -p $pid -o $TMP/ps.txt -- sleep 4 >/dev/null 2>&1
  local t1=$(awk '{print $14+$15}' /proc/$pid/stat)
  wait $lp
  python3 - "$label" $S $K $((t1-t0)) $TMP/ps.txt $TMP/load.json <<'PY'
import sys, json
label, S, K, dt, ps, lj = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5], sys.argv[6]
r = json.load(open(lj)); rate = r["msgs_per_sec"]; msgs = rate * 4
c = {}
for l in open(ps):
    p = l.strip().split(",")
    if len(p) > 2 and p[0].replace('.','').isdigit():
        c[p[2]] = float(p[0])
print("%-14s %sx%-3s %8.0f msgs/s  cpu %.2f us/msg  syscalls %.2f  uring ops %.2f  ctxsw %.3f /msg" % (label, S, K, rate, dt/100*1e6/msgs,
   c.get("raw_syscalls:sys_enter",0)/msgs, c.get("io_uring:io_uring_submit_req",0)/msgs, c.get("sched:sched_switch",0)/msgs))
PY
}
for l in "100 1" "100 16" "1000 1"; do set -- $l
  meas nginx-ws $NGX $NP --ws $1 $2
  meas gw-ws-uring $GW $GIP --ws $1 $2
  meas gw-ws-epoll $GWE $GEP --ws $1 $2
  meas gw-tcp-uring $GW $GIP "" $1 $2
  meas gw-tcp-epoll $GWE $GEP "" $1 $2
done
kill $NP $GIP $GEP; sleep 0.3; kill $MP $EP; wait 2>/dev/null; rm -rf $TMP
