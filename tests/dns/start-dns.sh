#!/bin/sh
# start-dns.sh DIR PORT
#
# Starts a throw-away BIND 9 (named) that is authoritative for one zone (default kms.test.)
# on 127.0.0.1:PORT (UDP and TCP) and accepts RFC 2136 updates signed with freshly generated
# TSIG keys (hmac-sha256), limited by an update-policy:
#   KEY_NAME       (the cluster)      may change _vlmcs._tcp.ZONE SRV and A/AAAA below ZONE;
#   OTHER_KEY_NAME (a foreign owner)  may change _vlmcs._tcp.ZONE SRV.
# Everything (config, zone, journal, keys, log, pid) lives in DIR. named runs as the calling
# user (no -u, no systemd, no rndc channel) in the foreground of a background job.
# Tools: tests/dns/install.sh installs them (bind9 bind9-utils bind9-dnsutils).
#
# On success it writes DIR/tsig.env:
#   KEY_NAME= KEY_SECRET= KEY_ALGORITHM= OTHER_KEY_NAME= OTHER_KEY_SECRET= DNS_SERVER= DNS_PORT= DNS_ZONE=
# prints the same lines on stdout, and exits 0 once a TSIG-signed SOA query is answered over
# UDP and TCP by THIS named (a signed answer proves no other server holds the port).
# On failure it prints the tail of DIR/named.log on stderr, stops its named, exits 1.
#
# Environment: TEST_DNS_ZONE (kms.test), TEST_DNS_KEY_NAME (kms-test-key),
#   TEST_DNS_START_TIMEOUT (30 s), TEST_DNS_NAMED (named binary),
#   TEST_DNS_COPY_NAMED (auto|1|0: run a copy of named from DIR to escape an AppArmor
#   profile bound to /usr/sbin/named; auto = only when such a profile is enforced).
# Stop it with stop-dns.sh DIR (by pid, never by name).
set -eu

PROG='start-dns'
err() { printf '%s: %s\n' "$PROG" "$*" >&2; }
die() { err "$*"; exit 1; }

[ $# -eq 2 ] || die "usage: $0 DIR PORT"
DIR_ARG=$1
PORT=$2
case $PORT in ''|*[!0-9]*) die "PORT must be a number, got '$PORT'" ;; esac
if [ "$PORT" -lt 1 ] || [ "$PORT" -gt 65535 ]; then die "PORT out of range: $PORT"; fi

ZONE=${TEST_DNS_ZONE:-kms.test}
ZONE=${ZONE%.}
KEY_NAME=${TEST_DNS_KEY_NAME:-kms-test-key}
OTHER_KEY_NAME=other-owner-key
for v in "$ZONE" "$KEY_NAME"; do
    case $v in ''|*[!A-Za-z0-9.-]*) die "zone and key names may only use A-Z a-z 0-9 . -" ;; esac
done
TIMEOUT=${TEST_DNS_START_TIMEOUT:-30}
case $TIMEOUT in ''|*[!0-9]*) die "TEST_DNS_START_TIMEOUT must be whole seconds" ;; esac

SCRIPT_DIR=$(CDPATH='' cd -- "$(dirname -- "$0")" && pwd -P)
for t in named.conf.template zone.template tsig.key.template; do
    [ -r "$SCRIPT_DIR/$t" ] || die "missing template $SCRIPT_DIR/$t"
done

# sbin directories are often not in a normal user's PATH.
find_tool() {
    if command -v "$1" >/dev/null 2>&1; then command -v "$1"; return 0; fi
    for d in /usr/sbin /sbin /usr/local/sbin; do
        if [ -x "$d/$1" ]; then echo "$d/$1"; return 0; fi
    done
    return 1
}
NAMED=${TEST_DNS_NAMED:-$(find_tool named || true)}
[ -n "$NAMED" ] && [ -x "$NAMED" ] || die "named not found: run tests/dns/install.sh (or set TEST_DNS_NAMED)"
DIG=$(find_tool dig) || die "dig not found: run tests/dns/install.sh"

mkdir -p -- "$DIR_ARG"
DIR=$(CDPATH='' cd -- "$DIR_ARG" && pwd -P)
case $DIR in *'"'*|*\\*|*'|'*|*'&'*|*' '*) die "DIR must not contain spaces or \" \\ | &: $DIR" ;; esac
# named started by root keeps only CAP_NET_BIND_SERVICE, so it cannot use a DIR owned by
# somebody else either.
# shellcheck disable=SC3067  # dash and bash both have test -O
[ -O "$DIR" ] || die "DIR must be owned by the user running this script: $DIR"
chmod 700 "$DIR"   # holds the secrets

if [ -f "$DIR/named.pid" ]; then
    oldpid=$(cat "$DIR/named.pid" 2>/dev/null || true)
    if [ -n "$oldpid" ] && kill -0 "$oldpid" 2>/dev/null; then
        die "a server already runs for $DIR (pid $oldpid); run stop-dns.sh $DIR first"
    fi
fi
# A stale journal would not match the freshly rendered zone.
rm -f "$DIR/named.pid" "$DIR/named.log" "$DIR/zone.db.jnl" "$DIR/session.key" \
      "$DIR/tsig.env" "$DIR"/managed-keys.bind* "$DIR"/*.mkeys*

new_secret() {
    s=
    if KEYGEN=$(find_tool tsig-keygen); then
        s=$("$KEYGEN" -a hmac-sha256 "$1" | sed -n 's/^[[:space:]]*secret[[:space:]]*"\([^"]*\)".*/\1/p')
    fi
    if [ -z "$s" ] && command -v openssl >/dev/null 2>&1; then s=$(openssl rand -base64 32); fi
    if [ -z "$s" ] && command -v base64 >/dev/null 2>&1; then s=$(head -c 32 /dev/urandom | base64); fi
    [ -n "$s" ] || die "cannot generate a TSIG secret (need tsig-keygen, openssl or base64)"
    echo "$s"
}
SECRET=$(new_secret "$KEY_NAME")
OTHER_SECRET=$(new_secret "$OTHER_KEY_NAME")

