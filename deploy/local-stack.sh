#!/usr/bin/env bash
# The compose topology (deploy/compose) from host binaries, on loopback, for CI machines
# that have no container engine: three kmsd nodes (node 1 bootstraps, 2 and 3 join), a
# BIND 9 that accepts TSIG-signed SRV updates, and a Prometheus that scrapes the nodes with
# the project's alert rules. Then it checks what the compose stack promises:
#   - the three nodes form one cluster (one leader, three members);
#   - an activation through each node succeeds, and the nodes share one count;
#   - the SRV RRset _vlmcs._tcp.kms.test holds one record per node (port, priority, weight);
#   - Prometheus has all three targets up and sees exactly one leader.
#
#   deploy/local-stack.sh            # up + check + down (default; what CI runs)
#   deploy/local-stack.sh up         # start and leave running (state in $STACK_DIR)
#   deploy/local-stack.sh check      # run the checks against a running stack
#   deploy/local-stack.sh down       # stop everything started by `up` (by pid)
#
# Environment: KMSD_BIN, KMSCTL_BIN (default: built with cargo into $CARGO_TARGET_DIR),
# STACK_DIR (default target/local-stack), LOCAL_STACK_PORT_BASE (default 20000: KMS on
# base+1688.., admin base+8688.., Raft base+7688.., metrics base+9688.., DNS base+5353,
# Prometheus base+9090), LOCAL_STACK_TIMEOUT (seconds per wait, default 60).
# Tools: deploy/install-tools.sh --local-stack (named, tsig-keygen, dig, prometheus, curl).
#
# Everything it starts is stopped by the pid it recorded, never by name.
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd -P)
MODE=${1:-run}
STACK_DIR=${STACK_DIR:-$ROOT/target/local-stack}
BASE=${LOCAL_STACK_PORT_BASE:-20000}
TIMEOUT=${LOCAL_STACK_TIMEOUT:-60}
TOKEN=${LOCAL_STACK_TOKEN:-local-stack-admin-token-0123456789}
ZONE=kms.test
KEY_NAME=kms-local-key
DNS_PORT=$((BASE + 5353))
PROM_PORT=$((BASE + 9090))
kms_port() { echo $((BASE + 1687 + $1)); }
admin_port() { echo $((BASE + 8687 + $1)); }
raft_port() { echo $((BASE + 7687 + $1)); }
metrics_port() { echo $((BASE + 9687 + $1)); }

