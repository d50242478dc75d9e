"""A mirror to a remote destination (ssh://, through the stand-in for ssh that runs
the far side's `blockxfer stdio-serve` here) resumes an interrupted update block by
block, and rolls back what was written there since the last update, as a local
destination does: the far side answers `inspect` (what it holds, and the plane of
blocks an interrupted receive placed) and `revert` (issue 12)."""

from __future__ import annotations

import os
import random
from pathlib import Path

from blockxfer.drivers.blockdev import open_device
from blockxfer.transfer.mirror import load, run_update
from blockxfer.transfer.mirror.target import LocalTarget, UrlTarget
from blockxfer.volume.check import check_volume
from tests.mirror_util import (
    churn,
    configure,
    dest_image,
    dying_reader,
    image_of,
    make_volume,
    open_vol,
)
from tests.test_mirror_remote import far  # noqa: F401 - the fixture

MiB = 1 << 20


def _cut_update(src: str, dest: str, after: int) -> None:
    """In a forked child: a local update that dies (SIGKILL) once `after` bytes were
    read, a moment later (the receive saves its plane every 64 KiB meanwhile)."""
    try:
        import blockxfer.stream.receive as receive
        receive.PERSIST_EVERY = 64 << 10
        vol = open_vol(src)
        reader = dying_reader(vol, after)
        run_update(vol, LocalTarget(dest, open_device), reader=reader)
    finally:
        os._exit(1)


def test_an_interrupted_update_resumes_block_by_block_over_ssh(
        tmp_path: Path, far: tuple[str, str]) -> None:  # noqa: F811
    dest, url = far
    src = str(tmp_path / "src.img")
    vol = make_volume(src, 24 << 20, 8 << 20)
    vol.write(0, random.Random(8).randbytes(8 * MiB))
    configure(vol, url)
    vol.close()
    pid = os.fork()
    if pid == 0:
        _cut_update(src, dest, 3 * MiB)
    os.waitpid(pid, 0)
    vol = open_vol(src)
    st = load(vol, src)
    seen = LocalTarget(dest, open_device).look()
    assert st.pending is not None and seen.pending == bytes.fromhex(st.pending.sid)
    assert seen.received is not None
    have = seen.received.count()
    assert have > 0
    r = run_update(vol, UrlTarget(url))
    assert r["kind"] == "full, resumed" and r["resumed"], r
    total = (8 * MiB) // 4096
    assert r["blocks"] <= total - have + 64, (r["blocks"], have)   # only the rest was sent
    assert image_of(vol, r["snapshot"]) == dest_image(dest)
    vol.close()
    d = open_vol(dest, write=False)
    assert check_volume(d).clean
    d.close()


def test_local_writes_at_a_remote_destination_are_rolled_back(
        tmp_path: Path, far: tuple[str, str]) -> None:  # noqa: F811
    dest, url = far
    vol = make_volume(str(tmp_path / "src.img"), 8 << 20, 1 << 20)
    churn(vol, random.Random(3), 40, 0)
    configure(vol, url)
    run_update(vol, LocalTarget(dest, open_device))     # the same full image, quicker
    d = open_vol(dest)
    d.write(0, os.urandom(8192))
    d.create_snapshot("local")
    d.close()
    churn(vol, random.Random(4))
    r = run_update(vol, UrlTarget(url))          # refused, rolled back there, sent again
    assert r["kind"].startswith("incremental"), r
    assert image_of(vol, r["snapshot"]) == dest_image(dest)
    d = open_vol(dest, write=False)
    assert "local" not in d.snapshot_names() and check_volume(d).clean
    d.close()
    vol.close()
