#!/usr/bin/env bash
# Checks every deployment file without a container engine or a Kubernetes cluster:
#
#   1. yamllint on every YAML file of the repository (config: deploy/.yamllint)
#   2. the Helm chart: `helm lint --strict`, values.schema.json, rendering with the real Helm
#      engine for the default and several non-default value sets, every rendered object
#      validated (strict) against the Kubernetes schemas of 1.27 and 1.34, the Prometheus
#      Operator objects against their CRD schemas and promtool, chart behaviour assertions
#   3. the failure cases: an even replicaCount (and other bad values) must be refused with
#      a clear message (part of 2, listed under "values that must be refused")
#   4. hadolint on deploy/docker/Dockerfile; .dockerignore keeps the build context small
#   5. docker-compose.yml: `docker-compose config` (parse, interpolation, references), the
#      Compose Specification JSON schema, every bind-mounted file present, the node configs
#      and the BIND configuration (named-checkconf, named-checkzone)
#   6. systemd: `systemd-analyze verify` and the unit's exposure score
#      (`systemd-analyze security --offline`), example configuration parses
#   7. shellcheck on the deployment, test and CI scripts
#   8. with KMSD_BIN=path/to/kmsd and a kmsd that has `check-config`: every example and
#      rendered node configuration is accepted by kmsd itself
#
# Tools come from deploy/install-tools.sh (called first; KMS_SKIP_INSTALL=1 skips that).
# In CI (CI=true) a missing tool is a failure, never a skip. The last line is
# "deploy: N passed, N failed". `docker build` cannot be run here (no container engine).
set -uo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
cd "$ROOT" || exit 1
CI=${CI:-false}
OUT=${KMS_VALIDATE_OUT:-$ROOT/target/deploy-validate}
mkdir -p "$OUT"

passed=0
failed=0
skipped=0
step() { printf '\n== %s\n' "$*"; }
pass() { printf 'PASS %s\n' "$*"; passed=$((passed + 1)); }
flunk() { printf 'FAIL %s\n' "$*"; failed=$((failed + 1)); }
# A missing tool: a failure in CI, a visible skip locally.
missing() {
    if [[ $CI == true ]]; then flunk "$1: $2 missing (CI)"; else printf 'SKIP %s: %s missing\n' "$1" "$2"; skipped=$((skipped + 1)); fi
}
run() { # name command... : runs it, shows its output, counts the result
    local name=$1; shift
    local log
    log=$("$@" 2>&1)
    local rc=$?
    # Helm logs every followed symlink (files/ -> deploy/prometheus) at INFO: noise here.
    [[ -n $log ]] && printf '%s\n' "$log" | grep -v ' INFO found symbolic link in path' | sed 's/^/    /'
    if ((rc == 0)); then pass "$name"; else flunk "$name (exit $rc)"; fi
    return $rc
}

if [[ ${KMS_SKIP_INSTALL:-0} != 1 ]]; then
    step "install tools (deploy/install-tools.sh)"
    if bash "$ROOT/deploy/install-tools.sh"; then pass "tools installed"; else flunk "deploy/install-tools.sh"; fi
fi
TOOLS_DIR=${KMS_TOOLS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/kms-cluster-tools}
# shellcheck source=/dev/null
[[ -f $TOOLS_DIR/env.sh ]] && . "$TOOLS_DIR/env.sh"
PY=$TOOLS_DIR/venv/bin/python
find_tool() { command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; }; }

# The files the chart links to (deploy/prometheus is written with the alert rules).
CHART=$ROOT/helm/kms-cluster

# ---- 1. YAML ------------------------------------------------------------------------------
step "1. yamllint (deploy/.yamllint)"
if command -v yamllint >/dev/null; then
    mapfile -t yaml_files < <(git ls-files -co --exclude-standard -- '*.yml' '*.yaml' |
        grep -v -E '^helm/[^/]+/templates/' | while read -r f; do [[ -e $f ]] && echo "$f"; done)
    run "yamllint: ${#yaml_files[@]} files" yamllint -s -c deploy/.yamllint "${yaml_files[@]}"
