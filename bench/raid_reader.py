"""Striped parallel reader vs one sequential reader on an md array (test bed bench).

    python -m bench.raid_reader /dev/md0 BYTES [--sequential | --no-geometry]

Reads BYTES from the start of the array with O_DIRECT and prints one line,
`MiB/s <rate>`, timing only the reading (Python's start-up under TCG takes
seconds and would blur the figure). Default: `drivers.reader.read_runs` with
the array's md geometry from sysfs. `--sequential`: one reader, one chunk per
request, waiting for each (what a plain `read()` loop does). `--no-geometry`:
read_runs with its defaults (1 MiB requests, depth 4), for comparison. Run by
vm-testbed/bench-raid.sh inside the guest (`make testbed-bench`).
"""

from __future__ import annotations

import argparse
import os
import time

from blockxfer.drivers.blockdev import aligned_buffer, open_device
from blockxfer.drivers.md import md_geometry
from blockxfer.drivers.reader import read_runs

BS = 4096


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("md")
    ap.add_argument("nbytes", type=int)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--sequential", action="store_true")
    mode.add_argument("--no-geometry", action="store_true")
    args = ap.parse_args()
    g = md_geometry(os.path.basename(os.path.realpath(args.md)))
    nbytes = args.nbytes // g.stripe_width * g.stripe_width
    with open_device(args.md) as dev:
        t0 = time.monotonic()
        if args.sequential:
            buf = memoryview(aligned_buffer(g.chunk_size))
            for off in range(0, nbytes, g.chunk_size):
                dev.pread(buf, off)
            done = nbytes
        else:
            done = sum(len(v) for _, v in read_runs(
                dev, [(0, nbytes // BS)], BS, geometry=None if args.no_geometry else g))
        secs = time.monotonic() - t0
    assert done == nbytes
    print(f"MiB/s {done / secs / (1 << 20):.1f}")


if __name__ == "__main__":
    main()
