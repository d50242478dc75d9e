#!/usr/bin/env bash
# blockxfer vm-testbed: boot a stock Debian kernel in QEMU with real md RAID,
# a kernel NBD client and a SCSI tape (st), and run the `device` test suite.
#
#   vm-testbed/run.sh            run `pytest -m device` in the guest (make testbed)
#   vm-testbed/run.sh --shell    interactive shell in the guest (make testbed-shell)
#   vm-testbed/run.sh --bench    throttled RAID0 read benchmark (make testbed-bench);
#                                with TESTBED_BENCH=tape: dump to an mhvtl drive vs dd;
#                                with TESTBED_BENCH=fio: fio via kernel NBD, ours vs qemu-nbd
#   vm-testbed/run.sh --prepare  host packages, guest kernel and mhvtl only, then print
#                                KVER=, KERNEL_DEB=, MHVTL_USR= (vagrant/run.sh uses it)
#
# Settings (environment): see docs/testbed.md.  Everything downloaded or built
# goes to vm-testbed/work/ (git-ignored, reused by later runs).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$HERE/.." && pwd)
WORK=$HERE/work
MODE=test
while [ $# -gt 0 ]; do
    case "$1" in
        --shell) MODE=shell ;;
        --bench) MODE=bench ;;
        --test) MODE=test ;;
        --prepare) MODE=prepare ;;
        -h|--help) sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "run.sh: unknown argument $1 (try --help)" >&2; exit 2 ;;
    esac
    shift
done
# the tape bench needs the normal devices and mhvtl, not the slow RAID disks
[ "$MODE" = bench ] && [ "${TESTBED_BENCH:-raid}" = tape ] && MODE=bench-tape
# fio in the guest through the kernel NBD client: blockxfer serve vs qemu-nbd on the host
[ "$MODE" = bench ] && [ "${TESTBED_BENCH:-raid}" = fio ] && MODE=bench-fio

TIMEOUT=${TESTBED_TIMEOUT:-900}         # seconds the guest may run (test and bench modes)
MEM=${TESTBED_MEM:-2048}
SMP=${TESTBED_SMP:-2}
DISK_MB=${TESTBED_DISK_MB:-256}
TAPE_MB=${TESTBED_TAPE_MB:-512}
TAPE_SMALL_MB=${TESTBED_TAPE_SMALL_MB:-8}
MHVTL=${TESTBED_MHVTL:-1}                  # 1: mhvtl library in the guest, the default tape
case "$MHVTL" in 0|1) ;; *) echo "TESTBED_MHVTL: 0 or 1" >&2; exit 2 ;; esac
CHANGER=${TESTBED_CHANGER:-1}              # 1: a tgt media changer with 3 tapes (tgt only)
CHANGER_TAPE_MB=${TESTBED_CHANGER_TAPE_MB:-4}  # its first tape: a dump spans from it
NBD_MB=${TESTBED_NBD_MB:-$((2 * DISK_MB))}  # md1 (RAID5 over 3 disks) holds 2 disks of data: a mirror of it needs that
BENCH_DISK_MB=${TESTBED_BENCH_DISK_MB:-512}
BENCH_BPS=${TESTBED_BENCH_BPS:-16777216}   # 16 MiB/s per bench disk
BENCH_LATENCY_MS=${TESTBED_BENCH_LATENCY_MS:-4}  # and 4 ms per request (slow-nbd only)
BENCH_VIA=${TESTBED_BENCH_VIA:-slow-nbd}    # slow-nbd: lib/slownbd.py; throttle: QEMU throttling
case "$BENCH_VIA" in slow-nbd|throttle) ;; *) echo "TESTBED_BENCH_VIA: slow-nbd or throttle" >&2; exit 2 ;; esac
TAPE_VIA=${TESTBED_TAPE_VIA:-qemu}          # qemu: libiscsi scsi-generic; open-iscsi: guest initiator
case "$TAPE_VIA" in qemu|open-iscsi) ;; *) echo "TESTBED_TAPE_VIA: qemu or open-iscsi" >&2; exit 2 ;; esac
# crc32c first: libcrc32c (needed by raid456 and ext4) asks the crypto API for it
MODULES=(crc32c_generic crc32c_intel virtio_pci virtio_blk virtio_scsi virtio_net scsi_mod sd_mod st sg md_mod raid0
         raid456 nbd loop overlay 9p 9pnet 9pnet_virtio netfs fscache ext4
         iscsi_tcp)

