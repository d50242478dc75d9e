"""The restore's read side: a snapshot's records come straight from its checked blobs
(no stream encoded only to be decoded again), runs that continue one another across
chunks travel as one large record, and what the stream decoder checked is still
checked."""

from __future__ import annotations

import io
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from blockxfer.errors import StreamError
from blockxfer.stream.decode import Data, StreamReader
from blockxfer.transfer.objstore.objects import MemoryStore
from blockxfer.transfer.objstore.restore import (
    RECORD_BYTES,
    open_snapshot,
    snapshot_records,
)
from blockxfer.transfer.objstore.store import Store
from blockxfer.transfer.objstore.upload import upload_stream
from tests.objstore_helpers import contents, make_chain, restore, stream_of


@pytest.fixture(scope="module")
def stored(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Store, bytes]]:
    d = tmp_path_factory.mktemp("objpath")
    vol = make_chain(str(d / "src.img"), 3)
    store = Store(MemoryStore(), "bk")
    upload_stream(store, "vol", io.BytesIO(stream_of(vol, "s1")), pack_bytes=1 << 20)
    for i in (2, 3):
        upload_stream(store, "vol", io.BytesIO(stream_of(vol, f"s{i} - s{i - 1}")),
                      pack_bytes=1 << 20)
    want = vol.read(0, vol.virtual_size, snapshot="s3")
    yield store, want
    vol.close()


def _blocks(records: Iterable[object]) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    for rec in records:
        assert isinstance(rec, Data)
        bs = len(rec.payload) // rec.count
        for k in range(rec.count):
            out[rec.vbn + k] = bytes(rec.payload[k * bs:(k + 1) * bs])
    return out


def test_records_are_the_stream_s_blocks_in_large_runs(stored: tuple[Store, bytes]) -> None:
    store, _ = stored
    recs = snapshot_records(store, "vol", "s3")
    data = list(recs)
    _, man, f = open_snapshot(store, "vol", "s3")
    reader = StreamReader(f, "stream")
    assert reader.read_header().image_blocks == recs.header.image_blocks == man.blocks
    assert _blocks(data) == _blocks(reader)
    largest = max(r.count for r in data if isinstance(r, Data)) * man.block_size
    assert man.chunk_blocks * man.block_size < largest <= RECORD_BYTES


def test_a_manifest_promising_more_blocks_is_refused(stored: tuple[Store, bytes]) -> None:
    store, _ = stored
    recs = snapshot_records(store, "vol", "s3")
    recs.header.image_blocks += 1
    with pytest.raises(StreamError, match="the blobs hold"):
        list(recs)


def test_restore_through_records(stored: tuple[Store, bytes], tmp_path: Path) -> None:
    store, want = stored
    target = str(tmp_path / "t.img")
    restore(store, "s3", target)
    assert contents(target, "s3") == want
