"""Parallel reader vs one sequential reader vs `dd iflag=direct bs=1M`, on a loop device.

Run as root: `python -m bench.bench_reader [--size 1G] [--runs 3] [--depth 4]`.
It writes a file of random data in /var/tmp, attaches it with direct I/O,
drops the page cache before every run and prints the median GB/s of each
reader and the ratios. The file and the loop device are removed afterwards.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import time

from bench.common import row
from blockxfer.drivers.blockdev import aligned_buffer, open_device
from blockxfer.drivers.loop import loop_device
from blockxfer.drivers.reader import read_runs
from blockxfer.units import parse_size

MiB = 1 << 20
BS = 4096


def drop_caches() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def parallel(path: str, size: int, depth: int) -> int:
    n = 0
    with open_device(path) as dev:
        for _, view in read_runs(dev, [(0, size // BS)], BS, depth=depth):
            n += len(view)
    return n


def sequential(path: str, size: int, depth: int) -> int:
    buf = memoryview(aligned_buffer(MiB))
    with open_device(path) as dev:
        for off in range(0, size, MiB):
            dev.pread(buf, off)
    return size


def dd(path: str, size: int, depth: int) -> int:
    out = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct",
                          f"count={size // MiB}"], capture_output=True, text=True, check=True)
    m = re.search(r"^(\d+) bytes", out.stderr, re.MULTILINE)
    return int(m.group(1)) if m else size


def make_file(path: str, size: int) -> None:
    chunk = os.urandom(64 * MiB)
    with open(path, "wb") as f:
        for _ in range(size // len(chunk)):
            f.write(chunk)           # repeated random chunks: nothing compresses or dedups
        f.write(chunk[:size % len(chunk)])
        os.fsync(f.fileno())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=parse_size, default=1 << 30)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--depth", type=int, default=4)
    ap.add_argument("--file", default=f"/var/tmp/blockxfer-bench-{os.getpid()}.img")
    a = ap.parse_args()
    size = a.size // MiB * MiB
    make_file(a.file, size)
    readers = {"parallel": parallel, "sequential": sequential, "dd": dd}
    rates: dict[str, list[float]] = {k: [] for k in readers}
    try:
        with loop_device(a.file) as path:
            print(f"{path} over {a.file}: {size / 2**30:.2f} GiB, direct I/O, "
                  f"depth {a.depth}, 1 MiB requests, {a.runs} runs each (interleaved)")
            for _ in range(a.runs):
                for name, fn in readers.items():
                    drop_caches()
                    t = time.perf_counter()
                    n = fn(path, size, a.depth)
                    rates[name].append(n / (time.perf_counter() - t) / 1e9)
    finally:
        os.unlink(a.file)
    med = {k: statistics.median(v) for k, v in rates.items()}
    print(f"{'reader':12} {'GB/s median':>12} {'[min-max]':>14} {'vs dd':>7}")
    for k, v in rates.items():
        print(f"{k:12} {med[k]:12.2f} {f'[{min(v):.2f}-{max(v):.2f}]':>14} "
              f"{med[k] / med['dd']:7.2f}")
    print(f"parallel / sequential = {med['parallel'] / med['sequential']:.2f}")
    print(row("parallel reader vs dd iflag=direct", med["parallel"], med["dd"]))


if __name__ == "__main__":
    main()
