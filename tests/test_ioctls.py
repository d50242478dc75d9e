"""Every ioctl number and kernel structure size, pinned for x86-64."""

import platform

import pytest

from blockxfer.drivers import ioctls as io

pytestmark = pytest.mark.skipif(platform.machine() != "x86_64", reason="values pinned for x86-64")


@pytest.mark.parametrize("name, value", [
    ("BLKGETSIZE64", 0x80081272), ("BLKSSZGET", 0x1268), ("BLKPBSZGET", 0x127B),
    ("BLKDISCARD", 0x1277), ("BLKFLSBUF", 0x1261), ("FIFREEZE", 0xC0045877),
    ("FITHAW", 0xC0045878),
    ("LOOP_SET_FD", 0x4C00), ("LOOP_CLR_FD", 0x4C01), ("LOOP_SET_STATUS64", 0x4C04),
    ("LOOP_GET_STATUS64", 0x4C05), ("LOOP_SET_DIRECT_IO", 0x4C08),
    ("LOOP_SET_BLOCK_SIZE", 0x4C09), ("LOOP_CONFIGURE", 0x4C0A), ("LOOP_CTL_ADD", 0x4C80),
    ("LOOP_CTL_REMOVE", 0x4C81), ("LOOP_CTL_GET_FREE", 0x4C82),
    ("MTIOCTOP", 0x40086D01), ("MTIOCGET", 0x80306D02), ("MTIOCPOS", 0x80086D03),
    ("SG_IO", 0x2285),
])
def test_request_number(name: str, value: int) -> None:
    assert getattr(io, name) == value


def test_struct_sizes() -> None:
    assert (io.MTOP.size, io.MTGET.size, io.MTPOS.size) == (8, 48, 8)
    assert (io.LOOP_INFO64.size, io.LOOP_CONFIG.size, io.FLOCK.size) == (232, 304, 32)


def test_mt_ops() -> None:
    assert (io.MTFSF, io.MTBSF, io.MTFSR, io.MTBSR, io.MTWEOF, io.MTREW) == (1, 2, 3, 4, 5, 6)
    assert (io.MTOFFL, io.MTEOM, io.MTERASE, io.MTSETBLK, io.MTSEEK) == (7, 12, 13, 20, 22)
    assert (io.MTLOAD, io.MTUNLOAD, io.MTCOMPRESSION, io.MTWEOFI) == (30, 31, 32, 35)
    assert (io.GMT_BOT, io.GMT_EOT, io.GMT_EOD, io.GMT_WR_PROT) == (
        0x40000000, 0x20000000, 0x08000000, 0x04000000)