else
    missing yamllint yamllint
fi

# ---- 2./3. Helm chart -----------------------------------------------------------------------
step "2. Helm chart helm/kms-cluster (render + Kubernetes schemas + behaviour), 3. refused values"
for link in "$CHART"/files/*; do
    if [[ -L $link && ! -e $link ]]; then
        flunk "chart file $(basename "$link") links to a missing file: $(readlink "$link")"
    fi
done
if [[ -x $PY ]] && "$PY" -c 'import helm_python, kubernetes_validate' 2>/dev/null; then
    node_modules=${KMS_TOOLS_NODE_MODULES:-}
    if [[ -z $node_modules || ! -d $node_modules ]] || ! command -v node >/dev/null; then
        missing "CRD schemas" "node / @kubernetes-models/prometheus-operator"
        node_modules=""
    fi
    promtool=$(find_tool promtool || true)
    [[ -n $promtool ]] || missing "PrometheusRule check" promtool
    run "helm chart: lint, render, schemas, behaviour, refusals" \
        "$PY" deploy/lib/validate_chart.py "$CHART" "$OUT/helm" \
        ${node_modules:+--node-modules "$node_modules"} ${promtool:+--promtool "$promtool"}
else
    missing "helm chart" "helm-python-sdk / kubernetes-validate"
fi

# ---- 4. Dockerfile ------------------------------------------------------------------------
step "4. Dockerfile (hadolint) and .dockerignore"
if command -v hadolint >/dev/null; then
    run "hadolint deploy/docker/Dockerfile" hadolint deploy/docker/Dockerfile
else
    missing hadolint hadolint
fi
# The build needs the workspace manifests and sources; it must not ship target/ or .git.
if grep -qx '\*' .dockerignore && grep -qx '!crates/' .dockerignore && grep -qx '!Cargo.lock' .dockerignore &&
    grep -qx '!deploy/docker/kmsd.toml' .dockerignore && grep -qx '\*\*/target' .dockerignore; then
    pass ".dockerignore: allow-list of the workspace, no target/"
else
    flunk ".dockerignore must ignore everything but Cargo.toml, Cargo.lock, crates/, proto/, tests/ (and no target/)"
fi
echo "    note: no container engine runs here, so \`docker build\` itself is not exercised"

# ---- 5. Compose ---------------------------------------------------------------------------
step "5. deploy/compose"
COMPOSE_DIR=$ROOT/deploy/compose
compose_env=(KMSD_ADMIN_TOKEN=validate-token-0123456789 GRAFANA_ADMIN_PASSWORD=validate)
if command -v docker-compose >/dev/null; then
    run "docker-compose config" env -C "$COMPOSE_DIR" "${compose_env[@]}" docker-compose -f docker-compose.yml config -q
    # Without the .env values, compose must stop with the message that says what to set.
    empty_env=$(mktemp)
    msg=$(env -C "$COMPOSE_DIR" -u KMSD_ADMIN_TOKEN GRAFANA_ADMIN_PASSWORD=x docker-compose -f docker-compose.yml \
        --env-file "$empty_env" config -q 2>&1)
    rm -f "$empty_env"
    if [[ $msg == *"set KMSD_ADMIN_TOKEN in deploy/compose/.env"* ]]; then
        pass "docker-compose refuses to start without KMSD_ADMIN_TOKEN"
    else
        flunk "docker-compose without KMSD_ADMIN_TOKEN: $msg"
    fi
else
    missing "docker-compose config" docker-compose
fi
if command -v check-jsonschema >/dev/null; then
    run "Compose Specification schema" check-jsonschema --builtin-schema vendor.compose-spec "$COMPOSE_DIR/docker-compose.yml"
else
    missing "compose schema" check-jsonschema
fi
if [[ -x $PY ]]; then
    run "compose: bind mounts exist, node configs consistent" "$PY" - "$COMPOSE_DIR" <<'PYEOF'
