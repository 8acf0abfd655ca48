#!/usr/bin/env bash
# The raw-TCP path as a user takes it: iperf3 -> `specter connect` (a local
# listener, TLS to the node's ingress) -> a specter node -> its tunnel client
# (attached to that node) -> iperf3 -s; one 5 s upload, beside iperf3 straight
# to the server. Needs iperf3 (apt-get install iperf3).
#   bench/iperf_path.sh path/to/specter LABEL
# prints: | LABEL | through Specter Gbit/s | direct Gbit/s |
set -euo pipefail
BIN=$1; TAG=$2
D=$(mktemp -d)
cleanup() {
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT
iperf3 -s -B 127.0.0.1 -p 18201 >/dev/null 2>&1 &
$BIN ca init --dir $D/ca >/dev/null
$BIN ca issue-node --ca-dir $D/ca --name n --ip 127.0.0.1 --out $D/n >/dev/null
$BIN ca issue-edge --ca-dir $D/ca --domain bench.test --out $D/e >/dev/null
$BIN node --listen 127.0.0.1:0 --admin 127.0.0.1:0 --https 127.0.0.1:18202 \
  --domain bench.test --edge-cert $D/e/edge.crt --edge-key $D/e/edge.key --ca $D/ca/ca.crt --cert $D/n/node.crt --key $D/n/node.key \
  --ready-file $D/ready 2>/dev/null &
for i in $(seq 100); do [ -f $D/ready ] && break; sleep 0.1; done
QUIC=$(python3 -c "import json;print(json.load(open('$D/ready'))['quic'])")
$BIN tunnel --to tcp://127.0.0.1:18201 --name raw --via $QUIC --ca $D/ca/ca.crt --state-dir $D/c \
  --attachments 1 --ready-file $D/client-ready >/dev/null 2>&1 &
for i in $(seq 200); do
  [ -f $D/client-ready ] && python3 -c "import json,sys;sys.exit(0 if json.load(open('$D/client-ready'))['healthy']==1 else 1)" && break
  sleep 0.1
done
$BIN connect raw.bench.test --via 127.0.0.1:18202 --ca $D/ca/ca.crt --listen 127.0.0.1:18203 >$D/connect.out 2>/dev/null &
# Ready once it says it listens: a probe connection would reach iperf3 -s,
# which serves one test at a time and refuses the next while it sees it.
for i in $(seq 100); do grep -q "^listening on" $D/connect.out 2>/dev/null && break; sleep 0.1; done
rate() { iperf3 -c 127.0.0.1 -p "$1" -t 5 -J | tee $D/iperf-$1.json | python3 -c "import json,sys;print('%.2f' % (json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e9))"; }
through=$(rate 18203) || { grep -h error $D/iperf-18203.json >&2; exit 1; }
direct=$(rate 18201)
echo "| $TAG | $through | $direct |"
