#!/usr/bin/env bash
# ci.sh: the release artifacts of kms-cluster, built and checked the way CI does it.
#   1. release build of kmsd and kmsctl (sizes recorded)
#   2. container image (deploy/docker/Containerfile) with `buildah bud --isolation chroot`:
#      user, entrypoint, ports, health check, labels and size checked with `podman image
#      inspect`; its root file system mounted (`buildah mount`) and, from it under chroot as
#      the image user: `kmsd --version`, a one-node kmsd on loopback, the health check and an
#      activation; saved as a docker-archive
#   3. Debian package (cargo-deb): contents checked, installed with `dpkg -i`, files, user and
#      permissions checked, the installed kmsd run as the service user on loopback (no
#      systemd needed) and activated against, stopped by pid; `dpkg -r` then `dpkg --purge`
#      leave nothing behind
#   4. CycloneDX SBOMs of kmsd and kmsctl (cargo-cyclonedx), checked
# Artifacts: $CARGO_TARGET_DIR/package/ (kms-cluster-VERSION.image.tar, kmsd_*.deb,
# sbom/*.cdx.json, sizes.txt). Tools are installed here (apt-get, cargo install --locked);
# with CI=true a tool that cannot be installed, or a missing privilege, is a failure.
#   bash deploy/package/ci.sh                 everything
#   PACKAGE_STEPS="image deb" bash ...        some steps (build, image, deb, sbom)
set -euo pipefail
cd "$(dirname "$0")/../.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$HOME/.cache/kms-cluster-target}"
export CARGO_TERM_COLOR=never
OUT="$CARGO_TARGET_DIR/package"
REL="$CARGO_TARGET_DIR/release"
STEPS="${PACKAGE_STEPS:-build image deb sbom}"
IMAGE_MAX_BYTES=${IMAGE_MAX_BYTES:-30000000}   # the goal: under 30 MB
VERSION=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^version = "\(.*\)"/\1/p' Cargo.toml)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
SOURCE=$(sed -n '/^\[workspace.package\]/,/^\[/ s/^repository = "\(.*\)"/\1/p' Cargo.toml)
IMAGE="localhost/kms-cluster:$VERSION"

in_ci() { [ "${CI:-}" = "true" ]; }
step() { printf '\n==> package: %s\n' "$*"; }
passed=0
pass() { passed=$((passed + 1)); echo "  ok: $*"; }
fail() { echo "  FAILED: $*" >&2; exit 1; }
has_step() { case " $STEPS " in *" $1 "*) return 0 ;; *) return 1 ;; esac; }
now() { date +%s; }
T0=$(now)
declare -A took

# ---- processes and mounts this script starts, stopped by pid / undone on exit ------------
PIDS=()
CONTAINERS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
    for ctr in "${CONTAINERS[@]}"; do
        buildah umount "$ctr" >/dev/null 2>&1 || true
        buildah rm "$ctr" >/dev/null 2>&1 || true
    done
    [ -n "${WORK:-}" ] && rm -rf "$WORK"
}
trap cleanup EXIT
WORK=$(mktemp -d /tmp/kms-package.XXXXXX)
mkdir -p "$OUT"

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])' 2>/dev/null ||
        shuf -i 20000-60000 -n 1
}

# Waits until URL answers 200 (at most $2 seconds).
wait_http() {
    local url=$1 limit=$2 i
    for ((i = 0; i < limit * 10; i++)); do
        if curl -fsS -o /dev/null "$url" 2>/dev/null; then return 0; fi
        sleep 0.1
    done
    return 1
}

# Stops a process started here by pid (SIGTERM, then waits up to 30 s).
stop_pid() {
    local pid=$1 i
    kill -TERM "$pid" 2>/dev/null || return 0
    for ((i = 0; i < 300; i++)); do
        kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null || true; return 0; }
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    fail "pid $pid did not stop within 30 s of SIGTERM"
}

# ---- tools -------------------------------------------------------------------------------
step "tools"
need_apt=()
for pair in buildah:buildah podman:podman jq:jq curl:curl objcopy:binutils dpkg-shlibdeps:dpkg-dev \
    gzip:gzip chroot:coreutils setpriv:util-linux; do
    command -v "${pair%%:*}" >/dev/null 2>&1 || need_apt+=("${pair#*:}")
