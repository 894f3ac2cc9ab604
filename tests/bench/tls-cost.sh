#!/usr/bin/env bash
# The cost of the authenticated transport: the cluster throughput benchmark (tests/bench/
# cluster.sh, phase 1) with the built-in cluster PKI (mutual TLS, the default) and with plain
# TCP (--insecure-raft-transport), alternating, in one run on the same machine.
#   bash tests/bench/tls-cost.sh [ROUNDS]        (default 2; each round runs both)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROUNDS="${1:-2}"
for round in $(seq 1 "$ROUNDS"); do
  echo "# round $round: cluster PKI (mutual TLS)"
  PHASES=throughput KMSD_ARGS="" bash tests/bench/cluster.sh 1 0
  echo "# round $round: plain TCP (--insecure-raft-transport)"
  PHASES=throughput KMSD_ARGS="--insecure-raft-transport" bash tests/bench/cluster.sh 1 0
done
