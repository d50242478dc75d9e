#!/usr/bin/env bash
# blockxfer Vagrant test bed (make testbed-vagrant): the same device suite as
# `make testbed`, in a full Debian 12 VM made by vagrant-libvirt.
#
#   vm-testbed/vagrant/run.sh        build the box once, vagrant up, run the suite, destroy
#
# 1. host packages from apt (vagrant, vagrant-libvirt, libvirt, debootstrap, ...);
#    the guest kernel and mhvtl as for the QEMU bed (../run.sh --prepare);
# 2. the box: built locally from apt by build-box.sh, cached in
#    vm-testbed/work/vagrant/ (added to a VAGRANT_HOME there) and rebuilt only
#    when the kernel or the box scripts change;
# 3. libvirtd and virtlogd: used if they already run; otherwise started here,
#    in a network namespace of their own (the VM's management network, its
#    DHCP and the NBD server live only there), and stopped by pid at the end;
# 4. vagrant up --provider=libvirt (../Vagrantfile), qemu-nbd for the kernel
#    NBD client, then guest/stage2.sh over `vagrant ssh` with mhvtl as the tape
#    (guest/mhvtl.sh); the per-device summary of lib/report.py; vagrant destroy.
# Settings (environment): TESTBED_MEM, TESTBED_SMP, TESTBED_DISK_MB, TESTBED_NBD_MB,
# TESTBED_TAPE_MB, TESTBED_TAPE_SMALL_MB, TESTBED_CHANGER_TAPE_MB, TESTBED_PYTEST_ARGS,
# TESTBED_PYTEST_MARK, TESTBED_TIMEOUT (s, the suite in the guest), TESTBED_VAGRANT_*:
# see docs/testbed.md.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TB=$(cd "$HERE/.." && pwd)
REPO=$(cd "$TB/.." && pwd)
WORK=$TB/work
VW=$WORK/vagrant
TIMEOUT=${TESTBED_TIMEOUT:-1500}
NBD_MB=${TESTBED_NBD_MB:-$((2 * ${TESTBED_DISK_MB:-256}))}  # as large as md1 (RAID5, 2 data disks): the mirror test needs it
DOMAIN_TYPE=${TESTBED_VAGRANT_DOMAIN_TYPE:-qemu}
NETNS=bxvagrant-$$
DOMAIN=vm-testbed_default   # vagrant-libvirt's name: the Vagrantfile's folder, the machine
# vagrant-libvirt's default management network; the guest reaches the host there
MGMT_HOST=192.168.121.1

say() { echo "testbed-vagrant: $*" >&2; }
fail() { echo "testbed-vagrant: FAILED: $*" >&2; exit 1; }

PIDS=()       # our daemons, stopped in reverse order
OWN_NETNS=
NSX=()        # prefix that runs a command in our network namespace (if we made one)
UP=
export VAGRANT_HOME=$VW/home VAGRANT_CWD=$TB VAGRANT_DOTFILE_PATH=$VW/dot
export VAGRANT_DEFAULT_PROVIDER=libvirt VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_COLOR=1
vg() { "${NSX[@]}" vagrant "$@"; }

