"""Mirroring on the test bed's real devices (issue 12): a volume on md RAID
mirrored to one on the kernel NBD device and to one on a loop device, with the
parallel striped reader, a restart in between and a few kills; byte-identical
and `check` clean at the end. Outside the test bed every test skips, naming the
variable it needs (docs/testbed.md)."""

from __future__ import annotations

import os
import random
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import aligned_buffer, open_device
from blockxfer.drivers.loop import loop_device
from blockxfer.drivers.reader import read_runs
from blockxfer.transfer.mirror import MirrorState, run_update, save
from blockxfer.transfer.mirror.target import LocalTarget
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.mirror_util import churn

pytestmark = pytest.mark.device

MiB = 1 << 20
WIPE = 4 * MiB                       # what a volume's superblocks and local area use, and more
CHURN = 64                           # writes between updates (and CHURN // 8 trims); with 200,
#                                      each case took 45-90 s on the test bed's md RAID5 under TCG


def env(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} is not set (runs in vm-testbed: make testbed)")
    return value


def _wipe(path: str) -> None:
    """Leave the device as the next test expects it: no volume signature."""
    dev = open_device(path, write=True)
    try:
        buf = aligned_buffer(WIPE)
        dev.pwrite(memoryview(buf)[:WIPE], 0)
        dev.flush()
    finally:
        dev.close()


@pytest.fixture
def source() -> Iterator[str]:
    path = env("BLOCKXFER_TEST_MD5")
    yield path
    _wipe(path)


def _size(path: str) -> int:
    dev = open_device(path)
    try:
        return dev.size
    finally:
        dev.close()


@pytest.fixture(params=["nbd", "loop"])
def dest(request: pytest.FixtureRequest, source: str) -> Iterator[str]:
    """A destination at least the source's size: a mirror's image keeps its block
    numbers, so its full image needs every VBN the source has."""
    if request.param == "nbd":
        path = env("BLOCKXFER_TEST_NBD")
        if _size(path) < _size(source):
            pytest.skip(f"{path} ({_size(path) >> 20} MiB) is smaller than {source} "
                        f"({_size(source) >> 20} MiB): a mirror needs the source's size")
        yield path
        _wipe(path)
        return
    env("BLOCKXFER_TESTBED")
    backing = Path("/var/tmp/mirror-dest.img")
    with open(backing, "wb") as f:
        f.truncate(_size(source))
    try:
        with loop_device(str(backing)) as loop:
            yield loop
    finally:
        backing.unlink()


def _update(src: str, dst: str) -> dict:
    vol = Volume.open(open_device(src, write=True))
    try:
        return run_update(vol, LocalTarget(dst, open_device),
                          reader=lambda runs: read_runs(vol.dev, runs, vol.block_size))
    finally:
        vol.close()


def test_mirror_md_raid_to_nbd_and_loop(source: str, dest: str) -> None:
    rng = random.Random(12)
    # 16 MiB of data spans 16 of md1's 1 MiB stripes: enough for the striped reader;
    # more only costs the test bed time (the NBD one crosses QEMU's user network)
    vol = Volume.create(open_device(source, write=True), virtual_size=64 * MiB)
    try:                                   # (closed on failure too: the next tests need md)
        vol.write(0, os.urandom(16 * MiB))
        save(vol, MirrorState(dest=dest, force=True))   # the device held something before
        target = LocalTarget(dest, open_device)
        reader = lambda runs: read_runs(vol.dev, runs, vol.block_size)   # noqa: E731
        assert run_update(vol, target, reader=reader)["kind"] == "full"
        for _ in range(3):
            churn(vol, rng, CHURN, CHURN // 8)
            r = run_update(vol, target, reader=reader)
            assert r["kind"] == "incremental (mark-on-allocate)"
    finally:
        vol.close()
    for _ in range(5):                                   # kills at random points
        vol = Volume.open(open_device(source, write=True))
        churn(vol, rng, CHURN, CHURN // 8)
        vol.close()
        pid = os.fork()
        if pid == 0:
            try:
                _update(source, dest)
            finally:
                os._exit(0)
        time.sleep(rng.uniform(0, 0.3))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    r = _update(source, dest)
    vol = Volume.open(open_device(source, write=False), writable=False)
    d = Volume.open(open_device(dest, write=False), writable=False)
    try:
        assert d.read(0, d.virtual_size) == vol.read(0, vol.virtual_size, r["snapshot"])
        assert check_volume(vol).clean and check_volume(d).clean
    finally:
        vol.close()
        d.close()
