#!/usr/bin/env bash
# stage-image.sh BIN_DIR CONTEXT_DIR: the build context of deploy/docker/Containerfile, a
# root file system with kmsd and kmsctl (symbols stripped), the shared libraries they link
# (found with ldd: glibc, libgcc_s and the dynamic loader, copied to the paths the loader
# looks in), /etc/passwd and /etc/group with the image user 65532 (kmsd), nsswitch.conf and
# the container config. No shell and no other program goes in.
set -euo pipefail
BIN_DIR=${1:?usage: stage-image.sh BIN_DIR CONTEXT_DIR}
CTX=${2:?usage: stage-image.sh BIN_DIR CONTEXT_DIR}
ROOT=$(cd "$(dirname "$0")/../.." && pwd)

rm -rf "$CTX"
mkdir -p "$CTX/rootfs/usr/local/bin" "$CTX/rootfs/etc/kmsd" "$CTX/rootfs/tmp" \
    "$CTX/rootfs/var/lib" "$CTX/data/kmsd"
for bin in kmsd kmsctl; do
    [ -x "$BIN_DIR/$bin" ] || { echo "stage-image: $BIN_DIR/$bin missing (build --release first)" >&2; exit 1; }
    objcopy --strip-all "$BIN_DIR/$bin" "$CTX/rootfs/usr/local/bin/$bin"
    chmod 0755 "$CTX/rootfs/usr/local/bin/$bin"
done

# Every library the binaries need, at the path the loader resolves it to (ldd prints
# "name => /path (addr)" and the loader itself as "/path (addr)").
libs=$(for bin in kmsd kmsctl; do ldd "$BIN_DIR/$bin"; done |
    awk '$2 == "=>" && $3 ~ /^\// {print $3} $1 ~ /^\// {print $1}' | sort -u)
[ -n "$libs" ] || { echo "stage-image: ldd found no libraries (static binaries need none)" >&2; }
for lib in $libs; do
    mkdir -p "$CTX/rootfs$(dirname "$lib")"
    cp -L "$lib" "$CTX/rootfs$lib"
    chmod 0755 "$CTX/rootfs$lib"
done

cat > "$CTX/rootfs/etc/passwd" <<'PW'
root:x:0:0:root:/root:/usr/sbin/nologin
kmsd:x:65532:65532:KMS host node (kms-cluster):/var/lib/kmsd:/usr/sbin/nologin
PW
cat > "$CTX/rootfs/etc/group" <<'GR'
root:x:0:
kmsd:x:65532:
GR
cat > "$CTX/rootfs/etc/nsswitch.conf" <<'NS'
passwd: files
group: files
hosts: files dns
NS
install -m 0644 "$ROOT/deploy/docker/kmsd.toml" "$CTX/rootfs/etc/kmsd/kmsd.toml"
chmod 1777 "$CTX/rootfs/tmp"
chmod 0755 "$CTX/rootfs/var" "$CTX/rootfs/var/lib"
chmod 0700 "$CTX/data/kmsd"   # copied with owner 65532 by the Containerfile
echo "staged $(du -sh "$CTX/rootfs" | cut -f1) in $CTX/rootfs: $(echo "$libs" | wc -w) libraries"
