#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need on a fresh machine.
#   bash tests/run-all.sh            everything
#   FUZZ_SECONDS=0 bash tests/run-all.sh   skip the fuzzing step (local quick runs only)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kms-cluster-target}"
export CARGO_TERM_COLOR=never
FUZZ_SECONDS="${FUZZ_SECONDS:-45}"
in_ci() { [ "${CI:-}" = "true" ]; }
step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
rustc --version

step "format"
cargo fmt --all -- --check

step "lint (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries used by the end-to-end tests"
cargo build --workspace --bins --locked

step "unit, vector and end-to-end tests"
cargo test --workspace --locked 2>&1 | tee "$CARGO_TARGET_DIR/test-output.txt"

if [ "$FUZZ_SECONDS" != "0" ]; then
  step "fuzz the PDU and KMS decoders for ${FUZZ_SECONDS}s each"
  if ! command -v cargo-fuzz >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked --version 0.13.2 || {
      if in_ci; then echo "cargo-fuzz could not be installed" >&2; exit 1; fi
      echo "cargo-fuzz unavailable; fuzzing skipped (not in CI)"; FUZZ_SECONDS=0; }
  fi
  if [ "$FUZZ_SECONDS" != "0" ]; then
    # No nightly toolchain exists here: RUSTC_BOOTSTRAP lets stable build the sanitizer flags.
    for target in server_pdu kms_request; do
      (cd crates/kms-wire && RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- \
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 15)
    done
  fi
fi

step "summary"
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$CARGO_TARGET_DIR/test-output.txt" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$CARGO_TARGET_DIR/test-output.txt" | awk '{s+=$1} END {print s+0}')
echo "${passed} passed, ${failed} failed"