umask 077
render() { # template output
    sed -e "s|@DIR@|$DIR|g" -e "s|@PORT@|$PORT|g" -e "s|@ZONE@|$ZONE|g" \
        -e "s|@KEY_NAME@|$KEY_NAME|g" -e "s|@SECRET@|$SECRET|g" \
        -e "s|@OTHER_KEY_NAME@|$OTHER_KEY_NAME|g" -e "s|@OTHER_SECRET@|$OTHER_SECRET|g" \
        "$SCRIPT_DIR/$1" > "$DIR/$2"
}
render tsig.key.template   tsig.key
render named.conf.template named.conf
render zone.template       zone.db
# The cluster key alone, for dig -k / nsupdate -k (tsig.key holds both keys).
printf 'key "%s" {\n\talgorithm hmac-sha256;\n\tsecret "%s";\n};\n' "$KEY_NAME" "$SECRET" > "$DIR/cluster.key"
if CHECKCONF=$(find_tool named-checkconf); then
    "$CHECKCONF" "$DIR/named.conf" >&2 || die "named-checkconf failed for $DIR/named.conf"
fi
if CHECKZONE=$(find_tool named-checkzone); then
    "$CHECKZONE" -q "$ZONE." "$DIR/zone.db" || die "named-checkzone failed for $DIR/zone.db"
fi

# Debian/Ubuntu's AppArmor profile for /usr/sbin/named only allows /etc/bind and
# /var/{lib,cache}/bind; it attaches by path, so a copy inside DIR runs unconfined.
apparmor_named_enforced() {
    [ "$(cat /sys/module/apparmor/parameters/enabled 2>/dev/null)" = Y ] || return 1
    if [ -r /sys/kernel/security/apparmor/profiles ]; then
        grep -Eq '^(named|/usr/sbin/named) \(enforce\)' /sys/kernel/security/apparmor/profiles
    else
        [ -e /etc/apparmor.d/usr.sbin.named ]
    fi
}
COPY=${TEST_DNS_COPY_NAMED:-auto}
if [ "$COPY" = auto ]; then
    COPY=0
    if [ -z "${TEST_DNS_NAMED:-}" ] && apparmor_named_enforced; then COPY=1; fi
fi
if [ "$COPY" = 1 ]; then
    cp "$NAMED" "$DIR/named" && chmod 700 "$DIR/named"
    NAMED=$DIR/named
    err "running a copy of named ($NAMED) to stay outside the AppArmor profile of /usr/sbin/named"
fi

# -g: foreground, log to stderr (-> named.log); -4: IPv4 only. stdin/stdout/stderr are cut
# off from the caller, so a caller reading our stdout gets EOF when this script exits.
"$NAMED" -g -4 -c "$DIR/named.conf" -p "$PORT" </dev/null >"$DIR/named.log" 2>&1 &
PID=$!
echo "$PID" > "$DIR/named.pid"

fail() {
    err "$*"
    if [ -s "$DIR/named.log" ]; then
        err "last lines of $DIR/named.log:"
        tail -n 25 "$DIR/named.log" >&2
    fi
    if kill "$PID" 2>/dev/null; then wait "$PID" 2>/dev/null || true; fi
    rm -f "$DIR/named.pid"
    exit 1
}

probe() { # extra dig options, e.g. +tcp
    out=$("$DIG" -k "$DIR/cluster.key" @127.0.0.1 -p "$PORT" \
          SOA "$ZONE." +norec +time=1 +tries=1 "$@" 2>&1) || return 1
    case $out in *"Couldn't verify"*|*"WARNING"*|*"could not"*) return 1 ;; esac
    case $out in *"status: NOERROR"*) ;; *) return 1 ;; esac
    case $out in *"ANSWER: 1,"*) return 0 ;; esac
    return 1
}
start=$(date +%s)
while :; do
    if ! kill -0 "$PID" 2>/dev/null; then
        wait "$PID" 2>/dev/null && rc=0 || rc=$?
        fail "named exited during start-up (status $rc)"
    fi
    if grep -qi 'address in use' "$DIR/named.log"; then
        fail "127.0.0.1:$PORT is already in use"
    fi
    if grep -qiE 'interface ignored|unable to listen' "$DIR/named.log"; then
        fail "named could not listen on 127.0.0.1:$PORT (in use? below 1024 without root?)"
    fi
    if grep -q ' running$' "$DIR/named.log" && probe && probe +tcp; then
        break
    fi
    if [ $(( $(date +%s) - start )) -ge "$TIMEOUT" ]; then
        fail "named did not answer a signed SOA $ZONE. on 127.0.0.1:$PORT within ${TIMEOUT}s"
    fi
    sleep 0.1 2>/dev/null || sleep 1
done

cat > "$DIR/tsig.env" <<ENV
KEY_NAME=$KEY_NAME
KEY_SECRET=$SECRET
KEY_ALGORITHM=hmac-sha256
OTHER_KEY_NAME=$OTHER_KEY_NAME
OTHER_KEY_SECRET=$OTHER_SECRET
DNS_SERVER=127.0.0.1
DNS_PORT=$PORT
DNS_ZONE=$ZONE
ENV
err "named pid $PID serves $ZONE. on 127.0.0.1:$PORT (state in $DIR)"
cat "$DIR/tsig.env"
