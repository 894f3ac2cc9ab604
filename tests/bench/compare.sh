#!/usr/bin/env bash
# Side-by-side benchmark: kmsd (durable) vs a reference KMS server binary, same machine, same
# kmsctl load, one run. The reference binary is not part of this project: pass its path.
#
#   VLMCSD=/path/to/vlmcsd bash tests/bench/compare.sh [REQUESTS]
#
# Prints a markdown table for docs/benchmarks.md. Every run is bounded in count and time and
# every process started here is stopped by its pid.
set -euo pipefail
cd "$(dirname "$0")/../.."
REQUESTS="${1:-20000}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kms-cluster-target}"
cargo build --release --locked -p kmsd -p kmsctl >/dev/null
BIN="$CARGO_TARGET_DIR/release"
WORK=$(mktemp -d)
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; rm -rf "$WORK"; }
trap cleanup EXIT

KMSD_PORT=${KMSD_PORT:-24810}  # fixed ports stay below the ephemeral range
REF_PORT=${REF_PORT:-24820}
"$BIN/kmsd" --kms-listen "127.0.0.1:$KMSD_PORT" --admin-listen 127.0.0.1:24811 \
  --raft-listen 127.0.0.1:24812 --data-dir "$WORK/kmsd" --log-level warn 2>"$WORK/kmsd.log" &
pids+=($!); KMSD_PID=$!
if [ -n "${VLMCSD:-}" ]; then
  "$VLMCSD" -D -L "127.0.0.1:$REF_PORT" -N1 -B1 -m 1000 -t 30 >"$WORK/ref.log" 2>&1 &
  pids+=($!)
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

echo "| mode | concurrency | kmsd req/s | kmsd p50 / p99 ms | reference req/s | reference p50 / p99 ms | kmsd / reference |"
echo "|---|---|---|---|---|---|---|"
for mode in keep-alive new-connection; do
  for conc in 1 64; do
    a=$(bench "127.0.0.1:$KMSD_PORT" $mode $conc)
    ar=$(field "$a" 'round(d["requests_per_sec"])')
    al="$(field "$a" 'round(d["latency_ms"]["p50"],3)') / $(field "$a" 'round(d["latency_ms"]["p99"],3)')"
    if [ -n "${VLMCSD:-}" ]; then
      b=$(bench "127.0.0.1:$REF_PORT" $mode $conc)
      br=$(field "$b" 'round(d["requests_per_sec"])')
      bl="$(field "$b" 'round(d["latency_ms"]["p50"],3)') / $(field "$b" 'round(d["latency_ms"]["p99"],3)')"
      ratio=$(python3 -c "print(round($ar/$br,2))")
    else br="-"; bl="-"; ratio="-"; fi
    echo "| $mode | $conc | $ar | $al | $br | $bl | $ratio |"
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
