"""The parallel reader on an in-memory device and, as root, a real loop device."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.loop import loop_device
from blockxfer.drivers.md import md_geometry, member_of
from blockxfer.drivers.reader import Readable, coalesce, plan_requests, read_runs
from blockxfer.errors import MediumError

BS = 4096
SYS = Path(__file__).parent / "data" / "sys"


class MemDevice:
    """Blocks whose bytes say their number; records concurrency; fails on request."""

    def __init__(self, nblocks: int, fail_at: int | None = None, delay: float = 0.0):
        self.nblocks, self.fail_at, self.delay = nblocks, fail_at, delay
        self.inflight = self.peak = 0
        self.lock = threading.Lock()
        self.offsets: list[int] = []

    def pread(self, buf: memoryview, offset: int) -> None:
        with self.lock:
            self.inflight += 1
            self.peak = max(self.peak, self.inflight)
            self.offsets.append(offset)
        try:
            time.sleep(self.delay)
            first = offset // BS
            if self.fail_at is not None and first <= self.fail_at < first + len(buf) // BS:
                raise MediumError("read mem: Input/output error")
            for i in range(len(buf) // BS):
                buf[i * BS:(i + 1) * BS] = (first + i).to_bytes(8, "little") * (BS // 8)
        finally:
            with self.lock:
                self.inflight -= 1


def collect(dev: Readable, runs: Iterable[tuple[int, int]], **kw: Any) -> dict[int, bytes]:
    got: dict[int, bytes] = {}
    for start, view in read_runs(dev, runs, BS, **kw):
        assert len(view) % BS == 0
        for i in range(len(view) // BS):
            assert start + i not in got
            got[start + i] = bytes(view[i * BS:i * BS + 8])
    return got


def test_coalesce() -> None:
    assert list(coalesce([(0, 2), (2, 3), (9, 0), (9, 1), (5, 1)])) == [(0, 5), (9, 1), (5, 1)]


def test_requests_are_aligned_and_bounded() -> None:
    reqs = list(plan_requests([(10, 1000)], BS, request_size=1 << 20))
    assert reqs[0] == (10, 246) and all(c <= 256 for _, c in reqs)
    assert all(s % 256 == 0 for s, _ in reqs[1:])
    assert sum(c for _, c in reqs) == 1000


def test_every_block_once_in_parallel() -> None:
    seed = random.randrange(1 << 30)
    print("seed", seed)
    rng = random.Random(seed)
    runs, pos = [], 0
    for _ in range(200):
        pos += rng.randrange(0, 50)
        n = rng.randrange(1, 600)
        runs.append((pos, n))
        pos += n
    dev = MemDevice(pos, delay=0.001)
    got = collect(dev, runs, depth=4)
    want = {b for s, n in runs for b in range(s, s + n)}
    assert set(got) == want
    assert all(v == b.to_bytes(8, "little") for b, v in got.items())
    assert dev.peak > 1


def test_error_propagates_and_stops() -> None:
    dev = MemDevice(10_000, fail_at=5000)
    with pytest.raises(MediumError):
        collect(dev, [(0, 10_000)])


def test_early_close_waits_for_inflight() -> None:
    dev = MemDevice(100_000, delay=0.002)
    it = read_runs(dev, [(0, 100_000)], BS, depth=4)
    next(it)
    it.close()
    assert dev.inflight == 0 and len(dev.offsets) < 20


def test_md_spreads_over_members() -> None:
    g = md_geometry("md0", sysfs=SYS)                 # raid0, 2 disks, 512 KiB chunks
    reqs = list(plan_requests([(0, 1024), (4096, 1024)], BS, geometry=g))
    members = [member_of(g, s * BS) for s, _ in reqs]
    assert all(c == 128 for _, c in reqs)
    assert all(a != b for a, b in zip(members, members[1:], strict=False))
    dev = MemDevice(10_000)
    assert len(collect(dev, [(0, 1024), (4096, 1024)], geometry=g)) == 2048


def test_small_chunk_reads_whole_stripes() -> None:
    g = md_geometry("md1", sysfs=SYS)                 # raid5, 4 disks, 64 KiB chunks
    reqs = list(plan_requests([(0, 1000)], BS, geometry=g))
    stripe = g.stripe_width // BS
    assert all(s % stripe == 0 for s, _ in reqs) and reqs[0][1] % stripe == 0


@pytest.mark.root
class Jittery(MemDevice):
    """Requests take random times: they complete out of issue order."""

    def __init__(self, nblocks: int) -> None:
        super().__init__(nblocks)
        self.rng = random.Random(3)

    def pread(self, buf: memoryview, offset: int) -> None:
        with self.lock:
            pause = self.rng.uniform(0, 0.01)
        time.sleep(pause)
        super().pread(buf, offset)


def test_ordered_yields_in_issue_order_and_checks_in_the_reading_thread() -> None:
    """`ordered` (the object-store upload's reads): starts ascending although
    requests finish out of order, every block once; `check` sees each request in a
    read thread, and what it raises stops the iteration."""
    dev = Jittery(4096)
    runs = [(0, 700), (1000, 1500), (3000, 1096)]
    seen: list[tuple[int, str]] = []

    def check(start: int, data: memoryview) -> None:
        seen.append((start, threading.current_thread().name))
    starts = [start for start, _ in read_runs(dev, runs, BS, request_size=64 * BS, depth=6,
                                               ordered=True, check=check)]
    assert starts == sorted(starts) == [s for s, _ in plan_requests(runs, BS,
                                                                     request_size=64 * BS)]
    assert sorted(s for s, _ in seen) == starts
    assert all(name.startswith("blockxfer-read") for _, name in seen)
    assert collect(dev, runs, ordered=True) == collect(dev, runs)

    def refuse(start: int, data: memoryview) -> None:
        if start >= 1000:
            raise MediumError("checksum mismatch")
    with pytest.raises(MediumError, match="checksum"):
        for _ in read_runs(dev, runs, BS, request_size=64 * BS, ordered=True, check=refuse):
            pass


def test_reads_a_loop_device(root: None, tmp_path: Path) -> None:
    backing = Path("/var/tmp") / f"bx-reader-{id(tmp_path)}.img"
    data = random.randbytes(8 << 20)
    backing.write_bytes(data)
    try:
        with loop_device(str(backing)) as path, open_device(path) as dev:
            assert dev.direct
            got = bytearray(len(data))
            for start, view in read_runs(dev, [(0, 512), (1024, 1024), (512, 512)], BS):
                got[start * BS:start * BS + len(view)] = view
            assert got == data
    finally:
        backing.unlink()
