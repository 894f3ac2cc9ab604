#!/bin/sh
# install.sh: make sure the tools of the DNS integration tests are present.
#   bind9          -> named            (the authoritative test server)
#   bind9-utils    -> tsig-keygen, named-checkconf, named-checkzone
#   bind9-dnsutils -> dig, nsupdate    (independent checks of what was published)
# Idempotent: installs only what is missing. Needs root (or sudo) for apt-get.
# On a non-Debian system it prints what is needed and exits 1.
set -eu

PROG=install-dns-tools
err() { printf '%s: %s\n' "$PROG" "$*" >&2; }

# Tools may live in sbin directories that are not in a normal user's PATH.
have() {
    command -v "$1" >/dev/null 2>&1 && return 0
    for d in /usr/sbin /sbin /usr/local/sbin; do [ -x "$d/$1" ] && return 0; done
    return 1
}

missing=
have named || missing="$missing bind9"
{ have tsig-keygen && have named-checkconf; } || missing="$missing bind9-utils"
{ have dig && have nsupdate; } || missing="$missing bind9-dnsutils"

if [ -z "$missing" ]; then
    err "named, tsig-keygen, dig and nsupdate are already installed"
    exit 0
fi

if ! command -v apt-get >/dev/null 2>&1; then
    err "missing:$missing (no apt-get here; install BIND 9 server, utils and dig/nsupdate by hand)"
    exit 1
fi

SUDO=
if [ "$(id -u)" != 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO="sudo -n"; else
        err "missing:$missing and not root (run as root: apt-get install$missing)"
        exit 1
    fi
fi

err "installing:$missing"
export DEBIAN_FRONTEND=noninteractive
# Installing bind9 on a systemd host also enables the system named on port 53; the tests
# use their own named on a high loopback port with its own config, so the two do not meet.
$SUDO apt-get -o DPkg::Lock::Timeout=300 update -q >&2
# shellcheck disable=SC2086  # $missing is a list of package names
$SUDO apt-get -o DPkg::Lock::Timeout=300 install -y -q --no-install-recommends $missing >&2
have named && have dig && have nsupdate && have tsig-keygen || { err "install did not provide the tools"; exit 1; }
err "done"
