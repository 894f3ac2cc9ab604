#!/bin/sh
# One-shot set-up for deploy/compose (service dns-init, runs as root in the BIND image):
# - creates the TSIG key once (kept in the dns-keys volume across restarts and upgrades);
# - writes the bare secret for kmsd (tsig_secret_file), readable only by kmsd's uid;
# - seeds the zone file into BIND's writable volume once.
# Rotating the key: see docs/operations.md ("Rotating the TSIG key").
set -eu

KEY_NAME=${TSIG_KEY_NAME:-kms-compose-key}
KMSD_UID=${KMSD_UID:-65532}
KEYS=/run/kms-dns
ZONE_FILE=/var/lib/bind/kms.test.zone

umask 077
if [ ! -s "$KEYS/tsig.key" ]; then
    tsig-keygen -a hmac-sha256 "$KEY_NAME" > "$KEYS/tsig.key.new"
    mv "$KEYS/tsig.key.new" "$KEYS/tsig.key"
    echo "dns-init: created TSIG key $KEY_NAME"
fi
secret=$(sed -n 's/^[[:space:]]*secret[[:space:]]*"\([^"]*\)".*/\1/p' "$KEYS/tsig.key")
[ -n "$secret" ] || { echo "dns-init: no secret in $KEYS/tsig.key" >&2; exit 1; }
printf '%s\n' "$secret" > "$KEYS/tsig.secret.new"
mv "$KEYS/tsig.secret.new" "$KEYS/tsig.secret"
# named reads the key file after dropping to user bind; kmsd runs as $KMSD_UID.
chown root:bind "$KEYS/tsig.key" && chmod 0640 "$KEYS/tsig.key"
chown "$KMSD_UID:$KMSD_UID" "$KEYS/tsig.secret" && chmod 0400 "$KEYS/tsig.secret"
chmod 0755 "$KEYS"

if [ ! -s "$ZONE_FILE" ]; then
    cp /init/kms.test.zone "$ZONE_FILE"
    echo "dns-init: seeded $ZONE_FILE"
fi
chown -R bind:bind /var/lib/bind
echo "dns-init: done"