import sys, tomllib, yaml
from pathlib import Path
d = Path(sys.argv[1])
c = yaml.safe_load((d / "docker-compose.yml").read_text())
bad = 0
for name, svc in c["services"].items():
    for vol in svc.get("volumes", []):
        src = vol.split(":")[0]
        if src.startswith((".", "/")) and not (d / src).exists():
            print(f"{name}: bind-mount source {src} does not exist"); bad += 1
ids = {}
for n in (1, 2, 3):
    cfg = tomllib.loads((d / "kmsd" / f"node{n}.toml").read_text())
    ids[cfg["node"]["id"]] = n
    host = f"kms{n}.kms.test"
    aliases = c["services"][f"kms{n}"]["networks"]["kms"]["aliases"]
    if host not in aliases: print(f"kms{n}: alias {host} missing"); bad += 1
    if cfg["raft"]["advertise"] != f"{host}:7688" or cfg["admin"]["advertise"] != f"{host}:8688":
        print(f"node{n}.toml: advertise addresses must be {host}"); bad += 1
    join = cfg["raft"].get("join")
    if (n == 1) != (join is None):
        print(f"node{n}.toml: only node 1 bootstraps (no join)"); bad += 1
    published = {p.split(":")[0] for p in c["services"][f"kms{n}"]["ports"] if p.endswith(":1688")}
    if str(cfg["node"]["advertise_port"]) not in published:
        print(f"node{n}.toml: advertise_port {cfg['node']['advertise_port']} is not the published port {published}"); bad += 1
    for pub in cfg["dns"]["publish"]:
        if pub["tsig_secret_file"] != "/run/kms-dns/tsig.secret": print("tsig_secret_file path"); bad += 1
if sorted(ids) != [1, 2, 3]: print(f"node ids {sorted(ids)}"); bad += 1
print(f"{bad} problem(s)")
sys.exit(1 if bad else 0)
PYEOF
else
    missing "compose consistency" "python venv"
fi
promtool_bin=$(find_tool promtool || true)
if [[ -n $promtool_bin ]]; then
    run "promtool check config deploy/compose/prometheus/prometheus.yml" \
        "$promtool_bin" check config --syntax-only "$COMPOSE_DIR/prometheus/prometheus.yml"
else
    missing "compose prometheus.yml" promtool
fi
checkconf=$(find_tool named-checkconf || true)
checkzone=$(find_tool named-checkzone || true)
if [[ -n $checkconf && -n $checkzone ]]; then
    # named.conf includes the key dns-init creates at run time: check it in a scratch root.
    root=$(mktemp -d)
    mkdir -p "$root/run/kms-dns" "$root/etc/bind" "$root/var/cache/bind" "$root/var/lib/bind"
    printf 'key "kms-compose-key" {\n\talgorithm hmac-sha256;\n\tsecret "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0MTI=";\n};\n' \
        > "$root/run/kms-dns/tsig.key"
    cp "$COMPOSE_DIR/bind/named.conf" "$root/etc/bind/named.conf"
    run "named-checkconf deploy/compose/bind/named.conf" "$checkconf" -t "$root" /etc/bind/named.conf
    run "named-checkzone kms.test" "$checkzone" -q kms.test "$COMPOSE_DIR/bind/kms.test.zone"
    rm -rf "$root"
else
    missing "BIND config check" "named-checkconf (bind9-utils)"
fi

# ---- 6. systemd ---------------------------------------------------------------------------
step "6. deploy/systemd"
# Resource bounds and a private state dir (docs/security.md): kmsd sizes its registry from
# MemoryMax, TasksMax bounds its threads.
for setting in MemoryMax TasksMax UMask=0077 StateDirectoryMode=0700 NoNewPrivileges=yes; do
    if grep -Eq "^${setting}(=|$)" deploy/systemd/kmsd.service; then
        pass "kmsd.service sets ${setting}"
    else
        flunk "kmsd.service does not set ${setting}"
    fi
