"""Restores check the target before writing anything: `--only` from an incremental
image never wipes a volume, `--vbns` writes raw blocks only into the volume the
image came from (or anywhere with --force)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import BlockxferError, UsageError, VolumeError
from blockxfer.transfer.restore import restore_range
from blockxfer.transfer.snaprestore import restore_snapshot_only
from blockxfer.transfer.tapeset import list_tape
from blockxfer.volume import Volume
from tests.test_stream import snapshot_contents
from tests.test_tape_dump import LEVELS, dump, opener, restore

MiB = 1 << 20


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, bytes]]:
    from tests.test_stream import make_source
    path = str(tmp_path_factory.mktemp("idsrc") / "src.img")
    vol = make_source(path)
    contents = {e.name: vol.read(0, vol.virtual_size, snapshot=e.name) for e in vol.snapshots()}
    vol.close()
    return path, contents


@pytest.fixture(scope="module")
def tape(src: tuple[str, dict[str, bytes]],
         tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """A tape holding levels 0 and 1, and a volume restored from level 0."""
    path, _ = src
    d = tmp_path_factory.mktemp("rid")
    t = str(d / "t.vtape")
    create_virtual_tape(t, 256 * MiB, locate=False)
    dump(path, LEVELS[0], t)
    dump(path, LEVELS[1], t)
    vol = str(d / "vol.img")
    restore(t, vol, image=1)
    return t, vol, str(d)


def _copy(src_path: str, dst: str) -> str:
    Path(dst).write_bytes(Path(src_path).read_bytes())
    return dst


def test_only_from_an_incremental_image_leaves_the_volume(tape: tuple[str, str, str],
                                                          tmp_path: Path) -> None:
    t, vol, _ = tape
    target = _copy(vol, str(tmp_path / "v.img"))
    before = Path(target).read_bytes()
    with pytest.raises(UsageError, match=r"image 2 lacks .*'june5'.*--snapshot june5.*nothing "
                                         r"was written"):
        restore_snapshot_only(t, target, 2, "june5", open_tape=opener, open_device=open_device)
    assert Path(target).read_bytes() == before
    with pytest.raises(UsageError, match="lacks"):
        restore_snapshot_only(t, target, 2, "june5", open_tape=opener, open_device=open_device,
                              force=True)
    assert Path(target).read_bytes() == before
    new = str(tmp_path / "new.img")
    with pytest.raises(UsageError):
        restore_snapshot_only(t, new, 2, "june5", open_tape=opener, open_device=open_device)
    assert not os.path.exists(new)


def test_only_from_a_full_image_needs_force_over_a_volume(tape: tuple[str, str, str],
                                                          src: tuple[str, dict[str, bytes]],
                                                          tmp_path: Path) -> None:
    t, vol, _ = tape
    _, contents = src
    target = _copy(vol, str(tmp_path / "v.img"))
    before = Path(target).read_bytes()
    with pytest.raises(VolumeError, match="already holds a blockxfer volume; use --force"):
        restore_snapshot_only(t, target, 1, "june1", open_tape=opener, open_device=open_device)
    assert Path(target).read_bytes() == before
    restore_snapshot_only(t, target, 1, "june1", open_tape=opener, open_device=open_device,
                          force=True)
    assert snapshot_contents(target)["june1"] == contents["june1"]


def _some_vbn(t: str) -> int:
    idx = list_tape(opener(t, False)).images[0].index
    assert idx is not None
    return idx.records[len(idx.records) // 2][0]


def test_vbns_refuse_a_target_that_is_not_the_images_volume(tape: tuple[str, str, str],
                                                            tmp_path: Path) -> None:
    t, vol, _ = tape
    vbn = _some_vbn(t)
    other = str(tmp_path / "other.img")
    Volume.create(open_device(other, write=True, create_size=48 * MiB)).close()
    plain = str(tmp_path / "plain.img")
    with open(plain, "wb") as f:
        f.truncate(48 * MiB)
    for target, why in [(other, "is volume .* not volume"), (plain, "not a blockxfer volume"),
                        (str(tmp_path / "missing.img"), "does not exist")]:
        before = Path(target).read_bytes() if os.path.exists(target) else None
        with pytest.raises(BlockxferError, match=why):
            restore_range(t, target, 1, vbn, vbn, open_tape=opener, open_device=open_device)
        assert (Path(target).read_bytes() if os.path.exists(target) else None) == before
    assert not os.path.exists(str(tmp_path / "missing.img"))
    assert snapshot_contents(other) == {}               # still a clean, empty volume
    same = _copy(vol, str(tmp_path / "same.img"))       # the image's own volume: a repair
    res = restore_range(t, same, 1, vbn, vbn, open_tape=opener, open_device=open_device)
    assert res.blocks == 1 and Path(same).read_bytes() == Path(vol).read_bytes()
    res = restore_range(t, plain, 1, vbn, vbn, open_tape=opener, open_device=open_device,
                        force=True)
    assert res.blocks == 1


def test_vbns_cli_refusal_is_one_line(tape: tuple[str, str, str], tmp_path: Path) -> None:
    t, _, _ = tape
    vbn = _some_vbn(t)
    plain = str(tmp_path / "plain.img")
    with open(plain, "wb") as f:
        f.truncate(48 * MiB)
    p = subprocess.run([sys.executable, "-m", "blockxfer.cli", "restore", plain, "--tape", t,
                        "--image", "1", "--vbns", f"{vbn}-{vbn}"], capture_output=True, text=True)
    assert p.returncode == 5 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "--force" in p.stderr
    assert Path(plain).read_bytes() == bytes(48 * MiB)
