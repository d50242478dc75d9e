#!/bin/bash
# Second stage of the test bed guest, run by /init inside `chroot /host`, i.e.
# with the host's own programs (bash, mdadm, nbd-client, the repo's .venv) on
# the guest's kernel.  Reads the run's settings from $RESULTS/config.env (made
# by run.sh), prepares the devices, then runs the test suite, a shell or the
# benchmark.  Its exit status becomes `make testbed`'s.
set -u
KVER=${1:?kernel version}
# the QEMU bed names them on the kernel command line, the Vagrant bed in the environment
REPO=${TB_REPO:-} RESULTS=${TB_RESULTS:-}
for arg in $(cat /proc/cmdline); do
    case "$arg" in
        tb.repo=*) REPO=${arg#tb.repo=} ;;
        tb.results=*) RESULTS=${arg#tb.results=} ;;
    esac
done
set -a  # config.env's TB_* settings are exported to the scripts run below
# shellcheck source=/dev/null
. "$RESULTS/config.env"
set +a
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
export LANG=C.UTF-8 TERM=${TB_TERM:-linux}
STATUS_FILE=$RESULTS/status

log() { echo "stage2 [$(cut -d" " -f1 /proc/uptime)s]: $*"; }
die() {
    echo "TESTBED-FATAL: $*"
    echo 125 >"$STATUS_FILE"
    exit 125
}

# Writable home and module tree.  With the overlay the whole root is writable;
# without it only the tmpfs mounts are.
if touch /root/.tb-probe 2>/dev/null; then
    rm -f /root/.tb-probe
    export HOME=/root
else
    export HOME=/tmp/home
    mkdir -p "$HOME"
fi
KMODS=$REPO/vm-testbed/work/kernel/lib/modules/$KVER
if [ ! -e "/lib/modules/$KVER" ]; then
    if mkdir -p /lib/modules 2>/dev/null && ln -s "$KMODS" "/lib/modules/$KVER" 2>/dev/null; then
        :
    else
        log "no writable /lib/modules: use 'modprobe -d $REPO/vm-testbed/work/kernel'"
    fi
fi
export BLOCKXFER_TEST_MODPROBE_DIR=$REPO/vm-testbed/work/kernel
tbmodprobe() { modprobe "$@" 2>/dev/null || modprobe -d "$BLOCKXFER_TEST_MODPROBE_DIR" "$@"; }
for m in loop sg st nbd md_mod raid0 raid456; do tbmodprobe "$m" || log "modprobe $m failed"; done

# --- disks: virtio-blk serials set by run.sh name their roles -----------------
declare -A BY_SERIAL=()
for s in /sys/block/vd*/serial; do
    [ -e "$s" ] || continue
    dev=$(basename "$(dirname "$s")")
    serial=$(cat "$s")
    [ -n "$serial" ] || continue  # the Vagrant box's own disk has none
    BY_SERIAL[$serial]=/dev/$dev
done
disks_with_prefix() {
    local p=$1 k out=()
    for k in $(printf '%s\n' "${!BY_SERIAL[@]}" | sort); do
        [[ $k == "$p"* ]] && out+=("${BY_SERIAL[$k]}")
    done
    echo "${out[@]:-}"
}

make_md() {  # make_md VAR /dev/mdN LEVEL CHUNK_KiB DEV...: exports VAR and VAR_CREATED
    local var=$1 md=$2 level=$3 chunk=$4
    shift 4
    [ $# -ge 2 ] || { log "not enough disks for $md"; return 1; }
    local extra=()
    [ "$level" = 5 ] && extra+=(--assume-clean)  # fresh disks are all zero: parity holds
    mdadm --create "$md" --run --quiet --metadata=1.2 --homehost=testbed \
        --level="$level" --chunk="$chunk" --raid-devices=$# "${extra[@]}" "$@" </dev/null \
        || { log "mdadm --create $md failed"; return 1; }
    log "$md: raid$level over $* ($(cat /sys/block/${md#/dev/}/size) sectors)"
    # what was asked for, so the tests can hold sysfs against it (members in role order)
    local members="$*"
    export "$var=$md" "${var}_CREATED=level=raid$level chunk=$((chunk * 1024)) members=${members// /,}"
}

# --- tape: through QEMU's libiscsi scsi-generic on virtio-scsi (scsi-id 0 = main
# tape, 1 = small one, LUN 0), or logged in with open-iscsi in the guest (target
# id 0, LUN 1 = main, 2 = small) ------------------------------------------------
not_mhvtl() {  # not_mhvtl H:C:T:L: the device is not on mhvtl's SCSI host (it starts meanwhile)
    local name=
    read -r name <"/sys/class/scsi_host/host${1%%:*}/proc_name" 2>/dev/null
    [ "$name" != mhvtl ]
}
# Shell builtins only (globs, read), no `$(basename ...)`/`readlink`: these run in
# polling loops, and each fork and exec cost tens of milliseconds under TCG.
find_tape() {  # find_tape TARGET:LUN -> /dev/nstN
    local d t
    for d in /sys/bus/scsi/devices/*:*:"$1"; do
        [ -e "$d" ] && not_mhvtl "${d##*/}" || continue
        for t in "$d"/scsi_tape/nst*; do
            case ${t##*/} in *[0-9]) [ -e "$t" ] && { echo "/dev/${t##*/}"; return 0; } ;; esac
        done                            # (nst0a, nst0l, nst0m: the other modes)
    done
    return 1
}

login_open_iscsi() {
    local portal=10.0.2.2:$TB_ISCSI_PORT
    mkdir -p /etc/iscsi /run/lock/iscsi /var/lib/iscsi
    echo "InitiatorName=iqn.2025-01.org.blockxfer:guest" >/etc/iscsi/initiatorname.iscsi
    iscsid || { log "iscsid failed to start"; return 1; }
    # No discovery: tgt would advertise 127.0.0.1, the host's address, not ours.
    iscsiadm -m node -o new -T "$TB_ISCSI_IQN" -p "$portal" >/dev/null \
        && iscsiadm -m node -T "$TB_ISCSI_IQN" -p "$portal" --login >/dev/null \
        || { log "iscsiadm login to $portal failed"; return 1; }
    log "open-iscsi: logged in to $TB_ISCSI_IQN at $portal"
}

# The tapes of each implementation, as the BLOCKXFER_TEST_* variables the tests
# read: TGT_ENV (tgt, from the host) and MHVTL_ENV (mhvtl, in the guest).  The
# main pytest run gets mhvtl's (tgt's without mhvtl); tgt's run the tape tests
# again in a second pass (run_tgt_pass).
declare -A TGT_ENV=() MHVTL_ENV=()
setup_tapes() {
    local i
    [ "${TB_TAPES:-0}" -gt 0 ] || return 0
    local main=0:0 small=1:0
    if [ "${TB_TAPE_VIA:-qemu}" = open-iscsi ]; then
        main=0:1 small=0:2
        login_open_iscsi || return 1
    fi
    for _ in $(seq 1 50); do
        find_tape "$main" >/dev/null && break
        sleep 0.2
    done
    TAPE=$(find_tape "$main") || { log "no tape appeared (expected /dev/nst0)"; return 1; }
    TGT_ENV[BLOCKXFER_TEST_TAPE]=$TAPE
    log "${TB_TAPE_KIND:-tgt} tape: $TAPE ($(cat "/sys/class/scsi_tape/$(basename "$TAPE")/device/vendor" 2>/dev/null | xargs)" \
        "$(cat "/sys/class/scsi_tape/$(basename "$TAPE")/device/model" 2>/dev/null | xargs))"
    if [ "${TB_TAPES:-0}" -gt 1 ] && TAPE_EW=$(find_tape "$small"); then
        TGT_ENV[BLOCKXFER_TEST_TAPE_SMALL]=$TAPE_EW
        TGT_ENV[BLOCKXFER_TEST_TAPE_SMALL_MB]=${TB_TAPE_SMALL_MB:-}
        # the conformance suite fills this one (early warning, trailer after it)
        TGT_ENV[BLOCKXFER_TEST_TAPE_FILL]=$TAPE_EW
        log "small tape (early warning at ${TB_TAPE_SMALL_MB:-?} MB): $TAPE_EW"
    fi
    [ "${TB_CHANGER:-0}" = 1 ] && setup_changer
    TGT_ENV[BLOCKXFER_TEST_TAPE_KIND]=${TB_TAPE_KIND:-tgt}
    TGT_ENV[BLOCKXFER_TEST_TAPE_PATH]=${TB_TAPE_VIA:-qemu}  # qemu (libiscsi passthrough) or open-iscsi
}

# mhvtl starts in the background (its daemons and devices take 10-30 s under TCG)
# while the arrays, tgt's tapes and NBD are set up; setup_mhvtl waits for it.
MHVTL_PID=
start_mhvtl_bg() {
    [ "${TB_MHVTL:-0}" = 1 ] || return 0
    # shellcheck source=vm-testbed/guest/mhvtl.sh
    . "$REPO/vm-testbed/guest/mhvtl.sh"
    rm -f /tmp/mhvtl.env
    (start_mhvtl && printf '%s=%q\n' MHVTL_TAPE "$MHVTL_TAPE" MHVTL_SMALL "$MHVTL_SMALL" \
        MHVTL_CHANGER "$MHVTL_CHANGER" MHVTL_CHANGER_TAPE "$MHVTL_CHANGER_TAPE" >/tmp/mhvtl.env) &
    MHVTL_PID=$!
}
setup_mhvtl() {
    [ "${TB_MHVTL:-0}" = 1 ] || return 0
    wait "$MHVTL_PID" && [ -s /tmp/mhvtl.env ] \
        || die "mhvtl could not be started (see the stage2 lines above)"
    # shellcheck source=/dev/null
    . /tmp/mhvtl.env
    MHVTL_ENV=(
        [BLOCKXFER_TEST_TAPE]=$MHVTL_TAPE
        [BLOCKXFER_TEST_TAPE_SMALL]=$MHVTL_SMALL
        [BLOCKXFER_TEST_TAPE_SMALL_MB]=${TB_TAPE_SMALL_MB:-8}
        [BLOCKXFER_TEST_TAPE_FILL]=$MHVTL_SMALL
        [BLOCKXFER_TEST_TAPE_HARD_EOM]=1
        [BLOCKXFER_TEST_CHANGER]=$MHVTL_CHANGER
        [BLOCKXFER_TEST_CHANGER_TAPE]=$MHVTL_CHANGER_TAPE
        [BLOCKXFER_TEST_CHANGER_DRIVE]=2
        [BLOCKXFER_TEST_TAPE_KIND]=mhvtl
        [BLOCKXFER_TEST_TAPE_PATH]=guest
        # vtlcmd and the drive id of BLOCKXFER_TEST_TAPE: tests inject TapeAlert flags
        [BLOCKXFER_TEST_MHVTL_VTLCMD]=$TB_MHVTL_USR/bin/vtlcmd
        [BLOCKXFER_TEST_MHVTL_DRIVE]=${MHVTL_DRIVES[0]}
    )
}

export_tape_env() {  # export_tape_env mhvtl|tgt: the BLOCKXFER_TEST_* tape variables of one
    local -n e=${1^^}_ENV
    local k
    for k in $(env | grep -o '^BLOCKXFER_TEST_\(TAPE\|CHANGER\|MHVTL\)[A-Z_]*'); do unset "$k"; done
    for k in "${!e[@]}"; do export "$k=${e[$k]}"; done
}

# tgt's changer (scsi-id 3, SCSI type 8: mtx drives it through its sg node) and
# its drive (scsi-id 2, empty until the changer loads a tape)
setup_changer() {
    local d g type drive
    for d in /sys/bus/scsi/devices/*:*:3:0; do
        type=
        [ -e "$d" ] && not_mhvtl "${d##*/}" && read -r type <"$d/type" && [ "$type" = 8 ] || continue
        for g in "$d"/scsi_generic/sg*; do [ -e "$g" ] && break; done
        [ -e "$g" ] || continue
        drive=$(find_tape 2:0) || { log "changer found but not its drive"; return 0; }
        TGT_ENV[BLOCKXFER_TEST_CHANGER]=/dev/${g##*/} TGT_ENV[BLOCKXFER_TEST_CHANGER_TAPE]=$drive
        log "changer: ${TGT_ENV[BLOCKXFER_TEST_CHANGER]} (tgt SMC), its drive $drive"
        return 0
    done
    log "no changer appeared at scsi-id 3"
}

setup_nbd() {
    [ -n "${TB_NBD_PORT:-}" ] || return 0
    local i
    for i in $(seq 1 50); do [ -e /dev/nbd0 ] && break; sleep 0.1; done
    local host=${TB_NBD_HOST:-10.0.2.2}  # QEMU's user network; the Vagrant bed's host differs
    nbd-client "$host" "$TB_NBD_PORT" /dev/nbd0 -N "${TB_NBD_EXPORT:-testbed}" -b 4096 \
        </dev/null >/tmp/nbd-client.log 2>&1 \
        || { log "nbd-client failed: $(cat /tmp/nbd-client.log)"; return 1; }
    for i in $(seq 1 50); do
        [ "$(cat /sys/block/nbd0/size 2>/dev/null || echo 0)" -gt 0 ] && break
        sleep 0.1
    done
    export BLOCKXFER_TEST_NBD=/dev/nbd0
    log "nbd: /dev/nbd0 <- $host:$TB_NBD_PORT ($(cat /sys/block/nbd0/size) sectors)"
}

write_env() {
    env | grep '^BLOCKXFER_TEST_' | sort | tee "$RESULTS/devices.env"
    [ ${#MHVTL_ENV[@]} -gt 0 ] && [ ${#TGT_ENV[@]} -gt 0 ] || return 0
    echo "# second pass (tape tests only) on ${TB_TAPE_KIND:-tgt}:" >>"$RESULTS/devices.env"
    (export_tape_env tgt; env | grep '^BLOCKXFER_TEST_\(TAPE\|CHANGER\)' | sort) \
        | tee -a "$RESULTS/devices.env"
}

mount_scratch() {  # ext4 on the "scratch" disk at /var/tmp: see run.sh make_disks
    local dev=${BY_SERIAL[scratch]:-}
    [ -n "$dev" ] || return 0
    mkfs.ext4 -q -F -E lazy_itable_init=1,lazy_journal_init=1 "$dev" </dev/null \
        && mount -t ext4 "$dev" /var/tmp && chmod 1777 /var/tmp \
        || { log "scratch disk $dev: mkfs/mount on /var/tmp failed"; return 1; }
}

case "$TB_MODE" in
test|shell)
    mount_scratch
    start_mhvtl_bg
    R0=$(disks_with_prefix r0-)
    R5=$(disks_with_prefix r5-)
    # Two chunk sizes, so both of the reader's plans run on real md: whole stripes
    # (chunk < 256 KiB) on md0 and chunk round-robin over the members on md1.
    # shellcheck disable=SC2086
    make_md BLOCKXFER_TEST_MD0 /dev/md0 0 "${TB_CHUNK_KB:-64}" $R0
    # shellcheck disable=SC2086
    make_md BLOCKXFER_TEST_MD5 /dev/md1 5 "${TB_CHUNK5_KB:-512}" $R5
    SPARES=$(disks_with_prefix spare-)
    [ -n "$SPARES" ] && export BLOCKXFER_TEST_DISKS=${SPARES// /,}
    EXTRA=$(disks_with_prefix extra-)
    [ -n "$EXTRA" ] && export BLOCKXFER_TEST_EXTRA_DISKS=${EXTRA// /,}
    setup_tapes
    setup_mhvtl
    if [ ${#MHVTL_ENV[@]} -gt 0 ]; then export_tape_env mhvtl; else export_tape_env tgt; fi
    setup_nbd
    export BLOCKXFER_TESTBED=1
    write_env
    ;;
bench)
    export BENCH_DISKS
    BENCH_DISKS=$(disks_with_prefix bench-)
    ;;
bench-fio)
    for i in $(seq 1 50); do [ -e /dev/nbd1 ] && break; sleep 0.1; done
    for c in "0 $TB_FIO_OURS_PORT active" "1 $TB_FIO_PEER_PORT raw"; do
        set -- $c
        nbd-client 10.0.2.2 "$2" "/dev/nbd$1" -N "$3" -b 4096 </dev/null >/tmp/nbd-client.log 2>&1 \
            || die "nbd-client to export $3 at 10.0.2.2:$2 failed: $(cat /tmp/nbd-client.log)"
    done
    ;;
bench-tape)
    mount_scratch
    start_mhvtl_bg
    setup_mhvtl
    export_tape_env mhvtl
    [ -n "${BLOCKXFER_TEST_TAPE:-}" ] || die "the tape bench needs mhvtl (TESTBED_MHVTL=1)"
    ;;
esac

cd "$REPO" || die "cannot cd to $REPO"
# the tape tests, run again on tgt when mhvtl is the main tape
TAPE_TESTS=(tests/test_tape_conformance.py tests/test_tape_dump_device.py tests/test_changer_device.py
            tests/test_scsi_device.py tests/test_testbed_smoke.py::test_tape_online_and_roundtrip
            tests/test_testbed_smoke.py::test_tape_position_query
            tests/test_testbed_smoke.py::test_small_tape_early_warning)
PASSES=/tmp/passes
write_pass() {  # write_pass NAME ARGS...: a pytest pass for guest/passes.py, in this environment
    local name=$1 sfx=
    shift
    [ "$name" = main ] || sfx=-$name
    mkdir -p "$PASSES"
    printf '%s\0' -m "${TB_PYTEST_MARK:-device}" -p no:cacheprovider -p testbed_report \
        --junitxml="$RESULTS/junit$sfx.xml" "$@" >"$PASSES/$name.args"
    PYTHONPATH=$REPO/vm-testbed/guest${PYTHONPATH:+:$PYTHONPATH} \
        TESTBED_REPORT=$RESULTS/report$sfx.json env -0 >"$PASSES/$name.env"
}
pass_rc() {  # pass_rc NAME: its pytest status; its log to the results as pytest[-NAME].log
    local sfx=
    [ "$1" = main ] || sfx=-$1
    cp "$PASSES/$1.log" "$RESULTS/pytest$sfx.log" 2>/dev/null
    cat "$PASSES/$1.rc" 2>/dev/null || echo 3
}
export PYTHONDONTWRITEBYTECODE=1
case "$TB_MODE" in
test)
    # TESTBED_PYTEST_ARGS is split like a shell command line: -k 'tape or nbd' works
    eval "extra=(${TB_PYTEST_ARGS:-})"
    # Only the files with device tests: collecting all of tests/ (1000 tests, their
    # imports) took about a minute under TCG. Paths in TESTBED_PYTEST_ARGS win.
    files=()
    case "${TB_PYTEST_MARK:-device} ${TB_PYTEST_ARGS:-}" in
        "device "*tests/*|"device "*.py*) ;;
        # shellcheck disable=SC2207  # paths without blanks; the guest has no /dev/fd for <()
        "device "*) files=($(grep -rlE --include='test_*.py' 'mark\.device' tests | sort)) ;;
    esac
    write_pass main "${files[@]}" "${extra[@]}"
    passes=(main)
    if [ ${#MHVTL_ENV[@]} -gt 0 ] && [ ${#TGT_ENV[@]} -gt 0 ]; then
        # tgt stays a second implementation: the drive without LOCATE, reached
        # through iSCSI; only the tape tests run again, on its devices
        (export_tape_env tgt
         unset BLOCKXFER_TEST_MD0 BLOCKXFER_TEST_MD5 BLOCKXFER_TEST_NBD BLOCKXFER_TEST_DISKS \
               BLOCKXFER_TEST_EXTRA_DISKS
         write_pass tgt "${TAPE_TESTS[@]}" "${extra[@]}")
        passes+=(tgt)
    fi
    # both passes from one interpreter (its imports paid once): guest/passes.py
    "$REPO/.venv/bin/python" "$REPO/vm-testbed/guest/passes.py" "$PASSES" "${passes[@]}"
    rc=$(pass_rc main)
    if [ ${#passes[@]} -gt 1 ]; then
        rc2=$(pass_rc tgt)
        [ "$rc2" = 5 ] && rc2=0   # nothing selected (a -k for the main pass)
        [ "$rc" = 0 ] && rc=$rc2
    fi
    ;;
shell)
    echo
    echo "=== blockxfer test bed shell: host root (overlay) on kernel $KVER; exit (or Ctrl-D) powers the guest off ==="
    echo "=== devices are in \$BLOCKXFER_TEST_*; run: .venv/bin/pytest -m device -p no:cacheprovider ==="
    setsid -c bash -i </dev/ttyS0 >/dev/ttyS0 2>&1
    rc=0
    ;;
bench)
    bash "$REPO/vm-testbed/bench-raid.sh" $BENCH_DISKS 2>&1 | tee "$RESULTS/bench.log"
    rc=${PIPESTATUS[0]}
    ;;
bench-fio)
    python3 "$REPO/vm-testbed/bench-fio.py" /dev/nbd0 /dev/nbd1 2>&1 | tee "$RESULTS/bench.log"
    rc=${PIPESTATUS[0]}
    for i in 0 1; do nbd-client -d "/dev/nbd$i" >/dev/null 2>&1; done
    ;;
bench-tape)
    # dump of an image to mhvtl's drive 0 vs dd of the same bytes and record size,
    # and a one-block partial restore by LOCATE vs reading the whole image
    TAPE=$BLOCKXFER_TEST_TAPE BENCH_TAPE_MB=${TB_BENCH_TAPE_MB:-128} BENCH_TAPE_ROUNDS=${TB_BENCH_TAPE_ROUNDS:-3} \
        "$REPO/.venv/bin/python" -m bench.bench_tape 2>&1 | tee "$RESULTS/bench.log"
    rc=${PIPESTATUS[0]}
    ;;
*)
    die "unknown mode $TB_MODE"
    ;;
esac
sync
echo "$rc" >"$STATUS_FILE"
exit "$rc"
