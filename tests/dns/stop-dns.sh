#!/bin/sh
# stop-dns.sh DIR
#
# Stops the named started by start-dns.sh DIR, by the pid in DIR/named.pid only (never by
# name): SIGTERM, then SIGKILL after TEST_DNS_STOP_TIMEOUT seconds (default 10). Exits 0 when
# it is stopped or was not running. Leaves DIR in place.
set -eu

PROG=stop-dns
err() { printf '%s: %s\n' "$PROG" "$*" >&2; }

[ $# -eq 1 ] || { err "usage: $0 DIR"; exit 2; }
[ -d "$1" ] || { err "no such directory: $1 (nothing to stop)"; exit 0; }
DIR=$(CDPATH='' cd -- "$1" && pwd -P)
PIDFILE=$DIR/named.pid
TIMEOUT=${TEST_DNS_STOP_TIMEOUT:-10}
case $TIMEOUT in ''|*[!0-9]*) TIMEOUT=10 ;; esac

[ -f "$PIDFILE" ] || { err "no $PIDFILE (nothing to stop)"; exit 0; }
PID=$(cat "$PIDFILE")
case $PID in ''|*[!0-9]*) err "bad pid in $PIDFILE: '$PID'"; exit 1 ;; esac

# A zombie is already dead (in containers pid 1 may reap it late).
alive() {
    kill -0 "$1" 2>/dev/null || return 1
    if [ -r "/proc/$1/stat" ]; then
        state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)
        [ "$state" != Z ] || return 1
    fi
    return 0
}

if ! alive "$PID"; then
    err "named (pid $PID) is not running"
    rm -f "$PIDFILE"
    exit 0
fi
# Pid reuse guard: the process must be the named of this DIR.
if [ -r "/proc/$PID/cmdline" ]; then
    if ! tr '\000' '\n' < "/proc/$PID/cmdline" | grep -qxF "$DIR/named.conf"; then
        err "pid $PID is not the named of $DIR (pid reused?); not killing it"
        rm -f "$PIDFILE"
        exit 1
    fi
fi

kill -TERM "$PID" 2>/dev/null || true
waited=0
while alive "$PID"; do
    if [ "$waited" -ge $((TIMEOUT * 10)) ]; then
        err "named (pid $PID) ignored SIGTERM for ${TIMEOUT}s; sending SIGKILL"
        kill -KILL "$PID" 2>/dev/null || true
        break
    fi
    sleep 0.1 2>/dev/null || { sleep 1; waited=$((waited + 9)); }
    waited=$((waited + 1))
done
rm -f "$PIDFILE"
err "stopped named (pid $PID) of $DIR"
