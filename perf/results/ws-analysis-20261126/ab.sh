#!/usr/bin/env bash
# ab.sh ROUNDS SECS : alternates gateway binaries (base, A, B) and nginx-ws; prints CPU us/msg
set -uo pipefail
BIN=/work/target-wsbench/release
R=${1:-3}; SECS=${2:-5}; WARM=1
MOCK=127.0.0.1:29742; WSECHO=127.0.0.1:29843; GWP=28480; NGX=127.0.0.1:28477
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
declare -A GP
i=0
for b in base A B; do
  port=$((GWP+i)); i=$((i+1))
  cat > $TMP/gw-$b.toml <<CFG
[server]
listen = "127.0.0.1:$port"
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
  /tmp/wsexp/game-gateway-$b --config $TMP/gw-$b.toml >/dev/null 2>$TMP/gw-$b.log & GP[$b]=$!
  eval "PORT_$b=$port"
done
sleep 1; kill -0 $NP || { echo nginx died; cat $TMP/err.log; }
ticks() { awk '{print $14+$15}' /proc/$1/stat; }
run() { # label target pid ws args
  local label=$1 target=$2 pid=$3 ws=$4; shift 4
  local a b out
  a=$(ticks $pid)
  out=$(taskset -c 1 $BIN/gw-load $ws --target $target --duration $SECS --warmup $WARM --json "$@" 2>/dev/null | tail -1)
  b=$(ticks $pid)
  python3 -c "
import json,sys; r=json.loads(sys.argv[1]); m=r['msgs_per_sec']*($SECS+$WARM)
open('/tmp/wsexp/ab.jsonl','a').write(json.dumps({'label':'$label','load':'$*'.replace('--sessions ','').replace(' --inflight ','x'),'rate':r['msgs_per_sec'],'cpu':($b-$a)/100*1e6/m,'err':r['errors']+r['missing']})+chr(10))
print('%-16s %-7s %9.0f msgs/s cpu/msg %.2f us  err=%d miss=%d' % ('$label', '$*'.replace('--sessions ','').replace(' --inflight ','x'), r['msgs_per_sec'], ($b-$a)/100*1e6/m, r['errors'], r['missing']))" "$out"
}
for r in $(seq $R); do
  for load in "100 1" "100 16" "1000 1"; do
    set -- $load
    run nginx-ws $NGX $NP --ws --sessions $1 --inflight $2
    for b in base A B; do
      p=PORT_$b
      run gw-ws-$b 127.0.0.1:${!p} ${GP[$b]} --ws --sessions $1 --inflight $2
    done
    run gw-tcp-base 127.0.0.1:$PORT_base ${GP[base]} "" --sessions $1 --inflight $2
  done
done
for p in ${GP[@]} $NP; do kill $p; done; sleep 0.3; kill $MP $EP; wait 2>/dev/null; rm -rf $TMP
