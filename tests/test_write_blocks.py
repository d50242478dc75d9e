"""Scattered 4 KiB writes (volume/writes.py): `write_blocks`, the batched call for
an NBD server's queued random writes, and the one-block path of `write` must leave
the same disk, the same free space, the same change planes and the same replayable
intent log as the general path, including all-zero blocks (unmapped), repeats of
a block within one call, and a volume full until a CP frees the rewritten blocks."""

from __future__ import annotations

import os
import random
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import UsageError
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from blockxfer.volume.intentlog import INLINE

MiB = 1 << 20
BS = 4096
VSIZE = 2 * MiB
NB = VSIZE // BS


@pytest.fixture(autouse=True)
def _no_timed_cp(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("blockxfer.volume.volume.CP_INTERVAL", 1e9)


def _create(path: str, size: int = 16 * MiB) -> Volume:
    return Volume.create(open_device(path, write=True, create_size=size), virtual_size=VSIZE)


def _crash(vol: Volume) -> None:
    """Stop as a killed process does: no CP, nothing flushed."""
    vol.io.close()
    vol.dev.close()


def _replayed(path: str) -> bytes:
    """The disk after replaying the log read-only, then writable; check clean."""
    seen = []
    for writable in (False, True):
        vol = Volume.open(open_device(path, write=writable), writable=writable)
        try:
            report = check_volume(vol)
            assert report.clean, report.problems
            seen.append(vol.read(0, VSIZE))
        finally:
            vol.close()
    assert seen[0] == seen[1]
    return seen[0]


def _batch(rng: random.Random, n: int, zeros: float = 0.1,
           distinct: bool = False) -> tuple[list[int], list[bytes]]:
    """`n` random 4 KiB writes, some all-zero; `distinct`: no block twice."""
    blocks = rng.sample(range(NB), n) if distinct else [rng.randrange(NB) for _ in range(n)]
    datas = [bytes(BS) if rng.random() < zeros else rng.randbytes(BS) for _ in blocks]
    return [b * BS for b in blocks], datas


def _apply(disk: bytearray, offs: list[int], datas: list[bytes]) -> None:
    for o, d in zip(offs, datas, strict=True):
        disk[o:o + len(d)] = d


def test_batched_writes_equal_writes_one_by_one(tmp_path: object) -> None:
    """Same disk, same active plane, same free count, same tracked changes."""
    vols = [_create(os.path.join(str(tmp_path), f"{k}.img")) for k in range(2)]
    rng, disk = random.Random(7), bytearray(VSIZE)
    disk[:VSIZE // 2] = os.urandom(VSIZE // 2)       # mapped: the writes free blocks too
    for v in vols:
        v.write(0, bytes(disk[:VSIZE // 2]))
        v.commit()
        v.track_changes()
    for _ in range(20):
        offs, datas = _batch(rng, rng.randrange(1, 300), distinct=rng.random() < 0.7)
        vols[0].write_blocks(offs, datas)
        for o, d in zip(offs, datas, strict=True):
            vols[1].write(o, d)
        _apply(disk, offs, datas)
    a, b = vols
    assert a.read(0, VSIZE) == b.read(0, VSIZE) == bytes(disk)
    assert a.free_blocks() == b.free_blocks()
    assert a.active.bits.count() == b.active.bits.count()
    assert a.active.dirty == b.active.dirty
    (alloc_a, freed_a), (alloc_b, freed_b) = a.changes(), b.changes()
    assert alloc_a.count() == alloc_b.count() and freed_a.count() == freed_b.count()
    for v in vols:
        v.commit()
        assert check_volume(v).clean
        v.close()


def test_mixed_and_repeated_writes_go_one_by_one(tmp_path: object) -> None:
    """A block written twice in one call, unaligned or longer writes: in order."""
    vol = _create(os.path.join(str(tmp_path), "v.img"))
    disk = bytearray(VSIZE)
    offs = [BS, 5 * BS, BS, 7 * BS + 100, 9 * BS]
    datas = [b"a" * BS, b"b" * BS, b"c" * BS, b"d" * 5000, b"e" * (3 * BS)]
    vol.write_blocks(offs, datas)
    _apply(disk, offs, datas)
    assert vol.read(0, VSIZE) == bytes(disk)
    with pytest.raises(UsageError):
        vol.write_blocks([VSIZE], [b"x" * BS])
    with pytest.raises(ValueError):
        vol.write_blocks([0, BS], [b"x" * BS])
    vol.write_blocks([], [])
    vol.close()


def test_one_sync_logs_a_batch_in_one_record_and_replays_it(
        tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    path = os.path.join(str(tmp_path), "v.img")
    vol = _create(path)
    rng = random.Random(3)
    vol.write(0, os.urandom(VSIZE))                  # mapped before: the batch replaces
    disk = bytearray(vol.read(0, VSIZE))
    vol.commit()
    offs, datas = _batch(rng, 40, distinct=True)
    vol.write_blocks(offs, datas)
    _apply(disk, offs, datas)
    kinds = [e.kind for e in vol.log.entries]
    assert kinds.count(INLINE) == sum(1 for d in datas if any(d)) > 30
    calls: list[str] = []

    def counted(name: str) -> Callable[..., None]:
        real = getattr(vol.dev, name)

        def call(*args: object) -> None:
            calls.append(name)
            real(*args)
        return call

    for name in ("pwrite", "flush"):
        monkeypatch.setattr(vol.dev, name, counted(name))
    vol.sync()
    assert calls == ["pwrite", "flush"]        # one record, one request, one fdatasync
    _crash(vol)
    assert _replayed(path) == bytes(disk)


def test_single_block_writes_replay_after_a_crash(tmp_path: object) -> None:
    """The one-block path of `write`: data, an all-zero block (unmapped), rewrites."""
    path = os.path.join(str(tmp_path), "v.img")
    vol = _create(path)
    rng, disk = random.Random(5), bytearray(VSIZE)
    for k in range(300):
        off = rng.randrange(64) * BS
        data = bytes(BS) if k % 7 == 0 else rng.randbytes(BS)
        vol.write(off, memoryview(bytearray(data)))
        disk[off:off + BS] = data
        if k % 50 == 49:
            vol.sync()
    assert vol.read(0, VSIZE) == bytes(disk)
    _crash(vol)
    assert _replayed(path) == bytes(disk)


def test_a_full_volume_commits_once_instead_of_failing(tmp_path: object) -> None:
    """Rewrites of a full disk need the blocks the last rewrite freed: a CP."""
    path = os.path.join(str(tmp_path), "v.img")
    vol = Volume.create(open_device(path, write=True, create_size=3 * MiB), virtual_size=VSIZE)
    rng = random.Random(11)
    disk = bytearray(rng.randbytes(VSIZE))
    vol.write(0, bytes(disk))
    vol.commit()
    order = list(range(NB))
    for _ in range(3):
        rng.shuffle(order)
        for at in range(0, NB, 97):
            offs = [k * BS for k in order[at:at + 97]]
            datas = [rng.randbytes(BS) for _ in offs]
            vol.write_blocks(offs, datas)
            _apply(disk, offs, datas)
    assert vol.read(0, VSIZE) == bytes(disk)
    vol.commit()
    assert check_volume(vol).clean
    vol.close()


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["blocks", "one", "sync", "commit"]),
                          st.integers(0, 2**32)), min_size=1, max_size=12))
def test_any_mix_of_batches_syncs_and_cps_replays(tmp_path_factory: pytest.TempPathFactory,
                                                  steps: list[tuple[str, int]]) -> None:
    """After a crash, the disk is what the last sync or CP left (nothing later)."""
    path = str(tmp_path_factory.mktemp("wb") / "v.img")
    vol = _create(path, size=8 * MiB)
    disk, durable = bytearray(VSIZE), bytes(VSIZE)
    for kind, seed in steps:
        rng = random.Random(seed)
        if kind == "blocks":
            offs, datas = _batch(rng, rng.randrange(1, 80), zeros=0.2)
            vol.write_blocks(offs, datas)
            _apply(disk, offs, datas)
        elif kind == "one":
            off, data = rng.randrange(NB) * BS, rng.choice([bytes(BS), rng.randbytes(BS)])
            vol.write(off, data)
            _apply(disk, [off], [data])
        else:
            vol.sync() if kind == "sync" else vol.commit()
            durable = bytes(disk)
    assert vol.read(0, VSIZE) == bytes(disk)
    _crash(vol)
    assert _replayed(path) == durable


@pytest.mark.parametrize("bs", [64 << 10, 128 << 10])
def test_large_blocks_batch_by_staging_buffer_or_go_one_by_one(tmp_path: object,
                                                               bs: int) -> None:
    """64 KiB blocks: batches of one staging buffer (16 blocks); 128 KiB blocks are
    beyond a small write: one by one through the general path."""
    path = os.path.join(str(tmp_path), "v.img")
    vol = Volume.create(open_device(path, write=True, create_size=64 * MiB), block_size=bs,
                        virtual_size=16 * MiB)
    rng = random.Random(bs)
    disk = bytearray(16 * MiB)
    for _ in range(4):
        blocks = rng.sample(range(16 * MiB // bs), 40 if bs == 64 << 10 else 30)
        offs = [b * bs for b in blocks]
        datas = [bytes(bs) if rng.random() < 0.1 else rng.randbytes(bs) for _ in offs]
        vol.write_blocks(offs, datas)
        _apply(disk, offs, datas)
        vol.write(offs[0], datas[-1])                   # the one-block path of write
        _apply(disk, offs[:1], datas[-1:])
    vol.sync()
    assert vol.read(0, 16 * MiB) == bytes(disk)
    _crash(vol)
    vol = Volume.open(open_device(path, write=True))
    assert vol.read(0, 16 * MiB) == bytes(disk)
    assert check_volume(vol).clean
    vol.close()
