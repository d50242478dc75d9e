#!/bin/bash
# Throttled-disk RAID0 read benchmark, run INSIDE the test bed guest
# (make testbed-bench, i.e. vm-testbed/run.sh --bench, which attaches four
# virtio disks each limited by QEMU's I/O throttling and passes them here).
#
#   bench-raid.sh DISK1 DISK2 DISK3 DISK4
#
# It builds md RAID0 over the disks and compares reading one member with
# reading the array (dd with O_DIRECT, fio when present).  Hook for the
# project's striped parallel reader: set TESTBED_BENCH_READER on the host to a
# command line; it runs in the guest, in the repository, with
#   BENCH_MD=/dev/md0  BENCH_MEMBERS="/dev/vda ..."  BENCH_BYTES=N  BENCH_CHUNK=bytes
# and must read BENCH_BYTES from the start of BENCH_MD (for example
# `.venv/bin/python -m bench.raid_reader`).  It is timed like dd and its
# speed-up over one sequential reader of one member is reported (goal >= 3.5x).
#
# Caveat: QEMU's throttle admits a request first and charges its bytes after,
# so it caps each disk's bandwidth but gives no request a service time.  Even
# a naive reader of md0, one chunk at a time, then gets 3.7-4x here (the
# "naive" row); compare the striped reader with that row too.
set -u
[ $# -ge 2 ] || { echo "usage: $0 DISK..." >&2; exit 2; }
MEMBERS=("$@")
N=${#MEMBERS[@]}
CHUNK_KB=${TB_BENCH_CHUNK_KB:-512}
MB=${TB_BENCH_MB:-96}          # read from one member; the array reads N times as much
MD=/dev/md0
bps=${TB_BENCH_BPS:-0}
echo "bench: $N disks, each throttled to $((bps / 1048576)) MiB/s by QEMU; raid0 chunk ${CHUNK_KB} KiB"

mdadm --create "$MD" --run --quiet --metadata=1.2 --level=0 --chunk="$CHUNK_KB" \
    --raid-devices="$N" "${MEMBERS[@]}" </dev/null || { echo "bench: mdadm failed"; exit 1; }

now() { date +%s.%N; }
rate() {  # rate BYTES SECONDS -> MiB/s
    python3 -c "import sys; print(f'{int(sys.argv[1]) / float(sys.argv[2]) / 1048576:.1f}')" "$1" "$2"
}
timed() {  # timed BYTES cmd... -> prints MiB/s
    local bytes=$1 t0 t1
    shift
    echo 3 >/proc/sys/vm/drop_caches
    t0=$(now)
    "$@" >/dev/null 2>&1 || { echo "FAILED"; return 1; }
    t1=$(now)
    rate "$bytes" "$(python3 -c "print($t1 - $t0)")"
}

one=$((MB << 20))
all=$((N * one))
declare -A R
R[single]=$(timed "$one" dd if="${MEMBERS[0]}" of=/dev/null bs=1M count="$MB" iflag=direct)
echo "  one member, dd 1 MiB O_DIRECT:          ${R[single]} MiB/s"
R[md_dd]=$(timed "$all" dd if="$MD" of=/dev/null bs=$((CHUNK_KB * N))K \
    count=$((all / (CHUNK_KB * N * 1024))) iflag=direct)
echo "  raid0, dd one full stripe per read:     ${R[md_dd]} MiB/s"
R[md_seq]=$(timed "$all" dd if="$MD" of=/dev/null bs="${CHUNK_KB}K" count=$((all / (CHUNK_KB * 1024))) iflag=direct)
echo "  raid0, dd one chunk per read (naive):   ${R[md_seq]} MiB/s"
par() { local d; for d in "${MEMBERS[@]}"; do dd if="$d" of=/dev/null bs=1M count="$MB" iflag=direct & done; wait; }
R[members_par]=$(timed "$all" par)
echo "  all members at once (upper bound):      ${R[members_par]} MiB/s"
if command -v fio >/dev/null; then
    # fio's own bandwidth figure: its start-up under TCG takes seconds
    echo 3 >/proc/sys/vm/drop_caches
    R[md_fio]=$(fio --name=seq --filename="$MD" --rw=read --direct=1 --bs="${CHUNK_KB}k" \
        --iodepth=$((2 * N)) --ioengine=libaio --size="$all" --output-format=json 2>/dev/null \
        | python3 -c 'import json, sys; print(f"{json.load(sys.stdin)['"'jobs'][0]['read']['bw_bytes']"' / 1048576:.1f}")' \
        || echo FAILED)
    printf "  %-40s %s MiB/s\n" "raid0, fio ${CHUNK_KB} KiB, iodepth $((2 * N)):" "${R[md_fio]}"
fi
if [ -n "${TB_BENCH_READER:-}" ]; then
    R[reader]=$(timed "$all" env BENCH_MD=$MD BENCH_MEMBERS="${MEMBERS[*]}" BENCH_BYTES=$all \
        BENCH_CHUNK=$((CHUNK_KB * 1024)) bash -c "$TB_BENCH_READER")
    echo "  blockxfer striped reader:               ${R[reader]} MiB/s"
else
    echo "  blockxfer striped reader:               (not set: TESTBED_BENCH_READER)"
fi
for k in md_seq md_dd md_fio reader; do
    [ -n "${R[$k]:-}" ] && [ "${R[$k]}" != FAILED ] || continue
    python3 -c "import sys; print(f'bench: {sys.argv[1]}: {float(sys.argv[2]) / float(sys.argv[3]):.2f}x one sequential reader (goal >= 3.5x)')" \
        "$k" "${R[$k]}" "${R[single]}"
done
mdadm --stop "$MD" >/dev/null 2>&1
exit 0
