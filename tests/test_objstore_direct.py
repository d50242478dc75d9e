"""The direct upload from a local volume stores what an upload of its send's stream
stores: the same packs, manifests and catalog, byte for byte, for a full and an
incremental; and it refuses a damaged block as a send does."""

from __future__ import annotations

import io
import types
from collections.abc import Iterator

import pytest

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


@pytest.mark.parametrize("request_blocks", [7, 1024])
def test_direct_path_stores_what_the_stream_path_stores(
        vol: Volume, fixed: None, monkeypatch: pytest.MonkeyPatch, request_blocks: int) -> None:
    """Reads cut at odd places (7 blocks, across chunk edges) or large: the same."""
    monkeypatch.setattr(direct, "REQUEST", request_blocks * vol.block_size)
    via_stream, via_volume = MemoryStore(), MemoryStore()
    for expr in ("s1", "s2 - s1", "s3 - s2"):
        a = upload_stream(Store(via_stream, "bk"), "vol", io.BytesIO(stream_of(vol, expr)),
                          pack_bytes=PACK)
        seen: list[int] = []
        b = direct.upload_volume(Store(via_volume, "bk"), "vol", vol, expr, pack_bytes=PACK,
                                 progress=seen.append)
        assert a == b and not a.already
        assert sum(seen) == a.blocks * vol.block_size
        assert _objects(via_stream) == _objects(via_volume), expr
    assert not verify_store(Store(via_volume, "bk")).problems
    again = direct.upload_volume(Store(via_volume, "bk"), "vol", vol, "s3 - s2")
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
    with pytest.raises(DamagedBlock, match=f"VBN {vbn}"):
        for _ in direct.ordered_reads(pread, plan, 16, 3):
            pass
