#!/bin/bash
# Slow-disk RAID0 read benchmark, run INSIDE the test bed guest
# (make testbed-bench, i.e. vm-testbed/run.sh --bench, which attaches four
# slow virtio disks and passes them here).
#
#   bench-raid.sh DISK1 DISK2 DISK3 DISK4
#
# It builds md RAID0 over the disks and compares reading one member with
# reading the array: dd with O_DIRECT, fio when present, and the project's
# readers (bench/raid_reader.py): one sequential reader (one chunk per request,
# waiting for each) and drivers.reader.read_runs with the md geometry. The goal
# is read_runs >= 3.5x the sequential reader.
#
# The disks are exports of vm-testbed/lib/slownbd.py by default: each serves one
# request at a time and takes latency + length / bandwidth for it, like a disk
# arm. With TESTBED_BENCH_VIA=throttle they are QEMU-throttled files instead;
# QEMU's throttle admits a request first and charges its bytes after, so it
# caps bandwidth without giving a request a service time, and even the naive
# one-chunk-at-a-time reader then gets the sum of the members (3.7-4x).
#
# Hook for another reader: TESTBED_BENCH_READER on the host, a command line run
# in the guest, in the repository, with BENCH_MD=/dev/md0 BENCH_MEMBERS="..."
# BENCH_BYTES=N BENCH_CHUNK=bytes; it must read BENCH_BYTES from the start of
# BENCH_MD and is timed like dd.
set -u
[ $# -ge 2 ] || { echo "usage: $0 DISK..." >&2; exit 2; }
MEMBERS=("$@")
N=${#MEMBERS[@]}
CHUNK_KB=${TB_BENCH_CHUNK_KB:-512}
MB=${TB_BENCH_MB:-32}          # read from one member; the array reads N times as much
MD=/dev/md0
bps=${TB_BENCH_BPS:-0}
if [ "${TB_BENCH_VIA:-slow-nbd}" = throttle ]; then
    echo "bench: $N disks, each throttled to $((bps / 1048576)) MiB/s by QEMU; raid0 chunk ${CHUNK_KB} KiB"
else
    echo "bench: $N disks, each one request at a time at $((bps / 1048576)) MiB/s + ${TB_BENCH_LATENCY_MS:-?} ms (slownbd.py); raid0 chunk ${CHUNK_KB} KiB"
fi

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
pyread() {  # pyread ARGS... -> MiB/s as bench.raid_reader measures it (start-up not counted)
    echo 3 >/proc/sys/vm/drop_caches
    .venv/bin/python -m bench.raid_reader "$MD" "$all" "$@" 2>/dev/null | awk '/^MiB\/s/ {print $2}' \
        | grep . || echo FAILED
}
R[py_seq]=$(pyread --sequential)
echo "  raid0, python one chunk per read:       ${R[py_seq]} MiB/s"
R[read_runs]=$(pyread)
echo "  raid0, read_runs with md geometry:      ${R[read_runs]} MiB/s"
R[read_runs_nogeo]=$(pyread --no-geometry)
echo "  raid0, read_runs without geometry:      ${R[read_runs_nogeo]} MiB/s"
if [ -n "${TB_BENCH_READER:-}" ]; then
    R[reader]=$(timed "$all" env BENCH_MD=$MD BENCH_MEMBERS="${MEMBERS[*]}" BENCH_BYTES=$all \
        BENCH_CHUNK=$((CHUNK_KB * 1024)) bash -c "$TB_BENCH_READER")
    echo "  blockxfer striped reader:               ${R[reader]} MiB/s"
else
    echo "  blockxfer striped reader:               (not set: TESTBED_BENCH_READER)"
fi
for k in md_seq md_dd md_fio py_seq read_runs read_runs_nogeo reader; do
    [ -n "${R[$k]:-}" ] && [ "${R[$k]}" != FAILED ] || continue
    python3 -c "import sys; print(f'bench: {sys.argv[1]}: {float(sys.argv[2]) / float(sys.argv[3]):.2f}x one sequential reader (goal >= 3.5x)')" \
        "$k" "${R[$k]}" "${R[single]}"
done
for k in read_runs read_runs_nogeo; do
    [ "${R[$k]:-FAILED}" != FAILED ] && [ "${R[py_seq]:-FAILED}" != FAILED ] || continue
    python3 -c "import sys; print(f'bench: {sys.argv[1]}: {float(sys.argv[2]) / float(sys.argv[3]):.2f}x the sequential reader of the array (goal >= 3.5x)')" \
        "$k" "${R[$k]}" "${R[py_seq]}"
done
mdadm --stop "$MD" >/dev/null 2>&1
exit 0
