"""Crash safety of group commit (syncing.py): records are written outside the
volume lock while other threads write and sync. Three threads each write blocks
of their own and sync, in a forked child killed at many points (a device write
count); after each kill every block holds the write its thread last saw
acknowledged or a later one of that thread, whole, and `check` is clean.
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import threading

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.faults import FaultyDevice, forked_reports

pytestmark = pytest.mark.slow

BS = 4096
VSIZE = 1 << 20
THREADS, BLOCKS, ROUNDS = 3, 8, 40      # blocks per thread; writes per thread


@pytest.fixture(autouse=True)
def _no_timed_cp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("blockxfer.volume.volume.CP_INTERVAL", 1e9)


def _block(t: int, n: int) -> int:
    return t * BLOCKS + n % BLOCKS


def _data(t: int, n: int) -> bytes:
    return bytes([t + 1, n + 1]) * (BS // 2)


def _worker(vol: Volume, t: int, out: int, lock: threading.Lock) -> None:
    rng = random.Random(t)
    for n in range(ROUNDS):
        vol.write(_block(t, n) * BS, _data(t, n))
        if rng.random() < 0.5:
            vol.sync()
            with lock:                       # n and every write before it are acknowledged
                os.write(out, bytes([t, n]))


def _run_child(path: str, kill_at: int | None) -> dict[int, int]:
    """The workload in a forked child (killed at its `kill_at`-th device write);
    returns each thread's last acknowledged round."""
    def workload(w: int) -> None:
        dev = FaultyDevice(open_device(path, write=True), after=kill_at, mode="kill")
        vol = Volume.open(dev)
        lock = threading.Lock()
        threads = [threading.Thread(target=_worker, args=(vol, t, w, lock))
                   for t in range(THREADS)]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        os.write(w, bytes([255, dev.writes >> 8, dev.writes & 255]))
        os.kill(os.getpid(), signal.SIGKILL)
    raw, _ = forked_reports(workload)
    acked: dict[int, int] = {}
    for k in range(0, len(raw) - 2 * (raw[-3:-2] == b"\xff"), 2):
        t, n = raw[k], raw[k + 1]
        if t != 255:
            acked[t] = max(acked.get(t, -1), n)
    if raw[-3:-2] == b"\xff":
        acked[-1] = raw[-2] << 8 | raw[-1]
    return acked


def _check(path: str, acked: dict[int, int], where: str) -> None:
    vol = Volume.open(open_device(path), writable=False)
    try:
        report = check_volume(vol)
        assert report.clean, (where, report.problems)
        disk = vol.read(0, THREADS * BLOCKS * BS)
    finally:
        vol.close()
    for t in range(THREADS):
        last = acked.get(t, -1)
        for b in range(BLOCKS):
            got = disk[_block(t, b) * BS:(_block(t, b) + 1) * BS]
            rounds = [n for n in range(b, ROUNDS, BLOCKS)]
            floor = max((n for n in rounds if n <= last), default=None)
            allowed = {_data(t, n) for n in rounds if floor is None or n >= floor}
            if floor is None:
                allowed.add(bytes(BS))
            assert got in allowed, f"{where}: thread {t} block {b}, acknowledged round {last}"


def test_sigkill_while_threads_write_and_sync(tmp_path: object) -> None:
    """60 kills spread over the run's device writes."""
    template = os.path.join(str(tmp_path), "template.img")
    path = os.path.join(str(tmp_path), "vol.img")
    Volume.create(open_device(template, write=True, create_size=8 << 20),
                  virtual_size=VSIZE).close()
    shutil.copyfile(template, path)
    total = _run_child(path, None)[-1]          # device writes of an unkilled run
    rng = random.Random(7)
    for k in sorted(rng.sample(range(1, total + 1), min(60, total))):
        shutil.copyfile(template, path)
        acked = _run_child(path, k)
        acked.pop(-1, None)
        _check(path, acked, f"killed at write {k} of ~{total}")
