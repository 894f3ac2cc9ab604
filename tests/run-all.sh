#!/usr/bin/env bash
# The whole test suite, as CI runs it. Installs what the tests need on a fresh machine.
#   bash tests/run-all.sh                   everything
#   FUZZ_SECONDS=0 bash tests/run-all.sh    skip the fuzzing step (local quick runs only)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kms-cluster-target}"
export CARGO_TERM_COLOR=never
FUZZ_SECONDS="${FUZZ_SECONDS:-45}"
in_ci() { [ "${CI:-}" = "true" ]; }
step() { printf '\n==> %s\n' "$*"; }

step "toolchain"
cargo --version
rustc --version

step "system tools for the tests (BIND 9, Prometheus, Chromium; only when missing)"
# In CI a failed install is fatal: the tests that need the tool would fail anyway.
bash tests/dns/install.sh
bash tests/ops/install.sh
bash tests/fixtures/install.sh

step "format"
cargo fmt --all -- --check

step "lint (clippy, warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "build binaries used by the end-to-end tests"
cargo build --workspace --bins --locked

step "unit, vector and end-to-end tests"
cargo test --workspace --locked 2>&1 | tee "$CARGO_TARGET_DIR/test-output.txt"

step "deployment files (Dockerfile, compose, systemd, Helm chart)"
KMSD_BIN="$CARGO_TARGET_DIR/debug/kmsd" KMS_VALIDATE_OUT="$CARGO_TARGET_DIR/deploy-validate" \
  bash deploy/validate.sh 2>&1 | tee "$CARGO_TARGET_DIR/deploy-output.txt"

step "local three-node stack from host binaries (the compose topology without containers)"
bash deploy/install-tools.sh --local-stack
KMSD_BIN="$CARGO_TARGET_DIR/debug/kmsd" KMSCTL_BIN="$CARGO_TARGET_DIR/debug/kmsctl" \
  bash deploy/local-stack.sh 2>&1 | tee "$CARGO_TARGET_DIR/local-stack-output.txt"

step "release artifacts: image (buildah), .deb (dpkg -i/-r), SBOM"; bash deploy/package/ci.sh 2>&1 | tee "$CARGO_TARGET_DIR/package-output.txt"
step "fault injection: netns partitions, pauses, crashes, clock jumps, disk faults (docs/faults.md)"; bash tests/faults/run.sh

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
        -max_total_time="$FUZZ_SECONDS" -rss_limit_mb=2048 -print_final_stats=1 2>&1 | tail -n 6)
    done
  fi
fi

step "summary"
cd "$ROOT"
passed=$(grep -Eo 'test result: ok\. [0-9]+ passed' "$CARGO_TARGET_DIR/test-output.txt" | awk '{s+=$4} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed' "$CARGO_TARGET_DIR/test-output.txt" | awk '{s+=$1} END {print s+0}')
dpassed=$(grep -Eo 'deploy: [0-9]+ passed' "$CARGO_TARGET_DIR/deploy-output.txt" | awk '{print $2}' | tail -n1)
echo "cargo tests: ${passed} passed, ${failed} failed; deployment checks: ${dpassed:-0} passed"
echo "$((passed + ${dpassed:-0})) passed, ${failed} failed"
