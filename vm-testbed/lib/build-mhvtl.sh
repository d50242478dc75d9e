#!/usr/bin/env bash
# Build mhvtl for the test bed guest from the pinned source tarball.
#
#   build-mhvtl.sh WORK KVER TARBALL
#
# - the kernel module for the guest kernel KVER, against linux-headers-KVER
#   from apt: WORK/kernel/mhvtl/mhvtl.ko (next to the kernel, so a new kernel
#   rebuilds it; the key file names the kernel and the tarball);
# - the user space (vtltape, vtllibrary, mktape, vtlcmd, libvtlscsi.so):
#   WORK/mhvtl/usr-<sha>/{bin,lib}, relocatable ($ORIGIN rpath).
# The configuration and tape home paths compiled into the user space live under
# /run and /var/tmp, which are writable in the guest with or without the overlay
# (see guest/mhvtl.sh). The source is unpacked under WORK (git-ignored) and
# removed after the build; nothing of it enters the repository.
# Research: shared/research/mhvtl-in-testbed.md. Exits non-zero with the reason.
set -euo pipefail
WORK=$1 KVER=$2 TARBALL=$3
SHA256=18462d68f1423250f5b0c877aa3842ae24dbdc3b74a54789606172cc51756cb8
CONFIG_PATH=/run/mhvtl
HOME_PATH=/var/tmp/mhvtl

say() { echo "testbed: mhvtl: $*" >&2; }
fail() { echo "testbed: FAILED: mhvtl: $*" >&2; exit 1; }

[ -f "$TARBALL" ] || fail "source tarball $TARBALL not found (set TESTBED_MHVTL_TARBALL)"
sum=$(sha256sum "$TARBALL" | cut -d' ' -f1)
[ "$sum" = "$SHA256" ] || fail "$TARBALL has sha256 $sum, expected $SHA256"

MOD=$WORK/kernel/mhvtl
USR=$WORK/mhvtl/usr-${SHA256:0:12}
mod_key="$KVER $SHA256"
[ -f "$MOD/mhvtl.ko" ] && [ "$(cat "$MOD/.key" 2>/dev/null)" = "$mod_key" ] && mod_ok=1 || mod_ok=
[ -x "$USR/bin/vtltape" ] && [ -f "$USR/.done" ] && usr_ok=1 || usr_ok=
[ -n "$mod_ok" ] && [ -n "$usr_ok" ] && exit 0

# Build packages: the exact headers for the guest kernel, and zlib for the user space.
need=()
for p in "linux-headers-$KVER" zlib1g-dev gcc make; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || need+=("$p")
done
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    log=$WORK/apt-mhvtl.log
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
            >"$log" 2>&1; then
        apt-get update -qq >>"$log" 2>&1 || true
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" \
            >>"$log" 2>&1 || { tail -20 "$log" >&2; fail "apt-get install ${need[*]} (see $log)"; }
    fi
fi
[ -d "/lib/modules/$KVER/build" ] || fail "/lib/modules/$KVER/build missing after installing linux-headers-$KVER"

SRC=$WORK/mhvtl/build
rm -rf "$SRC"
mkdir -p "$SRC"
tar -xzf "$TARBALL" -C "$SRC" --strip-components=1 || fail "cannot unpack $TARBALL"
log=$WORK/mhvtl/build.log
: >"$log"

if [ -z "$mod_ok" ]; then
    say "building the kernel module for $KVER"
    # V= (not KDIR=): config.sh finds include/linux/fs.h only through
    # /lib/modules/KVER/build, where Debian's -common headers package puts it
    make -C "$SRC/kernel" V="$KVER" mhvtl.ko >>"$log" 2>&1 \
        || { tail -30 "$log" >&2; fail "kernel module build failed (see $log)"; }
    rm -rf "$MOD.tmp"
    mkdir -p "$MOD.tmp"
    cp "$SRC/kernel/mhvtl.ko" "$MOD.tmp/"
    echo "$mod_key" >"$MOD.tmp/.key"
    rm -rf "$MOD"
    mv "$MOD.tmp" "$MOD"
fi

if [ -z "$usr_ok" ]; then
    say "building the user space"
    # shellcheck disable=SC2016
    make -C "$SRC" -j2 usr etc PREFIX="$USR" MHVTL_CONFIG_PATH="$CONFIG_PATH" \
        MHVTL_HOME_PATH="$HOME_PATH" RPM_OPT_FLAGS='-Wl,-rpath,\$$ORIGIN/../lib' >>"$log" 2>&1 \
        || { tail -30 "$log" >&2; fail "user space build failed (see $log)"; }
    rm -rf "$USR"
    install -d "$USR/bin" "$USR/lib"
    install -m755 "$SRC"/usr/bin/* "$USR/bin/"
    install -m755 "$SRC/usr/libvtlscsi.so" "$USR/lib/"
    for b in vtltape vtllibrary mktape vtlcmd; do
        [ -x "$USR/bin/$b" ] || fail "user space build made no $b"
    done
    touch "$USR/.done"
fi
rm -rf "$SRC"
say "built (module $MOD/mhvtl.ko, user space $USR)"