stop_pid() {
    local p=$1 i
    kill "$p" 2>/dev/null || return 0
    for i in $(seq 1 50); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
    kill -9 "$p" 2>/dev/null
    wait "$p" 2>/dev/null
}
cleanup() {
    set +e
    if [ -n "$UP" ]; then
        say "vagrant destroy"
        timeout 300 "${NSX[@]}" vagrant destroy -f >"$VW/destroy.log" 2>&1 \
            || { tail -5 "$VW/destroy.log" >&2; say "vagrant destroy failed (see $VW/destroy.log)"; }
        # our libvirtd leaves a running QEMU behind when it stops: make sure none is left
        if [ -n "$OWN_NETNS" ] && virsh -c qemu:///system domstate "$DOMAIN" >/dev/null 2>&1; then
            virsh -c qemu:///system destroy "$DOMAIN" >/dev/null 2>&1
            virsh -c qemu:///system undefine "$DOMAIN" --remove-all-storage >/dev/null 2>&1
            say "removed the domain $DOMAIN with virsh"
        fi
    fi
    local i
    for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do stop_pid "${PIDS[$i]}"; done
    [ -n "$OWN_NETNS" ] && ip netns del "$NETNS" 2>/dev/null
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- host packages --------------------------------------------------------------
ensure_packages() {
    local p missing=()
    for p in vagrant vagrant-libvirt libvirt-daemon-system libvirt-clients qemu-system-x86 \
             qemu-utils debootstrap dnsmasq-base iptables e2fsprogs iproute2; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    [ "$(id -u)" = 0 ] || fail "missing host packages: ${missing[*]} (run as root, or apt-get install them)"
    mkdir -p "$VW"
    say "installing ${missing[*]}"
    local log=$VW/apt-install.log
    apt-get update -qq >"$log" 2>&1 || { tail -20 "$log" >&2; fail "apt-get update failed"; }
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >>"$log" 2>&1 || { tail -20 "$log" >&2; fail "apt-get install ${missing[*]} (see $log)"; }
}

# --- the box ----------------------------------------------------------------------
ensure_box() {
    local key
    key=$( { echo "$KVER"; cat "$HERE/build-box.sh" "$HERE/box/Vagrantfile"; } | sha256sum | cut -c1-12)
    BOX=blockxfer-testbed-$key
    if vg box list 2>/dev/null | grep -q "^$BOX "; then
        say "box $BOX (cached in $VAGRANT_HOME)"
        return 0
    fi
    local file=$VW/box/blockxfer-testbed.box
    if [ "$(cat "$VW/box/key" 2>/dev/null)" != "$key" ] || [ ! -f "$file" ]; then
        rm -f "$VW/box/key" "$file"
        mkdir -p "$VW/box"
        local t0=$SECONDS
        bash "$HERE/build-box.sh" "$VW/box" "$KVER" "$KERNEL_DEB" || fail "the box could not be built"
        echo "$key" >"$VW/box/key"
        say "box built in $((SECONDS - t0)) s"
    fi
    # an older box of ours (another kernel, other scripts) only takes space
    local old
    for old in $(vg box list 2>/dev/null | awk '/^blockxfer-testbed-/ {print $1}'); do
        vg box remove --force --all "$old" >/dev/null 2>&1 || true
    done
    say "vagrant box add $BOX"
    vg box add --force --name "$BOX" "$file" >"$VW/box-add.log" 2>&1 \
        || { tail -10 "$VW/box-add.log" >&2; fail "vagrant box add $file failed (see $VW/box-add.log)"; }
    # the box is not world-readable by default, and libvirt's QEMU (libvirt-qemu)
    # must read the kernel and initrd in it
    chmod -R a+rX "$VAGRANT_HOME/boxes"
}

# --- libvirtd / virtlogd -------------------------------------------------------------
libvirt_up() { virsh -c qemu:///system version >/dev/null 2>&1; }
start_daemon() {  # start_daemon NAME ARGS...: in our namespace, in the foreground, logged
    local name=$1
    shift
    "${NSX[@]}" "$@" >"$VW/$name.log" 2>&1 </dev/null &
    PIDS+=($!)
}
ensure_libvirt() {
    chmod a+x "$VAGRANT_HOME" "$VW" "$WORK" 2>/dev/null || true
    if libvirt_up; then
        say "libvirtd is running: using it (management network $MGMT_HOST/24 in the host's namespace)"
        P9_ACCESS=squash
        return 0
    fi
    command -v libvirtd >/dev/null || PATH=$PATH:/usr/sbin:/sbin
    ip netns add "$NETNS" || fail "cannot create the network namespace $NETNS"
    OWN_NETNS=1
    NSX=(ip netns exec "$NETNS")
    "${NSX[@]}" ip link set lo up
    # stale sockets or pid files of a libvirtd that is gone make the new one refuse
    rm -f /run/libvirtd.pid /run/virtlogd.pid
    # QEMU as root, through a qemu.conf seen only by this libvirtd (ip netns exec
    # gives it a mount namespace of its own): it must read the repository, the
    # venv's interpreter (under /root for pyenv) and write the guest's results
    # with their owners (9p passthrough). The system's qemu.conf is not touched.
    printf 'user = "root"\ngroup = "root"\n' >"$VW/qemu.conf"
    start_daemon virtlogd virtlogd
    start_daemon libvirtd sh -c 'mount --bind "$1" /etc/libvirt/qemu.conf && exec libvirtd' sh "$VW/qemu.conf"
    P9_ACCESS=passthrough
    local i
    for i in $(seq 1 150); do
        libvirt_up && break
        kill -0 "${PIDS[-1]}" 2>/dev/null || { tail -20 "$VW/libvirtd.log" >&2; fail "libvirtd exited (see $VW/libvirtd.log)"; }
        sleep 0.2
    done
    libvirt_up || fail "libvirtd did not answer within 30 s (see $VW/libvirtd.log)"
    say "started virtlogd (pid ${PIDS[0]}) and libvirtd (pid ${PIDS[1]}) in network namespace $NETNS"
}

# vagrant box remove leaves the box's volume in libvirt's pool: drop those of older boxes
drop_old_volumes() {
    local v
    for v in $(virsh -c qemu:///system vol-list default 2>/dev/null | awk '/^ *blockxfer-testbed-/ {print $1}'); do
        case "$v" in "${BOX}_vagrant_box_image"*) continue ;; esac
        virsh -c qemu:///system vol-delete "$v" --pool default >/dev/null 2>&1 && say "removed the old box volume $v"
    done
}

# --- run -------------------------------------------------------------------------------
write_config() {
    RESULTS=$VW/results
    rm -rf "$RESULTS"
    mkdir -p "$RESULTS"
    # a QEMU that runs as libvirt-qemu (squash) writes the guest's files here
    [ "$P9_ACCESS" = passthrough ] || chmod 0777 "$RESULTS"
    cat >"$RESULTS/config.env" <<EOF
TB_MODE=test
TB_TAPES=0
TB_TAPE_KIND=none
TB_TAPE_MB=${TESTBED_TAPE_MB:-512}
TB_TAPE_SMALL_MB=${TESTBED_TAPE_SMALL_MB:-8}
TB_CHANGER_TAPE_MB=${TESTBED_CHANGER_TAPE_MB:-4}
TB_CHANGER=0
TB_NBD_HOST=$MGMT_HOST
TB_NBD_PORT=$NBD_PORT
TB_NBD_EXPORT=testbed
TB_MHVTL=1
TB_MHVTL_USR=$MHVTL_USR
TB_MHVTL_KO=$WORK/kernel/mhvtl/mhvtl.ko
TB_TERM=${TERM:-linux}
EOF
    local v
    for v in TESTBED_PYTEST_ARGS TESTBED_PYTEST_MARK TESTBED_CHUNK_KB TESTBED_CHUNK5_KB; do
        if [ -n "${!v:-}" ]; then printf 'TB_%s=%q\n' "${v#TESTBED_}" "${!v}" >>"$RESULTS/config.env"; fi
    done
}

vagrant_up() {
    TB_PYTHON_PREFIX=$("$REPO/.venv/bin/python" -c 'import sys; print(sys.base_prefix)') \
        || fail "$REPO/.venv/bin/python does not run"
    export TB_PYTHON_PREFIX TB_9P_ACCESS=$P9_ACCESS
    export TB_REPO=$REPO TB_RESULTS=$RESULTS TB_BOX=$BOX TB_DOMAIN_TYPE=$DOMAIN_TYPE TB_CONSOLE_LOG=$VW/console.log
    export TB_MEM=${TESTBED_MEM:-2048} TB_SMP=${TESTBED_SMP:-2} TB_DISK_MB=${TESTBED_DISK_MB:-256}
    rm -f "$VW/console.log"
    # a machine left by a killed run would make `up` reuse it
    vg destroy -f >/dev/null 2>&1 || true
    say "vagrant up --provider=libvirt (domain type $DOMAIN_TYPE; log $VW/up.log, console $VW/console.log)"
    UP=1
    local t0=$SECONDS
    if ! timeout -k 10 "${TESTBED_VAGRANT_UP_TIMEOUT:-1200}" "${NSX[@]}" \
            vagrant up --provider=libvirt >"$VW/up.log" 2>&1; then
        tail -25 "$VW/up.log" >&2
        [ -f "$VW/console.log" ] && { say "last console lines:"; tail -15 "$VW/console.log" >&2; }
        fail "the VM did not come up (see $VW/up.log and $VW/console.log)"
    fi
    UP_SECS=$((SECONDS - t0))
    say "VM up in $UP_SECS s"
}

start_nbd() {
    truncate -s "${NBD_MB}M" "$VW/nbd0.img"
    # on the management network's host address: the guest's kernel client reaches it there
    start_daemon qemu-nbd qemu-nbd --format=raw --export-name=testbed --bind="$MGMT_HOST" \
        --port="$NBD_PORT" --persistent --shared=4 "$VW/nbd0.img"
}

main() {
    [ "$(id -u)" = 0 ] || fail "run as root (libvirt, the namespace, the devices)"
    mkdir -p "$VW"
    ensure_packages
    export PATH=$PATH:/usr/sbin:/sbin
    local prep
    prep=$(bash "$TB/run.sh" --prepare) || fail "the guest kernel or mhvtl could not be prepared"
    KVER=$(sed -n 's/^KVER=//p' <<<"$prep")
    KERNEL_DEB=$(sed -n 's/^KERNEL_DEB=//p' <<<"$prep")
    MHVTL_USR=$(sed -n 's/^MHVTL_USR=//p' <<<"$prep")
    [ -n "$KVER" ] && [ -f "$KERNEL_DEB" ] && [ -n "$MHVTL_USR" ] \
        || fail "run.sh --prepare gave no kernel package or mhvtl build: $prep"
    [ -x "$REPO/.venv/bin/python" ] || fail "no $REPO/.venv: run 'make venv' first (make testbed-vagrant does)"
    ensure_box
    ensure_libvirt
    drop_old_volumes
    NBD_PORT=10809
    write_config
    vagrant_up
    start_nbd
    say "running the device suite in the guest (guest/stage2.sh; at most ${TIMEOUT}s)"
    local t0=$SECONDS rc=0
    timeout -k 10 "$TIMEOUT" "${NSX[@]}" vagrant ssh -c \
        "sudo TB_REPO='$REPO' TB_RESULTS=/tb-results bash '$REPO/vm-testbed/guest/stage2.sh' '$KVER'" \
        </dev/null 2>&1 | tee "$VW/suite.log" || rc=${PIPESTATUS[0]}
    local secs=$((SECONDS - t0))
    if [ ! -s "$RESULTS/status" ]; then
        tail -25 "$VW/suite.log" >&2
        [ "$rc" = 124 ] && fail "the suite did not finish within ${TIMEOUT}s (TESTBED_TIMEOUT); see $VW/suite.log"
        fail "the suite did not run in the guest (vagrant ssh exit $rc); see $VW/suite.log"
    fi
    rc=$(cat "$RESULTS/status")
    grep -h 'TESTBED-FATAL\|^stage2' "$VW/suite.log" >&2 || true
    [ "$rc" = 125 ] && fail "the guest could not set up (see TESTBED-FATAL above and $VW/suite.log)"
    # report.py's "from boot to power-off": vagrant up (boot included) and the suite
    python3 "$TB/lib/report.py" "$RESULTS" "vagrant-libvirt, domain type $DOMAIN_TYPE" \
        "$((UP_SECS + secs))" || true
    exit "$rc"
}
main
