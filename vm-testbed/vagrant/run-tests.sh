#!/bin/bash
# Run the device suite in the Vagrant box (as root):
#   sudo /blockxfer/vm-testbed/vagrant/run-tests.sh [pytest args]
# Idempotent: arrays, tape target, iSCSI session and NBD are set up if missing.
set -euo pipefail
REPO=/blockxfer
STATE=/var/lib/blockxfer-testbed
mkdir -p "$STATE"
modprobe -a st sg nbd raid0 raid456 loop

disk() { ls /dev/vd? | sed -n "$1p"; }   # 1 = system disk
if [ ! -e /dev/md0 ]; then
    mdadm --create /dev/md0 --run --level=0 --raid-devices=2 "$(disk 2)" "$(disk 3)"
    mdadm --create /dev/md1 --run --level=5 --assume-clean --raid-devices=3 \
        "$(disk 4)" "$(disk 5)" "$(disk 6)"
fi

IQN=iqn.2025-01.org.blockxfer:vagrant
if ! tgtadm --lld iscsi --op show --mode target | grep -q "$IQN"; then
    rm -f "$STATE"/*.vtape
    tgtimg --op new --device-type tape --barcode TB0001L8 --size 512 --type data --file "$STATE/tape0.vtape"
    tgtimg --op new --device-type tape --barcode TB0002L8 --size 8 --type data --file "$STATE/small.vtape"
    tgtadm --lld iscsi --op new --mode target --tid 1 -T "$IQN"
    tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 1 -b "$STATE/tape0.vtape" --bstype ssc --device-type tape
    tgtadm --lld iscsi --op new --mode logicalunit --tid 1 --lun 2 -b "$STATE/small.vtape" --bstype ssc --device-type tape
    tgtadm --lld iscsi --op bind --mode target --tid 1 -I 127.0.0.1
fi
if ! iscsiadm -m session 2>/dev/null | grep -q "$IQN"; then
    iscsiadm -m discovery -t sendtargets -p 127.0.0.1
    iscsiadm -m node -T "$IQN" -p 127.0.0.1 --login
    udevadm settle
fi
tape_for_lun() {  # the nst device of LUN $1 of our target
    local t
    for t in /sys/class/scsi_tape/nst[0-9]*; do
        case "$t" in *[a-z]) continue ;; esac
        [ "$(basename "$(readlink -f "$t/device")" | cut -d: -f4)" = "$1" ] \
            && grep -q IET "$t/device/vendor" \
            && { echo "/dev/$(basename "$t")"; return; }
    done
}

if [ ! -e /sys/block/nbd0/pid ]; then
    truncate -s 256M "$STATE/nbd0.img"
    cat >"$STATE/nbd.conf" <<CONF
[generic]
listenaddr = 127.0.0.1
port = 10809
[testbed]
exportname = $STATE/nbd0.img
CONF
    nbd-server -C "$STATE/nbd.conf"
    nbd-client 127.0.0.1 10809 /dev/nbd0 -N testbed -b 4096
fi

BLOCKXFER_TEST_TAPE=$(tape_for_lun 1)
BLOCKXFER_TEST_TAPE_SMALL=$(tape_for_lun 2)
export BLOCKXFER_TEST_TAPE BLOCKXFER_TEST_TAPE_SMALL BLOCKXFER_TEST_TAPE_SMALL_MB=8
export BLOCKXFER_TEST_TAPE_KIND=tgt-open-iscsi
export BLOCKXFER_TEST_MD0=/dev/md0 BLOCKXFER_TEST_MD5=/dev/md1 BLOCKXFER_TEST_NBD=/dev/nbd0
BLOCKXFER_TEST_DISKS=$(disk 7)
export BLOCKXFER_TEST_DISKS BLOCKXFER_TESTBED=vagrant
env | grep '^BLOCKXFER_TEST' | sort
cd "$REPO"
exec .venv/bin/pytest -m device -p no:cacheprovider "$@"
