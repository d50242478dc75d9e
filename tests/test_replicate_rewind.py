"""Rewinding a replica to a master (`replicate pull --rollback`), killed at each of its
writes: the volume opens as it was (same CP, same data, `check` clean) until the
last write, and after it as the master it went back to."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockxfer.device import BlockDevice
from blockxfer.volume import rewind
from blockxfer.volume.layout import Superblock
from blockxfer.volume.local import LocalArea, LocalState
from drivers.blockdev import open_device
from tests.transport_util import bx, ok

# a rollback killed at every write: make test-slow (CI) runs it
pytestmark = pytest.mark.slow


class Killed(Exception):
    pass


def _diverged_replica(tmp_path: Path) -> str:
    src, dst, stream = (str(tmp_path / n) for n in ("a.img", "b.img", "m1.stream"))
    ok(bx("init", src, "--size", "32M"))
    ok(bx("write", src, "--offset", "0", data=os.urandom(1 << 20)))
    ok(bx("snapshot", "--master", f"{src}@m1"))
    ok(bx("send", src, "m1", "-o", stream))
    ok(bx("receive", dst, "-i", stream))
    ok(bx("write", dst, "--offset", str(2 << 20), data=os.urandom(1 << 20)))   # local
    ok(bx("snapshot", f"{dst}@local"))
    return dst


def _generation(path: str) -> int:
    import json
    return int(json.loads(ok(bx("info", path, "--json")).stdout)["generation"])


@pytest.mark.parametrize("at", ["local area", "first superblock", "second superblock"])
def test_rewind_killed_at_each_write(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     at: str) -> None:
    dst = _diverged_replica(tmp_path)
    before, gen = ok(bx("read", dst)).stdout, _generation(dst)
    writes = {"n": 0}
    real_sb, real_area = rewind.write_superblock, LocalArea.write

    def sb(dev: BlockDevice, block: Superblock, slot: int) -> None:
        writes["n"] += 1
        if at == "first superblock" or (at == "second superblock" and writes["n"] == 2):
            raise Killed(at)
        real_sb(dev, block, slot)

    def area(self: LocalArea, st: LocalState) -> None:
        if at == "local area":
            raise Killed(at)
        real_area(self, st)

    monkeypatch.setattr(rewind, "write_superblock", sb)
    monkeypatch.setattr(LocalArea, "write", area)
    dev = open_device(dst, write=True)
    with pytest.raises(Killed):
        rewind.rewind_to(dev, "m1")
    dev.close()
    monkeypatch.undo()
    assert _generation(dst) == gen and ok(bx("read", dst)).stdout == before
    assert ok(bx("check", dst)).returncode == 0
    dev = open_device(dst, write=True)
    try:
        assert rewind.rewind_to(dev, "m1") == ["local"]
    finally:
        dev.close()
    assert ok(bx("read", dst)).stdout == ok(bx("read", f"{dst}@m1")).stdout
    assert ok(bx("check", dst)).returncode == 0
    assert "local" not in ok(bx("snapshots", dst)).stdout.decode()
