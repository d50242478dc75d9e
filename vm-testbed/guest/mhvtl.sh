# Sourced by stage2.sh: start an mhvtl library in the guest and export its
# devices.  Built on the host by lib/build-mhvtl.sh (TB_MHVTL_KO, TB_MHVTL_USR);
# the configuration and tape home paths are compiled into the user space
# (/run/mhvtl and /var/tmp/mhvtl: writable with or without the overlay).
#
# Library 10 (STK L700, SCSI target 0) with three IBM LTO-5 drives (targets
# 1-3, the changer's drives 0-2) and barcoded cartridges (MB = capacity):
#   slots 1-4  BXC001L5..BXC004L5  the changer's scratch tapes: BXC001L5 is
#              small so a dump spans from it (early warning at
#              TB_CHANGER_TAPE_MB), the rest 64 MB
#   slot 5     BXM001L5            main tape, loaded into drive 0 (TB_TAPE_MB)
#   slot 6     BXS001L5            small tape, loaded into drive 1: early warning
#              at TB_TAPE_SMALL_MB, the physical end 2 MB later (mhvtl puts
#              early warning 2 MB before the end)
#   slots 7-8  BXP001L5, BXP002L5  64 MB, a pool for barcode tests
#   slots 9-10 empty
# Drive 2 stays empty: the changer tests load it.  Drive compression is off by
# default (lzo would shrink the tests' constant data far past the capacity).

MHVTL_CONF=/run/mhvtl
MHVTL_HOME=/var/tmp/mhvtl
MHVTL_LIB=10
MHVTL_DRIVES=(11 12 13)
# An idle daemon polls the kernel module with a sleep that grows by this many µs
# per empty poll (up to 1 s; reset to 5 µs by each command). mhvtl's 400: 10
# (its minimum) makes the first command after a pause quicker, but polls between
# commands far more often; in the one run with it, under TCG, the tests that
# write thousands of 4 KiB records took twice as long (17 s -> 40 s).
MHVTL_BACKOFF=400

mhvtl_device_conf() {
    local id t=1
    cat <<EOF
VERSION: 5

Library: $MHVTL_LIB CHANNEL: 00 TARGET: 00 LUN: 00
 Vendor identification: STK
 Product identification: L700
 Unit serial number: BXLIB10
 NAA: 10:22:33:44:ab:00:00:00
 Home directory: $MHVTL_HOME
 PERSIST: False
 Backoff: $MHVTL_BACKOFF
EOF
    for id in "${MHVTL_DRIVES[@]}"; do
        cat <<EOF

Drive: $id CHANNEL: 00 TARGET: 0$t LUN: 00
 Library ID: $MHVTL_LIB Slot: 0$t
 Vendor identification: IBM
 Product identification: ULT3580-TD5
 Product revision level: 550V
 Unit serial number: BXDRV$id
 NAA: 10:22:33:44:ab:00:0$t:00
 Compression: factor 1 enabled 0
 Compression type: lzo
 Backoff: $MHVTL_BACKOFF
EOF
        t=$((t + 1))
    done
}

# barcode:MB, in slot order ("-" = empty slot)
mhvtl_cartridges() {
    local small=$(( ${TB_TAPE_SMALL_MB:-8} + 2 )) span=$(( ${TB_CHANGER_TAPE_MB:-4} + 2 ))
    echo "BXC001L5:$span BXC002L5:64 BXC003L5:64 BXC004L5:64" \
         "BXM001L5:${TB_TAPE_MB:-512} BXS001L5:$small BXP001L5:64 BXP002L5:64 - -"
}

mhvtl_library_contents() {
    local i=1 c
    echo "VERSION: 2"
    echo
    for _ in "${MHVTL_DRIVES[@]}"; do echo "Drive $i:"; i=$((i + 1)); done
    printf '\nPicker 1:\n\nMAP 1:\n\n'
    i=1
    for c in $(mhvtl_cartridges); do
        if [ "$c" = - ]; then echo "Slot $i:"; else echo "Slot $i: ${c%:*}"; fi
        i=$((i + 1))
    done
}

# The lookups below use shell builtins only (globs, read): they run in a polling
# loop, and each `$(basename ...)`/`readlink` was a fork and exec that cost tens
# of milliseconds under TCG, enough to slow the SCSI scan they were waiting for.
mhvtl_host() {  # the SCSI host number of mhvtl's pseudo HBA
    local h name
    for h in /sys/class/scsi_host/host*; do
        read -r name <"$h/proc_name" 2>/dev/null || continue
        [ "$name" = mhvtl ] && { echo "${h##*host}"; return 0; }
    done
    return 1
}

