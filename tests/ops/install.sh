#!/usr/bin/env bash
# Installs what the operations tests need, only when missing (idempotent):
# - promtool + prometheus (Debian package `prometheus`): alert-rule checks and the
#   real-Prometheus scrape test;
# - chromium (Debian package `chromium`): the headless dashboard test.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus >/dev/null 2>&1 || { [[ " ${need[*]-} " == *" prometheus "* ]] || need+=(prometheus); }
command -v chromium >/dev/null 2>&1 || need+=(chromium)
# Fonts so the screenshot shows text (chromium pulls a minimal set; DejaVu is small and safe).
[[ -d /usr/share/fonts/truetype/dejavu ]] || need+=(fonts-dejavu-core)

if ((${#need[@]} == 0)); then
    echo "ops tools present: $(command -v promtool) $(command -v prometheus) $(command -v chromium)"
    exit 0
fi

SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
export DEBIAN_FRONTEND=noninteractive
echo "installing: ${need[*]}"
$SUDO apt-get update -qq
# --no-install-recommends keeps the install small; the prometheus service is not started
# by the tests (they run their own server on loopback).
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}"
# The Debian package may start a system prometheus on :9090; the tests do not need it.
if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet prometheus 2>/dev/null; then
    $SUDO systemctl stop prometheus || true
fi
command -v promtool >/dev/null
command -v prometheus >/dev/null
command -v chromium >/dev/null
echo "ops tools installed"
