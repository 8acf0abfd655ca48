#!/usr/bin/env bash
# The raw-TCP path as a user takes it: iperf3 -> `specter connect` (a local
# listener, TLS to a node's ingress) -> a specter node -> its tunnel client
# -> iperf3 -s; one 5 s upload, beside iperf3 straight to the server. With
# `forwarded`, `specter connect` enters at a second node, which forwards to
# the node the client is attached to (the forwarded path). Needs iperf3
# (apt-get install iperf3).
#   bench/iperf_path.sh path/to/specter LABEL [forwarded]
# prints: | LABEL | through Specter Gbit/s | direct Gbit/s |
set -euo pipefail
BIN=$1; TAG=$2; PATH_KIND=${3:-direct}
. "$(dirname "$0")/lib.sh"
iperf3 -s -B 127.0.0.1 -p 18201 >/dev/null 2>&1 &
edge_ca a b
edge_node a --https 127.0.0.1:18202
attached_client tcp://127.0.0.1:18201 raw "$QUIC"
entry=18202
if [ "$PATH_KIND" = forwarded ]; then
  edge_node b --https 127.0.0.1:18204 --join "$QUIC"
  entry=18204
fi
"$BIN" connect raw.bench.test --via 127.0.0.1:$entry --ca "$D/ca/ca.crt" --listen 127.0.0.1:18203 >"$D/connect.out" 2>/dev/null &
# Ready once it says it listens (it has checked the name through the entry
# node): a probe connection would reach iperf3 -s, which serves one test at
# a time and refuses the next while it sees it.
wait_until 30 "specter connect listening" grep -q "^listening on" "$D/connect.out"
rate() { iperf3 -c 127.0.0.1 -p "$1" -t 5 -J | tee "$D/iperf-$1.json" | python3 -c "import json,sys;print('%.2f' % (json.load(sys.stdin)['end']['sum_received']['bits_per_second']/1e9))"; }
through=$(rate 18203) || { grep -h error "$D/iperf-18203.json" >&2; exit 1; }
direct=$(rate 18201)
echo "| $TAG | $through | $direct |"