mhvtl_tape() {  # mhvtl_tape HOST TARGET -> /dev/nstN of the drive at that target
    local t
    for t in /sys/bus/scsi/devices/"$1:0:$2:0"/scsi_tape/nst*; do
        case ${t##*/} in *[0-9]) [ -e "$t" ] && { echo "/dev/${t##*/}"; return 0; } ;; esac
    done
    return 1                            # (nst0a, nst0l, nst0m: the other modes)
}

mhvtl_changer_sg() {  # /dev/sgN of the library (SCSI type 8)
    local g
    for g in /sys/bus/scsi/devices/"$1:0:0:0"/scsi_generic/sg*; do
        [ -e "$g" ] && { echo "/dev/${g##*/}"; return 0; }
    done
    return 1
}

# Start it all; on failure say why and return 1 (stage2 makes that fatal).
start_mhvtl() {
    local bin=$TB_MHVTL_USR/bin out c id host n=0
    [ -f "$TB_MHVTL_KO" ] || { log "mhvtl: no module $TB_MHVTL_KO"; return 1; }
    [ -x "$bin/vtltape" ] || { log "mhvtl: no user space in $TB_MHVTL_USR"; return 1; }
    [ -e /dev/fd ] || ln -s /proc/self/fd /dev/fd
    out=$(insmod "$TB_MHVTL_KO" opts=0 2>&1) || { log "mhvtl: insmod: $out"; return 1; }
    rm -rf "$MHVTL_CONF" "$MHVTL_HOME"
    mkdir -p "$MHVTL_CONF" "$MHVTL_HOME" /var/lock/mhvtl
    mhvtl_device_conf >"$MHVTL_CONF/device.conf"
    mhvtl_library_contents >"$MHVTL_CONF/library_contents.$MHVTL_LIB"
    # the daemons log only to syslog: keep it for the failure messages below
    busybox syslogd -O "$MHVTL_CONF/messages" 2>/dev/null || true
    for c in $(mhvtl_cartridges); do
        [ "$c" = - ] && continue
        out=$("$bin/mktape" -l "$MHVTL_LIB" -m "${c%:*}" -s "${c#*:}" -t data -d LTO5 2>&1) \
            || { log "mhvtl: mktape ${c%:*}: $out"; return 1; }
    done
    # drives first (each daemonizes), then the library; stdio detached so no
    # daemon holds the console or a pipe open
    for id in "${MHVTL_DRIVES[@]}"; do
        "$bin/vtltape" -q"$id" -v1 </dev/null >/dev/null 2>&1 \
            || { log "mhvtl: vtltape -q$id failed to start"; return 1; }
    done
    "$bin/vtllibrary" -q"$MHVTL_LIB" -v1 </dev/null >/dev/null 2>&1 \
        || { log "mhvtl: vtllibrary -q$MHVTL_LIB failed to start"; return 1; }
    log "mhvtl: cartridges made, daemons started"
    host=$(mhvtl_host) || { log "mhvtl: the module loaded but no SCSI host named mhvtl"; return 1; }
    while :; do
        MHVTL_CHANGER=$(mhvtl_changer_sg "$host") && mhvtl_tape "$host" 3 >/dev/null && break
        n=$((n + 1))
        [ $n -lt 100 ] || { log "mhvtl: devices did not appear within 20 s"; \
                            tail -20 "$MHVTL_CONF/messages" 2>/dev/null; return 1; }
        sleep 0.2
    done
    MHVTL_TAPE=$(mhvtl_tape "$host" 1) && MHVTL_SMALL=$(mhvtl_tape "$host" 2) \
        && MHVTL_CHANGER_TAPE=$(mhvtl_tape "$host" 3) || { log "mhvtl: a drive is missing"; return 1; }
    log "mhvtl: devices up, loading drives 0 and 1"
    # main tape in drive 0, small one in drive 1
    mtx -f "$MHVTL_CHANGER" load 5 0 >/dev/null && mtx -f "$MHVTL_CHANGER" load 6 1 >/dev/null \
        || { log "mhvtl: mtx could not load the main and small tapes"; \
             tail -20 "$MHVTL_CONF/messages" 2>/dev/null; return 1; }
    for c in "$MHVTL_TAPE" "$MHVTL_SMALL"; do
        for n in $(seq 1 50); do mt -f "$c" status >/dev/null 2>&1 && break; sleep 0.2; done
    done
    log "mhvtl: library $MHVTL_CHANGER, drives $MHVTL_TAPE (BXM001L5)," \
        "$MHVTL_SMALL (BXS001L5), $MHVTL_CHANGER_TAPE (empty)"
}

stop_mhvtl() {
    local id
    [ -x "${TB_MHVTL_USR:-}/bin/vtlcmd" ] || return 0
    for id in "$MHVTL_LIB" "${MHVTL_DRIVES[@]}"; do
        "$TB_MHVTL_USR/bin/vtlcmd" "$id" exit >/dev/null 2>&1
    done
}
