"""The Python cost of one random 4 KiB `Volume.write` and one `Volume.sync` (an
intent log record), in process: the CPU side of the NBD row "4k write+flush x1000"
(at queue depth 1 each request's Python is on the critical path).

N random 4 KiB writes on the bench's real volume (bench/backends.py, a file in
/var/tmp), each followed by a sync. Prints p50 and mean of the write and of the
sync (wall), of the sync's own Python (its wall minus the pwrite and fdatasync
the main thread spent in), and the CPU time (process_time) per pair. Not a row
of `make bench`: a tool to compare two trees, e.g. run from each one in turn,
several times, and compare medians (the machine is shared and noisy).

    python -m bench.write_sync [N] [DIR]
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from bench.backends import real_volume

BS = 4096
SIZE = 1 << 30
WARM = 200


class SyscallClock:
    """Wall time the calling thread spends in the wrapped os functions (the pool
    threads' staged data writes are not counted)."""

    def __init__(self, names: tuple[str, ...]) -> None:
        self.ns = 0
        self._main = threading.get_ident()
        self._real = {n: getattr(os, n) for n in names}
        for name, fn in self._real.items():
            setattr(os, name, self._timed(fn))

    def _timed(self, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any) -> Any:
            if threading.get_ident() != self._main:
                return fn(*args)
            t = time.perf_counter_ns()
            try:
                return fn(*args)
            finally:
                self.ns += time.perf_counter_ns() - t
        return timed

    def restore(self) -> None:
        for name, fn in self._real.items():
            setattr(os, name, fn)


def run(n: int, where: str) -> dict[str, list[float]]:
    rng = random.Random(1)
    offsets = [rng.randrange(SIZE // BS) * BS for _ in range(n + WARM)]
    datas = [os.urandom(BS) for _ in range(64)]
    path = os.path.join(where, f"write_sync_{os.getpid()}.img")
    clock = SyscallClock(("pwrite", "pwritev", "fdatasync"))
    out: dict[str, list[float]] = {"write": [], "sync": [], "sync python": []}
    pt = time.perf_counter_ns
    try:
        with real_volume(path, SIZE) as vol:
            for k in range(WARM):
                vol.write(offsets[k], datas[k % 64])
                vol.sync()
            cpu = time.process_time()
            for k in range(WARM, WARM + n):
                t0 = pt()
                vol.write(offsets[k], datas[k % 64])
                t1, before = pt(), clock.ns
                vol.sync()
                t2 = pt()
                out["write"].append((t1 - t0) / 1e3)
                out["sync"].append((t2 - t1) / 1e3)
                out["sync python"].append((t2 - t1 - (clock.ns - before)) / 1e3)
            out["cpu per pair"] = [(time.process_time() - cpu) / n * 1e6]     # one figure
    finally:
        clock.restore()
        os.unlink(path)
    return out


def main() -> int:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 3000
    where = sys.argv[2] if len(sys.argv) > 2 else "/var/tmp"
    got = run(n, where)
    cpu = got.pop("cpu per pair")[0]
    for name, values in got.items():
        print(f"{name:12s} p50 {statistics.median(values):6.1f} us  "
              f"mean {statistics.mean(values):6.1f} us")
    print(f"CPU per write+sync {cpu:.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
