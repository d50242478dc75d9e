#!/usr/bin/env python3
"""fio through the kernel NBD client, run INSIDE the test bed guest
(`TESTBED_BENCH=fio make testbed-bench`; issue 17's guest-like workload).

    bench-fio.py OURS_DEV PEER_DEV

OURS_DEV is connected to `blockxfer serve` of a volume file on the host,
PEER_DEV to `qemu-nbd` of a raw file there (vm-testbed/run.sh starts both; the
guest reaches them through QEMU's user network). Each job runs on both devices
alternately, ours first in odd rounds and the peer first in even ones, and the
medians are compared:

- 4 KiB random writes with fsync=1 (an NBD FLUSH after every write): IOPS;
- 1 MiB sequential writes, then reads of what was written (O_DIRECT, iodepth 4):
  MiB/s.

Settings (environment, from run.sh): TB_FIO_MB (the region, 64), TB_FIO_RUNTIME
(seconds of each random-write run, 5), TB_FIO_ROUNDS (5: with 3, one
server's rounds spread 201-317 IOPS and the median ratio read 0.69 where 7
rounds gave 1.37). Uses the host's fio
and python3 (no venv).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys

MB = int(os.environ.get("TB_FIO_MB") or 64)
RUNTIME = int(os.environ.get("TB_FIO_RUNTIME") or 5)
ROUNDS = int(os.environ.get("TB_FIO_ROUNDS") or 5)

# name, fio options, which side of fio's result, the figure
JOBS = [
    ("randwrite 4k fsync=1", ["--rw=randwrite", "--bs=4k", "--fsync=1", "--ioengine=psync",
                              "--time_based", f"--runtime={RUNTIME}"], "write", "iops"),
    ("seq write 1M iodepth 4", ["--rw=write", "--bs=1M", "--ioengine=libaio", "--iodepth=4",
                                "--end_fsync=1"], "write", "MiB/s"),
    ("seq read 1M iodepth 4", ["--rw=read", "--bs=1M", "--ioengine=libaio", "--iodepth=4"],
     "read", "MiB/s"),
]


def fio(dev: str, opts: list[str], side: str, unit: str) -> float:
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")
    out = subprocess.run(["fio", "--name=bench", f"--filename={dev}", "--direct=1",
                          f"--size={MB}M", "--output-format=json", *opts],
                         capture_output=True, text=True, check=True).stdout
    job = json.loads(out[out.index("{"):])["jobs"][0][side]
    return float(job["iops"]) if unit == "iops" else job["bw_bytes"] / (1 << 20)


def main() -> int:
    ours, peer = sys.argv[1], sys.argv[2]
    print(f"# fio through the kernel NBD client: blockxfer serve ({ours}) vs qemu-nbd of a "
          f"raw file ({peer}); {MB} MiB, {ROUNDS} interleaved rounds, medians")
    worst = None
    for name, opts, side, unit in JOBS:
        a: list[float] = []
        b: list[float] = []
        for r in range(ROUNDS):
            order = [(ours, a), (peer, b)] if r % 2 == 0 else [(peer, b), (ours, a)]
            for dev, got in order:
                got.append(fio(dev, opts, side, unit))
        ma, mb = statistics.median(a), statistics.median(b)
        ratio = ma / mb if mb else 0.0
        worst = ratio if worst is None else min(worst, ratio)
        print(f"{name:24} ours {ma:9.1f} {unit:6} qemu-nbd {mb:9.1f} {unit:6} ratio {ratio:5.2f}"
              f"   (ours {' '.join(f'{x:.0f}' for x in a)}; qemu-nbd "
              f"{' '.join(f'{x:.0f}' for x in b)})")
    print(f"bench: fio via kernel NBD: lowest ratio {worst:.2f} of qemu-nbd")
    return 0


if __name__ == "__main__":
    sys.exit(main())
