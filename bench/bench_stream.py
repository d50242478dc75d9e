"""Stream bench (issue 3), one run, caches dropped before each measurement:

- full send of a volume holding 1 GiB of data to a file vs dd iflag=direct bs=1M
  of the same bytes (goal >= 0.9 of dd), and vs btrfs send of the same 1 GiB on a
  loop-backed btrfs (goal: faster);
- incremental send after a 5% change vs btrfs send -p (goal >= 3x: issue 17);
- computing an incremental image on a 1 TiB volume (goal < 100 ms).

Each pair runs interleaved (ours, peer, ours, ...; BLOCKXFER_BENCH_ROUNDS, default 5)
and the medians are compared. Both sides make their output durable (our send
fsyncs its file; dd has conv=fsync; btrfs send is followed by `sync FILE`).

Run as root: `python -m bench.bench_stream` (needs btrfs-progs for the btrfs rows).
"""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.loop import loop_device
from blockxfer.drivers.reader import read_runs
from blockxfer.image import evaluate
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume

from .common import SCRATCH, drop_caches, interleaved, row, run

GIB = 1 << 30
PIECE = 64 << 10
CHANGES = int(0.05 * GIB) // PIECE
ROUNDS = int(os.environ.get("BLOCKXFER_BENCH_ROUNDS", "5"))


def _send(path: str, expr: str, out: str) -> None:
    with Volume.open(open_device(path), writable=False) as vol:
        def reader(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
            return read_runs(vol.dev, runs, vol.block_size)
        with open(out, "wb") as f:
            send_image(vol, expr, f, reader=reader)
            os.fsync(f.fileno())


def _source(path: str, data: str) -> None:
    with Volume.create(open_device(path, write=True, create_size=GIB + GIB // 2),
                       virtual_size=GIB + GIB // 4) as vol, open(data, "rb") as f:
        off = 0
        while chunk := f.read(8 << 20):
            vol.write(off, chunk)
            off += len(chunk)
        vol.create_snapshot("a")
        rng = random.Random(5)
        for _ in range(CHANGES):
            vol.write(rng.randrange(GIB // PIECE) * PIECE, os.urandom(PIECE))
        vol.create_snapshot("b")


@contextmanager
def _btrfs(data: str) -> Iterator[tuple[Callable[[], None], Callable[[], None]] | None]:
    """(full send, incremental send) of the same data and change on a loop-backed
    btrfs, or None without root or btrfs-progs."""
    if shutil.which("mkfs.btrfs") is None or os.geteuid() != 0:
        yield None
        return
    img, mnt, out = f"{SCRATCH}/btrfs.img", f"{SCRATCH}/mnt", f"{SCRATCH}/btrfs.stream"
    with open(img, "wb") as f:
        f.truncate(4 * GIB)
    os.makedirs(mnt, exist_ok=True)
    with loop_device(img) as dev:
        run("mkfs.btrfs", "-q", "-f", dev)
        run("mount", dev, mnt)
        try:
            run("btrfs", "subvolume", "create", f"{mnt}/vol")
            run("cp", data, f"{mnt}/vol/data")
            run("btrfs", "subvolume", "snapshot", "-r", f"{mnt}/vol", f"{mnt}/a")
            rng = random.Random(5)
            with open(f"{mnt}/vol/data", "r+b") as g:
                for _ in range(CHANGES):
                    g.seek(rng.randrange(GIB // PIECE) * PIECE)
                    g.write(os.urandom(PIECE))
            run("btrfs", "subvolume", "snapshot", "-r", f"{mnt}/vol", f"{mnt}/b")

            def full() -> None:
                run("btrfs", "send", "-q", "-f", out, f"{mnt}/a")
                run("sync", out)

            def incr() -> None:
                run("btrfs", "send", "-q", "-p", f"{mnt}/a", "-f", out, f"{mnt}/b")
                run("sync", out)
            yield full, incr
        finally:
            subprocess.run(["umount", mnt], check=False)
            os.unlink(img)
            if os.path.exists(out):
                os.unlink(out)


def terabyte_image() -> float:
    path = f"{SCRATCH}/tib.img"
    with Volume.create(open_device(path, write=True, create_size=1 << 40)) as vol:
        vol.write(0, os.urandom(64 << 20))
        vol.create_snapshot("a")
        vol.write(1 << 39, os.urandom(16 << 20))
        vol.create_snapshot("b")
        t = time.perf_counter()
        evaluate("b - a", vol, vol.block_size)
        took = time.perf_counter() - t
    os.unlink(path)
    return took


def main() -> None:
    os.makedirs(SCRATCH, exist_ok=True)
    data, vol, out = f"{SCRATCH}/data.bin", f"{SCRATCH}/src.img", f"{SCRATCH}/out.stream"
    with open(data, "wb") as f:
        block = os.urandom(64 << 20)
        for _ in range(16):
            f.write(block)
    _source(vol, data)
    print(f"# blockxfer stream bench, scratch {SCRATCH}, {ROUNDS} rounds interleaved")
    full, dd = interleaved(lambda: _send(vol, "a", out),
                           lambda: run("dd", f"if={data}", f"of={out}", "bs=1M",
                                       "iflag=direct", "conv=fsync"), ROUNDS)
    _send(vol, "a", out)
    full_bytes = os.path.getsize(out)
    print(row("full send 1 GiB vs dd iflag=direct", full, dd, GIB, 0.9))
    _send(vol, "b - a", out)
    incr_bytes = os.path.getsize(out)
    drop_caches()
    with _btrfs(data) as bt:
        if bt:
            ours, theirs = interleaved(lambda: _send(vol, "a", out), bt[0], ROUNDS)
            print(row("full send 1 GiB vs btrfs send", ours, theirs, GIB, 1.0))
            ours, theirs = interleaved(lambda: _send(vol, "b - a", out), bt[1], ROUNDS)
            print(row("incremental 5% vs btrfs send -p", ours, theirs, CHANGES * PIECE, 3.0))
        else:
            print("btrfs rows skipped: needs root and btrfs-progs")
    print(f"stream sizes: full {full_bytes} B for {GIB} B of data (+{full_bytes / GIB - 1:.2%}), "
          f"incremental {incr_bytes} B for {CHANGES * PIECE} B changed "
          f"(+{incr_bytes / (CHANGES * PIECE) - 1:.2%})")
    print(row("incremental image on a 1 TiB volume", terabyte_image() * 1000, goal=100,
              unit="ms", better="lower"))
    for p in (data, vol, out):
        os.unlink(p)


if __name__ == "__main__":
    main()
