#!/usr/bin/env bash
# The plain-HTTP proxy path as web visitors use it: wrk -> a specter node
# (--http-mode proxy) -> its tunnel client -> nginx serving a 1.3 KB file, beside
# wrk straight to nginx. Needs wrk and nginx (apt-get install wrk nginx-light).
#   bench/http_path.sh path/to/specter LABEL
# prints: | LABEL | c1 p50 | c64 req/s | node RSS after | direct nginx c1 p50, c64 req/s |
set -euo pipefail
BIN=$1; TAG=$2
. "$(dirname "$0")/lib.sh"
# nginx stops within 5 s, so the next run can bind its port.
stop_nginx() {
  nginx -c $D/nginx.conf -s stop 2>/dev/null || true
  for _ in $(seq 50); do [ -f $D/nginx.pid ] || break; sleep 0.1; done
}
on_exit=stop_nginx
# nginx's workers (user nobody) read the file: mktemp's folder is private.
chmod 755 $D
mkdir -p $D/www; head -c 1300 /dev/urandom | base64 -w0 | head -c 1300 > $D/www/file
cat > $D/nginx.conf <<NG
worker_processes 1; daemon on; pid $D/nginx.pid; error_log $D/err.log;
events { worker_connections 1024; }
http { access_log off; keepalive_timeout 75; keepalive_requests 100000;
  server { listen 127.0.0.1:18080; root $D/www; } }
NG
nginx -c $D/nginx.conf
edge_ca n
edge_node n --https 127.0.0.1:0 --http 127.0.0.1:18081 --http-mode proxy --visitors-per-source 4096
attached_client http://127.0.0.1:18080 web "$QUIC"
wait_until 10 "web.bench.test answering" curl -sf -H "Host: web.bench.test" http://127.0.0.1:18081/file -o /dev/null
url=http://127.0.0.1:18081/file
# wrk counts any answer; a run with one that is not 2xx measured something
# else (an error page) and fails.
load() {
  wrk "$@" > $D/wrk.out
  ! grep -q "Non-2xx" $D/wrk.out || { cat $D/wrk.out >&2; exit 1; }
  cat $D/wrk.out
}
c1=$(load -t1 -c1 -d5s -H "Host: web.bench.test" --latency $url | awk '/50%/{print $2}')
c64=$(load -t2 -c64 -d5s -H "Host: web.bench.test" $url | awk '/Requests\/sec/{print $2}')
rss=$(awk '/VmRSS/{print $2}' /proc/$NODE/status)
d1=$(load -t1 -c1 -d3s --latency http://127.0.0.1:18080/file | awk '/50%/{print $2}')
d64=$(load -t2 -c64 -d3s http://127.0.0.1:18080/file | awk '/Requests\/sec/{print $2}')
echo "| $TAG | $c1 | $c64 | $rss KiB | direct nginx: $d1, $d64 req/s |"
