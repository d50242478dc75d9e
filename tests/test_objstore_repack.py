"""Repacking mostly unused packs (blockxfer/transfer/objstore/repack.py), over the
in-memory store: the kept snapshots restore byte for byte, old packs go only after
the grace period, an upload merged from a repacked base is refused and succeeds when
run again, damage is never copied, and a repack cut off at many points loses nothing."""

from __future__ import annotations

import contextlib
import io
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import DeviceError, StreamError
from blockxfer.transfer.objstore.format import Manifest
from blockxfer.transfer.objstore.maintain import collect_garbage, remove_snapshots, verify_store
from blockxfer.transfer.objstore.objects import MemoryStore
from blockxfer.transfer.objstore.repack import repack
from blockxfer.transfer.objstore.store import Store
from blockxfer.transfer.objstore.upload import upload_stream
from blockxfer.volume import Volume
from tests.marks import first_fast
from tests.objstore_helpers import contents, restore, stream_of
from tests.test_objstore import _pack_bytes, _store

MiB = 1 << 20
N = 8
KEEP = ["s2", "s6", "s8"]


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Volume, dict[str, bytes],
                                                                       dict[str, bytes]]]:
    """Each snapshot rewrites a hot region whole (dead once the snapshot is removed)
    and a cold one of its own (live for ever), half of it then rewritten by the next:
    packs of removed snapshots mix dead blobs, live ones and half-taken ones."""
    d = tmp_path_factory.mktemp("repack")
    vol = Volume.create(open_device(str(d / "src.img"), write=True, create_size=40 * MiB),
                        virtual_size=24 * MiB)
    rng = random.Random(9)
    for i in range(1, N + 1):
        vol.write(0, rng.randbytes(3 * MiB))                         # hot
        vol.write((4 + 2 * i) * MiB - 512 * 1024, rng.randbytes(MiB))  # cold, overlapping
        vol.create_snapshot(f"s{i}")
    streams = {"s1": stream_of(vol, "s1")}
    streams |= {f"s{i}": stream_of(vol, f"s{i} - s{i - 1}") for i in range(2, N + 1)}
    want = {f"s{i}": vol.read(0, vol.virtual_size, snapshot=f"s{i}") for i in range(1, N + 1)}
    yield vol, streams, want
    vol.close()


def _put_chain(store: Store, streams: dict[str, bytes], upto: int = N) -> None:
    for i in range(1, upto + 1):
        upload_stream(store, "vol", io.BytesIO(streams[f"s{i}"]), pack_bytes=8 * MiB)


def _thinned(streams: dict[str, bytes]) -> tuple[MemoryStore, Store]:
    ms, store = _store()
    _put_chain(store, streams)
    remove_snapshots(store, "vol", [f"s{i}" for i in range(1, N + 1) if f"s{i}" not in KEEP])
    return ms, store


def _age_all(ms: MemoryStore) -> None:
    for key in list(ms.objects):
        ms.age(key, 10 * 24 * 3600)


def test_repack_frees_space_and_every_kept_snapshot_restores(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], tmp_path: Path) -> None:
    _, streams, want = chain
    plain_ms, plain = _thinned(streams)
    collect_garbage(plain, grace=0)
    ms, store = _thinned(streams)
    _age_all(ms)
    rep = collect_garbage(store, grace=3600, repack_below=0.9)
    assert rep.repack is not None and rep.repack.packs_repacked > 0
    assert rep.young >= rep.repack.packs_repacked   # retired just now: a restore may read them
    assert rep.repack.manifests_rewritten >= 1 and not rep.repack.problems
    assert not verify_store(store).problems
    held = _pack_bytes(ms)
    _age_all(ms)                                    # the old packs were retired just now
    again = collect_garbage(store, grace=3600)
    assert again.packs_deleted >= rep.repack.packs_repacked
    assert _pack_bytes(ms) < held and _pack_bytes(ms) < _pack_bytes(plain_ms)
    assert not [k for k in ms.objects if "/retired/" in k]
    assert not verify_store(store).problems
    for name in KEEP:
        restore(store, name, str(tmp_path / f"{name}.img"))
        assert contents(str(tmp_path / f"{name}.img"), name) == want[name]


def test_dry_run_changes_nothing(chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    ms, store = _thinned(streams)
    before = dict(ms.objects)
    rep = repack(store, below=0.9, dry_run=True)
    assert rep.packs_repacked > 0 and ms.objects == before


def test_an_upload_merged_from_a_repacked_base_is_refused_then_succeeds(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, streams, _ = chain
    ms, store = _store()
    _put_chain(store, streams, 4)
    remove_snapshots(store, "vol", ["s1", "s2", "s3"])
    real_put = store.put_manifest

    def put_then_repack(volume: str, man: Manifest, *rest: Any) -> tuple[str, int]:
        out = real_put(volume, man, *rest)
        monkeypatch.setattr(store, "put_manifest", real_put)  # once: repack writes manifests too
        assert repack(store, below=1.0).packs_repacked > 0
        return out
    monkeypatch.setattr(store, "put_manifest", put_then_repack)
    with pytest.raises(StreamError, match="removed or repacked"):
        upload_stream(store, "vol", io.BytesIO(streams["s5"]), pack_bytes=8 * MiB)
    upload_stream(store, "vol", io.BytesIO(streams["s5"]), pack_bytes=8 * MiB)
    _age_all(ms)
    collect_garbage(store, grace=0)
    assert not verify_store(store).problems
    assert [s.name for s in store.need_catalog("vol").snaps()] == ["s4", "s5"]


def test_a_damaged_blob_is_not_copied(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    ms, store = _thinned(streams)
    for rec in store.need_catalog("vol").snaps():             # one byte of every live blob
        for e in store.manifest("vol", rec).entries:
            key, pos = store.pack_key(e.pack), e.offset + 30
            data, mtime, etag = ms.objects[key]
            if data[pos] == 0x5A:
                continue                                          # flipped already
            ms.objects[key] = (data[:pos] + b"\x5a" + data[pos + 1:], mtime, etag)
    before = dict(ms.objects)
    rep = repack(store, below=1.0)
    assert rep.problems and all("damaged" in p for p in rep.problems)
    assert rep.packs_repacked == 0 and ms.objects == before


@pytest.mark.parametrize("per_call", first_fast([3, 13], 1))
def test_repack_cut_off_at_many_points_loses_nothing(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], per_call: int) -> None:
    """The n-th PUT, GET or LIST fails (the process dies there); then gc runs with
    everything aged: every kept snapshot still verifies, and a second repack finishes."""
    _, streams, _ = chain
    rng = random.Random(7)
    probe_ms, probe = _thinned(streams)
    probe_ms.calls.clear()
    repack(probe, below=0.9)
    points = [(call, rng.randrange(1, probe_ms.calls[call] + 1))
              for call in ("put", "get", "put", "list") for _ in range(per_call)]
    for call, n in points:
        ms, store = _thinned(streams)
        ms.calls.clear()
        ms.fail(call, n)
        with contextlib.suppress(DeviceError):
            repack(store, below=0.9)
        ms.fail(call, 0)
        _age_all(ms)
        collect_garbage(store, grace=0)
        assert not verify_store(store).problems, (call, n)
        assert [s.name for s in store.need_catalog("vol").snaps()] == KEEP
        repack(store, below=0.9)
        assert not verify_store(store).problems, (call, n)
    assert len(points) == 4 * per_call
