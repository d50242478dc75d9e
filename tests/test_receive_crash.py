"""A receive killed at any write, or with its writes cut off, leaves the target at
its previous state or at the new one, never between, and `check` is clean."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
from collections.abc import Callable
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import BlockxferError
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import send_image
from tests.faults import FaultyDevice
from tests.test_stream import make_source, snapshot_contents


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes, dict, dict]:
    d = tmp_path_factory.mktemp("rc")
    vol = make_source(str(d / "src.img"))
    full, incr = io.BytesIO(), io.BytesIO()
    send_image(vol, "june3 + june2 + june1", full)
    send_image(vol, "june5 + june4 - june3", incr)
    vol.close()
    base = str(d / "base.img")
    receive_stream(io.BytesIO(full.getvalue()), base, open_device)
    before = snapshot_contents(base)
    shutil.copyfile(base, str(d / "after.img"))
    receive_stream(io.BytesIO(incr.getvalue()), str(d / "after.img"), open_device)
    after = snapshot_contents(str(d / "after.img"))
    return base, incr.getvalue(), before, after


def _writes(base: str, stream: bytes, path: str) -> int:
    shutil.copyfile(base, path)
    counted: list[FaultyDevice] = []

    def opener(p: str, **kw: object) -> FaultyDevice:
        counted.append(FaultyDevice(open_device(p, **kw)))
        return counted[-1]
    receive_stream(io.BytesIO(stream), path, opener)
    return counted[0].writes


def _faulty(k: int, mode: str) -> Callable[..., FaultyDevice]:
    return lambda p, **kw: FaultyDevice(open_device(p, **kw), after=k, mode=mode)


def test_receive_killed_at_many_points(setup: tuple[str, bytes, dict, dict],
                                       tmp_path: Path) -> None:
    base, stream, before, after = setup
    path = str(tmp_path / "t.img")
    total = _writes(base, stream, path)
    for k in sorted(random.Random(9).sample(range(1, total + 1), min(40, total))):
        shutil.copyfile(base, path)
        pid = os.fork()
        if pid == 0:
            try:
                receive_stream(io.BytesIO(stream), path, _faulty(k, "kill"))
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) or os.WTERMSIG(status) == signal.SIGKILL
        got = snapshot_contents(path)
        assert got in (before, after), f"killed at write {k} of {total}"


def test_receive_with_writes_cut_off(setup: tuple[str, bytes, dict, dict], tmp_path: Path) -> None:
    base, stream, before, after = setup
    path = str(tmp_path / "t.img")
    total = _writes(base, stream, path)
    for k in sorted(random.Random(10).sample(range(0, total), min(40, total))):
        shutil.copyfile(base, path)
        with contextlib.suppress(BlockxferError):
            receive_stream(io.BytesIO(stream), path, _faulty(k, "drop"))
        got = snapshot_contents(path)
        assert got in (before, after), f"writes cut after {k} of {total}"
