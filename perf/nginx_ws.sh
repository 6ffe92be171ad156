# Shared by perf/compare-ws.sh and perf/floor.sh: nginx proxying WebSocket
# (http block, one worker, master_process off, access_log off, default
# buffers) to a WebSocket echo.
#
# nginx_ws_conf DIR LISTEN BACKEND: writes DIR/nginx.conf (temp files, log
# and pid under DIR).
nginx_ws_conf() {
  local dir=$1 listen=$2 backend=$3
  mkdir -p "$dir/ngx"
  cat >"$dir/nginx.conf" <<CFG
daemon off;
master_process off;
worker_processes 1;
error_log $dir/nginx-error.log warn;
pid $dir/nginx.pid;
events { worker_connections 9000; }
http {
  access_log off;
  client_body_temp_path $dir/ngx/body;
  proxy_temp_path $dir/ngx/proxy;
  fastcgi_temp_path $dir/ngx/fastcgi;
  uwsgi_temp_path $dir/ngx/uwsgi;
  scgi_temp_path $dir/ngx/scgi;
  server {
    listen $listen;
    location / {
      proxy_pass http://$backend;
      proxy_http_version 1.1;
      proxy_set_header Upgrade \$http_upgrade;
      proxy_set_header Connection "upgrade";
    }
  }
}
CFG
}
