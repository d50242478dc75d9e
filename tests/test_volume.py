"""The volume: snapshots, shadows, pointers, change planes, and every refusal."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import (
    AlreadyExists,
    DeviceBusy,
    DeviceError,
    FormatError,
    NotFound,
    UsageError,
    VolumeError,
    VolumeFull,
)
from blockxfer.volume import Volume
from blockxfer.volume.blockio import aligned
from blockxfer.volume.check import check_volume
from tests.conftest import reopen

BS = 4096


def test_write_read_unaligned_and_holes(volume: Volume) -> None:
    data = os.urandom(3 * BS + 123)
    volume.write(BS - 7, data)
    assert volume.read(BS - 7, len(data)) == data
    assert volume.read(0, BS - 7) == bytes(BS - 7)
    ext = volume.extents(0, 8 * BS)
    assert ext == [(0, 5 * BS, True), (5 * BS, 3 * BS, False)]
    volume = reopen(volume)
    assert volume.read(BS - 7, len(data)) == data
    assert check_volume(volume).clean
    volume.close()


def test_snapshots_keep_old_data(volume: Volume) -> None:
    volume.write(0, b"a" * BS)
    volume.create_snapshot("one")
    volume.write(0, b"b" * BS)
    volume.create_snapshot("two", master=True)
    volume.trim(0, BS)
    assert volume.read(0, BS, snapshot="one") == b"a" * BS
    assert volume.read(0, BS, snapshot="two") == b"b" * BS
    assert volume.read(0, BS) == bytes(BS)
    assert [e.name for e in volume.snapshots()] == ["one", "two"]
    assert volume.resolve("two").master
    volume = reopen(volume)
    assert volume.read(0, BS, snapshot="one") == b"a" * BS
    volume.destroy_snapshot("one")
    with pytest.raises(NotFound):
        volume.read(0, BS, snapshot="one")
    assert check_volume(volume).clean
    volume.close()


def test_snapshot_plane_contains_its_own_cp(volume: Volume) -> None:
    volume.write(0, os.urandom(10 * BS))
    volume.create_snapshot("s")
    plane = volume.plane("s")
    assert plane.count() == volume.resolve("s").blocks
    root = volume.resolve("s").root
    assert root is not None and plane[root.catalog.vbn] and plane[root.plane.vbn]


def _small(path: str, size: int = 5 << 20) -> Volume:
    return Volume.create(open_device(path, write=True, create_size=size), virtual_size=2 << 20)


def test_shadow_bits_clear_on_reuse(volume_path: str) -> None:
    vol = _small(volume_path)
    vol.write(0, os.urandom(64 * BS))
    vol.create_snapshot("sh", shadow=True)
    before = vol.plane("sh").count()
    vol.trim(0, 64 * BS)
    vol.commit()
    for _ in range(30):  # churn until the allocator wraps and reuses freed blocks
        vol.write(0, os.urandom(64 * BS))
        vol.commit()
    assert vol.plane("sh").count() < before
    with pytest.raises(VolumeError, match="shadow"):
        vol.read(0, BS, snapshot="sh")
    assert check_volume(vol).clean
    vol.close()


@pytest.mark.parametrize("shadow", [True, False])
def test_only_regular_snapshots_pin_blocks(volume_path: str, shadow: bool) -> None:
    vol = _small(volume_path)
    vol.write(0, os.urandom(2 << 20))
    vol.create_snapshot("s", shadow=shadow)

    def churn() -> None:
        for _ in range(3):
            vol.write(0, os.urandom(2 << 20))
            vol.commit()
    if shadow:
        churn()
    else:
        with pytest.raises(VolumeFull):
            churn()
    vol.close()


def test_pointers(volume: Volume) -> None:
    volume.write(0, b"x" * BS)
    volume.create_snapshot("june5")
    volume.set_pointer("master", "june5")
    assert volume.read(0, BS, snapshot="master") == b"x" * BS
    with pytest.raises(VolumeError, match="pointer 'master'"):
        volume.destroy_snapshot("june5")
    with pytest.raises(AlreadyExists):
        volume.create_snapshot("master")
    volume.delete_pointer("master")
    with pytest.raises(NotFound):
        volume.delete_pointer("master")
    volume.destroy_snapshot("june5")


def test_change_planes_double_buffered(volume: Volume) -> None:
    volume.write(0, b"1" * BS)
    volume.create_snapshot("base")
    volume.track_changes()
    volume.write(0, b"2" * BS)
    allocated, freed = volume.changes()
    assert allocated.count() >= 1 and freed.count() >= 1
    again, _ = volume.changes()
    assert again.count() == 0
    assert volume.allocated_since("base").count() >= 1
    assert volume.freed_since("base").count() >= 1


def test_duplicate_and_unknown_snapshots(volume: Volume) -> None:
    volume.create_snapshot("a")
    with pytest.raises(AlreadyExists):
        volume.create_snapshot("a")
    with pytest.raises(NotFound):
        volume.destroy_snapshot("b")
    with pytest.raises(UsageError):
        volume.create_snapshot("bad name")


def test_volume_full_keeps_committed_state(volume_path: str) -> None:
    vol = Volume.create(open_device(volume_path, write=True, create_size=4 << 20),
                        virtual_size=3 << 20)
    first = os.urandom(2 << 20)
    vol.write(0, first)
    vol.create_snapshot("keep")
    with pytest.raises(VolumeFull, match="volume full"):
        for _ in range(4):
            vol.write(0, os.urandom(2 << 20))
            vol.commit()
    vol.close()
    vol = Volume.open(open_device(volume_path, write=True))
    assert vol.read(0, 2 << 20, snapshot="keep") == first
    assert check_volume(vol).clean
    vol.close()


def test_not_a_volume(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "junk")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
    with pytest.raises(FormatError, match="not a blockxfer volume"):
        Volume.open(open_device(path))


def test_damaged_superblocks(volume: Volume) -> None:
    path = volume.dev.path
    volume.write(0, b"x" * BS)
    volume.commit()                   # both slots now hold a superblock
    volume.close()
    with open(path, "r+b") as f:
        f.seek(100)
        f.write(b"\xff" * 8)          # slot 0 damaged: slot 1 still opens
    Volume.open(open_device(path)).close()
    with open(path, "r+b") as f:
        f.seek(BS + 100)
        f.write(b"\xff" * 8)
    with pytest.raises(FormatError, match="damaged"):
        Volume.open(open_device(path))


def test_bad_block_size_and_too_small(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "v")
    with pytest.raises(FormatError, match="power of two"):
        Volume.create(open_device(path, write=True, create_size=8 << 20), block_size=6000)
    small = os.path.join(str(tmp_path), "s")
    with pytest.raises(VolumeError, match="too small"):
        Volume.create(open_device(small, write=True, create_size=64 << 10))


def test_in_use_names_the_pid(volume: Volume) -> None:
    code = ("import sys\nfrom blockxfer.drivers.blockdev import open_device\n"
            "try:\n    open_device(sys.argv[1], write=True)\n"
            "except Exception as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code, volume.dev.path], capture_output=True,
                         text=True, check=True).stdout
    assert f"in use by process {os.getpid()}" in out
    with pytest.raises(DeviceBusy):
        raise DeviceBusy(out)


def test_block_checksum_detects_damage(volume: Volume) -> None:
    volume.write(0, os.urandom(BS))
    volume.commit()
    vbn = int(volume.lba.get(0, 1)[0, 0])
    path = volume.dev.path
    volume.close()
    with open(path, "r+b") as f:
        f.seek(vbn * BS + 10)
        f.write(b"\x00\x01\x02")
    vol = Volume.open(open_device(path))
    with pytest.raises(FormatError, match="checksum mismatch"):
        vol.read(0, BS)
    report = check_volume(vol)
    assert not report.clean and any(str(vbn) in p for p in report.problems)
    vol.close()


def test_rewriting_a_full_disk_commits_instead_of_failing(volume_path: str) -> None:
    vol = _small(volume_path, size=3 << 20)       # room for the disk once, plus a little
    data = os.urandom(2 << 20)
    vol.write(0, data)
    vol.commit()
    for _ in range(3):                             # each pass frees what the last one used
        for off in range(0, 2 << 20, 256 << 10):   # in requests, as an NBD client writes
            vol.write(off, data[off:off + (256 << 10)])
    assert vol.read(0, 2 << 20) == data
    vol.close()


def test_iter_read_matches_read_across_holes_and_reopen(volume: Volume) -> None:
    """The streamed read prefetches map leaves in batches: holes, a snapshot and a
    cold cache (after reopening) must all read back as `read` does."""
    volume.write(0, os.urandom(300 * BS))
    volume.write(1000 * BS, os.urandom(700 * BS))
    volume.create_snapshot("s")
    volume.write(100 * BS, os.urandom(50 * BS))
    volume = reopen(volume)
    size = volume.virtual_size
    for snap in (None, "s"):
        got = b"".join(bytes(v) for v in volume.iter_read(0, size, snapshot=snap,
                                                          chunk=64 * BS))
        assert got == volume.read(0, size, snapshot=snap)
    volume = reopen(volume)
    volume.lba.prefetch(0, 2048, volume.io.read_many)
    prefetched = volume.lba.get(0, 2048)
    volume.lba.nodes.clear()
    assert (prefetched == volume.lba.get(0, 2048)).all()
    volume.close()


def test_commit_waits_for_reads_outside_the_lock(volume: Volume) -> None:
    """`read` does its device I/O outside the volume lock. Blocks it points at may
    be freed meanwhile (an overwrite), but must not become reusable, so a CP waits
    for the read; the read returns the data that was current when it started."""
    import threading

    old = os.urandom(16 * BS)
    volume.write(0, old)
    volume.commit()
    started, release = threading.Event(), threading.Event()
    real = volume.io.read_ptrs_into

    def paused(*args: Any, **kwargs: Any) -> None:
        started.set()
        assert release.wait(10)
        real(*args, **kwargs)

    volume.io.read_ptrs_into = paused  # type: ignore[method-assign]  # patched on purpose
    got: list[bytes] = []
    reader = threading.Thread(target=lambda: got.append(volume.read(0, 16 * BS)))
    reader.start()
    assert started.wait(10)
    volume.io.read_ptrs_into = real  # type: ignore[method-assign]  # patched on purpose
    volume.write(0, os.urandom(16 * BS))          # not blocked by the read; frees old blocks
    committer = threading.Thread(target=volume.commit)
    committer.start()
    committer.join(0.3)
    assert committer.is_alive()                   # the CP waits for the reader
    release.set()
    reader.join(10)
    committer.join(10)
    assert not committer.is_alive()
    assert got == [old]
    volume.write(0, os.urandom(64 * BS))          # may reuse the freed blocks now
    assert check_volume(volume).clean


def test_small_writes_are_staged_into_few_requests(volume: Volume) -> None:
    """4 KiB writes at scattered offsets land on consecutive VBNs, so the staging
    buffer sends them as one request; reads and CPs see them all."""
    volume.commit()
    calls: list[int] = []
    real = volume.dev.pwrite

    def counting(data: bytes | memoryview | bytearray, offset: int) -> None:
        calls.append(len(data))
        real(data, offset)

    volume.dev.pwrite = counting  # type: ignore[method-assign]  # patched on purpose
    blocks = {b: os.urandom(BS) for b in (7, 900, 3, 1500, 42, 1024, 8)}
    for b, raw in blocks.items():
        volume.write(b * BS, raw)
    assert calls == []                            # still staged
    for b, raw in blocks.items():
        assert volume.read(b * BS, BS) == raw     # a read sends the staged data first
    assert calls == [len(blocks) * BS]
    volume.write(5 * BS + 100, b"x" * 10)         # read-modify-write of a staged block
    volume.commit()
    volume.dev.pwrite = real  # type: ignore[method-assign]  # patched on purpose
    volume = reopen(volume)
    for b, raw in blocks.items():
        assert volume.read(b * BS, BS) == raw
    assert volume.read(5 * BS + 100, 10) == b"x" * 10
    assert check_volume(volume).clean
    volume.close()


def test_scattered_small_writes_share_one_staging_buffer(volume: Volume) -> None:
    """Runs on scattered VBNs (the free blocks CPs leave after random rewrites)
    wait in one staging buffer and go out at the drain, one request per run."""
    volume.commit()
    calls: list[tuple[int, int]] = []
    real = volume.dev.pwrite

    def counting(data: bytes | memoryview | bytearray, offset: int) -> None:
        calls.append((offset // BS, len(data) // BS))
        real(data, offset)

    volume.dev.pwrite = counting  # type: ignore[method-assign]
    top = volume.nblocks - 40               # free blocks far beyond the data
    runs = [(top, 1), (top + 10, 1), (top + 11, 1), (top + 3, 2)]
    raw = os.urandom(5 * BS)
    volume.io.stage_runs(runs[:2], raw[:2 * BS])
    volume.io.stage_runs(runs[2:], raw[2 * BS:])
    assert calls == []                            # still staged
    volume.io.drain()
    volume.dev.pwrite = real  # type: ignore[method-assign]
    assert calls == [(top, 1), (top + 10, 2), (top + 3, 2)]
    got = aligned(5 * BS)                   # O_DIRECT reads need aligned buffers
    for k, at in enumerate([top, top + 10, top + 11, top + 3, top + 4]):
        view = memoryview(got)[k * BS:(k + 1) * BS]
        volume.dev.pread(view, at * BS)
    assert bytes(got[:5 * BS]) == raw


def test_a_failed_staged_write_fails_the_cp(volume: Volume) -> None:
    volume.commit()
    real = volume.dev.pwrite

    def failing(data: bytes | memoryview | bytearray, offset: int) -> None:
        raise DeviceError("write: Input/output error")

    volume.write(0, os.urandom(BS))
    volume.dev.pwrite = failing  # type: ignore[method-assign]  # patched on purpose
    with pytest.raises(DeviceError):
        volume.commit()
    volume.dev.pwrite = real  # type: ignore[method-assign]  # patched on purpose
    with pytest.raises(VolumeError, match="reopen"):
        volume.write(0, b"x")


def test_map_cache_stays_bounded_while_reading(volume: Volume,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    from blockxfer.volume import volume as vmod
    monkeypatch.setattr(vmod, "MAX_DIRTY_NODES", 8)
    volume.write(0, os.urandom(8 << 20))            # 2048 blocks: 8 map leaves of 256
    volume.commit()
    volume.lba.nodes.clear()
    for off in range(0, 8 << 20, 1 << 20):
        volume.read(off, 4096)
    for _ in volume.iter_read(0, 8 << 20, chunk=1 << 20):
        pass
    assert len(volume.lba.nodes) <= 8 + volume.lba.levels


def test_snapshot_held_by_a_send_cannot_be_destroyed(volume: Volume) -> None:
    volume.write(0, b"s" * BS)
    volume.create_snapshot("sent")
    with volume.holding([volume.resolve("sent")]), \
            pytest.raises(VolumeError, match="being sent"):
        volume.destroy_snapshot("sent")
    volume.destroy_snapshot("sent")


def test_streamed_read_does_not_hold_the_lock(volume: Volume) -> None:
    """Between chunks of iter_read other threads read and write (a CP waits for the
    chunk in flight, which keeps its blocks from reuse); an early close releases it."""
    import threading
    data = os.urandom(4 << 20)
    volume.write(0, data)
    volume.commit()
    it = volume.iter_read(0, 4 << 20, chunk=1 << 20)
    first = bytes(next(it))
    got: list[bytes] = []
    def write_then_read() -> None:
        volume.write(6 << 20, b"w" * BS)
        got.append(volume.read(6 << 20, BS))
    t = threading.Thread(target=write_then_read)
    t.start()
    t.join(10)
    assert not t.is_alive(), "a write and a read waited on the streamed read"
    assert got == [b"w" * BS] and first == data[:1 << 20]
    assert b"".join(bytes(v) for v in it) == data[1 << 20:]
    it2 = volume.iter_read(0, 4 << 20, chunk=1 << 20)
    next(it2)
    it2.close()                                        # stopped early: nothing stays counted
    volume.commit()
    assert volume.read(6 << 20, BS) == b"w" * BS


def test_blocks_trimmed_after_a_cp_are_not_reused_before_the_next(volume: Volume) -> None:
    """A trim right after a CP frees blocks the committed root still points at: no
    write may take them until the next CP commits (a crash in between would find
    the committed state overwritten)."""
    data = os.urandom(4 * BS)
    volume.write(0, data)
    volume.commit()
    committed = set(volume.lba.get(0, 4)[:, 0].tolist())
    volume._cursor = volume.sb.first_data_vbn        # the allocator scans from the start
    volume.trim(0, 4 * BS)
    volume.write(1 << 20, os.urandom(4 * BS))
    assert not committed & set(volume.lba.get(256, 4)[:, 0].tolist())
    crashed = Volume.open(open_device(volume.dev.path), writable=False)   # what a crash leaves
    try:
        assert crashed.read(0, 4 * BS) == data
    finally:
        crashed.close()


def test_aligned_small_writes_copy_the_callers_buffer(volume: Volume) -> None:
    """An aligned small write is staged and logged straight from the caller's
    buffer (no copy of its own): reusing the buffer at once must change nothing,
    through reads, a sync (the intent log's inline data) and a reopen (replay)."""
    buf = bytearray(os.urandom(3 * BS))
    want = bytes(buf)
    volume.write(5 * BS, memoryview(buf)[:BS])
    volume.write(9 * BS, buf)
    buf[:] = bytes(len(buf))
    volume.sync()
    buf[:] = b"x" * len(buf)
    assert volume.read(5 * BS, BS) == want[:BS]
    assert volume.read(9 * BS, 3 * BS) == want
    volume = reopen(volume)
    assert volume.read(5 * BS, BS) == want[:BS]
    assert volume.read(9 * BS, 3 * BS) == want
    assert check_volume(volume).clean
    volume.close()


def test_zero_blocks_inside_small_and_large_writes_are_holes(volume: Volume) -> None:
    """Zero blocks are found by comparison in small writes and by numpy in large
    ones: both unmap them, and a single zero block unmaps what it overwrites."""
    data = b"a" * BS + bytes(2 * BS) + b"b" * BS
    volume.write(0, data)                                   # small: compared
    big = (b"c" * BS + bytes(BS)) * 40                      # 80 blocks: numpy
    volume.write(16 * BS, big)
    volume.write(200 * BS, b"d" * BS)
    volume.write(200 * BS, bytes(BS))                       # one block of zeros
    assert volume.read(0, 4 * BS) == data
    assert volume.read(16 * BS, len(big)) == big
    assert volume.read(200 * BS, BS) == bytes(BS)
    mapped = [(o // BS, n // BS) for o, n, m in volume.extents(0, 256 * BS) if m]
    assert mapped[:2] == [(0, 1), (3, 1)]
    assert (200, 1) not in mapped and sum(n for o, n in mapped if 16 <= o < 96) == 40
    volume = reopen(volume)
    assert volume.read(16 * BS, len(big)) == big
    assert check_volume(volume).clean
    volume.close()


def test_large_reads_and_writes_keep_eight_requests_in_flight(
        volume: Volume, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sequential NBD reads and writes need 1 MiB requests at queue depth 8 to reach
    the device (with 4 in flight, and 2 large writes, nbdcopy read at ~0.45x and
    wrote at ~0.6x qemu-nbd): a large read, and large writes in a row, keep 8
    device requests in flight."""
    state = {"now": 0, "most": 0}
    lock = threading.Lock()

    def slow(real: Callable[[Any, int], None]) -> Callable[[Any, int], None]:
        def call(buf: Any, offset: int) -> None:
            with lock:
                state["now"] += 1
                state["most"] = max(state["most"], state["now"])
            try:
                time.sleep(0.2)            # long enough for the others to pile up
                real(buf, offset)
            finally:
                with lock:
                    state["now"] -= 1
        return call

    data = os.urandom(2 << 20)             # four of them fill the virtual disk
    real_write, real_read = volume.dev.pwrite, volume.dev.pread
    monkeypatch.setattr(volume.dev, "pwrite", slow(real_write))
    for k in range(4):                     # four 2 MiB writes: 8 requests of 1 MiB
        volume.write(k * len(data), data)
    assert state["most"] >= 8
    volume.commit()
    monkeypatch.setattr(volume.dev, "pwrite", real_write)
    state["most"] = 0
    monkeypatch.setattr(volume.dev, "pread", slow(real_read))
    assert volume.read(0, 8 << 20) == data * 4
    assert state["most"] >= 8
    monkeypatch.setattr(volume.dev, "pread", real_read)
    assert check_volume(volume).clean
    volume.close()


def test_write_parts_is_write_of_the_joined_parts(volume: Volume) -> None:
    """Large aligned parts are copied once into the write buffer; anything else is
    joined and written; either way the disk holds the concatenation."""
    cases: list[tuple[int, list[bytes | memoryview]]] = [
        (0, [os.urandom(40 * BS), bytes(30 * BS), os.urandom(BS)]),                # large
        (100 * BS + 7, [os.urandom(300), os.urandom(5000)]),                       # unaligned
        (200 * BS, [os.urandom(BS), memoryview(os.urandom(2 * BS))])]              # small
    for offset, parts in cases:
        volume.write_parts(offset, parts)
    for offset, parts in cases:
        assert volume.read(offset, sum(len(x) for x in parts)) == b"".join(parts)
    assert not any(m for o, n, m in volume.extents(40 * BS, 30 * BS))   # zeros stay holes
    volume = reopen(volume)
    assert volume.read(0, 71 * BS) == b"".join(cases[0][1])
    assert check_volume(volume).clean
    volume.close()
