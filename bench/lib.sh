# Shared by the bench/*.sh scripts (sourced): a scratch folder removed on
# exit with every process the script started, waits with a deadline that
# fail loudly, and the certificates and processes of a small cluster.

# The run's scratch folder; `on_exit` may name a function of the script's
# own to run first (e.g. stopping nginx).
D=$(mktemp -d)
on_exit=
cleanup() {
  [ -n "$on_exit" ] && "$on_exit"
  kill $(jobs -p) 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$D"
}
trap cleanup EXIT

# wait_until SECONDS WHAT COMMAND...: polls COMMAND every 0.1 s until it
# succeeds; past SECONDS, says WHAT did not happen and exits.
wait_until() {
  local secs=$1 what=$2
  local deadline=$((SECONDS + secs))
  shift 2
  until "$@" 2>/dev/null; do
    [ $SECONDS -lt $deadline ] || { echo "$what: not within $secs s" >&2; exit 1; }
    sleep 0.1
  done
}

# ready_field FILE KEY: a field of a ready file (`quic`, `admin`, ...).
ready_field() { python3 -c "import json;print(json.load(open('$1'))['$2'])"; }

# edge_ca NAME...: a CA in $D/ca, a node certificate for 127.0.0.1 in
# $D/NAME for each NAME, and the edge certificate for *.bench.test in $D/e.
edge_ca() {
  "$BIN" ca init --dir "$D/ca" >/dev/null
  for n in "$@"; do
    "$BIN" ca issue-node --ca-dir "$D/ca" --name "$n" --ip 127.0.0.1 --out "$D/$n" >/dev/null
  done
  "$BIN" ca issue-edge --ca-dir "$D/ca" --domain bench.test --out "$D/e" >/dev/null
}

# edge_node NAME ARGS...: a node with the certificates of NAME and the
# edge's, its QUIC port free, ARGS added (its ingress ports, --join);
# returns once it is ready, its address in $QUIC and its pid in $NODE.
edge_node() {
  local n=$1
  shift
  "$BIN" node --listen 127.0.0.1:0 --admin 127.0.0.1:0 --domain bench.test \
    --edge-cert "$D/e/edge.crt" --edge-key "$D/e/edge.key" --ca "$D/ca/ca.crt" \
    --cert "$D/$n/node.crt" --key "$D/$n/node.key" --ready-file "$D/ready-$n" "$@" 2>/dev/null &
  NODE=$!
  wait_until 10 "node $n ready" test -f "$D/ready-$n"
  QUIC=$(ready_field "$D/ready-$n" quic)
}

# attached_client TO NAME VIA: a tunnel client serving NAME (TO, e.g.
# tcp://HOST:PORT) through the node at VIA, one attachment; returns once
# it holds it.
attached_client() {
  "$BIN" tunnel --to "$1" --name "$2" --via "$3" --ca "$D/ca/ca.crt" --state-dir "$D/c-$2" \
    --attachments 1 --ready-file "$D/client-$2" >/dev/null 2>&1 &
  wait_until 20 "client $2 attached" python3 -c \
    "import json,sys;sys.exit(0 if json.load(open('$D/client-$2'))['healthy']==1 else 1)"
}
