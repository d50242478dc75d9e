"""The object-store layout over an in-memory store: incremental forever, any snapshot
restored alone from only its manifest's chunks, prune and gc, damage refused with the
target unchanged, two writers, and an upload killed at many points then run again."""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.errors import BlockxferError, DeviceError, FormatError, StreamError, VolumeError
from blockxfer.transfer.objstore import format as fmt
from blockxfer.transfer.objstore.maintain import (
    collect_garbage,
    prune_plan,
    remove_snapshots,
    verify_store,
)
from blockxfer.transfer.objstore.objects import MemoryStore
from blockxfer.transfer.objstore.store import Store
from blockxfer.transfer.objstore.upload import UploadResult, upload_stream
from blockxfer.volume import Volume
from tests.objstore_helpers import contents, make_chain, restore, stream_of, upload

N = 10


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Volume, dict[str, bytes],
                                                                       dict[str, bytes]]]:
    """A source volume with s1..s10, its streams, each snapshot's contents."""
    d = tmp_path_factory.mktemp("objsrc")
    vol = make_chain(str(d / "src.img"), N)
    streams = {"s1": stream_of(vol, "s1")}
    streams |= {f"s{i}": stream_of(vol, f"s{i} - s{i - 1}") for i in range(2, N + 1)}
    want = {f"s{i}": vol.read(0, vol.virtual_size, snapshot=f"s{i}") for i in range(1, N + 1)}
    yield vol, streams, want
    vol.close()


def _store(conditional: bool = True) -> tuple[MemoryStore, Store]:
    ms = MemoryStore(conditional=conditional)
    return ms, Store(ms, "bk")


def _put_chain(store: Store, streams: dict[str, bytes], upto: int = N,
               pack_bytes: int = 1 << 20) -> list[UploadResult]:
    return [upload_stream(store, "vol", io.BytesIO(streams[f"s{i}"]), pack_bytes=pack_bytes)
            for i in range(1, upto + 1)]


def _pack_bytes(ms: MemoryStore) -> int:
    return sum(len(v[0]) for k, v in ms.objects.items() if k.endswith(".pack"))


def test_any_snapshot_of_ten_restores_alone(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], tmp_path: Path) -> None:
    _, streams, want = chain
    ms, store = _store()
    _put_chain(store, streams)
    for name in ("s1", "s4", "s10"):
        ms.got_bytes = 0
        target = str(tmp_path / f"{name}.img")
        restore(store, name, target)
        assert contents(target, name) == want[name]
        found = store.need_catalog("vol").find(name=name)
        assert found is not None
        man = store.manifest("vol", found)
        blobs = {(e.pack, e.offset): e.length for e in man.entries}
        # only this manifest's blobs (plus gaps under 256 KiB read over), the
        # manifest and the catalog: never the whole chain
        assert ms.got_bytes <= sum(blobs.values()) * 1.3 + 200_000
        if name != "s10":                          # the newest names nearly everything
            assert ms.got_bytes < _pack_bytes(ms) * 0.9


