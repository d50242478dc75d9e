"""A volume's catalog lost or damaged in the store: gc refuses to run (it would take
every block as unused), and `store recover` rebuilds the catalog from the manifests
so that every snapshot restores again."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockxfer.errors import VolumeError
from blockxfer.transfer.objstore.maintain import (
    collect_garbage,
    recover_catalog,
    remove_snapshots,
    verify_store,
)
from blockxfer.transfer.objstore.objects import MemoryStore
from blockxfer.transfer.objstore.store import Store
from tests.objstore_helpers import contents, restore

DAY = 86400.0


def _store_with_chain(streams: dict[str, bytes]) -> tuple[MemoryStore, Store]:
    from tests.test_objstore_lock import _locked_chain
    return _locked_chain(streams, set())


def test_a_lost_catalog_stops_gc_and_is_rebuilt(chain4: dict[str, bytes], tmp_path: Path) -> None:
    streams = chain4
    ms, store = _store_with_chain(streams)
    want = {s.name: (s.guid, s.base, s.blocks) for s in store.need_catalog("vol").snaps()}
    restore(store, "s4", str(tmp_path / "before.img"))
    del ms.objects[store.catalog_key("vol")]
    for key in list(ms.objects):
        ms.age(key, 2 * DAY)
    packs = {k for k in ms.objects if k.endswith(".pack")}
    with pytest.raises(VolumeError, match="store recover"):
        collect_garbage(store, grace=0)
    assert packs <= set(ms.objects)                          # nothing deleted
    rep = recover_catalog(store, "vol")
    assert not rep.skipped
    got = {s.name: (s.guid, s.base, s.blocks) for s in store.need_catalog("vol").snaps()}
    assert got == want
    assert not verify_store(store).problems
    restore(store, "s4", str(tmp_path / "after.img"))
    assert contents(str(tmp_path / "after.img"), "s4") == contents(str(tmp_path / "before.img"),
                                                                  "s4")
    with pytest.raises(VolumeError, match="has a catalog"):
        recover_catalog(store, "vol")


def test_a_damaged_catalog_needs_force_and_damaged_manifests_are_skipped(
        chain4: dict[str, bytes]) -> None:
    streams = chain4
    ms, store = _store_with_chain(streams)
    key = store.catalog_key("vol")
    raw, mtime, etag = ms.objects[key]
    ms.objects[key] = (raw[:30] + b"X" + raw[31:], mtime, etag)
    with pytest.raises(VolumeError, match="damaged"):
        recover_catalog(store, "vol")
    man = sorted(k for k in ms.objects if k.endswith(".manifest"))[0]
    data, mtime, etag = ms.objects[man]
    ms.objects[man] = (data[:40] + bytes([data[40] ^ 1]) + data[41:], mtime, etag)
    rep = recover_catalog(store, "vol", force=True)
    assert len(rep.skipped) == 1 and "damaged" in rep.skipped[0]
    assert len(store.need_catalog("vol").snaps()) == 3


def test_removed_snapshots_stay_removed_after_gc(chain4: dict[str, bytes]) -> None:
    streams = chain4
    ms, store = _store_with_chain(streams)
    remove_snapshots(store, "vol", ["s2"])
    for key in list(ms.objects):
        ms.age(key, 2 * DAY)
    collect_garbage(store, grace=0)
    del ms.objects[store.catalog_key("vol")]
    recover_catalog(store, "vol")
    assert [s.name for s in store.need_catalog("vol").snaps()] == ["s1", "s3", "s4"]
