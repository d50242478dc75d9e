"""Smoke checks for the devices the vm-testbed hands to the `device` suite.

Each test uses one BLOCKXFER_TEST_* variable and is skipped, saying which,
when it is unset (outside the test bed).  They check only that the device is
there and does basic I/O; the real suites live beside this file.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import struct
from pathlib import Path

import pytest

pytestmark = pytest.mark.device

MTIOCTOP = 0x40086D01
MTIOCGET = 0x80306D02
MTIOCPOS = 0x80086D03
MTREW, MTWEOF = 6, 5
GMT_ONLINE = 0x01000000
GMT_BOT = 0x40000000
GMT_EOT = 0x20000000


def env_dev(var: str) -> str:
    path = os.environ.get(var)
    if not path:
        pytest.skip(f"{var} is not set (runs in vm-testbed: make testbed)")
    return path


def sysfs_block(dev: str) -> Path:
    return Path("/sys/class/block") / os.path.basename(dev)


def aligned(size: int) -> mmap.mmap:
    return mmap.mmap(-1, size)  # page-aligned, as O_DIRECT wants


def mtop(fd: int, op: int, count: int = 1) -> None:
    fcntl.ioctl(fd, MTIOCTOP, struct.pack("@hi", op, count))


def mtget(fd: int) -> tuple[int, ...]:
    return struct.unpack("@5l2i", fcntl.ioctl(fd, MTIOCGET, bytes(48)))


def direct_roundtrip(dev: str, offset: int, size: int = 1 << 20) -> None:
    pattern = (os.urandom(4096) * (size // 4096))[:size]
    buf = aligned(size)
    buf[:] = pattern
    fd = os.open(dev, os.O_RDWR | os.O_DIRECT | os.O_EXCL)
    try:
        assert os.pwritev(fd, [buf], offset) == size
        os.fsync(fd)
        back = aligned(size)
        assert os.preadv(fd, [back], offset) == size
        assert back[:] == pattern
    finally:
        os.close(fd)


# --- tape ---------------------------------------------------------------------------


def test_tape_online_and_roundtrip() -> None:
    tape = env_dev("BLOCKXFER_TEST_TAPE")
    assert stat.S_ISCHR(os.stat(tape).st_mode)
    records = [os.urandom(65536) for _ in range(3)]
    fd = os.open(tape, os.O_RDWR)
    try:
        mtop(fd, MTREW)
        gstat = mtget(fd)[3]
        assert gstat & GMT_ONLINE, f"tape not online: gstat={gstat:#x}"
        assert gstat & GMT_BOT
        for r in records:
            assert os.write(fd, r) == len(r)
        mtop(fd, MTWEOF)
        mtop(fd, MTREW)
        # Reads of exactly the record size: the emulated drive needs it.
        for r in records:
            assert os.read(fd, len(r)) == r
        assert os.read(fd, 65536) == b""  # the filemark
        assert mtget(fd)[5] == 1  # st's file number moved past it
    finally:
        os.close(fd)


def test_tape_position_query() -> None:
    """tgt cannot tell its position (docs/testbed.md); other drives must."""
    tape = env_dev("BLOCKXFER_TEST_TAPE")
    fd = os.open(tape, os.O_RDONLY)
    try:
        mtop(fd, MTREW)
        if os.environ.get("BLOCKXFER_TEST_TAPE_KIND") == "tgt":
            with pytest.raises(OSError) as exc:
                fcntl.ioctl(fd, MTIOCPOS, bytes(8))
            assert exc.value.errno == errno.EIO
        else:
            (blkno,) = struct.unpack("@l", fcntl.ioctl(fd, MTIOCPOS, bytes(8)))
            assert blkno == 0
    finally:
        os.close(fd)


def test_small_tape_early_warning() -> None:
    """st's documented EOM dance on tgt's early warning (it has no hard EOM)."""
    tape = env_dev("BLOCKXFER_TEST_TAPE_SMALL")
    mb = int(os.environ.get("BLOCKXFER_TEST_TAPE_SMALL_MB") or 8)
    rec = b"\xa5" * 65536
    fd = os.open(tape, os.O_RDWR)
    try:
        mtop(fd, MTREW)
        written = 0
        # The write that crosses early warning still succeeds and sets GMT_EOT.
        while not mtget(fd)[3] & GMT_EOT:
            assert written < 2 * (mb << 20), "no early warning seen"
            assert os.write(fd, rec) == len(rec)
            written += len(rec)
        assert (mb << 20) * 0.9 <= written <= (mb << 20) + 2 * len(rec)
        # The next write fails with ENOSPC, then one trailer write is let through.
        with pytest.raises(OSError) as exc:
            os.write(fd, rec)
        assert exc.value.errno == errno.ENOSPC
        assert os.write(fd, rec) == len(rec)
        mtop(fd, MTWEOF)
        mtop(fd, MTREW)
    finally:
        os.close(fd)


# --- md RAID --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("var", "level", "disks"),
    [
        ("BLOCKXFER_TEST_MD0", "raid0", 2),
        ("BLOCKXFER_TEST_MD5", "raid5", 3),
    ],
)
def test_md_geometry_and_direct_io(var: str, level: str, disks: int) -> None:
    md = env_dev(var)
    sysmd = sysfs_block(md) / "md"
    assert (sysmd / "level").read_text().strip() == level
    assert int((sysmd / "raid_disks").read_text()) == disks
    chunk = int((sysmd / "chunk_size").read_text())
    assert chunk > 0 and chunk % 4096 == 0
    members = sorted(p.name for p in sysmd.glob("rd*"))
    assert len(members) == disks
    assert (sysmd / "array_state").read_text().strip() in {"clean", "active", "active-idle"}
    size = int((sysfs_block(md) / "size").read_text()) * 512
    assert size > 4 << 20
    direct_roundtrip(md, offset=size // 2 // 4096 * 4096)


# --- NBD ------------------------------------------------------------------------------


def test_nbd_connected() -> None:
    nbd = env_dev("BLOCKXFER_TEST_NBD")
    size = int((sysfs_block(nbd) / "size").read_text()) * 512
    assert size > 0
    assert (sysfs_block(nbd) / "pid").exists(), "nbd device is not connected"
    direct_roundtrip(nbd, offset=4096)


# --- spare disks ------------------------------------------------------------------------


def test_spare_disks() -> None:
    disks = env_dev("BLOCKXFER_TEST_DISKS").split(",")
    assert disks
    for d in disks:
        assert stat.S_ISBLK(os.stat(d).st_mode)
        assert int((sysfs_block(d) / "size").read_text()) > 0
        assert not any((sysfs_block(d) / "holders").iterdir()), f"{d} is in use"
    direct_roundtrip(disks[0], offset=0)
