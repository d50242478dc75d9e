"""Tape bench (issue 5), one run:

- dump of a 1 GiB image to a tape vs `dd bs=256k` of the same stream bytes to the
  same medium (goal >= 0.95 of dd), interleaved (BENCH_TAPE_ROUNDS, 3), each run on
  a freshly labelled tape, medians compared;
- single-block partial restore (location table, LOCATE when the drive has it) vs
  a full read of the image.

TAPE=/dev/nstN uses a real drive (scratch tape!), e.g. the test bed's mhvtl drive
(`make testbed-bench-tape`); otherwise a virtual tape file in the bench folder,
compared with dd to a plain file beside it. BENCH_TAPE_MB sets the image size
(default 1024). Run: `python -m bench.bench_tape`.
"""

from __future__ import annotations

import os
import resource
import statistics
import time

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.reader import read_runs
from blockxfer.drivers.tapes import StTape, open_tape_handle
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.stream.send import send_image
from blockxfer.transfer.dump import dump_image
from blockxfer.transfer.restore import TapeImageReader, restore_range
from blockxfer.transfer.tapeset import label_tape, list_tape
from blockxfer.volume import Volume

from .common import SCRATCH, drop_caches, row, run

GIB = 1 << 30
MIB = 1 << 20
dd_cpus: list[float] = []           # CPU seconds of each dd run (user + system)


def rate_row(name: str, ours: float, peer: float, nbytes: int, goal: float) -> str:
    """Like common.row in MB/s: the test bed's emulated drive is far below 1 GB/s."""
    a, b = nbytes / ours / 1e6, nbytes / peer / 1e6
    mark = "  ok" if a / b >= goal else f"  BELOW GOAL {goal}"
    return f"{name:38} ours {a:8.1f} MB/s   dd {b:8.1f} MB/s   ratio {a / b:5.2f}{mark}"


def opener(path: str, write: bool) -> StTape:
    return open_tape_handle(path, write=write)


def main() -> None:
    os.makedirs(SCRATCH, exist_ok=True)
    data = int(os.environ.get("BENCH_TAPE_MB") or 1024) * MIB
    rounds = int(os.environ.get("BENCH_TAPE_ROUNDS") or 3)
    src, stream = f"{SCRATCH}/src.img", f"{SCRATCH}/image.stream"
    with Volume.create(open_device(src, write=True, create_size=data + data // 2),
                       virtual_size=data + data // 4) as vol:
        block = os.urandom(8 << 20)
        for off in range(0, data, len(block)):
            vol.write(off, block[:4096] + os.urandom(4096) + block[8192:])
        vol.create_snapshot("full")
    tape = os.environ.get("TAPE") or f"{SCRATCH}/bench.vtape"
    if not os.environ.get("TAPE"):
        if os.path.exists(tape):
            os.unlink(tape)
        create_virtual_tape(tape, 4 * GIB)
    with Volume.open(open_device(src), writable=False) as vol:
        reader = lambda runs: read_runs(vol.dev, runs, vol.block_size)  # noqa: E731
        drop_caches()
        start = time.perf_counter()
        with open(stream, "wb") as f:
            send_image(vol, "full", f, compress=False, reader=reader)
        encode = time.perf_counter() - start
        partial: list[str] = []

        def ours() -> None:
            _relabel(tape)
            drop_caches()
            start, cpu = time.perf_counter(), time.process_time()
            dump_image(vol, "full", tape, open_tape=opener, compress=False, reader=reader)
            times.append(time.perf_counter() - start)
            cpus.append(time.process_time() - cpu)
            # the partial restore while the image is the tape's only one (dd's file
            # after it would not be a blockxfer file)
            if not partial and (_can_locate(tape) or not os.environ.get("TAPE")):
                partial.append(_partial(tape, data))

        # interleaved, each from a freshly labelled tape: ours, dd, dd, ours, ours, ...
        times: list[float] = []
        cpus: list[float] = []
        dds: list[float] = []
        for r in range(rounds):
            for side in ((ours, lambda: dds.append(_dd(stream, tape))) if r % 2 == 0 else
                         (lambda: dds.append(_dd(stream, tape)), ours)):
                side()
    size = os.path.getsize(stream)
    mine, dd = statistics.median(times), statistics.median(dds)
    print(f"# blockxfer tape bench on {tape} ({rounds} interleaved rounds, medians)")
    what = f"dump {data // MIB} MiB image vs dd bs=256k"
    print(row(what, mine, dd, size, 0.95) if data >= GIB else
          rate_row(what, mine, dd, size, 0.95))
    pairs = [d / t for t, d in zip(times, dds, strict=True)]   # each round's own ratio
    print(f"{'  (each run, s)':38} dump {' '.join(f'{t:.2f}' for t in times)}; "
          f"dd {' '.join(f'{t:.2f}' for t in dds)}")
    print(f"{'  (ratio within each round)':38} {' '.join(f'{r:.2f}' for r in pairs)}: "
          f"median {statistics.median(pairs):.2f}")
    print(f"{'  (CPU seconds per run, medians)':38} dump {statistics.median(cpus):.2f}, "
          f"dd {statistics.median(dd_cpus):.2f}: the dump's own work beside the drive's")
    print(f"{'  (the stream alone, to a file)':38} {size / encode / 1e6:8.1f} MB/s: the dump "
          "cannot beat making its stream")
    for line in partial:
        print(line)
    if not os.environ.get("TAPE"):
        os.unlink(tape)
    for p in (src, stream, f"{SCRATCH}/dd.out"):
        if os.path.exists(p):
            os.unlink(p)


def _relabel(tape: str) -> None:
    """A fresh label at BOT: each run writes after it, on an otherwise empty tape."""
    t = opener(tape, True)
    try:
        label_tape(t, "BENCH", force=True)
    finally:
        t.close()


def _dd(stream: str, tape: str) -> float:
    """dd of the stream bytes, 256 KiB records: after the image on the drive (at end
    of data), or to a plain file beside the virtual tape."""
    target = tape if os.environ.get("TAPE") else f"{SCRATCH}/dd.out"
    if target == tape:
        _relabel(tape)                  # then dd writes right after the label, as dump does
        t = opener(tape, False)
        try:
            t.seek_eod()
        finally:
            t.close()
    drop_caches()
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    run("dd", f"if={stream}", f"of={target}", "bs=256k", "conv=fsync" if target != tape else
        "status=none")
    took = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    dd_cpus.append(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime)
    return took


def _partial(tape: str, data: int) -> str:
    """One block restored by the location table (LOCATE) vs reading the whole image."""
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
        f.truncate(data + data // 2)
    start = time.perf_counter()
    res = restore_range(tape, part, 1, vbn, vbn, open_tape=opener, open_device=open_device,
                        force=True)     # a scratch file, not the volume: only the timing counts
    one = time.perf_counter() - start
    os.unlink(part)
    return (f"single-block partial restore {one * 1000:8.1f} ms ({res.records_read} records) "
            f"vs full read of the image {whole * 1000:8.1f} ms: {whole / one:6.0f}x faster")


def _can_locate(tape: str) -> bool:
    """A drive with LOCATE gets the partial-restore row too (tgt's has none)."""
    if not os.environ.get("TAPE"):
        return False
    t = opener(tape, False)
    try:
        return t.can_locate
    finally:
        t.close()


if __name__ == "__main__":
    main()
