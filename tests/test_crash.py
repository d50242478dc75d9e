"""Crash safety: kill the writer at hundreds of points, or drop every write after the
k-th, then reopen: the last committed state reads back byte for byte and `check`
is clean.

A workload is a seeded sequence of operations (write+CP, trim+CP, snapshot,
destroy). The parent replays the same seed on an in-memory model, so it knows the
state after every step without trusting the volume.
"""

from __future__ import annotations

import os
import random
import shutil
import signal

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.faults import FaultyDevice, forked_reports
from tests.marks import first_fast

VSIZE = 2 << 20
BS = 4096
STEPS = 24


def _ops(seed: int) -> list[tuple]:
    """The operations of one workload, decided from the seed alone."""
    rng = random.Random(seed)
    snaps: list[str] = []
    ops: list[tuple] = []
    for i in range(STEPS):
        r = rng.random()
        if r < 0.55:
            off = rng.randrange(0, VSIZE - 1)
            n = rng.randrange(1, min(VSIZE - off, 96 * 1024) + 1)
            ops.append(("write", off, rng.randbytes(n)))
        elif r < 0.65:
            off = rng.randrange(0, VSIZE - 1)
            ops.append(("trim", off, rng.randrange(1, min(VSIZE - off, 64 * 1024) + 1)))
        elif r < 0.85 or not snaps:
            name = f"s{i}"
            snaps.append(name)
            ops.append(("snapshot", name, rng.random() < 0.2))
        else:
            ops.append(("destroy", snaps.pop(rng.randrange(len(snaps)))))
    return ops


def _models(ops: list[tuple]) -> list[tuple[bytes, dict[str, bytes], set[str]]]:
    """State after each prefix of ops: (disk, regular snapshots' contents, all names)."""
    disk = bytearray(VSIZE)
    snaps: dict[str, bytes] = {}
    names: set[str] = set()
    states = [(bytes(disk), dict(snaps), set(names))]
    for op in ops:
        if op[0] == "write":
            disk[op[1]:op[1] + len(op[2])] = op[2]
        elif op[0] == "trim":
            disk[op[1]:op[1] + op[2]] = bytes(op[2])
        elif op[0] == "snapshot":
            names.add(op[1])
            if not op[2]:
                snaps[op[1]] = bytes(disk)
        else:
            names.discard(op[1])
            snaps.pop(op[1], None)
        states.append((bytes(disk), dict(snaps), set(names)))
    return states


def _apply(vol: Volume, op: tuple) -> None:
    if op[0] == "write":
        vol.write(op[1], op[2])
        vol.commit()
    elif op[0] == "trim":
        vol.trim(op[1], op[2])
        vol.commit()
    elif op[0] == "snapshot":
        vol.create_snapshot(op[1], shadow=op[2])
    else:
        vol.destroy_snapshot(op[1])


def _state_of(path: str) -> tuple[bytes, dict[str, bytes], set[str]]:
    vol = Volume.open(open_device(path, write=True), writable=False)
    try:
        report = check_volume(vol)
        assert report.clean, report.problems
        disk = vol.read(0, VSIZE)
        snaps = {e.name: vol.read(0, VSIZE, snapshot=e.name)
                 for e in vol.snapshots() if not e.shadow}
        return disk, snaps, set(vol.snapshot_names())
    finally:
        vol.close()


@pytest.fixture(scope="module")
def template(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = str(tmp_path_factory.mktemp("crash") / "template.img")
    Volume.create(open_device(path, write=True, create_size=16 << 20),
                  virtual_size=VSIZE).close()
    return path


def _count_writes(template: str, path: str, ops: list[tuple]) -> list[int]:
    """Writes issued by the end of each step, on an unfaulted run."""
    shutil.copyfile(template, path)
    dev = FaultyDevice(open_device(path, write=True))
    vol = Volume.open(dev)
    marks = [dev.writes]
    for op in ops:
        _apply(vol, op)
        marks.append(dev.writes)
    vol.close()
    return marks


def _run_child(path: str, ops: list[tuple], kill_at: int) -> int:
    """Run the workload in a forked child killed at its `kill_at`-th write; returns
    the number of steps the child reported complete."""
    def workload(w: int) -> None:
        dev = FaultyDevice(open_device(path, write=True), after=kill_at, mode="kill")
        vol = Volume.open(dev)
        for op in ops:
            _apply(vol, op)
            os.write(w, b".")
        vol.close()
    done, status = forked_reports(workload)
    assert os.WIFEXITED(status) or os.WTERMSIG(status) == signal.SIGKILL
    return len(done)


@pytest.mark.parametrize("seed", first_fast(range(10), 3))
def test_sigkill_at_many_points(template: str, tmp_path: object, seed: int) -> None:
    path = os.path.join(str(tmp_path), "vol.img")
    ops = _ops(seed)
    states = _models(ops)
    marks = _count_writes(template, path, ops)
    rng = random.Random(1000 + seed)
    points = sorted(rng.sample(range(1, marks[-1] + 1), min(22, marks[-1])))
    for k in points:
        shutil.copyfile(template, path)
        done = _run_child(path, ops, k)
        got = _state_of(path)
        # everything reported complete is there; the step in flight is all or nothing
        assert got in (states[done], states[min(done + 1, len(ops))]), \
            f"seed {seed}, killed at write {k} after {done} steps"


@pytest.mark.parametrize("seed", first_fast(range(4), 2))
def test_dropped_writes_leave_last_commit(template: str, tmp_path: object, seed: int) -> None:
    path = os.path.join(str(tmp_path), "vol.img")
    ops = _ops(100 + seed)
    states = _models(ops)
    marks = _count_writes(template, path, ops)
    for k in sorted(random.Random(seed).sample(range(0, marks[-1]), min(25, marks[-1]))):
        shutil.copyfile(template, path)
        dev = FaultyDevice(open_device(path, write=True), after=k, mode="drop")
        vol = Volume.open(dev)
        try:
            for op in ops:
                _apply(vol, op)
        except Exception:
            pass  # reading back a dropped block may fail: the process would die here
        vol.io.close()
        dev.close()
        durable = max(i for i, m in enumerate(marks) if m <= k)
        expected = [states[durable]]
        if durable < len(ops) and ops[durable][0] == "snapshot":
            expected.append(states[durable + 1])   # its first CP (of two) may be durable
        got = _state_of(path)
        assert got in expected, f"seed {100 + seed}: writes cut after {k}"
