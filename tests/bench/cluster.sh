#!/usr/bin/env bash
# Cluster benchmarks, all on loopback, every process stopped by its pid:
#   1. durable-activation throughput: a 3-node cluster vs a single node, same kmsctl load,
#      side by side in one run (through the leader and through a follower);
#   2. failover: leader kill -9 -> first successful (committed) activation through a
#      survivor, over TRIALS trials (p50/p99);
#   3. catch-up: time for a new node to join a cluster holding CLIENTS registered clients;
#      plus resident memory, data dir and snapshot size at that size (for docs/capacity.md).
#
#   bash tests/bench/cluster.sh [TRIALS] [CLIENTS]      (defaults 20 and 100000)
#
# PHASES picks sections (default "throughput failover catchup"); KMSD_ARGS adds flags to every
# kmsd, e.g. KMSD_ARGS="--raft-heartbeat-ms 50 --raft-election-timeout-min-ms 250
# --raft-election-timeout-max-ms 500" PHASES=failover to measure other election timings.
# REJOIN_WAIT_SECS (default 1) is the pause after the killed node rejoins, before the next
# trial; 0 kills the next leader as soon as the rejoined node is ready. FAILOVER_SIGNAL=TERM
# stops the leader gracefully instead of kill -9 (it hands leadership over first, as in a
# rolling update).
#
# NODE_CPUS=0.5 gives every kmsd process (the single node and each cluster node) its own CPU
# budget of that many cores through a cgroup (root, cgroup v1 or v2), which emulates one
# machine per node of equal size; without it all nodes share the same cores as the load
# generator, so the cluster does three times the work on the same CPUs.
set -euo pipefail
cd "$(dirname "$0")/../.."
TRIALS="${1:-20}"
PHASES=" ${PHASES:-throughput failover catchup} "
read -r -a EXTRA <<<"${KMSD_ARGS:-}"
REJOIN_WAIT_SECS="${REJOIN_WAIT_SECS:-1}"
FAILOVER_SIGNAL="${FAILOVER_SIGNAL:-KILL}"
CLIENTS="${2:-100000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kms-cluster-target}"
cargo build --release --locked -p kmsd -p kmsctl >/dev/null 2>&1
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
declare -A PID
CGROUPS=()
cleanup() {
  for p in "${PID[@]}"; do kill -9 "$p" 2>/dev/null || true; done
  sleep 0.2
  for g in "${CGROUPS[@]}"; do rmdir "$g" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT
# Puts process $2 into its own CPU-limited cgroup named after node $1 (NODE_CPUS cores).
limit_cpu() {
  [ -n "${NODE_CPUS:-}" ] || return 0
  local id=$1 pid=$2 period=10000 quota g
  quota=$(python3 -c "print(int(float('$NODE_CPUS') * $period))")
  if [ -f /sys/fs/cgroup/cgroup.controllers ] && grep -qw cpu /sys/fs/cgroup/cgroup.controllers; then
    echo +cpu > /sys/fs/cgroup/cgroup.subtree_control 2>/dev/null || true
    g=/sys/fs/cgroup/kmsbench-$$-$id
    mkdir -p "$g"; echo "$quota $period" > "$g/cpu.max"
  elif [ -d /sys/fs/cgroup/cpu ]; then
    g=/sys/fs/cgroup/cpu/kmsbench-$$-$id
    mkdir -p "$g"; echo "$period" > "$g/cpu.cfs_period_us"; echo "$quota" > "$g/cpu.cfs_quota_us"
  else
    echo "NODE_CPUS needs a writable cgroup cpu controller" >&2; exit 1
  fi
  CGROUPS+=("$g")
  echo "$pid" > "$g/cgroup.procs"
}
BASE=${BENCH_PORT_BASE:-24000}  # below the ephemeral port range
kms() { echo "127.0.0.1:$((BASE + $1))"; }
admin() { echo "127.0.0.1:$((BASE + 100 + $1))"; }
raft() { echo "127.0.0.1:$((BASE + 200 + $1))"; }

# Node-to-node transport: the built-in cluster PKI (mutual TLS; nodes join with a shared
# cluster secret) unless KMSD_ARGS says --insecure-raft-transport (plain TCP, admin-API join).
INSECURE=0
for a in "${EXTRA[@]}"; do [ "$a" = "--insecure-raft-transport" ] && INSECURE=1; done
if [ "$INSECURE" = 0 ]; then
  (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$WORK/cluster.secret")
  EXTRA+=(--cluster-secret-file "$WORK/cluster.secret")
fi
start() { # id [join-id]
  local id=$1 join=()
  if [ -n "${2:-}" ]; then
    if [ "$INSECURE" = 1 ]; then join=(--join "http://$(admin "$2")"); else join=(--join "$(raft "$2")"); fi
  fi
  "$BIN/kmsd" --node-id "$id" --data-dir "$WORK/n$id" --kms-listen "$(kms "$id")" \
    --admin-listen "$(admin "$id")" --raft-listen "$(raft "$id")" --log-level warn \
    "${EXTRA[@]}" "${join[@]}" >>"$WORK/n$id.log" 2>&1 &
  PID[$id]=$!
  disown "$!"  # the kill -9 trials are expected: no "Killed" job notices in the report
  limit_cpu "$id" "${PID[$id]}"
  for _ in $(seq 1 300); do
    curl -sf "http://$(admin "$id")/readyz" >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  echo "node $id not ready" >&2; tail -20 "$WORK/n$id.log" >&2; exit 1
}
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print(eval(sys.argv[1]))" "$1"; }
leader_of() { curl -s "http://$(admin "$1")/api/v1/cluster" | json 'd["leader_id"]'; }
bench() { # node concurrency requests [extra]
  local node=$1 c=$2 n=$3; shift 3
  "$BIN/kmsctl" bench --server "$(kms "$node")" --concurrency "$c" --requests "$n" \
    --duration-secs 120 --json "$@"
}

[ -n "${KMSD_ARGS:-}" ] && echo "kmsd flags: $KMSD_ARGS"
start 1; start 2 1; start 3 1
if [[ "$PHASES" == *" throughput "* ]]; then
echo "## 1. Throughput: 3-node cluster vs single node (kmsctl bench, keep-alive, 64 clients; CPU per node: ${NODE_CPUS:-shared})"
start 9                      # the single node
L=$(leader_of 1); F=$(( L == 1 ? 2 : 1 ))
printf '| target | requests/s | p50 ms | p99 ms | failed |\n|---|---|---|---|---|\n'
for round in 1 2; do
  for target in 9 "$L" "$F"; do
    r=$(bench "$target" 64 30000)
    name=$([ "$target" = 9 ] && echo "single node" || { [ "$target" = "$L" ] && echo "cluster leader" || echo "cluster follower"; })
    printf '| %s (round %s) | %s | %s | %s | %s |\n' "$name" "$round" \
      "$(echo "$r" | json 'round(d["requests_per_sec"])')" "$(echo "$r" | json 'd["latency_ms"]["p50"]')" \
      "$(echo "$r" | json 'd["latency_ms"]["p99"]')" "$(echo "$r" | json 'd["failed"]')"
  done
done
kill -9 "${PID[9]}"; unset 'PID[9]'
fi

if [[ "$PHASES" == *" failover "* ]]; then
echo
echo "## 2. Failover: leader SIG$FAILOVER_SIGNAL -> first committed activation through a survivor ($TRIALS trials)"
: > "$WORK/failover.txt"
for _ in $(seq 1 "$TRIALS"); do
  L=$(leader_of 1 2>/dev/null || leader_of 2)
  S=$(( L == 1 ? 2 : 1 ))
  t0=$(date +%s%N)
  victim=${PID[$L]}
  kill -s "$FAILOVER_SIGNAL" "$victim"; unset "PID[$L]"
  # The first activation answered through the survivor after a new leader is known there:
  while true; do
    nl=$(curl -s --max-time 1 "http://$(admin "$S")/api/v1/cluster" | json 'd["leader_id"]' 2>/dev/null || echo None)
    if [ "$nl" != "None" ] && [ "$nl" != "$L" ] && [ -n "$nl" ]; then
      if "$BIN/kmsctl" activate --server "$(kms "$S")" --timeout-secs 5 --quiet >/dev/null 2>&1; then break; fi
    fi
    sleep 0.02
  done
  t1=$(date +%s%N)
  echo $(( (t1 - t0) / 1000000 )) >> "$WORK/failover.txt"
  # A gracefully stopping node still holds its ports until it exits.
  for _ in $(seq 1 750); do kill -0 "$victim" 2>/dev/null || break; sleep 0.02; done
  start "$L"                 # rejoins from its data dir
  sleep "$REJOIN_WAIT_SECS"
done
python3 - "$WORK/failover.txt" <<'EOF'
import sys
v = sorted(int(x) for x in open(sys.argv[1]))
pick = lambda q: v[min(len(v) - 1, round((len(v) - 1) * q))]
print(f"trials {len(v)}: min {v[0]} ms, p50 {pick(0.5)} ms, p99 {pick(0.99)} ms, max {v[-1]} ms")
print("all (ms):", " ".join(map(str, v)))
EOF
fi

[[ "$PHASES" == *" catchup "* ]] || exit 0
echo
echo "## 3. Catch-up of a new node with $CLIENTS registered clients"
bench 1 64 "$CLIENTS" >/dev/null
sleep 2
rss() { awk '/VmRSS/{print int($2/1024)}' "/proc/$1/status"; }
L=$(leader_of 1)
clients=$(curl -s "http://$(admin "$L")/metrics" | awk '/^kms_registered_clients /{print $2}')
echo "registered clients on the leader: $clients"
for id in 1 2 3; do
  echo "node $id: RSS $(rss "${PID[$id]}") MiB, data dir $(du -sm "$WORK/n$id" | cut -f1) MiB"
done
snap=$(find "$WORK/n$L" -name snapshot -type f -printf '%s\n' | head -n1)
echo "snapshot file on the leader: $((${snap:-0} / 1024)) KiB"
t0=$(date +%s%N)
start 4 1
while true; do
  n=$(curl -s "http://$(admin 4)/metrics" | awk '/^kms_registered_clients /{print $2}')
  [ "${n%.*}" = "${clients%.*}" ] && break
  sleep 0.05
done
t1=$(date +%s%N)
echo "node 4 caught up with ${clients} clients in $(( (t1 - t0) / 1000000 )) ms (process start to full registry); RSS $(rss "${PID[4]}") MiB"
