#!/usr/bin/env bash
# Chaos-kill run: real `specter` processes on 127.0.0.101.., steady HTTPS load
# through every node, a node SIGKILLed every few seconds and restarted.
#
#   tests/chaos-kill.sh                       # 5 nodes, a kill every 5 s, 60 s
#   tests/chaos-kill.sh --mode replica        # kill replica holders instead
#   tests/chaos-kill.sh --nodes 7 --period 3 --duration 30 --restart-after 1.5
#
# Exits non-zero if a request failed through an entry node that was up for
# the whole request, if a body did not match its checksum, or if the client
# did not get back to k attachments after a kill. See tests/chaos/main.rs.
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo test --release --quiet --test chaos -- "$@"