done
if [ ${#need_apt[@]} -gt 0 ]; then
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
        echo "installing: ${need_apt[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_apt[@]}" >/dev/null ||
            fail "apt-get install ${need_apt[*]}"
    elif in_ci; then
        fail "missing ${need_apt[*]} and cannot install (not root or no apt-get)"
    else
        echo "missing ${need_apt[*]} (not root): the steps needing them fail"
    fi
fi
[ "$(id -u)" = 0 ] || { in_ci && fail "the image and package checks need root"; echo "not root: image and deb steps skipped"; STEPS=$(echo "$STEPS" | sed 's/image//; s/deb//'); }
cargo_tools=()
has_step deb && cargo_tools+=(cargo-deb)
has_step sbom && cargo_tools+=(cargo-cyclonedx)
for tool in "${cargo_tools[@]}"; do
    if ! command -v "$tool" >/dev/null 2>&1; then
        echo "cargo install --locked $tool"
        # Their own target dir: the workspace's stays untouched.
        CARGO_TARGET_DIR="$CARGO_TARGET_DIR/tools" cargo install --locked --quiet "$tool" ||
            fail "cargo install $tool"
    fi
    cargo "${tool#cargo-}" --version
done
took[tools]=$(($(now) - T0))

# ---- 1. release build --------------------------------------------------------------------
if has_step build; then
    step "1. release build (kmsd, kmsctl)"
    t=$(now)
    cargo build --release --locked -p kmsd -p kmsctl
    took[build]=$(($(now) - t))
    for bin in kmsd kmsctl; do
        [ -x "$REL/$bin" ] || fail "$REL/$bin not built"
        if readelf -S "$REL/$bin" | grep -q '\.debug_info'; then
            fail "$bin carries DWARF debug info (the release profile strips it)"
        fi
    done
    pass "release binaries without debug info: kmsd $(stat -c %s "$REL/kmsd") B, kmsctl $(stat -c %s "$REL/kmsctl") B"
    "$REL/kmsd" --version | grep -qx "kmsd $VERSION" || fail "kmsd --version"
fi
for bin in kmsd kmsctl; do [ -x "$REL/$bin" ] || fail "$REL/$bin missing: run the build step"; done

# ---- 2. container image ------------------------------------------------------------------
if has_step image; then
    step "2. container image $IMAGE (buildah bud --isolation chroot)"
    t=$(now)
    bash deploy/package/stage-image.sh "$REL" "$WORK/context"
    buildah rmi -f "$IMAGE" >/dev/null 2>&1 || true
    buildah bud --isolation chroot --format docker --quiet \
        -f deploy/docker/Containerfile \
        --build-arg VERSION="$VERSION" --build-arg REVISION="$REVISION" \
        --build-arg SOURCE="$SOURCE" --build-arg CREATED="$(date -u +%Y-%m-%dT%H:%M:%SZ)" \
        -t "$IMAGE" "$WORK/context" >/dev/null
    pass "built $IMAGE"

    podman image inspect "$IMAGE" > "$WORK/inspect.json"
    q() { jq -c ".[0]$1" "$WORK/inspect.json"; }
    [ "$(q .Config.User)" = '"65532:65532"' ] || fail "user: $(q .Config.User)"
    pass "runs as 65532:65532 (non-root)"
    [ "$(q .Config.Entrypoint)" = '["/usr/local/bin/kmsd"]' ] || fail "entrypoint: $(q .Config.Entrypoint)"
    pass "entrypoint /usr/local/bin/kmsd"
    [ "$(q '.Config.ExposedPorts | keys')" = '["1688/tcp","7688/tcp","8688/tcp"]' ] ||
        fail "ports: $(q .Config.ExposedPorts)"
    pass "exposes 1688, 7688, 8688/tcp"
    [ "$(q .Healthcheck.Test)" = '["CMD","/usr/local/bin/kmsd","healthcheck"]' ] ||
        fail "health check: $(q .Healthcheck)"
    pass "health check: kmsd healthcheck every $(($(q .Healthcheck.Interval) / 1000000000)) s"
    [ "$(q '.Config.Labels["org.opencontainers.image.version"]')" = "\"$VERSION\"" ] || fail "version label"
    [ "$(q '.Config.Labels["org.opencontainers.image.revision"]')" = "\"$REVISION\"" ] || fail "revision label"
    [ "$(q '.Config.Labels["org.opencontainers.image.source"]')" = "\"$SOURCE\"" ] || fail "source label"
    pass "OCI labels: version $VERSION, revision ${REVISION:0:12}, source $SOURCE"
    [ "$(q '.Config.Volumes | keys')" = '["/var/lib/kmsd"]' ] || fail "volume: $(q .Config.Volumes)"
    size=$(q .Size)
    [ "$size" -lt "$IMAGE_MAX_BYTES" ] || fail "image size $size B (goal < $IMAGE_MAX_BYTES B)"
    pass "image size $size B (< $IMAGE_MAX_BYTES B)"

    # The image's file system, as a writable container root (the data dir must be writable
    # by the image user).
    ctr=$(buildah from --quiet "$IMAGE")
    CONTAINERS+=("$ctr")
    mnt=$(buildah mount "$ctr")
    for sh in bin/sh bin/bash usr/bin/sh usr/bin/busybox; do
        [ ! -e "$mnt/$sh" ] || fail "the image contains /$sh"
    done
    pass "no shell in the image"
    [ "$(stat -c '%u:%g %a' "$mnt/var/lib/kmsd")" = "65532:65532 700" ] ||
        fail "/var/lib/kmsd is $(stat -c '%u:%g %a' "$mnt/var/lib/kmsd")"
    pass "/var/lib/kmsd 0700 65532:65532"
    # A clean environment (the image's ENV is not applied by chroot; what kmsd needs is given).
    CHROOT=$(command -v chroot)
    in_image() { env -i PATH=/usr/local/bin "$@"; }
    v=$(in_image "$CHROOT" --userspec=65532:65532 "$mnt" /usr/local/bin/kmsd --version)
    [ "$v" = "kmsd $VERSION" ] || fail "kmsd --version in the image: $v"
    pass "kmsd --version from the image: $v"

    kms=$(free_port) admin=$(free_port) raft=$(free_port)
    token=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
    in_image KMSD_CONFIG=/etc/kmsd/kmsd.toml KMSD_ADMIN_TOKEN="$token" \
        "$CHROOT" --userspec=65532:65532 "$mnt" /usr/local/bin/kmsd \
        --kms-listen "127.0.0.1:$kms" --admin-listen "127.0.0.1:$admin" --raft-listen "127.0.0.1:$raft" \
        > "$WORK/image-kmsd.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$admin/readyz" 60 || { cat "$WORK/image-kmsd.log"; fail "kmsd from the image not ready"; }
    in_image "$CHROOT" --userspec=65532:65532 "$mnt" /usr/local/bin/kmsd healthcheck \
        --url "http://127.0.0.1:$admin/healthz" || fail "health check command in the image"
    pass "one-node kmsd from the image ready; its health check command passes"
    out=$(in_image "$CHROOT" --userspec=65532:65532 "$mnt" /usr/local/bin/kmsctl activate \
        --server "127.0.0.1:$kms" --product windows --json) || fail "activation: $out"
    echo "$out" | jq -e '.result == "success" and .current_count == 1' >/dev/null || fail "activation: $out"
    pass "activation against it with the image's kmsctl: $(echo "$out" | jq -r '"count \(.current_count), protocol \(.protocol)"')"
    stop_pid "$pid"
    [ -n "$(ls -A "$mnt/var/lib/kmsd")" ] || fail "nothing written to /var/lib/kmsd"
    pass "stopped by pid; state written to the image's /var/lib/kmsd as 65532"
    buildah umount "$ctr" >/dev/null
    buildah rm "$ctr" >/dev/null
    CONTAINERS=()

    rm -f "$OUT/kms-cluster-$VERSION.image.tar"
    podman save --quiet --format docker-archive -o "$OUT/kms-cluster-$VERSION.image.tar" "$IMAGE"
    pass "saved $OUT/kms-cluster-$VERSION.image.tar ($(stat -c %s "$OUT/kms-cluster-$VERSION.image.tar") B)"
    took[image]=$(($(now) - t))
fi

# ---- 3. Debian package -------------------------------------------------------------------
if has_step deb; then
    step "3. Debian package (cargo-deb)"
    t=$(now)
    bash deploy/package/gen-assets.sh "$REL" deploy/package/generated
    rm -f "$OUT"/kmsd_*.deb
    cargo deb -p kmsd --no-build --output "$OUT/" >/dev/null
    deb=$(ls "$OUT"/kmsd_*.deb)
    pass "built $(basename "$deb") ($(stat -c %s "$deb") B)"
    dpkg-deb -c "$deb" | awk '{print $1, $2, $6}' > "$WORK/contents"
    expect_file() { # MODE-STRING PATH
        grep -qE "^$1 (root/root|0/0) \./$2\$" "$WORK/contents" || fail "package: $2 with $1 (have: $(grep " \./$2\$" "$WORK/contents"))"
    }
    expect_file -rwxr-xr-x usr/bin/kmsd
    expect_file -rwxr-xr-x usr/bin/kmsctl
    expect_file -rw-r----- etc/kmsd/kmsd.toml
    expect_file -rw-r--r-- usr/lib/sysusers.d/kmsd.conf
    expect_file -rw-r--r-- usr/lib/systemd/system/kmsd.service
    expect_file -rw-r--r-- usr/share/man/man1/kmsd.1.gz
    expect_file -rw-r--r-- usr/share/man/man1/kmsctl.1.gz
    expect_file -rw-r--r-- usr/share/man/man1/kmsctl-diagnose.1.gz
    expect_file -rw-r--r-- usr/share/bash-completion/completions/kmsctl
    expect_file -rw-r--r-- usr/share/zsh/vendor-completions/_kmsd
    expect_file -rw-r--r-- usr/share/fish/vendor_completions.d/kmsctl.fish
    expect_file -rw-r--r-- usr/share/doc/kmsd/examples/kmsd-cluster.toml
    pass "contents: binaries, unit, sysusers, config, $(grep -c 'man1/' "$WORK/contents") man pages, completions"
    dpkg-deb -f "$deb" Depends | grep -q 'libc6' || fail "Depends: $(dpkg-deb -f "$deb" Depends)"
    dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles | grep -qx /etc/kmsd/kmsd.toml || fail "kmsd.toml is no conffile"
    pass "Depends: $(dpkg-deb -f "$deb" Depends); /etc/kmsd/kmsd.toml is a conffile"
    for bin in kmsd kmsctl; do
        dpkg-deb --fsys-tarfile "$deb" | tar -xO "./usr/bin/$bin" > "$WORK/$bin.packaged"
        ! readelf -S "$WORK/$bin.packaged" | grep -q '\.symtab' || fail "/usr/bin/$bin is not stripped"
    done
    pass "packaged binaries stripped"

    # A leftover of an earlier run would hide what this one installs.
    dpkg -s kmsd >/dev/null 2>&1 && dpkg --purge kmsd >/dev/null
    if getent passwd kmsd >/dev/null; then fail "a user kmsd exists before the install"; fi
    dpkg -i "$deb" > "$WORK/dpkg-i.log" 2>&1 || { cat "$WORK/dpkg-i.log"; fail "dpkg -i"; }
    pass "dpkg -i"
    user=$(getent passwd kmsd) || fail "no user kmsd after the install"
    uid=$(echo "$user" | cut -d: -f3)
    [ "$uid" -lt 1000 ] || fail "kmsd is not a system user (uid $uid)"
    [ "$(echo "$user" | cut -d: -f6,7)" = "/var/lib/kmsd:/usr/sbin/nologin" ] || fail "kmsd user: $user"
    getent group kmsd >/dev/null || fail "no group kmsd"
    pass "system user kmsd (uid $uid, home /var/lib/kmsd, no login shell)"
    check_stat() { # PATH EXPECTED(owner:group mode)
        [ "$(stat -c '%U:%G %a' "$1")" = "$2" ] || fail "$1 is $(stat -c '%U:%G %a' "$1"), want $2"
    }
    check_stat /var/lib/kmsd "kmsd:kmsd 700"
    check_stat /etc/kmsd "root:kmsd 750"
    check_stat /etc/kmsd/kmsd.toml "root:kmsd 640"
    check_stat /usr/bin/kmsd "root:root 755"
    pass "permissions: /var/lib/kmsd 0700 kmsd, /etc/kmsd 0750 root:kmsd, kmsd.toml 0640"
    grep -qx 'ExecStart=/usr/bin/kmsd --config /etc/kmsd/kmsd.toml' /usr/lib/systemd/system/kmsd.service ||
        fail "unit ExecStart"
    grep -qx 'User=kmsd' /usr/lib/systemd/system/kmsd.service || fail "unit User"
    if command -v systemd-analyze >/dev/null; then
        verify=$(systemd-analyze verify /usr/lib/systemd/system/kmsd.service 2>&1) ||
            fail "systemd-analyze verify kmsd.service: $verify"
        pass "installed unit verifies (systemd-analyze verify)"
    fi
    zcat /usr/share/man/man1/kmsctl-diagnose.1.gz | grep -q 'admin\\-url' || fail "man page kmsctl-diagnose"
    zcat /usr/share/man/man1/kmsd.1.gz | grep -q '^\.TH kmsd 1' || fail "man page kmsd"
    bash -n /usr/share/bash-completion/completions/kmsctl || fail "bash completion syntax"
    grep -q diagnose /usr/share/bash-completion/completions/kmsctl || fail "completion lacks diagnose"
    pass "man pages (kmsd, kmsctl, kmsctl-diagnose, ...) and completions installed"
    /usr/bin/kmsd check-config --config /etc/kmsd/kmsd.toml >/dev/null || fail "shipped config invalid"
    setpriv --reuid=kmsd --regid=kmsd --init-groups /usr/bin/kmsd check-config --config /etc/kmsd/kmsd.toml >/dev/null ||
        fail "the service user cannot read /etc/kmsd/kmsd.toml"
    pass "shipped config valid and readable by kmsd"

    # The installed kmsd as the service would run it, without systemd: the service user,
    # the shipped config, loopback ports and a temporary data dir.
    data=$(mktemp -d /tmp/kms-package-data.XXXXXX)
    chown kmsd:kmsd "$data"
    chmod 0700 "$data"
    kms=$(free_port) admin=$(free_port) raft=$(free_port)
    (cd "$data" && exec setpriv --reuid=kmsd --regid=kmsd --init-groups /usr/bin/kmsd --config /etc/kmsd/kmsd.toml \
        --data-dir "$data/data" --kms-listen "127.0.0.1:$kms" --admin-listen "127.0.0.1:$admin" \
        --raft-listen "127.0.0.1:$raft") > "$WORK/deb-kmsd.log" 2>&1 &
    pid=$!
    PIDS+=("$pid")
    wait_http "http://127.0.0.1:$admin/readyz" 60 || { cat "$WORK/deb-kmsd.log"; fail "installed kmsd not ready"; }
    [ "$(ps -o user= -p "$pid" | tr -d ' ')" = kmsd ] ||
        fail "kmsd does not run as kmsd"
    out=$(/usr/bin/kmsctl activate --server "127.0.0.1:$kms" --product office --json) || fail "activation: $out"
    echo "$out" | jq -e '.result == "success"' >/dev/null || fail "activation: $out"
    # diagnose from the package: a fresh host is below N (exit 1, the problem named).
    set +e
    diag=$(/usr/bin/kmsctl diagnose --server "127.0.0.1:$kms" --product office \
        --admin-url "http://127.0.0.1:$admin" --json)
    code=$?
    set -e
    if [ "$code" != 1 ] || ! echo "$diag" | jq -e '.problems == ["count_below_n"]' >/dev/null; then
        fail "kmsctl diagnose (exit $code): $diag"
    fi
    pass "installed kmsd runs as kmsd on loopback: activation ok, kmsctl diagnose names count_below_n"
    stop_pid "$pid"
    [ "$(stat -c %U "$data/data")" = kmsd ] || fail "data dir not written by kmsd"
    rm -rf "$data"
    pass "stopped by pid (SIGTERM)"

    dpkg -r kmsd > "$WORK/dpkg-r.log" 2>&1 || { cat "$WORK/dpkg-r.log"; fail "dpkg -r"; }
    [ ! -e /usr/bin/kmsd ] && [ ! -e /usr/bin/kmsctl ] && [ ! -e /usr/lib/systemd/system/kmsd.service ] ||
        fail "dpkg -r left the binaries or the unit"
    [ -e /etc/kmsd/kmsd.toml ] || fail "dpkg -r removed the configuration (a conffile stays until purge)"
    pass "dpkg -r: programs gone, configuration kept"
    dpkg --purge kmsd > "$WORK/dpkg-purge.log" 2>&1 || { cat "$WORK/dpkg-purge.log"; fail "dpkg --purge"; }
    [ ! -e /etc/kmsd ] || fail "purge left /etc/kmsd: $(ls -la /etc/kmsd)"
    [ ! -e /var/lib/kmsd ] || fail "purge left /var/lib/kmsd"
    ! getent passwd kmsd >/dev/null || fail "purge left the user kmsd"
    ! getent group kmsd >/dev/null || fail "purge left the group kmsd"
    ! dpkg -s kmsd >/dev/null 2>&1 || fail "dpkg still knows kmsd"
    left=$(awk '$1 !~ /^d/ {sub(/^\./, "", $3); print $3}' "$WORK/contents" | while read -r f; do
        [ -e "$f" ] && echo "$f"; done || true)
    [ -z "$left" ] || fail "left after purge: $left"
    pass "dpkg --purge: no file, directory, user or group left"
    took[deb]=$(($(now) - t))
fi

# ---- 4. SBOM ------------------------------------------------------------------------------
if has_step sbom; then
    step "4. SBOM (CycloneDX, cargo-cyclonedx)"
    t=$(now)
    mkdir -p "$OUT/sbom"
    rm -f "$OUT"/sbom/*.cdx.json
    # One document per workspace member, written beside its Cargo.toml; the release
    # artifacts' two are kept, the others removed (nothing stays in the source tree).
    cargo cyclonedx --format json --spec-version 1.5 --no-build-deps -q
    for crate in kmsd kmsctl; do
        mv "crates/$crate/$crate.cdx.json" "$OUT/sbom/$crate.cdx.json"
    done
    find crates tests -maxdepth 2 -name '*.cdx.json' -delete
    for crate in kmsd kmsctl; do
        f="$OUT/sbom/$crate.cdx.json"
        [ -s "$f" ] || fail "$f empty"
        jq -e --arg c "$crate" '
            .bomFormat == "CycloneDX"
            and (.metadata.component.name == $c)
            and ([.components[].name] | index("tokio") != null)
            and ([.components[].name] | index("kms-wire") != null)
            and ([.components[] | select(.purl != null)] | length > 50)' "$f" >/dev/null ||
            fail "$f: not a CycloneDX document of $crate with its dependencies"
        pass "$(basename "$f"): CycloneDX $(jq -r .specVersion "$f"), $(jq '.components | length' "$f") components ($(jq -r '[.components[].name | select(startswith("kms"))] | join(", ")' "$f"))"
    done
    took[sbom]=$(($(now) - t))
fi

# ---- summary ------------------------------------------------------------------------------
step "summary"
{
    echo "version $VERSION revision $REVISION"
    for bin in kmsd kmsctl; do echo "release/$bin $(stat -c %s "$REL/$bin") bytes"; done
    if [ -n "${size:-}" ]; then echo "image $size bytes (uncompressed layers)"; fi
    if has_step deb; then echo "deb $(stat -c %s "$OUT"/kmsd_*.deb) bytes"; fi
    for k in "${!took[@]}"; do echo "time $k ${took[$k]} s"; done
} | tee "$OUT/sizes.txt"
echo "artifacts in $OUT"
echo "package: $passed passed, 0 failed"
