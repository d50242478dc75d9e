"""Object lock (send --retain): every object a retained snapshot's restore reads is
kept immutable by the store until its date, and blockxfer itself never removes,
prunes or repacks it before then. Over an in-memory store that enforces retention
as AWS S3 does; tests/test_objstore_s3.py runs it on SeaweedFS."""

from __future__ import annotations

import io
import time

import pytest

from blockxfer.errors import UsageError, VolumeError
from blockxfer.transfer.objstore.maintain import (
    collect_garbage,
    prune_plan,
    remove_snapshots,
    verify_store,
)
from blockxfer.transfer.objstore.objects import MemoryStore
from blockxfer.transfer.objstore.store import Store
from blockxfer.transfer.objstore.upload import upload_stream

DAY = 86400.0


def _locked_chain(streams: dict[str, bytes], retained: set[str]) -> tuple[MemoryStore, Store]:
    ms = MemoryStore(lock=True)
    store = Store(ms, "bk")
    for i in range(1, 5):
        name = f"s{i}"
        until = time.time() + DAY if name in retained else None
        upload_stream(store, "vol", io.BytesIO(streams[name]), retain_until=until)
    return ms, store


def test_a_retained_snapshots_objects_are_all_locked(chain4: dict[str, bytes]) -> None:
    streams = chain4
    ms, store = _locked_chain(streams, {"s3"})
    rec = store.need_catalog("vol").find(name="s3")
    assert rec is not None and rec.retain_until and rec.retain_until > time.time()
    man = store.manifest("vol", rec)
    needed = {store.pack_key(p) for p in man.packs()} | {rec.manifest}
    assert needed <= set(ms.retained)           # also the older packs its merge names
    with pytest.raises(Exception, match="retained"):
        ms.delete(rec.manifest)


def test_rm_prune_gc_and_repack_leave_a_retained_snapshot_whole(chain4: dict[str, bytes]) -> None:
    streams = chain4
    ms, store = _locked_chain(streams, {"s2"})
    with pytest.raises(VolumeError, match="retained by object lock until"):
        remove_snapshots(store, "vol", ["s2"])
    names = prune_plan(store.need_catalog("vol"), 1, [])
    assert names == ["s1", "s3"]
    remove_snapshots(store, "vol", names)
    for key in list(ms.objects):
        ms.age(key, 7 * DAY)
    collect_garbage(store, grace=0, repack_below=1.0)
    rec = store.need_catalog("vol").find(name="s2")
    assert rec is not None and not verify_store(store).problems
    assert rec.manifest in ms.objects             # the locked manifest is still the one named


def test_retain_without_object_lock_is_refused_before_anything_moves(
        chain4: dict[str, bytes]) -> None:
    streams = chain4
    ms = MemoryStore()
    with pytest.raises(UsageError, match="no object lock"):
        upload_stream(Store(ms, "bk"), "vol", io.BytesIO(streams["s1"]),
                      retain_until=time.time() + DAY)
    assert not ms.objects
