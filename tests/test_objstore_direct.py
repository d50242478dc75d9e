"""The direct upload from a local volume stores what an upload of its send's stream
stores: the same packs, manifests and catalog, byte for byte, for a full and an
incremental; and it refuses a damaged block as a send does."""

from __future__ import annotations

import io
import os
import types
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.cli.store import ordered_reader
from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.reader import read_runs
from blockxfer.errors import DamagedBlock
from blockxfer.stream import send as send_mod
from blockxfer.transfer.objstore import direct
from blockxfer.transfer.objstore import upload as upload_mod
from blockxfer.transfer.objstore.maintain import verify_store
from blockxfer.transfer.objstore.objects import MemoryStore
from blockxfer.transfer.objstore.store import Store
from blockxfer.transfer.objstore.upload import upload_stream
from blockxfer.volume import Volume
from tests.objstore_helpers import make_chain, stream_of

PACK = 256 << 10


@pytest.fixture(scope="module")
def vol(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Volume]:
    v = make_chain(str(tmp_path_factory.mktemp("direct") / "src.img"), 3)
    yield v
    v.close()


@pytest.fixture
def fixed(monkeypatch: pytest.MonkeyPatch) -> None:
    """The two things that differ between two uploads of one image: the stream id a
    send draws and the upload's clock."""
    monkeypatch.setattr(send_mod, "os", types.SimpleNamespace(urandom=lambda n: b"\x5a" * n))
    monkeypatch.setattr(upload_mod, "time", types.SimpleNamespace(time=lambda: 1.7e9))


def _objects(ms: MemoryStore) -> dict[str, bytes]:
    """Every object but the locks and the store marker (created when first used)."""
    return {k: v[0] for k, v in ms.objects.items()
            if "/locks/" not in k and not k.endswith("/blockxfer-store")}


@pytest.mark.parametrize("unit", [7, None])
def test_direct_path_stores_what_the_stream_path_stores(
        vol: Volume, fixed: None, monkeypatch: pytest.MonkeyPatch, unit: int | None) -> None:
    """Reads cut at chunk edges (as they are) or at every 7th block: the same."""
    if unit is not None:
        monkeypatch.setattr(direct, "_unit", lambda bs, c: unit)
    via_stream, via_volume = MemoryStore(), MemoryStore()
    for expr in ("s1", "s2 - s1", "s3 - s2"):
        a = upload_stream(Store(via_stream, "bk"), "vol", io.BytesIO(stream_of(vol, expr)),
                          pack_bytes=PACK)
        seen: list[int] = []
        b = direct.upload_volume(Store(via_volume, "bk"), "vol", vol, expr,
                                 ordered_reader(vol), pack_bytes=PACK, progress=seen.append)
        assert a == b and not a.already
        assert sum(seen) == a.blocks * vol.block_size
        assert _objects(via_stream) == _objects(via_volume), expr
    assert not verify_store(Store(via_volume, "bk")).problems
    again = direct.upload_volume(Store(via_volume, "bk"), "vol", vol, "s3 - s2",
                                 ordered_reader(vol))
    assert again.already


def test_direct_path_refuses_a_damaged_block(vol: Volume) -> None:
    """A data block whose bytes do not match its map's checksum stops the upload."""
    plan = send_mod.plan_send(vol, "s1")
    assert plan.check is not None
    vbn = int(plan.check.vbns[len(plan.check.vbns) // 2])

    def pread(view: memoryview, offset: int) -> None:
        vol.dev.pread(view, offset)
        at = vbn * vol.block_size - offset
        if 0 <= at < len(view):
            view[at] ^= 1
    damaged = types.SimpleNamespace(pread=pread)
    with pytest.raises(DamagedBlock, match=f"VBN {vbn}"):
        for _ in read_runs(damaged, plan.runs, vol.block_size, request_size=16 * vol.block_size,
                           depth=3, ordered=True, check=plan.check.known):
            pass


def test_heads_stop_after_a_gap_and_a_resume_skips_what_was_written(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fresh upload HEADs only its first packs (WORKERS + 1 misses in a row, plus
    those in flight); one run again after it died at the 20th pack PUT skips the
    packs the first run wrote, and writes the same packs a clean upload does."""
    from blockxfer.errors import DeviceError
    from blockxfer.transfer.objstore.packer import WORKERS
    vol = Volume.create(open_device(str(tmp_path / "v.img"), write=True,
                                    create_size=64 << 20))
    vol.write(0, os.urandom(44 << 20))
    vol.create_snapshot("s1")
    ms = MemoryStore()
    heads: list[str] = []
    head = ms.head

    def counted(key: str) -> object:
        if key.endswith(".pack"):
            heads.append(key)
        return head(key)
    monkeypatch.setattr(ms, "head", counted)
    clean = direct.upload_volume(Store(ms, "bk"), "vol", vol, "s1", ordered_reader(vol),
                                 pack_bytes=64 << 10)
    assert clean.packs_written > 4 * WORKERS and clean.packs_skipped == 0
    assert len(heads) <= 2 * WORKERS + 2
    want = sorted(k for k in ms.objects if k.endswith(".pack"))

    ms = MemoryStore()
    puts = ms.calls.get("put", 0)
    ms.fail("put", puts + 20)
    with pytest.raises(DeviceError):
        direct.upload_volume(Store(ms, "bk"), "vol", vol, "s1", ordered_reader(vol),
                                 pack_bytes=64 << 10)
    wrote = sum(k.endswith(".pack") for k in ms.objects)
    ms.fail("put", 0)
    again = direct.upload_volume(Store(ms, "bk"), "vol", vol, "s1", ordered_reader(vol),
                                 pack_bytes=64 << 10)
    assert again.packs_skipped >= wrote - WORKERS - 1 > 0
    assert again.packs_written + again.packs_skipped == clean.packs_written
    assert sorted(k for k in ms.objects if k.endswith(".pack")) == want
    assert not verify_store(Store(ms, "bk")).problems
    vol.close()
