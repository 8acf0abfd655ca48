#!/usr/bin/env bash
# The plain-HTTP proxy path as web visitors use it: wrk -> a specter node
# (--http-mode proxy) -> its tunnel client -> nginx serving a 1.3 KB file, beside
# wrk straight to nginx. Needs wrk and nginx (apt-get install wrk nginx-light).
#   bench/http_path.sh path/to/specter LABEL
# prints: | LABEL | c1 p50 | c64 req/s | node RSS after | direct nginx c1 p50, c64 req/s |
set -euo pipefail
BIN=$1; TAG=$2
D=$(mktemp -d)
# Stops what this run started and waits for it to be gone (the node leaves
# its cluster first; nginx within 5 s), so the next run can bind its ports.
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  nginx -c $D/nginx.conf -s stop 2>/dev/null || true
  for _ in $(seq 50); do [ -f $D/nginx.pid ] || break; sleep 0.1; done
}
trap cleanup EXIT
mkdir -p $D/www; head -c 1300 /dev/urandom | base64 -w0 | head -c 1300 > $D/www/file
cat > $D/nginx.conf <<NG
worker_processes 1; daemon on; pid $D/nginx.pid; error_log $D/err.log;
events { worker_connections 1024; }
http { access_log off; keepalive_timeout 75; keepalive_requests 100000;
  server { listen 127.0.0.1:18080; root $D/www; } }
NG
nginx -c $D/nginx.conf
$BIN ca init --dir $D/ca >/dev/null
$BIN ca issue-node --ca-dir $D/ca --name n --ip 127.0.0.1 --out $D/n >/dev/null
$BIN ca issue-edge --ca-dir $D/ca --domain bench.test --out $D/e >/dev/null
$BIN node --listen 127.0.0.1:0 --admin 127.0.0.1:0 --https 127.0.0.1:0 --http 127.0.0.1:18081 --http-mode proxy \
  --domain bench.test --edge-cert $D/e/edge.crt --edge-key $D/e/edge.key --ca $D/ca/ca.crt --cert $D/n/node.crt --key $D/n/node.key \
  --ready-file $D/ready --visitors-per-source 4096 2>/dev/null &
NODE=$!
for i in $(seq 100); do [ -f $D/ready ] && break; sleep 0.1; done
QUIC=$(python3 -c "import json;print(json.load(open('$D/ready'))['quic'])")
$BIN tunnel --to http://127.0.0.1:18080 --name web --via $QUIC --ca $D/ca/ca.crt --state-dir $D/c --attachments 1 >/dev/null 2>&1 &
for i in $(seq 100); do curl -sf -H "Host: web.bench.test" http://127.0.0.1:18081/file >/dev/null && break; sleep 0.1; done
url=http://127.0.0.1:18081/file
c1=$(wrk -t1 -c1 -d5s -H "Host: web.bench.test" --latency $url | awk '/50%/{print $2}')
c64=$(wrk -t2 -c64 -d5s -H "Host: web.bench.test" $url | awk '/Requests\/sec/{print $2}')
rss=$(awk '/VmRSS/{print $2}' /proc/$NODE/status)
d1=$(wrk -t1 -c1 -d3s --latency http://127.0.0.1:18080/file | awk '/50%/{print $2}')
d64=$(wrk -t2 -c64 -d3s http://127.0.0.1:18080/file | awk '/Requests\/sec/{print $2}')
echo "| $TAG | $c1 | $c64 | $rss KiB | direct nginx: $d1, $d64 req/s |"