say() { echo "testbed: $*" >&2; }
fail() { echo "testbed: FAILED: $*" >&2; exit 1; }

RUN=$WORK/run
RESULTS=$WORK/results
PIDS=()
cleanup() {
    set +e
    local p
    # tgtd ignores SIGTERM; ask it to stop (SIGKILL below if it does not)
    [ -n "${TGT_CTL:-}" ] && tgtadm -C "$TGT_CTL" --op delete --mode system --force >/dev/null 2>&1
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do
        for _ in 1 2 3 4 5 6 7 8 9 10; do kill -0 "$p" 2>/dev/null || break; sleep 0.1; done
        kill -9 "$p" 2>/dev/null
        wait "$p" 2>/dev/null  # reap it: no zombie left behind
    done
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- host packages ------------------------------------------------------------
APT_UPDATED=
apt_update_once() {
    [ -n "$APT_UPDATED" ] && return 0
    say "apt-get update"
    apt-get update -qq || fail "apt-get update failed"
    APT_UPDATED=1
}
ensure_host_packages() {
    # command -> Debian package
    local -A need=(
        [qemu-system-x86_64]=qemu-system-x86 [qemu-nbd]=qemu-utils [tgtd]=tgt [tgtimg]=tgt
        [mdadm]=mdadm [nbd-client]=nbd-client [depmod]=kmod [cpio]=cpio [fio]=fio
        [setsid]=util-linux [timeout]=coreutils [mtx]=mtx [mt]=mt-st [sg_logs]=sg3-utils
        [lsscsi]=lsscsi
    )
    local missing=() c
    for c in "${!need[@]}"; do
        command -v "$c" >/dev/null 2>&1 || PATH=$PATH:/usr/sbin:/sbin command -v "$c" >/dev/null 2>&1 \
            || missing+=("${need[$c]}")
    done
    # the initramfs needs the static busybox (the dynamic one would need its libc)
    # and QEMU's libiscsi block driver lives in a separate package
    local p
    for p in busybox-static qemu-block-extra; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    if [ "$TAPE_VIA" = open-iscsi ] && ! command -v iscsiadm >/dev/null 2>&1 \
            && ! [ -x /sbin/iscsiadm ]; then
        missing+=(open-iscsi)
    fi
    [ ${#missing[@]} -eq 0 ] && return 0
    mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
    [ "$(id -u)" = 0 ] || fail "missing host packages: ${missing[*]} (run as root, or apt-get install them)"
    apt_update_once
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >"$WORK/apt-install.log" 2>&1 || { tail -20 "$WORK/apt-install.log" >&2; fail "apt-get install ${missing[*]}"; }
}

# --- kernel ---------------------------------------------------------------------
fetch_kernel() {
    if [ -f "$WORK/kernel/.kver" ]; then
        KVER=$(cat "$WORK/kernel/.kver")
        return 0
    fi
    local pkg=${TESTBED_KERNEL_PKG:-}
    if [ -z "$pkg" ]; then
        pkg=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9.-]*-amd64-unsigned$' 2>/dev/null \
              | awk '{print $1}' | sort -V | tail -1)
        if [ -z "$pkg" ]; then
            apt_update_once
            pkg=$(apt-cache search --names-only '^linux-image-6\.1\.[0-9.-]*-amd64-unsigned$' \
                  | awk '{print $1}' | sort -V | tail -1)
        fi
    fi
    [ -n "$pkg" ] || fail "apt offers no linux-image-6.1.*-amd64-unsigned package"
    say "downloading $pkg"
    mkdir -p "$WORK/debs"
    rm -rf "$WORK/kernel.tmp"
    (cd "$WORK/debs" && apt-get download -q "$pkg" >/dev/null 2>"$WORK/debs/download.log") \
        || { cat "$WORK/debs/download.log" >&2; fail "apt-get download $pkg"; }
    local deb
    deb=$(ls -t "$WORK/debs/${pkg}"_*.deb | head -1)
    dpkg-deb -x "$deb" "$WORK/kernel.tmp"
    KVER=$(ls "$WORK/kernel.tmp/lib/modules" | head -1)
    depmod -b "$WORK/kernel.tmp" "$KVER"
    echo "$KVER" >"$WORK/kernel.tmp/.kver"
    rm -rf "$WORK/kernel"
    mv "$WORK/kernel.tmp" "$WORK/kernel"
}

build_initramfs() {
    INITRD=$WORK/initramfs.gz
    local key
    key=$( { echo "$KVER ${MODULES[*]}"; cat "$HERE/guest/init" "$HERE/lib/mkinitramfs.py"; \
             ls -l "$(readlink -f /bin/busybox)"; } | sha256sum | cut -c1-16)
    if [ -f "$INITRD" ] && [ "$(cat "$WORK/initramfs.key" 2>/dev/null)" = "$key" ]; then
        return 0
    fi
    python3 "$HERE/lib/mkinitramfs.py" "$WORK/kernel" "$KVER" "$HERE/guest/init" "$INITRD" \
        "${MODULES[@]}" >&2 || fail "building the initramfs"
    echo "$key" >"$WORK/initramfs.key"
}

# --- mhvtl: built here for the guest kernel, started in the guest (guest/mhvtl.sh) ---
MHVTL_USR=
mhvtl_tarball() {  # ../shared/third_party beside the clone (or beside a worktree's main checkout)
    local name=shared/third_party/mhvtl-fc22cc6.tar.gz common
    [ -n "${TESTBED_MHVTL_TARBALL:-}" ] && { echo "$TESTBED_MHVTL_TARBALL"; return 0; }
    common=$(git -C "$REPO" rev-parse --path-format=absolute --git-common-dir 2>/dev/null || true)
    for d in "$REPO/.." ${common:+"$(dirname "$common")/.."}; do
        [ -f "$d/$name" ] && { echo "$(cd "$d" && pwd)/$name"; return 0; }
    done
    echo "$REPO/../$name"
}
build_mhvtl() {
    [ "$MHVTL" = 1 ] || return 0
    local MHVTL_TARBALL
    MHVTL_TARBALL=$(mhvtl_tarball)
    bash "$HERE/lib/build-mhvtl.sh" "$WORK" "$KVER" "$MHVTL_TARBALL" \
        || fail "mhvtl could not be built (TESTBED_MHVTL=0 runs without it)"
    MHVTL_USR=$(ls -d "$WORK"/mhvtl/usr-* | head -1)
}

# --- accelerator: KVM only if a real boot gets going within seconds --------------
probe_accel() {
    if [ -n "${TESTBED_ACCEL:-}" ]; then ACCEL=$TESTBED_ACCEL; return 0; fi
    ACCEL=tcg
    [ -c /dev/kvm ] && [ -w /dev/kvm ] || { say "no usable /dev/kvm: software emulation (tcg)"; return 0; }
    local cache=$WORK/accel.cache key
    key="$(uname -r) $(qemu-system-x86_64 --version | head -1) $KVER"
    if [ -f "$cache" ] && [ "$(sed -n 1p "$cache")" = "$key" ] \
            && [ -n "$(find "$cache" -mmin -720 2>/dev/null)" ]; then
        ACCEL=$(sed -n 2p "$cache")
        say "accelerator: $ACCEL (probed earlier; rm $cache to re-probe)"
        return 0
    fi
    # Boot the kernel with no root: it panics at once and -no-reboot ends QEMU.
    local log=$WORK/kvm-probe.log
    rm -f "$log"
    if (timeout -k 2 ${TESTBED_KVM_PROBE_TIMEOUT:-10} qemu-system-x86_64 -accel kvm -cpu host -m 256 \
            -nodefaults -display none -no-reboot -serial "file:$log" \
            -kernel "$WORK/kernel/boot/vmlinuz-$KVER" -append "console=ttyS0 panic=-1" \
            </dev/null >"$log.err" 2>&1) 2>/dev/null || grep -q 'Kernel panic' "$log" 2>/dev/null; then
        grep -q 'Linux version' "$log" 2>/dev/null && ACCEL=kvm
    fi
    [ "$ACCEL" = kvm ] || say "KVM failed or did not boot a kernel within ${TESTBED_KVM_PROBE_TIMEOUT:-10}s (see work/kvm-probe.log*): software emulation (tcg)"
    printf '%s\n%s\n' "$key" "$ACCEL" >"$cache"
}

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# --- disks --------------------------------------------------------------------------
QEMU_DISKS=()
add_disk() {  # add_disk SERIAL FILE [extra -blockdev options]
    local serial=$1 file=$2 extra=${3:-} n=${#QEMU_DISKS[@]}
    QEMU_DISKS+=(-blockdev "driver=raw,node-name=d$n,file.driver=file,file.filename=$file,file.aio=threads,cache.direct=off$extra"
                 -device "virtio-blk-pci,drive=d$n,serial=$serial")
}
make_disks() {
    mkdir -p "$WORK/disks"
    rm -f "$WORK"/disks/*.img
    local i
    if [ "$MODE" = bench ]; then
        local exports=() port
        for i in 0 1 2 3; do
            # Fill with data once so reads hit real blocks, not holes.
            local f=$WORK/disks/bench-$i.raw
            if [ ! -f "$f" ] || [ "$(stat -c %s "$f")" != $((BENCH_DISK_MB << 20)) ]; then
                head -c $((BENCH_DISK_MB << 20)) /dev/urandom >"$f"
            fi
            exports+=("bench-$i=$f")
        done
        if [ "$BENCH_VIA" = throttle ]; then
            # QEMU throttling caps each disk's bandwidth but gives no request a
            # service time: a one-chunk-at-a-time reader gets the sum too
            for i in 0 1 2 3; do
                QEMU_DISKS+=(-drive "file=$WORK/disks/bench-$i.raw,format=raw,if=none,id=b$i,cache=writeback,throttling.bps-total=$BENCH_BPS"
                             -device "virtio-blk-pci,drive=b$i,serial=bench-$i")
            done
            return 0
        fi
        # Each disk is an export of lib/slownbd.py: one request at a time, each
        # taking latency + length / bandwidth, like one disk arm.
        port=$(free_port)
        python3 "$HERE/lib/slownbd.py" "$port" "$BENCH_BPS" "$BENCH_LATENCY_MS" "${exports[@]}" \
            >"$RUN/slownbd.log" 2>&1 &
        PIDS+=($!)
        for i in $(seq 1 50); do
            python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" \
                "$port" 2>/dev/null && break
            kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$RUN/slownbd.log" >&2; fail "slownbd.py exited"; }
            sleep 0.1
        done
        for i in 0 1 2 3; do
            QEMU_DISKS+=(-blockdev "driver=nbd,node-name=b$i,server.type=inet,server.host=127.0.0.1,server.port=$port,export=bench-$i"
                         -device "virtio-blk-pci,drive=b$i,serial=bench-$i")
        done
        return 0
    fi
    for i in 0 1; do truncate -s ${DISK_MB}M "$WORK/disks/r0-$i.img"; add_disk "r0-$i" "$WORK/disks/r0-$i.img"; done
    for i in 0 1 2; do truncate -s ${DISK_MB}M "$WORK/disks/r5-$i.img"; add_disk "r5-$i" "$WORK/disks/r5-$i.img"; done
    for i in 0 1; do truncate -s ${DISK_MB}M "$WORK/disks/spare-$i.img"; add_disk "spare-$i" "$WORK/disks/spare-$i.img"; done
    # /var/tmp in the guest (ext4): loop devices with direct I/O need a backing
    # file system that really does O_DIRECT, which the tmpfs overlay does not
    truncate -s 2G "$WORK/disks/scratch.img"  # also holds mhvtl's cartridges
    add_disk scratch "$WORK/disks/scratch.img"
    i=0
    local IFS=,
    for f in ${TESTBED_EXTRA_DISKS:-}; do
        [ -e "$f" ] || fail "TESTBED_EXTRA_DISKS: $f does not exist"
        add_disk "extra-$i" "$(readlink -f "$f")"
        i=$((i + 1))
    done
}

# --- tape: tgt SSC over iSCSI on 127.0.0.1, or mhvtl, or the user's own -----------
QEMU_TAPE=()
TAPES=0
TAPE_KIND=none
tgtadm_() { tgtadm -C "$TGT_CTL" --lld iscsi "$@"; }
start_tgt() {
    local port=$1 iqn=iqn.2025-01.org.blockxfer:testbed
    mkdir -p "$WORK/tape"
    rm -f "$WORK"/tape/*.vtape
    tgtimg --op new --device-type tape --barcode TB0001L8 --size "$TAPE_MB" --type data \
        --file "$WORK/tape/tape0.vtape" >/dev/null || fail "tgtimg could not create the tape"
    tgtimg --op new --device-type tape --barcode TB0002L8 --size "$TAPE_SMALL_MB" --type data \
        --file "$WORK/tape/small.vtape" >/dev/null || fail "tgtimg could not create the small tape"
    TGT_CTL=$((2000 + RANDOM % 28000))  # tgtd takes < 32768
    mkdir -p /var/run/tgtd
    tgtd -f -C "$TGT_CTL" --iscsi "portal=127.0.0.1:$port" >"$RUN/tgtd.log" 2>&1 &
    PIDS+=($!)
    local i
    for i in $(seq 1 50); do
        tgtadm_ --op show --mode target >/dev/null 2>&1 && break
        kill -0 "${PIDS[-1]}" 2>/dev/null || { cat "$RUN/tgtd.log" >&2; fail "tgtd exited"; }
        sleep 0.1
    done
    tgtadm_ --op new --mode target --tid 1 -T "$iqn" \
        && tgtadm_ --op new --mode logicalunit --tid 1 --lun 1 -b "$WORK/tape/tape0.vtape" \
            --bstype ssc --device-type tape \
        && tgtadm_ --op new --mode logicalunit --tid 1 --lun 2 -b "$WORK/tape/small.vtape" \
            --bstype ssc --device-type tape \
        || { cat "$RUN/tgtd.log" >&2; fail "tgtadm could not set up the tape target"; }
    local luns="1 2"
    if [ "$CHANGER" = 1 ]; then
        start_tgt_changer || { cat "$RUN/tgtd.log" >&2; fail "tgtadm could not set up the changer"; }
        luns="1 2 3 4"
    fi
    tgtadm_ --op bind --mode target --tid 1 -I ALL \
        || { cat "$RUN/tgtd.log" >&2; fail "tgtadm could not bind the tape target"; }
    TB_ISCSI_PORT=$port TB_ISCSI_IQN=$iqn
    TAPES=2
    TAPE_KIND=tgt
    # open-iscsi in the guest logs in itself (at 10.0.2.2); else QEMU is the initiator
    [ "$TAPE_VIA" = open-iscsi ] && return 0
    local l
    for l in $luns; do
        QEMU_TAPE+=(-blockdev "driver=iscsi,node-name=tape$l,transport=tcp,portal=127.0.0.1:$port,target=$iqn,lun=$l,initiator-name=iqn.2025-01.org.blockxfer:qemu"
                    -device "scsi-generic,drive=tape$l,bus=scsi0.0,channel=0,scsi-id=$((l - 1)),lun=0")
    done
}
# A tgt SMC changer (LUN 4) with one drive (LUN 3, no medium until the changer
# loads one) and three slots: CHG001L8 small enough that a dump spans onto
# CHG002L8, and a spare. tgt loads a slot's tape from media_home/BARCODE.
start_tgt_changer() {
    local lib=$WORK/tape/lib b size n=1000
    mkdir -p "$lib"
    rm -f "$lib"/* "$WORK/tape/smc"
    for b in CHG001L8:$CHANGER_TAPE_MB CHG002L8:64 CHG003L8:64; do
        size=${b#*:} b=${b%:*}
        tgtimg --op new --device-type tape --barcode "$b" --size "$size" --type data \
            --file "$lib/$b" >/dev/null || return 1
    done
    dd if=/dev/zero of="$WORK/tape/smc" bs=1k count=1 status=none
    tgtadm_ --op new --mode logicalunit --tid 1 --lun 3 --bstype ssc --device-type tape \
        && tgtadm_ --op new --mode logicalunit --tid 1 --lun 4 -b "$WORK/tape/smc" \
            --device-type changer \
        && tgtadm_ --op update --mode logicalunit --tid 1 --lun 4 \
            --params "element_type=1,start_address=1,quantity=1" \
        && tgtadm_ --op update --mode logicalunit --tid 1 --lun 4 \
            --params "element_type=2,start_address=1000,quantity=3" \
        && tgtadm_ --op update --mode logicalunit --tid 1 --lun 4 \
            --params "element_type=4,start_address=2,quantity=1" \
        && tgtadm_ --op update --mode logicalunit --tid 1 --lun 4 \
            --params "element_type=4,address=2,tid=1,lun=3" \
        && tgtadm_ --op update --mode logicalunit --tid 1 --lun 4 --params "media_home=$lib" \
        || return 1
    for b in CHG001L8 CHG002L8 CHG003L8; do
        tgtadm_ --op update --mode logicalunit --tid 1 --lun 4 \
            --params "element_type=2,address=$n,barcode=$b,sides=1" || return 1
        n=$((n + 1))
    done
}
mhvtl_sg() {  # first mhvtl tape drive's /dev/sgN on the host
    [ -d /sys/module/mhvtl ] || return 1
    local t host sg
    for t in /sys/class/scsi_tape/nst[0-9]*; do
        [ -e "$t/device/scsi_generic" ] || continue
        host=$(readlink -f "$t/device" | grep -o 'host[0-9]*' | head -1)
        [ "$(cat "/sys/class/scsi_host/$host/proc_name" 2>/dev/null)" = mhvtl ] || continue
        sg=$(ls "$t/device/scsi_generic" | head -1)
        echo "/dev/$sg"
        return 0
    done
    return 1
}
setup_tape() {
    case "$MODE" in bench|bench-tape|bench-fio) return 0 ;; esac
    local sg=${TESTBED_TAPE_SG:-}
    if [ -z "$sg" ] && [ -z "${TESTBED_TAPE_ISCSI:-}" ] && [ "${TESTBED_TAPE:-}" != tgt ]; then
        sg=$(mhvtl_sg) && { say "mhvtl found: passing its tape drive $sg to the guest"; TAPE_KIND=mhvtl; }
    fi
    if [ -n "$sg" ]; then
        [ -c "$sg" ] || fail "TESTBED_TAPE_SG=$sg is not a SCSI generic device"
        QEMU_TAPE+=(-blockdev "driver=host_device,node-name=tape1,filename=$sg"
                    -device "scsi-generic,drive=tape1,bus=scsi0.0,channel=0,scsi-id=0,lun=0")
        TAPES=1
        [ "$TAPE_KIND" = mhvtl ] || TAPE_KIND=host-sg
    elif [ -n "${TESTBED_TAPE_ISCSI:-}" ]; then
        # e.g. portal=192.0.2.5:3260,target=iqn...,lun=1
        QEMU_TAPE+=(-blockdev "driver=iscsi,node-name=tape1,transport=tcp,$TESTBED_TAPE_ISCSI"
                    -device "scsi-generic,drive=tape1,bus=scsi0.0,channel=0,scsi-id=0,lun=0")
        TAPES=1
        TAPE_KIND=iscsi
    else
        start_tgt "$(free_port)"
    fi
}

# --- NBD server on the host (guest reaches it at 10.0.2.2 through QEMU's slirp) ---
NBD_PORT=
start_nbd() {
    case "$MODE" in bench|bench-tape|bench-fio) return 0 ;; esac
    NBD_PORT=$(free_port)
    truncate -s ${NBD_MB}M "$WORK/disks/nbd0.img"
    qemu-nbd --format=raw --export-name=testbed --bind=127.0.0.1 --port="$NBD_PORT" \
        --persistent --shared=4 "$WORK/disks/nbd0.img" >"$RUN/qemu-nbd.log" 2>&1 &
    PIDS+=($!)
}

# --- fio bench: the same region through our server and through qemu-nbd ------------
FIO_MB=${TESTBED_FIO_MB:-64}
FIO_OURS_PORT= FIO_PEER_PORT=
wait_port() {  # wait_port PORT PID LOG NAME
    local i
    for i in $(seq 1 300); do
        python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', int(sys.argv[1])), 1).close()" \
            "$1" 2>/dev/null && return 0
        kill -0 "$2" 2>/dev/null || { cat "$3" >&2; fail "$4 exited"; }
        sleep 0.1
    done
    fail "$4 did not listen on 127.0.0.1:$1"
}
start_fio_servers() {
    [ "$MODE" = bench-fio ] || return 0
    local size=$((4 * FIO_MB)) vol=$WORK/disks/fio-ours.img raw=$WORK/disks/fio-peer.raw
    rm -f "$vol" "$raw"
    truncate -s "${size}M" "$raw"
    "$REPO/.venv/bin/blockxfer" init "$vol" --size "${size}M" >/dev/null \
        || fail "blockxfer init $vol"
    FIO_OURS_PORT=$(free_port)
    "$REPO/.venv/bin/blockxfer" serve "$vol" --listen "tcp:127.0.0.1:$FIO_OURS_PORT" \
        >"$RUN/fio-serve.log" 2>&1 &
    PIDS+=($!)
    wait_port "$FIO_OURS_PORT" "${PIDS[-1]}" "$RUN/fio-serve.log" "blockxfer serve"
    FIO_PEER_PORT=$(free_port)
    qemu-nbd --format=raw --export-name=raw --bind=127.0.0.1 --port="$FIO_PEER_PORT" \
        --persistent --shared=4 "$raw" >"$RUN/fio-qemu-nbd.log" 2>&1 &
    PIDS+=($!)
    wait_port "$FIO_PEER_PORT" "${PIDS[-1]}" "$RUN/fio-qemu-nbd.log" "qemu-nbd"
}

# --- boot -------------------------------------------------------------------------
boot() {
    local append="console=ttyS0 panic=-1 quiet loglevel=4 tb.repo=$REPO tb.results=$RESULTS"
    [ "${TESTBED_OVERLAY:-1}" = 1 ] || append+=" tb.overlay=0"
    local cpu=max
    [ "$ACCEL" = kvm ] && cpu=host
    local serial=(-chardev "stdio,id=con,signal=off,logfile=$RUN/console.log" -serial chardev:con)
    [ "$MODE" = shell ] && serial=(-chardev "stdio,id=con,mux=on,signal=off,logfile=$RUN/console.log"
                                   -serial chardev:con -mon chardev=con)
    local qemu=(qemu-system-x86_64 -accel "$ACCEL" -cpu "$cpu" -M pc -m "$MEM" -smp "$SMP"
        -nodefaults -display none -no-reboot "${serial[@]}"
        -kernel "$WORK/kernel/boot/vmlinuz-$KVER" -initrd "$INITRD" -append "$append"
        -virtfs "local,path=/,mount_tag=hostroot,security_model=none,readonly=on,multidevs=remap"
        -virtfs "local,path=$RESULTS,mount_tag=results,security_model=none,multidevs=remap"
        -netdev user,id=net0 -device virtio-net-pci,netdev=net0
        -device virtio-scsi-pci,id=scsi0
        "${QEMU_DISKS[@]}" "${QEMU_TAPE[@]}")
    echo "${qemu[*]}" >"$RUN/qemu.cmdline"
    say "booting $KVER under $ACCEL ($MODE mode; console log: $RUN/console.log)"
    local t0=$SECONDS rc=0
    if [ "$MODE" = shell ]; then
        say "leave with 'exit' in the guest shell, or Ctrl-A X to kill QEMU"
        "${qemu[@]}" || rc=$?
    else
        timeout -k 10 "$TIMEOUT" "${qemu[@]}" </dev/null || rc=$?
    fi
    QEMU_RC=$rc
    BOOT_SECS=$((SECONDS - t0))
}

main() {
    mkdir -p "$WORK"
    ensure_host_packages
    export PATH=$PATH:/usr/sbin:/sbin
    fetch_kernel
    case "$MODE" in bench|bench-fio) ;; *) build_mhvtl ;; esac
    if [ "$MODE" = prepare ]; then
        printf 'KVER=%s\nKERNEL_DEB=%s\nMHVTL_USR=%s\n' "$KVER" \
            "$(ls -t "$WORK"/debs/linux-image-"$KVER"*.deb 2>/dev/null | head -1)" "$MHVTL_USR"
        exit 0
    fi
    build_initramfs
    [ -x "$REPO/.venv/bin/python" ] || fail "no $REPO/.venv: run 'make venv' first (make testbed does)"
    # byte-compile here, natively: the guest would compile stale modules under TCG
    "$REPO/.venv/bin/python" -m compileall -q -j 0 "$REPO/blockxfer" "$REPO/tests" "$REPO/bench" \
        >/dev/null 2>&1 || say "compileall failed (the guest compiles what it needs)"
    # and pytest's rewritten test modules (assertion rewriting is ~1 s of CPU here, tens
    # of seconds under TCG), which it does not write with PYTHONDONTWRITEBYTECODE set
    # shellcheck disable=SC2046  # file names without blanks
    (cd "$REPO" && env -u PYTHONDONTWRITEBYTECODE "$REPO/.venv/bin/python" -m pytest --collect-only -q \
        -p no:cacheprovider -m device $(grep -rlE --include='test_*.py' 'mark\.device' tests) \
        >/dev/null 2>&1) || say "collecting the device tests here failed (the guest rewrites them)"
    probe_accel
    rm -rf "$RUN" "$RESULTS"
    mkdir -p "$RUN" "$RESULTS"
    make_disks
    setup_tape
    start_nbd
    start_fio_servers
    cat >"$RESULTS/config.env" <<EOF
TB_MODE=$MODE
TB_TAPES=$TAPES
TB_TAPE_KIND=$TAPE_KIND
TB_TAPE_MB=$TAPE_MB
TB_TAPE_SMALL_MB=$TAPE_SMALL_MB
TB_CHANGER_TAPE_MB=$CHANGER_TAPE_MB
TB_CHANGER=$([ "$TAPE_KIND" = tgt ] && [ "$TAPE_VIA" = qemu ] && echo "$CHANGER" || echo 0)
TB_NBD_PORT=$NBD_PORT
TB_NBD_EXPORT=testbed
TB_TAPE_VIA=$TAPE_VIA
TB_MHVTL=$([ -n "$MHVTL_USR" ] && echo 1 || echo 0)
TB_MHVTL_USR=$MHVTL_USR
TB_MHVTL_KO=$WORK/kernel/mhvtl/mhvtl.ko
TB_ISCSI_PORT=${TB_ISCSI_PORT:-}
TB_ISCSI_IQN=${TB_ISCSI_IQN:-}
TB_TERM=${TERM:-linux}
TB_BENCH_BPS=$BENCH_BPS
TB_BENCH_VIA=$BENCH_VIA
TB_BENCH_LATENCY_MS=$BENCH_LATENCY_MS
TB_FIO_OURS_PORT=$FIO_OURS_PORT
TB_FIO_PEER_PORT=$FIO_PEER_PORT
TB_FIO_MB=$FIO_MB
EOF
    local v
    for v in TESTBED_PYTEST_ARGS TESTBED_PYTEST_MARK TESTBED_BENCH_READER TESTBED_BENCH_MB TESTBED_BENCH_TAPE_MB \
             TESTBED_BENCH_CHUNK_KB TESTBED_CHUNK_KB TESTBED_CHUNK5_KB TESTBED_FIO_RUNTIME TESTBED_FIO_ROUNDS \
             TESTBED_BENCH_TAPE_ROUNDS; do
        if [ -n "${!v:-}" ]; then printf 'TB_%s=%q\n' "${v#TESTBED_}" "${!v}" >>"$RESULTS/config.env"; fi
    done
    boot
    # The status normally comes through the results share; the console has it too.
    if [ ! -f "$RESULTS/status" ] && grep -q '^TESTBED-STATUS=' "$RUN/console.log" 2>/dev/null; then
        grep -a '^TESTBED-STATUS=' "$RUN/console.log" | tail -1 | cut -d= -f2 | tr -dc '0-9' >"$RESULTS/status"
    fi
    if [ ! -s "$RESULTS/status" ]; then
        grep -h 'TESTBED-FATAL' "$RUN/console.log" >&2 || true
        [ "$QEMU_RC" = 124 ] && fail "the guest did not finish within ${TIMEOUT}s (TESTBED_TIMEOUT); see $RUN/console.log"
        fail "the VM did not boot or did not finish (qemu exit $QEMU_RC); see $RUN/console.log"
    fi
    local rc
    rc=$(cat "$RESULTS/status")
    [ "$rc" = 125 ] && fail "the guest could not set up (see TESTBED-FATAL above and $RUN/console.log)"
    if [ "$MODE" = test ]; then
        python3 "$HERE/lib/report.py" "$RESULTS" "$ACCEL" "$BOOT_SECS" || true
    elif [ "$MODE" = bench ]; then
        echo "==== vm-testbed bench (guest under $ACCEL) ===="
        grep -E '^(bench|  )' "$RESULTS/bench.log" || true
    elif [ "$MODE" = bench-tape ]; then
        echo "==== vm-testbed tape bench on mhvtl (guest under $ACCEL) ===="
        cat "$RESULTS/bench.log" 2>/dev/null || true
    elif [ "$MODE" = bench-fio ]; then
        echo "==== vm-testbed fio bench via kernel NBD (guest under $ACCEL) ===="
        cat "$RESULTS/bench.log" 2>/dev/null || true
    fi
    exit "$rc"
}
main
