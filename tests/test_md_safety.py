"""md geometry, nbd state and in-use checks on captured sysfs/proc trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from blockxfer.drivers.loop import loop_info
from blockxfer.drivers.md import md_geometry, member_of, nbd_info
from blockxfer.drivers.safety import (
    check_writable,
    find_signature,
    refuse_in_use,
    users_of_block,
)
from blockxfer.errors import DeviceBusy, DeviceError

DATA = Path(__file__).parent / "data"
SYS, PROC = DATA / "sys", DATA / "proc"


def test_raid0_geometry() -> None:
    g = md_geometry("md0", sysfs=SYS)
    assert (g.level, g.raid_disks, g.chunk_size, g.size) == ("raid0", 2, 512 * 1024, 2 << 30)
    assert [(m.slot, m.name) for m in g.members] == [(0, "vdb"), (1, "vdc")]
    assert [member_of(g, c * g.chunk_size) for c in range(4)] == [0, 1, 0, 1]
    assert g.stripe_width == 1 << 20


def test_raid5_left_symmetric() -> None:
    g = md_geometry("md1", sysfs=SYS)
    assert g.data_disks == 3 and g.members[-1].slot == -1 and g.members[-1].state == "spare"
    # left-symmetric, 4 disks: stripe 0 parity on 3, data 0,1,2; stripe 1 parity on 2, data 3,0,1
    assert [member_of(g, c * g.chunk_size) for c in range(6)] == [0, 1, 2, 3, 0, 1]


def test_raid10_near2() -> None:
    g = md_geometry("md2", sysfs=SYS)
    assert g.near_copies == 2 and g.data_disks == 2
    assert [member_of(g, c * g.chunk_size) for c in range(4)] == [0, 2, 0, 2]


def test_not_md() -> None:
    with pytest.raises(DeviceError, match="not an md array"):
        md_geometry("vdb", sysfs=SYS)


def test_nbd_info() -> None:
    on, off = nbd_info("nbd0", sysfs=SYS), nbd_info("nbd1", sysfs=SYS)
    assert on.connected and on.size == 1 << 30 and on.pid == 4242
    assert on.backend == "blockxfer-export"
    assert not off.connected and off.size == 0


def test_loop_info() -> None:
    i = loop_info("loop3", sysfs=SYS)
    assert i is not None and i.backing_file == "/var/tmp/x.img" and i.direct_io
    assert loop_info("loop9", sysfs=SYS) is None


@pytest.mark.parametrize("name, kind, detail", [
    ("vdb", "md-member", "of md0"),
    ("vdd", "mounted", "/mnt/data"),          # through its partition vdd1
    ("vdg", "holder", "dm-0 (vg-data)"),
])
def test_users(name: str, kind: str, detail: str) -> None:
    users = users_of_block(name, sysfs=SYS, proc=PROC)
    assert [(u.kind, u.detail) for u in users] == [(kind, detail)]


def test_swap_user() -> None:
    users = users_of_block("vde", path="/dev/nonexistent-vde", sysfs=SYS, proc=PROC)
    assert [u.kind for u in users] == ["swap"]


def test_free_device() -> None:
    assert users_of_block("vdf", sysfs=SYS, proc=PROC) == []


def test_signature_needs_force(tmp_path: Path) -> None:
    f = tmp_path / "old.img"
    f.write_bytes(bytes(1080) + b"\x53\xef" + bytes(70000))
    assert find_signature(str(f)) == "an ext2/3/4 file system"
    with pytest.raises(DeviceError, match="--force"):
        check_writable(str(f), sysfs=SYS, proc=PROC)
    assert check_writable(str(f), force=True, sysfs=SYS, proc=PROC).forced


def test_loop_backing_file_is_in_use(tmp_path: Path) -> None:
    f = tmp_path / "x.img"
    f.write_bytes(bytes(4096))
    sysfs = tmp_path / "sys"
    (sysfs / "block" / "loop5" / "loop").mkdir(parents=True)
    (sysfs / "block" / "loop5" / "loop" / "backing_file").write_text(str(f) + "\n")
    with pytest.raises(DeviceBusy, match="loop-backing of /dev/loop5.*does not change"):
        check_writable(str(f), force=True, sysfs=sysfs, proc=PROC)


def test_hard_linked_backing_file_is_in_use(tmp_path: Path) -> None:
    """A loop device over x.img makes its hard link (another name) in use too."""
    f = tmp_path / "x.img"
    f.write_bytes(bytes(4096))
    os.link(f, tmp_path / "y.img")
    sysfs = tmp_path / "sys"
    (sysfs / "block" / "loop5" / "loop").mkdir(parents=True)
    (sysfs / "block" / "loop5" / "loop" / "backing_file").write_text(str(f) + "\n")
    with pytest.raises(DeviceBusy, match="loop-backing of /dev/loop5"):
        refuse_in_use(str(tmp_path / "y.img"), sysfs=sysfs)