log() { printf 'local-stack: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
find_tool() { command -v "$1" 2>/dev/null || { [[ -x /usr/sbin/$1 ]] && echo "/usr/sbin/$1"; } || return 1; }

# ---- processes --------------------------------------------------------------------------
# Each started process has DIR/NAME.pid; stopping checks that the pid still runs a command
# line that mentions STACK_DIR (pid reuse), sends SIGTERM, waits, then SIGKILL.
start_bg() { # name logfile command...
    local name=$1 logf=$2; shift 2
    "$@" </dev/null >"$logf" 2>&1 &
    echo $! > "$STACK_DIR/$name.pid"
    log "started $name (pid $!)"
}
alive() { kill -0 "$1" 2>/dev/null && [[ $(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1) != Z ]]; }
stop_one() { # name [grace seconds]
    local name=$1 grace=${2:-30} pidf="$STACK_DIR/$1.pid" pid
    [[ -f $pidf ]] || return 0
    pid=$(cat "$pidf")
    if alive "$pid"; then
        if ! tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -qF "$STACK_DIR"; then
            log "pid $pid is no longer $name; not signalling it"
        else
            kill -TERM "$pid" 2>/dev/null || true
            local waited=0
            while alive "$pid" && ((waited < grace * 10)); do sleep 0.1; waited=$((waited + 1)); done
            if alive "$pid"; then log "$name ignored SIGTERM for ${grace}s: SIGKILL"; kill -KILL "$pid" 2>/dev/null || true; fi
            log "stopped $name (pid $pid)"
        fi
    fi
    rm -f "$pidf"
}
down() {
    # Followers first, the bootstrap node last; then the observers.
    for n in 3 2 1; do stop_one "kmsd$n" 40; done
    stop_one prometheus 15
    stop_one named 10
}

# ---- binaries ---------------------------------------------------------------------------
binaries() {
    local tdir=${CARGO_TARGET_DIR:-$ROOT/target}
    if [[ -z ${KMSD_BIN:-} || -z ${KMSCTL_BIN:-} ]]; then
        if [[ ! -x $tdir/debug/kmsd || ! -x $tdir/debug/kmsctl ]]; then
            log "building kmsd and kmsctl"
            (cd "$ROOT" && cargo build -q -p kmsd -p kmsctl)
        fi
    fi
    KMSD_BIN=${KMSD_BIN:-$tdir/debug/kmsd}
    KMSCTL_BIN=${KMSCTL_BIN:-$tdir/debug/kmsctl}
    [[ -x $KMSD_BIN && -x $KMSCTL_BIN ]] || die "kmsd/kmsctl not found ($KMSD_BIN, $KMSCTL_BIN)"
}

# ---- BIND -------------------------------------------------------------------------------
start_dns() {
    local d=$STACK_DIR/dns named keygen secret
    named=$(find_tool named) || die "named missing: deploy/install-tools.sh --local-stack"
    keygen=$(find_tool tsig-keygen) || die "tsig-keygen missing: deploy/install-tools.sh --local-stack"
    mkdir -p "$d" && chmod 700 "$d"
    rm -f "$d"/*.jnl "$d/named.log"
    (umask 077 && "$keygen" -a hmac-sha256 "$KEY_NAME" > "$d/tsig.key")
    secret=$(sed -n 's/^[[:space:]]*secret[[:space:]]*"\([^"]*\)".*/\1/p' "$d/tsig.key")
    (umask 077 && printf '%s\n' "$secret" > "$d/tsig.secret")
    # Same zone and update policy as deploy/compose/bind, on a loopback port.
    cat > "$d/named.conf" <<EOF
include "$d/tsig.key";
options {
    directory "$d";
    pid-file none;
    session-keyfile "$d/session.key";
    managed-keys-directory "$d";
    listen-on port $DNS_PORT { 127.0.0.1; };
    listen-on-v6 { none; };
    reuseport no;
    recursion no;
    dnssec-validation no;
    notify no;
    allow-transfer { none; };
    allow-query { localhost; };
};
controls { };
zone "$ZONE." {
    type primary;
    file "$d/$ZONE.zone";
    update-policy {
        grant $KEY_NAME name _vlmcs._tcp.$ZONE. SRV;
        grant $KEY_NAME subdomain $ZONE. A AAAA;
    };
};
EOF
    sed -e "s/^ns      IN A .*/ns      IN A    127.0.0.1/" "$ROOT/deploy/compose/bind/kms.test.zone" > "$d/$ZONE.zone"
    start_bg named "$d/named.log" "$named" -g -4 -c "$d/named.conf" -p "$DNS_PORT"
    wait_for "named answers on 127.0.0.1:$DNS_PORT" \
        bash -c "dig -k '$d/tsig.key' @127.0.0.1 -p $DNS_PORT SOA $ZONE. +time=1 +tries=1 | grep -q 'status: NOERROR'"
}

# ---- kmsd -------------------------------------------------------------------------------
node_config() { # n
    local n=$1 join=""
    ((n > 1)) && join="join = [\"127.0.0.1:$(raft_port 1)\"]"
    cat <<EOF
# Node $n of deploy/local-stack.sh (mirrors deploy/compose/kmsd/node$n.toml on loopback).
[node]
id = $n
data_dir = "$STACK_DIR/kmsd$n/data"
advertise_host = "kms$n.$ZONE"
advertise_port = $(kms_port "$n")

[kms]
listen = ["127.0.0.1:$(kms_port "$n")"]

[admin]
listen = "127.0.0.1:$(admin_port "$n")"
advertise = "127.0.0.1:$(admin_port "$n")"
metrics_listen = "127.0.0.1:$(metrics_port "$n")"

[raft]
listen = "127.0.0.1:$(raft_port "$n")"
advertise = "127.0.0.1:$(raft_port "$n")"
# Built-in cluster PKI: node 1 makes the CA, the others join with the shared secret.
cluster_secret_file = "$STACK_DIR/cluster.secret"
$join

[[dns.publish]]
zone = "$ZONE"
server = "127.0.0.1:$DNS_PORT"
tsig_key_name = "$KEY_NAME"
tsig_algorithm = "hmac-sha256"
tsig_secret_file = "$STACK_DIR/dns/tsig.secret"
ttl = 60
priority = $([[ $n == 3 ]] && echo 10 || echo 0)
weight = 100
EOF
}
start_node() { # n
    local n=$1 d=$STACK_DIR/kmsd$1
    mkdir -p "$d/data"
    if [[ ! -s $STACK_DIR/cluster.secret ]]; then
        (umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > "$STACK_DIR/cluster.secret")
    fi
    node_config "$n" > "$d/kmsd.toml"
    KMSD_ADMIN_TOKEN=$TOKEN start_bg "kmsd$n" "$d/kmsd.log" "$KMSD_BIN" --config "$d/kmsd.toml"
}

# ---- Prometheus -------------------------------------------------------------------------
start_prometheus() {
    local d=$STACK_DIR/prometheus prom rules=""
    prom=$(find_tool prometheus) || die "prometheus missing: deploy/install-tools.sh --local-stack"
    mkdir -p "$d/data"
    [[ -f $ROOT/deploy/prometheus/alerts.yml ]] && rules="  - $ROOT/deploy/prometheus/alerts.yml"
    cat > "$d/prometheus.yml" <<EOF
# deploy/compose/prometheus/prometheus.yml with loopback targets.
global:
  scrape_interval: 2s
  evaluation_interval: 2s
rule_files:
$rules
scrape_configs:
  - job_name: kmsd
    static_configs:
      - targets: ["127.0.0.1:$(metrics_port 1)", "127.0.0.1:$(metrics_port 2)", "127.0.0.1:$(metrics_port 3)"]
EOF
    start_bg prometheus "$d/prometheus.log" "$prom" --config.file="$d/prometheus.yml" \
        --storage.tsdb.path="$d/data" --web.listen-address="127.0.0.1:$PROM_PORT"
}

# ---- checks -----------------------------------------------------------------------------
wait_for() { # description command...
    local what=$1 start=$SECONDS; shift
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS - start >= TIMEOUT)); then log "timed out after ${TIMEOUT}s: $what"; return 1; fi
        sleep 0.5
    done
    log "ok: $what ($((SECONDS - start))s)"
}
api() { curl -fsS --max-time 3 -H "Authorization: Bearer $TOKEN" "http://127.0.0.1:$(admin_port "$1")$2"; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

cluster_formed() { # one leader known by node 1, three members
    local c
    c=$(api 1 /api/v1/cluster) || return 1
    [[ $(json 'len(d["members"]) if d.get("leader_id") else 0' <<<"$c") == 3 ]]
}
srv_records() { dig @127.0.0.1 -p "$DNS_PORT" SRV "_vlmcs._tcp.$ZONE" +short +time=1 +tries=1 | sort; }
srv_complete() {
    local want
    want=$(printf '0 100 %s kms1.%s.\n0 100 %s kms2.%s.\n10 100 %s kms3.%s.\n' \
        "$(kms_port 1)" "$ZONE" "$(kms_port 2)" "$ZONE" "$(kms_port 3)" "$ZONE" | sort)
    [[ $(srv_records) == "$want" ]]
}
targets_up() {
    curl -fsS --max-time 3 "http://127.0.0.1:$PROM_PORT/api/v1/targets" |
        json 'sum(1 for t in d["data"]["activeTargets"] if t["health"] == "up")' | grep -qx 3
}
one_leader() {
    curl -fsS --max-time 3 "http://127.0.0.1:$PROM_PORT/api/v1/query" --data-urlencode 'query=sum(kms_raft_is_leader)' |
        json 'd["data"]["result"][0]["value"][1]' | grep -qx 1
}
same_total() { # every node reports the same total_requests >= $1
    local t1 t2 t3
    t1=$(api 1 /api/v1/status | json 'd["total_requests"]') || return 1
    t2=$(api 2 /api/v1/status | json 'd["total_requests"]') || return 1
    t3=$(api 3 /api/v1/status | json 'd["total_requests"]') || return 1
    [[ $t1 == "$t2" && $t2 == "$t3" && $t1 -ge $1 ]]
}

checks() {
    local passed=0 failed=0 before
    count() { if "$@"; then passed=$((passed + 1)); else failed=$((failed + 1)); fi; }
    for n in 1 2 3; do
        count wait_for "kmsd$n /healthz" curl -fsS --max-time 2 "http://127.0.0.1:$(metrics_port "$n")/healthz"
    done
    count wait_for "cluster of 3 with a leader" cluster_formed
    for n in 1 2 3; do
        count wait_for "kmsd$n /readyz" curl -fsS --max-time 2 "http://127.0.0.1:$(metrics_port "$n")/readyz"
    done
    before=$(api 1 /api/v1/status | json 'd["total_requests"]' 2>/dev/null || echo 0)
    for n in 1 2 3; do
        count activate "$n"
    done
    count wait_for "all nodes count the 3 activations ($((before + 3)) requests)" same_total $((before + 3))
    if ! wait_for "SRV _vlmcs._tcp.$ZONE lists the 3 nodes" srv_complete; then
        failed=$((failed + 1)); log "SRV records now:"; srv_records >&2
    else
        passed=$((passed + 1))
    fi
    count wait_for "Prometheus: 3 targets up" targets_up
    count wait_for "Prometheus: exactly one leader" one_leader
    if ((failed)); then
        log "logs in $STACK_DIR/*/*.log"
        for f in "$STACK_DIR"/kmsd*/kmsd.log; do log "--- tail $f"; tail -n 15 "$f" >&2 || true; done
    fi
    echo "local-stack: $passed passed, $failed failed"
    ((failed == 0))
}
activate() { # n
    if "$KMSCTL_BIN" activate --server "127.0.0.1:$(kms_port "$1")" --product windows >"$STACK_DIR/activate$1.log" 2>&1; then
        log "ok: activation through kmsd$1"
    else
        log "FAILED: activation through kmsd$1 (see $STACK_DIR/activate$1.log)"
        return 1
    fi
}

up() {
    binaries
    for tool in dig curl python3; do find_tool "$tool" >/dev/null || die "$tool missing: deploy/install-tools.sh --local-stack"; done
    mkdir -p "$STACK_DIR"
    for name in kmsd1 kmsd2 kmsd3 named prometheus; do
        if [[ -f $STACK_DIR/$name.pid ]] && alive "$(cat "$STACK_DIR/$name.pid")"; then
            die "$name already runs for $STACK_DIR; run: $0 down"
        fi
    done
    rm -rf "$STACK_DIR"/kmsd1 "$STACK_DIR"/kmsd2 "$STACK_DIR"/kmsd3 "$STACK_DIR"/prometheus
    start_dns
    start_node 1
    start_node 2
    start_node 3
    start_prometheus
}

case $MODE in
    up) up ;;
    check) binaries; checks ;;
    down) down ;;
    run)
        trap down EXIT
        up
        checks
        ;;
    *) die "usage: $0 [run|up|check|down]" ;;
esac