done
if command -v systemd-analyze >/dev/null; then
    unit_dir=$(mktemp -d)
    # verify insists that ExecStart exists; the unit is checked as written otherwise.
    sed 's#^ExecStart=/usr/local/bin/kmsd #ExecStart=/bin/true #' deploy/systemd/kmsd.service > "$unit_dir/kmsd.service"
    run "systemd-analyze verify kmsd.service" systemd-analyze verify "$unit_dir/kmsd.service"
    score=$(systemd-analyze security --offline=true "$unit_dir/kmsd.service" 2>/dev/null |
        sed -n 's/.*Overall exposure level for kmsd.service: \([0-9.]*\).*/\1/p')
    if [[ -n $score ]] && awk -v s="$score" 'BEGIN { exit !(s <= 2.0) }'; then
        pass "kmsd.service exposure level $score (<= 2.0)"
    else
        flunk "kmsd.service exposure level '${score:-?}' (want <= 2.0)"
    fi
    rm -rf "$unit_dir"
else
    missing "systemd unit check" systemd-analyze
fi
if [[ -x $PY ]]; then
    run "example configurations parse (systemd, image defaults)" "$PY" -c \
        'import sys, tomllib; [tomllib.load(open(f, "rb")) for f in sys.argv[1:]]' \
        deploy/systemd/kmsd.toml deploy/docker/kmsd.toml
else
    missing "kmsd.toml parse" "python venv"
fi

# ---- 7. shell scripts ---------------------------------------------------------------------
step "7. shellcheck"
if command -v shellcheck >/dev/null; then
    run "shellcheck deploy/*.sh deploy/compose/bind/dns-init.sh tests/**/*.sh .ci/run" \
        shellcheck -x --severity=warning \
        deploy/install-tools.sh deploy/validate.sh deploy/local-stack.sh deploy/compose/bind/dns-init.sh \
        tests/*.sh tests/bench/*.sh tests/dns/*.sh tests/ops/*.sh .ci/run
else
    missing shellcheck shellcheck
fi

# ---- 8. kmsd's own view of the configuration files ------------------------------------------
step "8. kmsd check-config (KMSD_BIN)"
if [[ -n ${KMSD_BIN:-} && -x ${KMSD_BIN:-} ]] && "$KMSD_BIN" check-config --help >/dev/null 2>&1; then
    cfgs=(deploy/compose/kmsd/node1.toml deploy/compose/kmsd/node2.toml deploy/compose/kmsd/node3.toml
          deploy/systemd/kmsd.toml deploy/docker/kmsd.toml)
    if [[ -x $PY ]]; then
        # The chart's per-pod files, from the rendered default and all-features sets.
        "$PY" - "$OUT/helm" "$OUT/rendered-configs" <<'PYEOF'
import sys, yaml
from pathlib import Path
src, dst = Path(sys.argv[1]), Path(sys.argv[2])
dst.mkdir(parents=True, exist_ok=True)
for scenario in ("default", "all-features", "existing-secrets-nodeport"):
    for doc in yaml.safe_load_all((src / scenario / "manifest.yaml").read_text()):
        if doc and doc["kind"] == "ConfigMap" and doc["metadata"]["name"].endswith("-nodes"):
            for k, v in doc["data"].items():
                (dst / f"{scenario}-{k}").write_text(v)
PYEOF
        mapfile -t -O "${#cfgs[@]}" cfgs < <(ls "$OUT"/rendered-configs/*.toml 2>/dev/null)
    fi
    # The deployments pass the admin token (and the TSIG secret) from secrets at run time;
    # a placeholder stands in for them here.
    for f in "${cfgs[@]}"; do
        run "kmsd check-config $f" env KMSD_ADMIN_TOKEN=validate-placeholder-token-0123456789 \
            "$KMSD_BIN" check-config --config "$f"
    done
else
    echo "    not run: set KMSD_BIN to a kmsd that has the check-config subcommand"
fi

printf '\n'
((skipped)) && echo "deploy: $skipped check(s) skipped for missing tools (not allowed in CI)"
echo "deploy: $passed passed, $failed failed"
((failed == 0))
