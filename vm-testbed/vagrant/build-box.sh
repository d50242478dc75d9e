#!/usr/bin/env bash
# Build the Vagrant bed's Debian 12 box from apt, with no download of a box.
#
#   build-box.sh OUT_DIR KVER KERNEL_DEB
#
# debootstrap makes a bookworm root file system with the guest kernel KVER
# installed from KERNEL_DEB (the very package the QEMU bed boots, fetched by
# run.sh --prepare, so mhvtl.ko built by lib/build-mhvtl.sh loads in both) and the programs the device suite and the
# shared guest scripts (guest/stage2.sh, guest/mhvtl.sh) call; mke2fs -d turns
# it into an ext4 image without mounting anything, qemu-img into the box's
# qcow2. The box boots that kernel directly (libvirt <kernel>/<initrd>, no
# boot loader): the box carries vmlinuz and initrd.img beside box.img, and its
# Vagrantfile (box/Vagrantfile) points libvirt at them.
# Result: OUT_DIR/blockxfer-testbed.box (a plain tar). Exits non-zero with the reason.
set -euo pipefail
OUT=$1 KVER=$2 KERNEL_DEB=$3
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
MIRROR=${TESTBED_VAGRANT_MIRROR:-http://deb.debian.org/debian}
IMAGE_GB=${TESTBED_VAGRANT_BOX_GB:-4}
# the guest's programs: stage2.sh, mhvtl.sh and the tests (mdadm, mkfs.ext4,
# e2fsck, nbd-client, mtx, mt, sg_*, busybox syslogd); python3 runs the host's
# .venv, shared into the guest at the same path
PACKAGES=(
    linux-base initramfs-tools zstd systemd-sysv udev kmod iproute2 procps
    openssh-server sudo python3 libstdc++6 mdadm e2fsprogs nbd-client mtx mt-st
    sg3-utils lsscsi busybox
)

say() { echo "testbed-vagrant: box: $*" >&2; }
fail() { echo "testbed-vagrant: FAILED: box: $*" >&2; exit 1; }

PUBKEY=
for k in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub \
         /opt/vagrant/embedded/gems/gems/vagrant-*/keys/vagrant.pub; do
    [ -f "$k" ] && { PUBKEY=$k; break; }
done
[ -n "$PUBKEY" ] || fail "vagrant's insecure public key (keys/vagrant.pub) not found"

[ -f "$KERNEL_DEB" ] || fail "kernel package $KERNEL_DEB not found"
TMP=$OUT/box.tmp
ROOT=$TMP/root
cleanup() {
    set +e
    for m in dev/pts dev proc sys; do mountpoint -q "$ROOT/$m" && umount -l "$ROOT/$m"; done
    rm -rf "$TMP"
}
trap cleanup EXIT
rm -rf "$TMP"
mkdir -p "$ROOT"

say "debootstrap bookworm ($MIRROR) with ${#PACKAGES[@]} extra packages"
log=$OUT/debootstrap.log
include=$(IFS=,; echo "${PACKAGES[*]}")
debootstrap --variant=minbase --include="$include" bookworm "$ROOT" "$MIRROR" >"$log" 2>&1 \
    || { tail -20 "$log" >&2; fail "debootstrap failed (see $log)"; }
say "installing the kernel $(basename "$KERNEL_DEB")"
cp "$KERNEL_DEB" "$ROOT/tmp/kernel.deb"
mount -t proc proc "$ROOT/proc" && mount -t sysfs sysfs "$ROOT/sys" && mount --bind /dev "$ROOT/dev" \
    || fail "cannot mount /proc, /sys, /dev in the root file system"
chroot "$ROOT" dpkg -i /tmp/kernel.deb >"$OUT/kernel-install.log" 2>&1 \
    || { tail -20 "$OUT/kernel-install.log" >&2; fail "dpkg -i of the kernel failed (see $OUT/kernel-install.log)"; }
rm -f "$ROOT/tmp/kernel.deb"
umount "$ROOT/dev" "$ROOT/sys" "$ROOT/proc"
[ -f "$ROOT/boot/vmlinuz-$KVER" ] && [ -f "$ROOT/boot/initrd.img-$KVER" ] \
    || fail "no /boot/vmlinuz-$KVER or initrd.img-$KVER in the root file system"

say "configuring (user vagrant, ssh, DHCP, fstab)"
cat >"$ROOT/etc/fstab" <<'EOF'
/dev/vda / ext4 defaults,errors=remount-ro 0 1
EOF
echo blockxfer-testbed >"$ROOT/etc/hostname"
printf '127.0.0.1 localhost\n127.0.1.1 blockxfer-testbed\n' >"$ROOT/etc/hosts"
cat >"$ROOT/etc/systemd/network/80-dhcp.network" <<'EOF'
[Match]
Name=en* eth*
[Network]
DHCP=ipv4
EOF
ln -sf /lib/systemd/system/systemd-networkd.service \
    "$ROOT/etc/systemd/system/multi-user.target.wants/systemd-networkd.service"
# nothing at boot that the bed does not use: the devices are set up by stage2.sh
for unit in mdmonitor.service mdadm-shutdown.service nbd-client.service e2scrub_reap.service; do
    ln -sf /dev/null "$ROOT/etc/systemd/system/$unit"
done
echo 'UseDNS no' >"$ROOT/etc/ssh/sshd_config.d/testbed.conf"
chroot "$ROOT" useradd -m -s /bin/bash vagrant
install -d -m 700 -o 1000 -g 1000 "$ROOT/home/vagrant/.ssh"
install -m 600 -o 1000 -g 1000 "$PUBKEY" "$ROOT/home/vagrant/.ssh/authorized_keys"
echo 'vagrant ALL=(ALL) NOPASSWD: ALL' >"$ROOT/etc/sudoers.d/vagrant"
chmod 440 "$ROOT/etc/sudoers.d/vagrant"
chroot "$ROOT" apt-get clean
rm -rf "$ROOT"/var/lib/apt/lists/* "$ROOT"/var/cache/apt/*.bin

say "making the image"
mkdir -p "$TMP/box"
cp "$ROOT/boot/vmlinuz-$KVER" "$TMP/box/vmlinuz"
cp "$ROOT/boot/initrd.img-$KVER" "$TMP/box/initrd.img"
chmod 644 "$TMP/box/vmlinuz" "$TMP/box/initrd.img"
truncate -s "${IMAGE_GB}G" "$TMP/root.raw"
mke2fs -q -t ext4 -L bxroot -d "$ROOT" "$TMP/root.raw" >"$OUT/mke2fs.log" 2>&1 \
    || { cat "$OUT/mke2fs.log" >&2; fail "mke2fs -d failed"; }
qemu-img convert -O qcow2 "$TMP/root.raw" "$TMP/box/box.img" || fail "qemu-img convert failed"
rm -f "$TMP/root.raw"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$IMAGE_GB" \
    >"$TMP/box/metadata.json"
cp "$HERE/box/Vagrantfile" "$TMP/box/Vagrantfile"
echo "$KVER" >"$TMP/box/kver"
tar -cf "$TMP/blockxfer-testbed.box" -C "$TMP/box" metadata.json Vagrantfile box.img vmlinuz initrd.img kver \
    || fail "tar failed"
mv "$TMP/blockxfer-testbed.box" "$OUT/blockxfer-testbed.box"
say "built $OUT/blockxfer-testbed.box ($(du -h "$OUT/blockxfer-testbed.box" | cut -f1))"
