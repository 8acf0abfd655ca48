#!/usr/bin/env bash
# Idle memory of the nodes of a real cluster: N `specter node` processes on
# 127.0.60.1..N (no ingress), each joining the first; once every node's
# /status lists the N - 1 others alive, waits SETTLE seconds more and prints the mean
# over the nodes of VmRSS, RssAnon (what a node owns) and RssFile (the binary
# and libraries as mapped, pages the page cache shares between processes).
#   bench/idle_cluster.sh path/to/specter N [SETTLE] [LABEL]
# prints: | LABEL | N nodes | RSS | anonymous | file-backed |   (kB, means)
set -euo pipefail
BIN=$1; N=$2; SETTLE=${3:-20}; TAG=${4:-$N}
[ "$N" -ge 1 ] && [ "$N" -le 250 ] || { echo "N: 1 to 250" >&2; exit 2; }
. "$(dirname "$0")/lib.sh"
"$BIN" ca init --dir "$D/ca" >/dev/null
for i in $(seq "$N"); do
  "$BIN" ca issue-node --ca-dir "$D/ca" --name "n$i" --ip "127.0.60.$i" --out "$D/n$i" >/dev/null
done
start() { # i [join]
  local i=$1
  "$BIN" node --listen "127.0.60.$i:7000" --admin "127.0.60.$i:0" --ca "$D/ca/ca.crt" \
    --cert "$D/n$i/node.crt" --key "$D/n$i/node.key" --ready-file "$D/ready$i" \
    ${2:+--join "$2"} 2>/dev/null &
}
start 1
wait_until 10 "node 1 ready" test -f "$D/ready1"
for i in $(seq 2 "$N"); do start "$i" 127.0.60.1:7000; done
admin() { ready_field "$D/ready$1" admin; }
# Ready: every node sees the N - 1 others alive (deadline 120 s).
deadline=$((SECONDS + 120))
for i in $(seq "$N"); do
  until [ -f "$D/ready$i" ] && curl -sf "http://$(admin "$i")/status" 2>/dev/null \
      | python3 -c "import json,sys;s=json.load(sys.stdin);sys.exit(0 if sum(1 for m in s['members'] if m['state']=='alive')==$N-1 else 1)"; do
    [ $SECONDS -lt $deadline ] || { echo "node $i did not see the $((N - 1)) others in time" >&2; exit 1; }
    sleep 0.2
  done
done
sleep "$SETTLE"
pids=$(jobs -p)
field() { for p in $pids; do awk -v f="$1:" '$1==f{print $2}' "/proc/$p/status"; done \
  | awk '{s+=$1; n++} END {printf "%d", s/n}'; }
echo "| $TAG | $N nodes | $(field VmRSS) | $(field RssAnon) | $(field RssFile) |"
