"""Incremental mirroring and reintegration: the increments stay the real
difference from the base through churn, reintegration rebuilds the source's
newest mirrored state byte for byte with its snapshots, and damage is refused
before the target is touched."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from blockxfer.cli.increments import wire
from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import BlockxferError, DamagedBlock, FormatError, UsageError, VolumeError
from blockxfer.transfer.increments import (
    mirror_status,
    mirror_update,
    reintegrate,
    reintegrate_plan,
)
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from tests.clihelp import run as bxrun

MiB = 1 << 20
BS = 4096
HOT = 640                           # virtual blocks the churn rewrites and trims


@pytest.fixture(autouse=True)
def _wired() -> None:
    wire()


def make_source(path: str, seed: int = 1) -> Volume:
    vol = Volume.create(open_device(path, write=True, create_size=32 * MiB),
                        virtual_size=16 * MiB)
    rng = random.Random(seed)
    vol.write(0, rng.randbytes(6 * MiB))
    vol.create_snapshot("before1")
    vol.write(2 * MiB, rng.randbytes(1 * MiB))
    vol.create_snapshot("before2")
    return vol


def churn(vol: Volume, rng: random.Random, changed: set[int]) -> None:
    """Overwrites and TRIMs in the hot region (at its start, so a handful of map
    leaves cover it); `changed` collects the virtual blocks touched."""
    for _ in range(6):
        v, n = rng.randrange(HOT - 4), rng.randrange(1, 5)
        vol.write(v * BS, rng.randbytes(n * BS))
        changed.update(range(v, v + n))
    v = rng.randrange(HOT - 8)
    vol.trim(v * BS, 8 * BS)
    changed.update(range(v, v + 8))


def contents(path: str) -> tuple[dict[str, bytes], bytes]:
    """Every complete snapshot's bytes and the active disk's, with `check` clean."""
    vol = Volume.open(open_device(path), writable=False)
    try:
        snaps = {e.name: vol.read(0, vol.virtual_size, snapshot=e.name)
                 for e in vol.snapshots() if not e.incomplete}
        assert check_volume(vol).clean
        return snaps, vol.read(0, vol.virtual_size)
    finally:
        vol.close()


def newest_state(src: str) -> tuple[dict[str, bytes], bytes]:
    """The source's snapshots and its newest mirrored snapshot's bytes (what a
    reintegrated target's active disk must read)."""
    snaps, _ = contents(src)
    top = max((n for n in snaps if n.startswith("incr.")), key=lambda n: int(n.rsplit(".")[-1]))
    return snaps, snaps[top]


def assert_reintegrated(target: str, src: str) -> None:
    want_snaps, want_active = newest_state(src)
    got_snaps, got_active = contents(target)
    assert sorted(got_snaps) == sorted(want_snaps)
    for name, data in want_snaps.items():
        assert got_snaps[name] == data, name
    assert got_active == want_active


def test_100_updates_with_churn_stay_the_difference(tmp_path: Path) -> None:
    """After 100 updates of overwrites and TRIMs (and snapshots taken and destroyed
    meanwhile, one of them carried by the base), the structure is within 1.05x of
    the union of blocks changed since the base; reintegration from a virtual tape
    rebuilds the newest state with its snapshots, byte for byte."""
    src, tape, incr = str(tmp_path / "src.img"), str(tmp_path / "base.vtape"), str(tmp_path / "i")
    create_virtual_tape(tape, 256 * MiB)
    make_source(src).close()
    first = mirror_update(src, tape, incr)
    assert first["kind"] == "base" and first["base_image"] == 1
    rng, changed = random.Random(5), set[int]()
    for k in range(1, 101):
        with Volume.open(open_device(src, write=True)) as vol:
            churn(vol, rng, changed)
            if k == 30:
                vol.create_snapshot("during")
            if k == 60:
                vol.destroy_snapshot("during")
                vol.destroy_snapshot("before2")       # carried by the base: blocks reused
        res = mirror_update(src, tape, incr)
        assert res["kind"] == "increment" and res["update"] == k
    st = mirror_status(incr)
    union = len(changed) * BS
    assert st["updates"] == 100 and st["consistent"]
    size = int(str(st["structure_bytes"]))
    assert size <= 1.05 * union, (size, union)
    assert size <= 1.05 * int(str(st["changed_bytes"])) + 64 * 1024
    assert int(str(st["written_bytes"])) > 5 * size        # the increments' sum is far larger
    target = str(tmp_path / "back.img")
    out = reintegrate(target, f"tape:{tape}", incr)
    assert out["base_restored"] and out["snapshot"] == st["newest_snapshot"]
    assert_reintegrated(target, src)
    with Volume.open(open_device(src), writable=False) as vol:
        held = vol.holds()
        assert check_volume(vol).clean
    assert {n for n, tags in held.items() if "increments" in tags} == \
        {str(st["base_snapshot"]), str(st["newest_snapshot"])}


def _mirror(tmp_path: Path, updates: int = 3) -> tuple[str, str, str]:
    src, base, incr = str(tmp_path / "src.img"), str(tmp_path / "base.bxs"), str(tmp_path / "i")
    make_source(src).close()
    mirror_update(src, base, incr)
    rng, changed = random.Random(9), set[int]()
    for _ in range(updates):
        with Volume.open(open_device(src, write=True)) as vol:
            churn(vol, rng, changed)
        mirror_update(src, base, incr)
    return src, base, incr


def test_reintegrate_file_base_again_and_over_the_base(tmp_path: Path) -> None:
    src, base, incr = _mirror(tmp_path)
    target = str(tmp_path / "back.img")
    plan = reintegrate_plan(target, base, incr)
    assert plan["dry_run"] and plan["base_restored"] and not os.path.exists(target)
    reintegrate(target, base, incr)
    assert_reintegrated(target, src)
    again = reintegrate(target, base, incr)
    assert again["up_to_date"] and not again["base_restored"]
    # a target left at the base (a reintegrate killed after it) gets only the increments
    at_base = str(tmp_path / "at_base.img")
    with open(base, "rb") as f:
        from blockxfer.stream.receive import receive_stream
        receive_stream(f, at_base, open_device, seekable=True)
    out = reintegrate(at_base, base, incr)
    assert not out["base_restored"]
    assert_reintegrated(at_base, src)


def test_other_target_needs_force_and_stays(tmp_path: Path) -> None:
    src, base, incr = _mirror(tmp_path, 1)
    other = str(tmp_path / "other.img")
    make_source(other, seed=3).close()
    before = Path(other).read_bytes()
    with pytest.raises(VolumeError, match="already holds data.*--force"):
        reintegrate(other, base, incr)
    assert Path(other).read_bytes() == before
    reintegrate(other, base, incr, force=True)
    assert_reintegrated(other, src)


def test_an_update_follows_the_last_mirrored_state(tmp_path: Path) -> None:
    """An update with nothing changed writes nothing; the previous state's snapshot
    is released and destroyed, the base and the newest stay held."""
    src, base, incr = _mirror(tmp_path, 2)
    res = mirror_update(src, base, incr)
    assert isinstance(res["blocks"], int)
    assert res["blocks"] <= 8              # only the new snapshot's own metadata
    with Volume.open(open_device(src), writable=False) as vol:
        names = [e.name for e in vol.snapshots() if e.name.startswith("incr.")]
    assert len(names) == 2 and names[-1] == res["snapshot"]


def test_wrong_base_or_volume_is_refused(tmp_path: Path) -> None:
    src, base, incr = _mirror(tmp_path, 1)
    with pytest.raises(UsageError, match="built on the base"):
        mirror_update(src, str(tmp_path / "elsewhere.bxs"), incr)
    other = str(tmp_path / "other.img")
    make_source(other, seed=4).close()
    with pytest.raises(VolumeError, match="not the volume these increments mirror"):
        mirror_update(other, base, incr)
    other_base = str(tmp_path / "other.bxs")        # another mirror's base
    mirror_update(other, other_base, str(tmp_path / "other_incr"))
    with pytest.raises(BlockxferError, match="not the base of these increments"):
        reintegrate(str(tmp_path / "t.img"), other_base, incr)
    assert not os.path.exists(str(tmp_path / "t.img"))
    exists = str(tmp_path / "taken.bxs")
    Path(exists).write_bytes(b"x")
    with pytest.raises(UsageError, match="already exists"):
        mirror_update(src, exists, str(tmp_path / "j"))


def _held_block_offset(incr: str) -> int:
    from blockxfer.transfer.increments.store import Directory, set_bits
    d = Directory(incr)
    meta = d.meta(d.slot())
    return int(set_bits(meta.present)[len(set_bits(meta.present)) // 2]) * BS


@pytest.mark.parametrize("what", ["data", "meta", "header"])
def test_damaged_increment_is_refused_and_target_unchanged(tmp_path: Path, what: str) -> None:
    src, base, incr = _mirror(tmp_path, 2)
    target = str(tmp_path / "back.img")
    make_source(target, seed=6).close()
    before = Path(target).read_bytes()
    if what == "data":
        off = _held_block_offset(incr) + 100
        path = os.path.join(incr, "data")
    elif what == "meta":
        path = next(str(p) for p in Path(incr).glob("meta.*"))
        off = os.path.getsize(path) // 2
    else:                                     # both slots: no state is left to trust
        path, off = os.path.join(incr, "header"), 40
        with open(path, "r+b") as f:
            f.seek(4096 + off)
            f.write(b"\xff")
    with open(path, "r+b") as f:
        f.seek(off)
        b = f.read(1)
        f.seek(off)
        f.write(bytes([b[0] ^ 0xFF]))
    r = bxrun(["reintegrate", target, "--base", base, "--increments", incr, "--force"],
              text=True)
    assert r.returncode == 3, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "damaged" in lines[0] and "Traceback" not in r.stderr, r.stderr
    assert Path(target).read_bytes() == before
    with pytest.raises(FormatError):
        reintegrate(target, base, incr, force=True)
    if what == "data":
        with pytest.raises(DamagedBlock):
            reintegrate_plan(target, base, incr)


def test_cli_status_and_reintegrate(tmp_path: Path) -> None:
    import json
    src, base, incr = _mirror(tmp_path, 2)
    r = bxrun(["increments", "status", incr, "--json"], text=True, check=True)
    st = json.loads(r.stdout)
    assert st["updates"] == 2 and st["held_blocks"] > 0 and st["structure_bytes"] > 0
    r = bxrun(["increments", "status", incr], text=True, check=True)
    assert "changed since the base" in r.stdout
    target = str(tmp_path / "back.img")
    r = bxrun(["reintegrate", target, "--base", base, "--increments", incr, "-n"], text=True,
              check=True)
    assert "would restore the base" in r.stdout and not os.path.exists(target)
    r = bxrun(["reintegrate", target, "--base", base, "--increments", incr, "--json"],
              text=True, check=True)
    assert json.loads(r.stdout)["snapshot"] == st["newest_snapshot"]
    assert_reintegrated(target, src)
    r = bxrun(["increments", "status", str(tmp_path / "nothing")], text=True)
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1, r.stderr


def documented_keys() -> dict[str, set[str]]:
    """Command -> the JSON keys docs/increments.md lists for it."""
    import re
    doc = (Path(__file__).resolve().parent.parent / "docs" / "increments.md").read_text()
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"^### `([a-z -]+)`\n(.*?)(?=^#|\Z)", doc, re.M | re.S):
        lines = [re.sub(r"\([^)]*\)", "", line)
                 for line in re.findall(r"^- (.*)$", m.group(2), re.M)]
        out[m.group(1)] = {k for line in lines for part in line.split(";")
                           for k in re.findall(r"`([a-z_]+)`", part.split(":")[0])}
    return out


def test_json_keys_are_documented(tmp_path: Path) -> None:
    src, base, incr = _mirror(tmp_path, 1)
    keys = documented_keys()
    assert keys["increments status"] <= set(mirror_status(incr))
    assert keys["reintegrate"] <= set(reintegrate(str(tmp_path / "b.img"), base, incr))


def test_update_on_an_open_volume(tmp_path: Path) -> None:
    """A service that owns the volume updates through the volume it holds open."""
    from blockxfer.transfer.increments import update_volume
    src, base, incr = _mirror(tmp_path, 1)
    with Volume.open(open_device(src, write=True)) as vol:
        churn(vol, random.Random(2), set())
        res = update_volume(vol, base, incr)
        assert res["kind"] == "increment" and isinstance(res["blocks"], int) and res["blocks"] > 0
    assert_reintegrated(_reint(tmp_path / "b.img", base, incr), src)


def _reint(target: Path, base: str, incr: str) -> str:
    reintegrate(str(target), base, incr)
    return str(target)


def test_a_previous_state_someone_else_needs_is_kept(tmp_path: Path) -> None:
    """A pointer or another hold on the previous `incr.ID.N`: it stays on the source
    and in the mirrored state (complete after reintegration); once let go, the
    next update drops it."""
    src, base, incr = _mirror(tmp_path, 1)
    rng = random.Random(8)
    with Volume.open(open_device(src, write=True)) as vol:
        prev = [e.name for e in vol.snapshots() if e.name.startswith("incr.")][-1]
        vol.set_pointer("keep", prev)
        churn(vol, rng, set())
    mirror_update(src, base, incr)
    snaps = mirror_status(incr)["snapshots"]
    assert isinstance(snaps, list) and prev in snaps
    assert_reintegrated(_reint(tmp_path / "b1.img", base, incr), src)
    with Volume.open(open_device(src, write=True)) as vol:
        vol.delete_pointer("keep")
        churn(vol, rng, set())
    mirror_update(src, base, incr)
    with Volume.open(open_device(src), writable=False) as vol:
        assert prev not in vol.snapshot_names()
    assert_reintegrated(_reint(tmp_path / "b2.img", base, incr), src)
