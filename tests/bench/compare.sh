#!/usr/bin/env bash
# Side-by-side benchmark: kmsd (durable) vs a reference KMS server binary, same machine, same
# kmsctl load, one run. The reference binary is not part of this project: pass its path.
#
#   VLMCSD=/path/to/vlmcsd bash tests/bench/compare.sh [REQUESTS]
#
# Prints a markdown table for docs/benchmarks.md. Every run is bounded in count and time and
# every process started here is stopped by its pid. As root with a cgroup CPU accounting
# controller (v1 cpuacct or v2), each server runs in its own group (forked children included)
# and the table adds the server's CPU time per request.
set -euo pipefail
cd "$(dirname "$0")/../.."
REQUESTS="${1:-20000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kms-cluster-target}"
cargo build --release --locked -p kmsd -p kmsctl >/dev/null
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
pids=()
groups=()
cleanup() {
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for g in "${groups[@]}"; do rmdir "$g" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

# Puts pid $2 into a CPU accounting group named $1; prints the group (empty if none can be made).
account() {
  local g=""
  if [ -f /sys/fs/cgroup/cgroup.controllers ]; then
    g=/sys/fs/cgroup/kmscompare-$$-$1
  elif [ -d /sys/fs/cgroup/cpuacct ]; then
    g=/sys/fs/cgroup/cpuacct/kmscompare-$$-$1
  fi
  if [ -n "$g" ] && mkdir -p "$g" 2>/dev/null && echo "$2" > "$g/cgroup.procs" 2>/dev/null; then
    echo "$g"
  fi
}
# CPU time of a group in microseconds.
cpu_us() {
  if [ -f "$1/cpu.stat" ] && grep -q usage_usec "$1/cpu.stat"; then
    awk '/^usage_usec/{print $2}' "$1/cpu.stat"
  else
    echo $(( $(cat "$1/cpuacct.usage") / 1000 ))
  fi
}

KMSD_PORT=${KMSD_PORT:-24810}  # fixed ports stay below the ephemeral range
REF_PORT=${REF_PORT:-24820}
"$BIN/kmsd" --kms-listen "127.0.0.1:$KMSD_PORT" --admin-listen 127.0.0.1:24811 \
  --raft-listen 127.0.0.1:24812 --data-dir "$WORK/kmsd" --log-level warn 2>"$WORK/kmsd.log" &
pids+=($!); KMSD_PID=$!
KMSD_GROUP=$(account kmsd "$KMSD_PID")
[ -n "$KMSD_GROUP" ] && groups+=("$KMSD_GROUP")
REF_GROUP=""
if [ -n "${VLMCSD:-}" ]; then
  "$VLMCSD" -D -L "127.0.0.1:$REF_PORT" -N1 -B1 -m 1000 -t 30 >"$WORK/ref.log" 2>&1 &
  pids+=($!)
  REF_GROUP=$(account ref $!)
  [ -n "$REF_GROUP" ] && groups+=("$REF_GROUP")
fi
sleep 1

bench() { # server mode concurrency [extra args]
  local server=$1 mode=$2 conc=$3; shift 3
  local flags=()
  [ "$mode" = "new-connection" ] && flags+=(--new-connection)
  "$BIN/kmsctl" bench --server "$server" --concurrency "$conc" --requests "$REQUESTS" \
    --duration-secs 60 --json "${flags[@]}" "$@"
}
field() { python3 -c "import json,sys; d=json.loads(sys.argv[1]); print(eval(sys.argv[2]))" "$1" "$2"; }
# Runs bench against $1 with CPU accounting group $2; sets RESULT and CPU (us per request or -).
measured() {
  local server=$1 group=$2; shift 2
  local before=0
  [ -n "$group" ] && before=$(cpu_us "$group")
  RESULT=$(bench "$server" "$@")
  CPU="-"
  if [ -n "$group" ]; then
    local ok; ok=$(field "$RESULT" 'd["succeeded"]')
    if [ "$ok" -gt 0 ]; then CPU=$(( ($(cpu_us "$group") - before) / ok )); fi
  fi
}

echo "| mode | concurrency | kmsd req/s | kmsd p50 / p99 ms | kmsd CPU us/req | reference req/s | reference p50 / p99 ms | reference CPU us/req | kmsd / reference |"
echo "|---|---|---|---|---|---|---|---|---|"
for mode in keep-alive new-connection; do
  for conc in 1 64; do
    measured "127.0.0.1:$KMSD_PORT" "$KMSD_GROUP" $mode $conc
    a=$RESULT; ac=$CPU
    ar=$(field "$a" 'round(d["requests_per_sec"])')
    al="$(field "$a" 'round(d["latency_ms"]["p50"],3)') / $(field "$a" 'round(d["latency_ms"]["p99"],3)')"
    if [ -n "${VLMCSD:-}" ]; then
      measured "127.0.0.1:$REF_PORT" "$REF_GROUP" $mode $conc
      b=$RESULT; bc=$CPU
      br=$(field "$b" 'round(d["requests_per_sec"])')
      bl="$(field "$b" 'round(d["latency_ms"]["p50"],3)') / $(field "$b" 'round(d["latency_ms"]["p99"],3)')"
      ratio=$(python3 -c "print(round($ar/$br,2))")
    else br="-"; bl="-"; bc="-"; ratio="-"; fi
    echo "| $mode | $conc | $ar | $al | $ac | $br | $bl | $bc | $ratio |"
  done
done

# Latency at half of the keep-alive peak (64 clients), paced.
peak=$(field "$(bench "127.0.0.1:$KMSD_PORT" keep-alive 64)" 'd["requests_per_sec"]')
half=$(python3 -c "print(round($peak/2))")
h=$(bench "127.0.0.1:$KMSD_PORT" keep-alive 64 --rate "$half")
echo
echo "Paced at half of peak ($half req/s, 64 clients, keep-alive): p50 $(field "$h" 'd["latency_ms"]["p50"]') ms, p99 $(field "$h" 'd["latency_ms"]["p99"]') ms, max $(field "$h" 'd["latency_ms"]["max"]') ms"

# Resident memory with 100,000 registered clients.
"$BIN/kmsctl" bench --server "127.0.0.1:$KMSD_PORT" --concurrency 64 --requests 100000 \
  --duration-secs 300 --json >/dev/null
clients=$(curl -s "http://127.0.0.1:24811/metrics" | awk '/^kms_registered_clients /{print $2}')
rss=$(awk '/VmRSS/{print $2}' "/proc/$KMSD_PID/status")
du=$(du -sk "$WORK/kmsd" | cut -f1)
echo "Registered clients: $clients; kmsd resident memory: $((rss/1024)) MiB; data dir: $((du/1024)) MiB"
