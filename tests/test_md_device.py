"""md RAID, the parallel reader and the write refusals on real kernel devices.

Runs in the vm-testbed (`make testbed`), which builds the arrays with mdadm and
says what it asked for in BLOCKXFER_TEST_MD0_CREATED / BLOCKXFER_TEST_MD5_CREATED
("level=raid0 chunk=65536 members=/dev/vda,/dev/vdb"). Outside it every test
skips, naming the variable. The reader is checked against `dd` byte for byte
and for keeping every member busy, both from its request plan and from the
members' own /sys/block/X/stat counters.
"""

from __future__ import annotations

import contextlib
import os
import random
import subprocess
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import aligned_buffer, open_device
from blockxfer.drivers.md import MdGeometry, md_geometry, member_of
from blockxfer.drivers.reader import plan_requests, read_runs
from blockxfer.drivers.safety import check_writable
from blockxfer.errors import DeviceBusy

pytestmark = pytest.mark.device

BS = 4096
ARRAYS = [pytest.param("BLOCKXFER_TEST_MD0", id="raid0"),
          pytest.param("BLOCKXFER_TEST_MD5", id="raid5")]


def env(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} is not set (runs in vm-testbed: make testbed)")
    return value


def created(var: str) -> dict[str, str]:
    """What the test bed asked mdadm for."""
    return dict(kv.split("=", 1) for kv in env(f"{var}_CREATED").split())


@pytest.fixture(scope="module", params=ARRAYS)
def array_var(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def array(array_var: str) -> tuple[str, dict[str, str], MdGeometry]:
    """(path, what mdadm was asked, geometry read from sysfs now)."""
    path = env(array_var)
    return path, created(array_var), md_geometry(os.path.basename(path))


def test_geometry_is_what_mdadm_was_asked(array: tuple[str, dict[str, str], MdGeometry]) -> None:
    _path, asked, g = array
    members = asked["members"].split(",")
    assert g.level == asked["level"]
    assert g.chunk_size == int(asked["chunk"])
    assert g.raid_disks == len(members)
    assert [f"/dev/{m.name}" for m in g.members] == members       # in role order
    assert [m.slot for m in g.members] == list(range(len(members)))
    assert all("in_sync" in m.state for m in g.members)
    if g.level == "raid5":
        assert g.layout == 2                                        # mdadm's left-symmetric
    assert g.size >= g.stripe_width


def random_runs(rng: random.Random, nblocks: int, n: int) -> list[tuple[int, int]]:
    runs = []
    for _ in range(n):
        count = rng.choice([1, 3, 16, 100, 300, 1000])
        runs.append((rng.randrange(0, nblocks - count), count))
    return runs


@pytest.fixture(scope="module")
def filled(array_var: str) -> tuple[str, MdGeometry, bytes]:
    """The first 16 MiB of the array written with random bytes, and what dd reads back.

    The disks start zeroed, so reading them proves little until they hold data.
    """
    path = env(array_var)
    g = md_geometry(os.path.basename(path))
    nbytes = min(16 << 20, g.size) // g.stripe_width * g.stripe_width
    seed = random.randrange(1 << 30)
    print("seed", seed)
    buf = aligned_buffer(nbytes)
    buf[:] = random.Random(seed).randbytes(nbytes)
    with open_device(path, write=True) as dev:
        dev.pwrite(memoryview(buf), 0)
        dev.flush()
    out = subprocess.run(["dd", f"if={path}", "bs=1M", f"count={nbytes >> 20}",
                          "iflag=direct", "status=none"], check=True, capture_output=True)
    assert out.stdout == buf[:]
    return path, g, out.stdout


def test_read_runs_returns_what_dd_reads(filled: tuple[str, MdGeometry, bytes]) -> None:
    path, g, dd = filled
    seed = random.randrange(1 << 30)
    print("seed", seed)
    runs = random_runs(random.Random(seed), len(dd) // BS, 60)
    got: dict[int, bytes] = {}
    with open_device(path) as dev:
        assert dev.direct
        for start, view in read_runs(dev, runs, BS, geometry=g):
            for i in range(len(view) // BS):
                got[start + i] = bytes(view[i * BS:(i + 1) * BS])
    for start, count in runs:
        want = dd[start * BS:(start + count) * BS]
        assert b"".join(got[b] for b in range(start, start + count)) == want, (start, count)


def members_of_request(g: MdGeometry, start: int, count: int) -> set[int]:
    chunk = g.chunk_size // BS
    first, last = start // chunk, (start + count - 1) // chunk
    return {member_of(g, c * g.chunk_size) for c in range(first, last + 1)}


def test_plan_keeps_every_member_busy(array: tuple[str, dict[str, str], MdGeometry]) -> None:
    _path, _asked, g = array
    total = 64 << 20
    reqs = list(plan_requests([(0, total // BS)], BS, geometry=g))
    assert sum(c for _, c in reqs) == total // BS
    depth = 2 * g.raid_disks                       # read_runs' depth with a geometry
    for i in range(0, len(reqs) - depth, depth):
        busy: set[int] = set()
        for start, count in reqs[i:i + depth]:
            busy |= members_of_request(g, start, count)
        # every data member has work in each window of requests in flight
        assert len(busy) >= g.data_disks, (i, busy)
    load = Counter(m for s, c in reqs for m in members_of_request(g, s, c))
    assert min(load.values()) * 2 >= max(load.values()), load


def sectors_read(name: str) -> int:
    return int(Path(f"/sys/block/{name}/stat").read_text().split()[2])


def test_reader_spreads_reads_over_the_members(filled: tuple[str, MdGeometry, bytes]) -> None:
    path, g, dd = filled
    nblocks = len(dd) // BS
    before = {m.name: sectors_read(m.name) for m in g.members}
    with open_device(path) as dev:
        n = sum(len(v) for _, v in read_runs(dev, [(0, nblocks)], BS, geometry=g))
    assert n == nblocks * BS
    delta = {name: sectors_read(name) - s for name, s in before.items()}
    print("sectors read per member", delta)
    expected = n // 512 // g.data_disks
    for name, sectors in delta.items():
        assert sectors >= expected * 0.5, (name, delta)


# --- write refusals on real devices ---------------------------------------------------


@pytest.mark.device("md raid0")
def test_md_member_is_refused() -> None:
    member = created("BLOCKXFER_TEST_MD0")["members"].split(",")[0]
    with pytest.raises(DeviceBusy, match="md-member of md"):
        check_writable(member, force=True)


@contextlib.contextmanager
def mounted_ext4(dev: str) -> Iterator[str]:
    subprocess.run(["mkfs.ext4", "-q", "-F", dev], check=True, capture_output=True)
    mnt = tempfile.mkdtemp(prefix="bx-mnt-")
    subprocess.run(["mount", "-t", "ext4", dev, mnt], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", mnt], check=True)
        os.rmdir(mnt)


def test_mounted_disk_is_refused_then_free_after_umount() -> None:
    disk = env("BLOCKXFER_TEST_DISKS").split(",")[0]
    with mounted_ext4(disk) as mnt, pytest.raises(DeviceBusy, match=f"mounted {mnt}"):
        check_writable(disk, force=True)
    with pytest.raises(Exception, match="ext2/3/4"):
        check_writable(disk)                            # a leftover signature: needs --force
    assert check_writable(disk, force=True).forced
