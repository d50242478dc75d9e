"""`receive --force` of a full stream over another volume, killed at every write or
with its writes cut off: the target is always the old volume, the new one, or a
target that says "receiving stream <id> (interrupted)" and that the same receive
then completes. Never an unrecognisable device."""

from __future__ import annotations

import contextlib
import io
import os
import random
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import BlockxferError
from blockxfer.stream.decode import StreamReader
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume
from blockxfer.volume.receiving import InterruptedReceive
from tests.faults import FaultyDevice
from tests.test_stream import snapshot_contents

# 140 kill and cut-off points: make test-slow (CI) runs them
pytestmark = pytest.mark.slow

MiB = 1 << 20
BS = 4096


def _fragmented_source(path: str) -> Volume:
    """A volume whose newest snapshot's plane is full of holes, so its stream has
    hundreds of data records (one write each at the receiver)."""
    vol = Volume.create(open_device(path, write=True, create_size=16 * MiB),
                        virtual_size=8 * MiB)
    rng = random.Random(3)
    vol.write(0, rng.randbytes(400 * BS))
    vol.create_snapshot("s1")
    for k in range(0, 400, 2):
        vol.write(k * BS, rng.randbytes(BS))
    vol.create_snapshot("s2")
    vol.destroy_snapshot("s1")
    vol.write(401 * BS, rng.randbytes(64 * BS))
    vol.create_snapshot("s3")
    return vol


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, bytes, dict, dict]:
    d = tmp_path_factory.mktemp("fc")
    vol = _fragmented_source(str(d / "src.img"))
    buf = io.BytesIO()
    send_image(vol, "s3 + s2", buf)
    vol.close()
    old = str(d / "old.img")                  # an unrelated volume the stream overwrites
    ov = Volume.create(open_device(old, write=True, create_size=16 * MiB),
                       virtual_size=8 * MiB)
    ov.write(0, random.Random(5).randbytes(300 * BS))
    ov.create_snapshot("mine")
    ov.write(MiB, b"later" * 1000)
    ov.commit()
    ov.close()
    before = snapshot_contents(old)
    shutil.copyfile(old, str(d / "new.img"))
    receive_stream(io.BytesIO(buf.getvalue()), str(d / "new.img"), open_device, force=True)
    after = snapshot_contents(str(d / "new.img"))
    assert before != after
    return old, buf.getvalue(), before, after


def _writes(old: str, stream: bytes, path: str) -> int:
    shutil.copyfile(old, path)
    devs: list[FaultyDevice] = []

    def opener(p: str, **kw: object) -> FaultyDevice:
        devs.append(FaultyDevice(open_device(p, **kw)))
        return devs[-1]
    receive_stream(io.BytesIO(stream), path, opener, force=True)
    return sum(d.writes for d in devs)


def _faulty(k: int, mode: str) -> Callable[..., FaultyDevice]:
    return lambda p, **kw: FaultyDevice(open_device(p, **kw), after=k, mode=mode)


def _outcome(path: str, stream: bytes, before: dict, after: dict, where: str) -> str:
    """Which of the three allowed states the target is in; an interrupted one is
    completed by the same receive (with and without --force: same stream id)."""
    try:
        got = snapshot_contents(path)
    except InterruptedReceive as e:
        sid = StreamReader(io.BytesIO(stream)).read_header().stream_id.hex()
        assert f"receiving stream {sid} (interrupted)" in str(e), where
        receive_stream(io.BytesIO(stream), path, open_device, force=True)
        assert snapshot_contents(path) == after, where
        return "interrupted"
    assert got in (before, after), where
    return "old" if got == before else "new"


def test_force_receive_killed_or_cut_at_many_points(setup: tuple[str, bytes, dict, dict],
                                                    tmp_path: Path) -> None:
    old, stream, before, after = setup
    path = str(tmp_path / "t.img")
    total = _writes(old, stream, path)
    assert total >= 100, total
    seen: Counter[str] = Counter()
    points = 0
    for k in sorted(random.Random(11).sample(range(1, total + 1), min(70, total))):
        shutil.copyfile(old, path)
        pid = os.fork()
        if pid == 0:
            try:
                receive_stream(io.BytesIO(stream), path, _faulty(k, "kill"), force=True)
            finally:
                os._exit(0)
        _, status = os.waitpid(pid, 0)
        assert os.WIFEXITED(status) or os.WTERMSIG(status) == signal.SIGKILL
        seen[_outcome(path, stream, before, after, f"killed at write {k} of {total}")] += 1
        points += 1
    for k in sorted(random.Random(12).sample(range(0, total), min(70, total))):
        shutil.copyfile(old, path)
        with contextlib.suppress(BlockxferError):
            receive_stream(io.BytesIO(stream), path, _faulty(k, "drop"), force=True)
        seen[_outcome(path, stream, before, after, f"writes cut after {k} of {total}")] += 1
        points += 1
    assert points >= 100
    print(f"{points} points over {total} writes: {dict(seen)}")
    assert seen["interrupted"] and seen["old"], seen


def test_interrupted_target_is_reported_and_completed(setup: tuple[str, bytes, dict, dict],
                                                      tmp_path: Path) -> None:
    """The operator's view: `info` names the interrupted stream in one line, and the
    same `receive` command completes it."""
    old, stream, _, after = setup
    path = str(tmp_path / "t.img")
    total = _writes(old, stream, path)
    shutil.copyfile(old, path)
    with contextlib.suppress(BlockxferError):
        receive_stream(io.BytesIO(stream), path, _faulty(total // 2, "drop"), force=True)
    cli = [sys.executable, "-m", "blockxfer.cli"]
    p = subprocess.run([*cli, "info", path], capture_output=True, text=True)
    assert "(interrupted)" in p.stderr and "receiving stream" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1 and p.returncode == 5
    sfile = str(tmp_path / "s.bin")
    Path(sfile).write_bytes(stream)
    p = subprocess.run([*cli, "receive", path, "-i", sfile, "--force"], capture_output=True,
                       text=True)
    assert p.returncode == 0, p.stderr
    assert snapshot_contents(path) == after
