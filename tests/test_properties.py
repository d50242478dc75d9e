"""Local properties and holds (blockxfer/volume/properties.py): durable, never
replicated, kept across CPs and received roots; a held snapshot cannot be destroyed."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import UsageError, VolumeError
from blockxfer.volume import Volume
from blockxfer.volume.local import MAGIC_V1, LocalState
from tests.clihelp import bx, one_line
from tests.conftest import reopen
from tests.test_receiver import make_source, receive, stream


def test_properties_survive_cps_and_reopen(volume: Volume) -> None:
    volume.set_property("mirror", b'{"dest":"x"}')
    for i in range(3):
        volume.write(i * 4096, os.urandom(4096))
        volume.commit()
    volume = reopen(volume)
    assert volume.get_property("mirror") == b'{"dest":"x"}'
    volume.set_property("mirror", None)
    volume = reopen(volume)
    assert volume.properties() == {}
    volume.close()


def test_properties_are_local_to_a_copy(tmp_path: Path) -> None:
    src = make_source(str(tmp_path / "src.img"))
    dst = str(tmp_path / "dst.img")
    src.set_property("replicate.dests", b"[1]")
    receive(dst, stream(src, "a"))
    t = Volume.open(open_device(dst, write=True))
    assert t.properties() == {}                     # not replicated
    t.set_property("policy", b"daily=7")
    t.close()
    receive(dst, stream(src, "b - a"))              # a received root keeps this copy's own
    t = Volume.open(open_device(dst, write=True))
    assert t.get_property("policy") == b"daily=7"
    t.close()
    src.close()


def test_a_full_local_area_is_refused_and_changes_nothing(volume: Volume) -> None:
    volume.set_property("a", b"1")
    with pytest.raises(Exception, match="local area is full"):
        volume.set_property("big", b"x" * 8192)
    assert volume.properties() == {"a": b"1"}
    with pytest.raises(UsageError):
        volume.set_property("", b"1")


def test_version_1_local_state_still_reads() -> None:
    st = LocalState(seq=3, root_generation=7, props={"x": b"y"})
    raw = bytearray(st.pack(4096))
    v1 = LocalState(seq=3, root_generation=7).pack(4096)
    old = bytearray(v1)
    old[:8] = MAGIC_V1            # a v1 header has no property section before its checksum
    body_end = len(v1) - 8 - 2    # drop the empty property count, checksum again
    from blockxfer.checksum import checksum
    raw1 = bytes(old[:body_end])
    raw1 += checksum(raw1).to_bytes(8, "little")
    assert LocalState.unpack(raw1 + bytes(100)).seq == 3
    assert LocalState.unpack(bytes(raw)).props == {"x": b"y"}


def test_held_snapshot_cannot_be_destroyed(volume: Volume) -> None:
    volume.write(0, b"x" * 4096)
    volume.create_snapshot("s1")
    volume.hold("s1", "mirror")
    volume.hold("s1", "keep")
    with pytest.raises(VolumeError, match="held by keep, mirror"):
        volume.destroy_snapshot("s1")
    volume.release("s1", "mirror")
    volume = reopen(volume)
    assert volume.holds() == {"s1": {"keep"}}
    with pytest.raises(UsageError, match="no hold"):
        volume.release("s1", "mirror")
    volume.release("s1", "keep")
    volume.destroy_snapshot("s1")
    assert volume.holds() == {}
    volume.close()


def test_hold_cli(tmp_path: Path) -> None:
    path = str(tmp_path / "v.img")
    assert bx("init", path, "--size", "16M").returncode == 0
    assert bx("snapshot", f"{path}@s1").returncode == 0
    r = bx("hold", "audit", f"{path}@s1", "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["holds"] == {"s1": ["audit"]}
    r = bx("destroy", f"{path}@s1")
    assert r.returncode == 5 and "held by audit" in one_line(r)
    assert json.loads(bx("holds", path, "--json").stdout)["holds"] == {"s1": ["audit"]}
    assert bx("release", "audit", f"{path}@s1").returncode == 0
    assert bx("destroy", f"{path}@s1").returncode == 0


def test_local_header_golden_bytes() -> None:
    """docs/volume-format.md, "Local area": a header with one property, byte for byte."""
    raw = LocalState(seq=1, root_generation=2, props={"k": b"v"}).pack(4096)
    assert raw.hex() == (
        "42584c4f43414c32" "0100000000000000" "0200000000000000" + "00" * 16 * 3
        + "00" * 8 * 3 + "00000000" "00000000" "00" + "00" * 7
        + "0100" "01" "0100" "6b" "76" + "3ac69ee7d5e4e936")
