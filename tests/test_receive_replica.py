"""A replica takes incrementals only while nothing local changes it. Setting or
deleting a pointer, or destroying a snapshot (an incomplete one too), used to commit a
local CP and so silently block every later incremental: they are refused with the
reason, and the next incremental still applies."""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import VolumeError
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume
from tests.test_stream import make_source, snapshot_contents


@pytest.fixture(scope="module")
def streams(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, bytes], dict]:
    path = str(tmp_path_factory.mktemp("rep") / "src.img")
    vol = make_source(path)
    vol.set_pointer("master", "june3")
    vol.write(0, b"k1" * 4096)
    vol.create_snapshot("k1")
    vol.write(8192, b"k2" * 4096)
    vol.create_snapshot("k2")
    out = {}
    for key, expr in [("top", "k1"), ("l1", "k2 - k1")]:
        buf = io.BytesIO()
        send_image(vol, expr, buf)
        out[key] = buf.getvalue()
    contents = {e.name: vol.read(0, vol.virtual_size, snapshot=e.name) for e in vol.snapshots()}
    vol.close()
    return out, contents


def _replica(tmp_path: Path, stream: bytes) -> str:
    t = str(tmp_path / "rep.img")
    res = receive_stream(io.BytesIO(stream), t, open_device)
    assert "june1" in res.incomplete                  # k1 alone: older ones incomplete
    return t


@pytest.mark.parametrize("change", ["set pointer", "move pointer", "delete pointer",
                                    "destroy incomplete", "destroy complete"])
def test_local_catalog_change_is_refused_and_replication_goes_on(
        streams: tuple[dict[str, bytes], dict], tmp_path: Path, change: str) -> None:
    data, contents = streams
    t = _replica(tmp_path, data["top"])
    vol = Volume.open(open_device(t, write=True))
    try:
        with pytest.raises(VolumeError, match="is a replica .* would stop every later "
                                              "incremental") as e:
            if change == "set pointer":
                vol.set_pointer("local", "k1")
            elif change == "move pointer":
                vol.set_pointer("master", "k1")
            elif change == "delete pointer":
                vol.delete_pointer("master")
            elif change == "destroy incomplete":
                vol.destroy_snapshot("june1")
            else:
                vol.destroy_snapshot("k1")
        assert "on the source" in str(e.value)
        gen = vol.generation
    finally:
        vol.close()
    assert Volume.open(open_device(t), writable=False).generation == gen
    res = receive_stream(io.BytesIO(data["l1"]), t, open_device)
    assert res.top == "k2"
    got = snapshot_contents(t)
    assert got["k2"] == contents["k2"] and got["k1"] == contents["k1"]


def test_after_a_local_snapshot_the_volume_is_its_own(streams: tuple[dict[str, bytes], dict],
                                                      tmp_path: Path) -> None:
    """Taking a snapshot on the replica stops replication on purpose; from then on
    pointers and destroys are local business again."""
    data, _ = streams
    t = _replica(tmp_path, data["top"])
    with Volume.open(open_device(t, write=True)) as vol:
        vol.create_snapshot("mine")
        vol.set_pointer("local", "mine")
        vol.destroy_snapshot("june1")
    with Volume.open(open_device(t, write=True)) as vol:     # also after reopening
        vol.delete_pointer("local")


def test_cli_refusal_is_one_line(streams: tuple[dict[str, bytes], dict], tmp_path: Path) -> None:
    data, _ = streams
    t = _replica(tmp_path, data["top"])
    for args in (["pointer", t, "x", "k1"], ["destroy", f"{t}@june1"]):
        p = subprocess.run([sys.executable, "-m", "blockxfer.cli", *args], capture_output=True,
                           text=True)
        assert p.returncode == 5 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "replica" in p.stderr
