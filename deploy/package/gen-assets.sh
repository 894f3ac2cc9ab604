#!/usr/bin/env bash
# gen-assets.sh BIN_DIR OUT_DIR: files of the Debian package that are generated from the
# built binaries or from deploy/: man pages (clap_mangen, through the hidden `kmsd man` and
# `kmsctl man [SUBCOMMAND]`), shell completions (clap_complete, `... completions SHELL`) and
# the systemd unit with the package's binary path (/usr/bin instead of /usr/local/bin).
# crates/kmsd/Cargo.toml ([package.metadata.deb]) takes them from deploy/package/generated.
set -euo pipefail
BIN_DIR=${1:?usage: gen-assets.sh BIN_DIR OUT_DIR}
OUT=${2:?usage: gen-assets.sh BIN_DIR OUT_DIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
KMSD="$BIN_DIR/kmsd"
KMSCTL="$BIN_DIR/kmsctl"

rm -rf "$OUT"
mkdir -p "$OUT/man" "$OUT/completions"

"$KMSD" man | gzip -9n > "$OUT/man/kmsd.1.gz"
"$KMSCTL" man | gzip -9n > "$OUT/man/kmsctl.1.gz"
# One page per visible kmsctl subcommand (`man kmsctl-diagnose`).
subcommands=$("$KMSCTL" --help | awk '/^Commands:/ {on = 1; next} on && /^  [a-z]/ {print $1} on && /^$/ {exit}' |
    grep -vx help)
[ -n "$subcommands" ] || { echo "gen-assets: no kmsctl subcommands found in --help" >&2; exit 1; }
for sub in $subcommands; do
    "$KMSCTL" man "$sub" | gzip -9n > "$OUT/man/kmsctl-$sub.1.gz"
done

for bin in kmsd kmsctl; do
    "$BIN_DIR/$bin" completions bash > "$OUT/completions/$bin.bash"
    "$BIN_DIR/$bin" completions zsh > "$OUT/completions/_$bin"
    "$BIN_DIR/$bin" completions fish > "$OUT/completions/$bin.fish"
done

sed 's#/usr/local/bin/#/usr/bin/#g' "$ROOT/deploy/systemd/kmsd.service" > "$OUT/kmsd.service"
grep -qx 'ExecStart=/usr/bin/kmsd --config /etc/kmsd/kmsd.toml' "$OUT/kmsd.service" || {
    echo "gen-assets: unexpected ExecStart in deploy/systemd/kmsd.service" >&2; exit 1; }
echo "generated $(find "$OUT/man" -type f | wc -l) man pages and $(find "$OUT/completions" -type f | wc -l) completion scripts in $OUT"
