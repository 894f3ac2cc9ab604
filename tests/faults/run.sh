#!/usr/bin/env bash
# The fault-injection suite (issue 14, docs/faults.md): installs what it needs, builds kmsd
# with the storage failpoints, and runs the bounded CI schedule (fixed seed) plus the
# slow-rejoin regression test. Needs root; under CI=true anything missing is a failure.
#   bash tests/faults/run.sh                     CI schedule + regression tests (~3 min)
#   SOAK_MINUTES=30 bash tests/faults/run.sh --soak   randomized soak (SOAK_SEED=...)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kms-cluster-target}"
in_ci() { [ "${CI:-}" = "true" ]; }
fail_or_skip() {
  if in_ci; then echo "faults: $*" >&2; exit 1; fi
  echo "faults: $*; skipped (not in CI)"; exit 0
}

[ "$(id -u)" = 0 ] || fail_or_skip "needs root (network namespaces, nftables)"

# iproute2 (ip netns, veth, bridge), nftables (partitions), libfaketime (clock jumps).
if ! command -v nft >/dev/null || ! command -v ip >/dev/null \
  || [ ! -e /usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1 ]; then
  export DEBIAN_FRONTEND=noninteractive
  { apt-get update -qq && apt-get install -y -qq nftables iproute2 libfaketime >/dev/null; } \
    || fail_or_skip "cannot install nftables, iproute2, libfaketime"
fi
ip netns list >/dev/null 2>&1 || fail_or_skip "network namespaces unavailable"

# kmsd with the failpoints compiled in, next to the normal binary (which is rebuilt after,
# so the other tests keep a kmsd without them).
cargo build -p kmsd --features failpoints --locked
cp "$CARGO_TARGET_DIR/debug/kmsd" "$CARGO_TARGET_DIR/debug/kmsd-failpoints"
cargo build -p kmsd --locked
cargo build -p kms-tests --tests --locked

if [ "${1:-}" = "--soak" ]; then
  tests=(soak_random_faults)
else
  tests=(ci_schedule_every_nemesis_once slow_rejoin_follower_back_within_3s_of_heal
    rejoining_follower_does_not_depose_the_leader
    storage_failure_fail_stops_the_node_and_a_restart_heals_it)
fi
for t in "${tests[@]}"; do
  cargo test -p kms-tests --test e2e_faults --locked -- --ignored --exact --nocapture \
    --test-threads=1 "$t"
done
