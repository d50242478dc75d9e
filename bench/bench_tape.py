"""Tape bench (issue 5), one run:

- dump of a 1 GiB image to a tape vs `dd bs=256k` of the same stream bytes to the
  same medium (goal >= 0.95 of dd);
- single-block partial restore (location table) vs a full read of the image.

TAPE=/dev/nstN uses a real drive (scratch tape!); otherwise a virtual tape file in
the bench folder, compared with dd to a plain file beside it.
Run: `python -m bench.bench_tape`.
"""

from __future__ import annotations

import os
import time

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.reader import read_runs
from blockxfer.drivers.tapes import open_tape_handle
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.stream.send import send_image
from blockxfer.transfer.dump import dump_image
from blockxfer.transfer.restore import TapeImageReader, restore_range
from blockxfer.transfer.tapeset import label_tape, list_tape
from blockxfer.volume import Volume

from .common import SCRATCH, drop_caches, row, run

GIB = 1 << 30


def opener(path: str, write: bool):  # type: ignore[no-untyped-def]
    return open_tape_handle(path, write=write)


def main() -> None:
    os.makedirs(SCRATCH, exist_ok=True)
    src, stream = f"{SCRATCH}/src.img", f"{SCRATCH}/image.stream"
    with Volume.create(open_device(src, write=True, create_size=GIB + GIB // 2),
                       virtual_size=GIB + GIB // 4) as vol:
        block = os.urandom(8 << 20)
        for off in range(0, GIB, len(block)):
            vol.write(off, block[:4096] + os.urandom(4096) + block[8192:])
        vol.create_snapshot("full")
    tape = os.environ.get("TAPE") or f"{SCRATCH}/bench.vtape"
    if not os.environ.get("TAPE"):
        if os.path.exists(tape):
            os.unlink(tape)
        create_virtual_tape(tape, 4 * GIB)
    t = opener(tape, True)
    label_tape(t, "BENCH", force=True)
    t.close()
    with Volume.open(open_device(src), writable=False) as vol:
        with open(stream, "wb") as f:
            send_image(vol, "full", f, compress=False)
        drop_caches()
        start = time.perf_counter()
        dump_image(vol, "full", tape, open_tape=opener, compress=False,
                   reader=lambda runs: read_runs(vol.dev, runs, vol.block_size))
        ours = time.perf_counter() - start
    size = os.path.getsize(stream)
    target = tape if os.environ.get("TAPE") else f"{SCRATCH}/dd.out"
    drop_caches()
    start = time.perf_counter()
    run("dd", f"if={stream}", f"of={target}", "bs=256k", "conv=fsync" if target != tape else
        "status=none")
    dd = time.perf_counter() - start
    print(f"# blockxfer tape bench on {tape}")
    print(row("dump 1 GiB image vs dd bs=256k", ours, dd, size, 0.95))
    if not os.environ.get("TAPE"):
        t = opener(tape, False)
        contents = list_tape(t)
        img = contents.images[0]
        start = time.perf_counter()
        reader = TapeImageReader(t, contents, img, opener, None)
        while reader.read(1 << 20):
            pass
        whole = time.perf_counter() - start
        t.close()
        idx = img.index
        assert idx is not None
        vbn = idx.records[len(idx.records) // 2][0]
        part = f"{SCRATCH}/part.img"
        with open(part, "wb") as f:
            f.truncate(GIB + GIB // 2)
        start = time.perf_counter()
        res = restore_range(tape, part, 1, vbn, vbn, open_tape=opener, open_device=open_device)
        one = time.perf_counter() - start
        print(f"single-block partial restore {one * 1000:8.1f} ms ({res.records_read} records) "
              f"vs full read of the image {whole * 1000:8.1f} ms: {whole / one:6.0f}x faster")
        os.unlink(part)
        os.unlink(tape)
    for p in (src, stream, f"{SCRATCH}/dd.out"):
        if os.path.exists(p):
            os.unlink(p)


if __name__ == "__main__":
    main()