def test_increments_store_only_changed_blocks(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    _, store = _store()
    res = _put_chain(store, streams)
    full, incs = res[0], res[1:]
    assert all(r.incremental for r in incs)
    for r in incs:
        assert r.new_bytes < full.new_bytes * 0.2
        assert r.blocks < full.blocks * 0.2


def test_upload_again_is_a_no_op(chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    ms, store = _store()
    _put_chain(store, streams, 2)
    before = dict(ms.objects)
    r = upload_stream(store, "vol", io.BytesIO(streams["s2"]))
    assert r.already and ms.objects == before


def test_incremental_without_its_base_is_refused(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    ms, store = _store()
    with pytest.raises(StreamError, match="does not hold the base"):
        upload_stream(store, "vol", io.BytesIO(streams["s3"]))
    assert not ms.objects


def test_another_volume_under_the_name_is_refused(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], tmp_path: Path) -> None:
    _, streams, _ = chain
    _, store = _store()
    _put_chain(store, streams, 1)
    other = make_chain(str(tmp_path / "other.img"), 1, seed=9)
    try:
        with pytest.raises(VolumeError, match="another volume"):
            upload(store, other, "s1")
        upload(store, other, "s1", name="other")     # under its own name it is fine
    finally:
        other.close()
    assert store.volumes() == ["other", "vol"]


def test_prune_gc_and_the_rest_still_restore(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], tmp_path: Path) -> None:
    _, streams, want = chain
    ms, store = _store()
    _put_chain(store, streams)
    names = prune_plan(store.need_catalog("vol"), 3, ["s2"])
    assert names == ["s1", "s3", "s4", "s5", "s6", "s7"]
    remove_snapshots(store, "vol", names)
    before = _pack_bytes(ms)
    young = collect_garbage(store)                 # default grace: nothing yet
    assert young.packs_deleted == 0 and young.young > 0
    rep = collect_garbage(store, grace=0)
    assert rep.manifests_deleted == len(names)
    assert _pack_bytes(ms) <= before
    assert not verify_store(store).problems
    for name in ("s2", "s8", "s10"):
        restore(store, name, str(tmp_path / f"{name}.img"))
        assert contents(str(tmp_path / f"{name}.img"), name) == want[name]
    with pytest.raises(BlockxferError, match="at least 1"):
        prune_plan(store.need_catalog("vol"), 0, [])


def test_gc_never_deletes_what_a_manifest_names(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    ms, store = _store()
    _put_chain(store, streams, 4)
    ms.objects["bk/packs/00/" + "0" * 32 + ".pack"] = (b"junk", 0.0, "x")
    rep = collect_garbage(store, grace=0)
    assert rep.deleted == ["bk/packs/00/" + "0" * 32 + ".pack"]
    assert not verify_store(store).problems


def _flip(ms: MemoryStore, key: str, pos: int) -> None:
    data, mtime, etag = ms.objects[key]
    bad = bytearray(data)
    bad[pos] ^= 0x40
    ms.objects[key] = (bytes(bad), mtime, etag)


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_damaged_chunk_refused_target_unchanged(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], tmp_path: Path) -> None:
    _, streams, want = chain
    ms, store = _store()
    _put_chain(store, streams, 3)
    old = str(tmp_path / "old.img")
    restore(store, "s1", old)
    before = _digest(old)
    found = store.need_catalog("vol").find(name="s3")
    assert found is not None
    man = store.manifest("vol", found)
    e = man.entries[len(man.entries) // 2]
    _flip(ms, store.pack_key(e.pack), e.offset + e.length // 2)
    with pytest.raises(FormatError, match="damaged"):
        restore(store, "s3", old, force=True)
    assert _digest(old) == before and contents(old, "s1") == want["s1"]
    fresh = str(tmp_path / "fresh.img")
    with pytest.raises(BlockxferError, match="damaged"):
        restore(store, "s3", fresh)
    assert not os.path.exists(fresh)
    rep = verify_store(store)
    assert any("s3" in p for p in rep.problems)


def test_damaged_manifest_refused_target_unchanged(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], tmp_path: Path) -> None:
    _, streams, _ = chain
    ms, store = _store()
    _put_chain(store, streams, 2)
    old = str(tmp_path / "old.img")
    restore(store, "s1", old)
    before = _digest(old)
    rec = store.need_catalog("vol").find(name="s2")
    assert rec is not None
    _flip(ms, rec.manifest, 40)
    with pytest.raises(FormatError, match="manifest is damaged"):
        restore(store, "s2", old, force=True)
    assert _digest(old) == before
    del ms.objects[rec.manifest]
    with pytest.raises(FormatError, match="missing"):
        restore(store, "s2", old, force=True)
    assert _digest(old) == before


@pytest.mark.parametrize("conditional", [True, False], ids=["if-match", "locked"])
def test_two_writers_never_lose_a_snapshot(chain: tuple[Volume, dict[str, bytes], dict[str, bytes]],
                                           tmp_path: Path, conditional: bool) -> None:
    """Eight volumes committed at once into one store: every catalog complete."""
    _, streams, _ = chain
    ms, store = _store(conditional)
    _put_chain(store, streams, 1)
    assert store.conditional() is conditional
    errors: list[BaseException] = []

    def run(i: int) -> None:
        try:
            for k in range(2, 5):
                upload_stream(Store(ms, "bk"), "vol", io.BytesIO(streams[f"s{k}"]))
                remove_snapshots(Store(ms, "bk"), "vol", []) if i % 2 else None
        except BaseException as e:
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    cat = store.need_catalog("vol")
    assert [s.name for s in cat.snaps()] == ["s1", "s2", "s3", "s4"]
    assert not [k for k in ms.objects if "/locks/" in k]


def test_the_lock_takes_back_an_abandoned_one(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    ms, store = _store(conditional=False)
    _put_chain(store, streams, 1)
    stale = "bk/volumes/vol/locks/00000000000000000001-dead.lock"
    ms.put(stale, b"gone 1\n")
    ms.age(stale, 3600)
    _put_chain(store, streams, 2)
    assert stale not in ms.objects


def test_killed_upload_resumes_at_many_points(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    """The n-th PUT or HEAD fails (the uploader dies there); run again: the store
    verifies clean, holds every chunk once, and the second run skipped what the first
    wrote. 60 points over a full and an incremental upload."""
    _, streams, want = chain
    seed = int(os.environ.get("BX_SEED", "11"))
    rng = random.Random(seed)
    clean_ms, clean = _store()
    _put_chain(clean, streams, 2, pack_bytes=256 << 10)
    clean_packs = sorted(k for k in clean_ms.objects if k.endswith(".pack"))
    puts = clean_ms.calls["put"]
    points = [(call, rng.randrange(1, puts + 1)) for call in ("put", "head")
              for _ in range(30)]
    for call, n in points:
        ms, store = _store()
        _put_chain(store, streams, 1, pack_bytes=256 << 10)
        ms.calls.clear()
        ms.fail(call, n)
        with contextlib.suppress(DeviceError):
            upload_stream(store, "vol", io.BytesIO(streams["s2"]), pack_bytes=256 << 10)
        ms.fail(call, 0)
        r = upload_stream(Store(ms, "bk"), "vol", io.BytesIO(streams["s2"]),
                          pack_bytes=256 << 10)
        assert not verify_store(store).problems, (seed, call, n)
        assert sorted(k for k in ms.objects if k.endswith(".pack")) == clean_packs, (seed, n)
        assert [s.name for s in store.need_catalog("vol").snaps()] == ["s1", "s2"]
        if not r.already:
            assert r.packs_written + r.packs_skipped >= 1
    assert len(points) >= 50
    del want


def test_manifest_is_a_merge_not_a_replay(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    """s10's manifest names blobs of many uploads, each at most once per block."""
    _, streams, _ = chain
    _, store = _store()
    _put_chain(store, streams)
    found = store.need_catalog("vol").find(name="s10")
    assert found is not None
    man = store.manifest("vol", found)
    seen: dict[int, fmt.bitarray] = {}
    for e in man.entries:
        m = seen.setdefault(e.chunk, fmt.new_mask(man.chunk_blocks))
        assert not (m & e.mask).any()
        m |= e.mask
    assert len({e.pack for e in man.entries}) > 1


def test_a_replica_pulls_only_what_changed(chain: tuple[Volume, dict[str, bytes], dict[str, bytes]],
                                           tmp_path: Path) -> None:
    """A target holding s3 receives s7 as an increment: far fewer bytes read than a
    full restore, same contents, and then s10 on top."""
    _, streams, want = chain
    ms, store = _store()
    _put_chain(store, streams)
    target = str(tmp_path / "replica.img")
    restore(store, "s3", target)
    ms.got_bytes = 0
    full = str(tmp_path / "full.img")
    restore(store, "s7", full)
    full_bytes, ms.got_bytes = ms.got_bytes, 0
    res = restore(store, "s7", target)
    assert res.incremental
    assert ms.got_bytes < full_bytes / 2
    assert contents(target, "s7") == want["s7"] and contents(target, "s3") == want["s3"]
    assert restore(store, "s10", target).incremental
    assert contents(target, "s10") == want["s10"]


def test_a_damaged_increment_leaves_the_replica_as_it_was(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]], tmp_path: Path) -> None:
    _, streams, want = chain
    ms, store = _store()
    _put_chain(store, streams, 5)
    target = str(tmp_path / "replica.img")
    restore(store, "s2", target)
    found = store.need_catalog("vol").find(name="s5")
    assert found is not None
    new = store.manifest("vol", found)
    e = new.entries[-1]                       # a blob of the newest upload
    _flip(ms, store.pack_key(e.pack), e.offset + e.length - 20)
    with pytest.raises(StreamError, match="damaged"):
        restore(store, "s5", target)
    assert contents(target, "s2") == want["s2"]


def test_verify_reads_each_blob_once_and_names_who_needs_a_lost_pack(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    _, streams, _ = chain
    ms, store = _store()
    _put_chain(store, streams, 4)
    ms.got_bytes = 0
    rep = verify_store(store)
    assert not rep.problems and rep.snapshots == 4
    assert ms.got_bytes <= _pack_bytes(ms) * 1.05 + 200_000   # not once per snapshot
    found = store.need_catalog("vol").find(name="s1")
    assert found is not None
    first = store.manifest("vol", found)
    del ms.objects[store.pack_key(first.entries[0].pack)]
    rep = verify_store(store)
    assert rep.problems and all("vol@s1" in p for p in rep.problems)


def test_a_send_that_fails_is_the_error_reported(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    """`send VOL 'nosuch' -o s3://…`: the expression's error, not a cut stream."""
    from blockxfer.errors import NotFound
    from blockxfer.stream.send import send_image
    from blockxfer.transfer.objstore.upload import upload_image
    vol, _, _ = chain
    ms, store = _store()
    with pytest.raises(NotFound, match="nosuch"):
        upload_image(store, "vol", lambda out: send_image(vol, "nosuch", out))
    assert not [k for k in ms.objects if "/volumes/" in k]


def test_unreachable_endpoint_one_line_exit_4() -> None:
    import subprocess
    import sys
    env = {**os.environ, "AWS_ACCESS_KEY_ID": "a", "AWS_SECRET_ACCESS_KEY": "b",
           "AWS_MAX_ATTEMPTS": "1", "AWS_CONFIG_FILE": os.devnull,
           "AWS_SHARED_CREDENTIALS_FILE": os.devnull}
    r = subprocess.run([sys.executable, "-m", "blockxfer.cli", "store", "ls", "s3://x/y",
                        "--s3-endpoint", "http://127.0.0.1:1"], env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 4
    assert r.stderr.count("\n") == 1 and "cannot reach the S3 endpoint" in r.stderr


def test_a_lock_of_a_killed_writer_on_this_host_is_taken_back_at_once(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    """A writer killed inside its catalog commit must not hold others off for minutes."""
    import socket
    import subprocess
    import time
    _, streams, _ = chain
    ms, store = _store(conditional=False)
    _put_chain(store, streams, 1)
    p = subprocess.Popen(["true"])
    p.wait()
    lock = "bk/volumes/vol/locks/00000000000000000002-dead.lock"
    ms.put(lock, f"{socket.gethostname()} {p.pid}\n".encode())
    t = time.monotonic()
    _put_chain(store, streams, 2)
    assert time.monotonic() - t < 20 and lock not in ms.objects


def test_a_pack_a_killed_upload_left_damaged_is_written_again(
        chain: tuple[Volume, dict[str, bytes], dict[str, bytes]]) -> None:
    """Same name and size, other bytes (a server kept a partial file): not skipped."""
    _, streams, _ = chain
    ms, store = _store()
    _put_chain(store, streams, 1)
    key = next(k for k in ms.objects if k.endswith(".pack"))
    good = ms.objects[key][0]
    ms.objects.clear()
    ms.put(key, bytes(len(good)))
    _put_chain(store, streams, 1)
    assert ms.objects[key][0] == good
    assert not verify_store(store).problems
