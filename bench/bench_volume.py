"""Volume bench (issue 2): sequential write and read of 1 GiB through the volume
against dd with O_DIRECT on the same file system, then snapshot creation, image
evaluation and peak RSS on a 1 TiB sparse volume.

Run: `python -m bench.bench_volume` (root drops caches between runs).
"""

from __future__ import annotations

import mmap
import os
import subprocess
import sys
import time

from blockxfer.drivers.blockdev import open_device
from blockxfer.image import evaluate
from blockxfer.volume import Volume

from .common import SCRATCH, interleaved, row, run

GIB = 1 << 30
CHUNK = 8 << 20


def _volume_write(path: str, data: mmap.mmap) -> None:
    with Volume.open(open_device(path, write=True)) as vol:
        for off in range(0, GIB, CHUNK):
            vol.write(off, memoryview(data)[off % len(data):off % len(data) + CHUNK])
        vol.commit()


def _volume_read(path: str) -> None:
    with Volume.open(open_device(path), writable=False) as vol:
        for _ in vol.iter_read(0, GIB):
            pass


def sequential(rounds: int = 3) -> list[str]:
    """Ours and dd alternately, `rounds` times each (medians): a shared disk drifts
    over minutes, so one run of each compared moments, not tools. The volume's
    file has room for two copies: a rewrite goes to free blocks (copy-on-write)."""
    os.makedirs(SCRATCH, exist_ok=True)
    vpath, dpath = f"{SCRATCH}/vol.img", f"{SCRATCH}/dd.img"
    for p in (vpath, dpath):
        if os.path.exists(p):
            os.unlink(p)
    Volume.create(open_device(vpath, write=True, create_size=2 * GIB + GIB // 4),
                  virtual_size=GIB).close()
    data = mmap.mmap(-1, 64 << 20)
    data.write(os.urandom(64 << 20))
    with open(f"{SCRATCH}/src.bin", "wb") as f:
        for _ in range(16):
            f.write(data)
    w_ours, w_dd = interleaved(
        lambda: _volume_write(vpath, data),
        lambda: run("dd", f"if={SCRATCH}/src.bin", f"of={dpath}", "bs=1M", "oflag=direct",
                    "conv=notrunc"), rounds)
    r_ours, r_dd = interleaved(
        lambda: _volume_read(vpath),
        lambda: run("dd", f"if={dpath}", "of=/dev/null", "bs=1M", "iflag=direct"), rounds)
    for p in (vpath, dpath, f"{SCRATCH}/src.bin"):
        os.unlink(p)
    return [row("sequential write 1 GiB vs dd oflag=direct", w_ours, w_dd, GIB, 0.8),
            row("sequential read 1 GiB vs dd iflag=direct", r_ours, r_dd, GIB, 0.9)]


def terabyte() -> list[str]:
    """Snapshot and image times on a 1 TiB sparse volume; RSS measured in a child."""
    path = f"{SCRATCH}/tib.img"
    if os.path.exists(path):
        os.unlink(path)
    t = time.perf_counter()
    vol = Volume.create(open_device(path, write=True, create_size=1 << 40))
    t_init = time.perf_counter() - t
    vol.write(0, os.urandom(64 << 20))
    vol.create_snapshot("june3")
    vol.write(1 << 39, os.urandom(8 << 20))
    t = time.perf_counter()
    vol.create_snapshot("june4")
    t_snap = time.perf_counter() - t
    vol.write(1 << 38, os.urandom(8 << 20))
    vol.create_snapshot("june5")
    t = time.perf_counter()
    img = evaluate("june5 + june4 - june3", vol, vol.block_size)
    t_img = time.perf_counter() - t
    vol.close()
    rss = subprocess.run([sys.executable, "-m", "bench.bench_volume", "--rss", path],
                         capture_output=True, text=True, check=True).stdout.strip()
    os.unlink(path)
    return [row("init 1 TiB sparse volume", t_init * 1000, unit="ms", better="lower"),
            row("snapshot on 1 TiB volume", t_snap * 1000, goal=100, unit="ms", better="lower"),
            row("image 'june5 + june4 - june3' (1 TiB)", t_img * 1000, goal=100, unit="ms",
                better="lower") + f"   ({img.blocks} blocks)",
            row("peak RSS, 1 TiB volume open + image", float(rss), goal=300, unit="MiB",
                better="lower")]


def rss_child(path: str) -> None:
    with Volume.open(open_device(path), writable=False) as vol:
        evaluate("june5 + june4 - june3", vol, vol.block_size)
        vol.read(0, 1 << 20)
    print(peak_rss_mib())


def peak_rss_mib() -> int:
    """This process's own peak RSS (VmHWM: of its memory map, which exec replaced).
    Not ru_maxrss: exec keeps that from the process it replaces, so the child
    reported the bench's own peak (472 MiB after bench_nbd ran in the same bench
    process, 259 MiB when bench_volume ran first; the child alone: 63 MiB)."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) // 1024


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--rss":
        rss_child(sys.argv[2])
        return
    print(f"# blockxfer volume bench, scratch {SCRATCH}")
    for line in sequential() + terabyte():
        print(line)


if __name__ == "__main__":
    main()
