"""The intent log (blockxfer/volume/intentlog.py, syncing.py): a sync is one log
record, not a CP; opening replays the records that follow the committed root
(read-only too); a CP, a rollback or a received root makes them obsolete; a torn
or unbacked record ends the replay; `check` verifies the log; golden bytes."""

from __future__ import annotations

import io
import mmap
import os
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import VolumeError
from blockxfer.stream.receive import receive_stream
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume
from blockxfer.volume import intentlog as il
from blockxfer.volume.check import check_volume
from blockxfer.volume.layout import ObjectRef, RootRecord
from blockxfer.volume.superblock import local_end

MiB = 1 << 20
BS = 4096
VSIZE = 2 * MiB
DATA = Path(__file__).parent / "data"


@pytest.fixture
def path(tmp_path: Path) -> str:
    p = str(tmp_path / "vol.img")
    Volume.create(open_device(p, write=True, create_size=16 * MiB), virtual_size=VSIZE).close()
    return p


def crash(vol: Volume) -> None:
    """Stop using a volume the way a killed process does: no CP, nothing flushed."""
    vol.io.close()
    vol.dev.close()


def opened(path: str, writable: bool = False) -> Volume:
    return Volume.open(open_device(path, write=writable), writable=writable)


def contents(path: str, writable: bool = False) -> tuple[bytes, int, int]:
    """(virtual disk, log records check counts, committed generation), check clean."""
    vol = opened(path, writable)
    try:
        report = check_volume(vol)
        assert report.clean, report.problems
        return vol.read(0, VSIZE), report.log_records, vol.generation
    finally:
        vol.close()


def test_sync_is_a_log_record_not_a_cp(path: str) -> None:
    vol = opened(path, True)
    gen = vol.generation
    vol.write(5, b"small")                       # inline
    vol.write(300_000, os.urandom(200_000))     # pointer: data written copy-on-write
    vol.sync()
    vol.write(9000, b"x" * 10)
    vol.trim(300_000, 100_000)
    vol.sync()
    assert vol.generation == gen and vol.log.seq == 2
    want = vol.read(0, VSIZE)
    crash(vol)
    got, records, g = contents(path)             # read-only: replayed in memory only
    assert (got, records, g) == (want, 2, gen)
    got, records, g = contents(path, writable=True)   # replayed, committed at close
    assert (got, records, g) == (want, 2, gen)
    assert contents(path) == (want, 0, gen + 1)


def test_unsynced_writes_are_not_replayed(path: str) -> None:
    vol = opened(path, True)
    vol.write(0, b"acknowledged")
    vol.sync()
    vol.write(0, b"never synced")
    vol.write(BS * 9, os.urandom(100_000))
    crash(vol)
    got, records, _ = contents(path)
    assert got[:12] == b"acknowledged" and not any(got[BS:]) and records == 1


def test_replayed_volume_logs_on_after_its_records(path: str) -> None:
    vol = opened(path, True)
    vol.write(0, b"one")
    vol.sync()
    crash(vol)
    vol = opened(path, True)                      # replays one record, no CP yet
    assert vol.log.seq == 1
    vol.write(BS, b"two")
    vol.sync()
    crash(vol)
    got, records, _ = contents(path)
    assert (got[:3], got[BS:BS + 3], records) == (b"one", b"two", 2)


def test_a_cp_makes_the_records_obsolete(path: str) -> None:
    """Records written before a CP are still in the region; bound to the old root,
    they never replay onto the new one (which trimmed what they wrote)."""
    vol = opened(path, True)
    vol.write(0, b"old" * 1000)
    vol.sync()
    vol.trim(0, BS)
    vol.commit()
    crash(vol)
    got, records, _ = contents(path)
    assert records == 0 and not any(got[:BS])
    log = opened(path)
    try:
        assert log.log.records() == []
        stale = il.IntentLog(log.dev, BS, local_end(log.nblocks, BS),
                             log.sb.first_data_vbn - local_end(log.nblocks, BS))
        stale.token = 0
        assert stale.records() == []
    finally:
        log.close()


def test_rollback_discards_logged_writes(path: str) -> None:
    vol = opened(path, True)
    vol.write(0, b"snap")
    vol.create_snapshot("s")
    vol.write(0, b"gone")
    vol.sync()
    vol.rollback("s")
    crash(vol)
    got, records, _ = contents(path)
    assert got[:4] == b"snap" and records == 0


def test_full_receive_never_replays_onto_the_foreign_root(tmp_path: Path, path: str) -> None:
    src = Volume.create(open_device(str(tmp_path / "src.img"), write=True,
                                    create_size=16 * MiB), virtual_size=VSIZE)
    src.write(0, b"source")
    src.create_snapshot("a")
    buf = io.BytesIO()
    send_image(src, "a", buf)
    src.close()
    vol = opened(path, True)
    vol.write(BS, b"local, logged")
    vol.sync()
    crash(vol)
    receive_stream(io.BytesIO(buf.getvalue()), path, open_device,
                   force=True)
    got, records, _ = contents(path)
    assert got[:6] == b"source" and not any(got[BS:2 * BS]) and records == 0


def test_full_log_syncs_with_a_cp(path: str) -> None:
    vol = opened(path, True)
    gen, units = vol.generation, vol.log.capacity
    for i in range(units):                       # a 2-unit record each: the log fills
        vol.write(i * BS, os.urandom(BS))
        vol.sync()
    assert vol.generation > gen and vol.log.seq < units
    want = vol.read(0, VSIZE)
    crash(vol)
    assert contents(path)[0] == want


def test_many_changes_between_syncs_make_the_sync_a_cp(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past MAX_ENTRIES pending changes the log stops noting them (a record that
    large costs what a CP does, packed under the lock) and the sync commits."""
    monkeypatch.setattr(il, "MAX_ENTRIES", 8)
    vol = opened(path, True)
    gen = vol.generation
    for i in range(8):
        vol.write(2 * i * BS, os.urandom(BS))
    assert len(vol.log.entries) == 8 and not vol.log.overflow
    vol.write_blocks([17 * BS, 19 * BS], [os.urandom(BS), os.urandom(BS)])
    assert vol.log.overflow and not vol.log.entries
    vol.write(21 * BS, os.urandom(BS))                   # not noted: the sync commits
    vol.sync()
    assert vol.generation == gen + 1 and not vol.log.overflow
    vol.write(23 * BS, os.urandom(BS))
    vol.sync()                                           # a record again
    assert vol.generation == gen + 1 and vol.log.seq == 1
    want = vol.read(0, VSIZE)
    crash(vol)
    assert contents(path)[0] == want


def test_torn_last_record_is_ignored(path: str) -> None:
    vol = opened(path, True)
    vol.write(0, b"kept")
    vol.sync()
    pos = vol.log.pos
    vol.write(0, b"torn")
    vol.sync()
    off = vol.log.offset + pos * il.UNIT
    crash(vol)
    with open(path, "r+b") as f:                 # the data unit of the second record
        f.seek(off + il.UNIT + 100)
        f.write(b"\xff")
    got, records, _ = contents(path)
    assert got[:4] == b"kept" and records == 1


def test_record_whose_data_never_landed_is_not_replayed(path: str) -> None:
    """A pointer record whose blocks do not hold its data was never acknowledged
    (its fdatasync covered both): replay stops before it, check stays clean."""
    vol = opened(path, True)
    vol.write(0, b"A" * 100_000)
    vol.sync()
    vol.write(0, b"B" * 100_000)
    vbn = int(vol.lba.get(0, 1)[0, 0])
    vol.sync()
    crash(vol)
    with open(path, "r+b") as f:
        f.seek(vbn * BS)
        f.write(b"never landed")
    got, records, _ = contents(path)
    assert got[:100_000] == b"A" * 100_000 and records == 1


def test_check_finds_a_bad_record_followed_by_good_ones(path: str) -> None:
    vol = opened(path, True)
    vol.write(0, b"A" * 100_000)
    vbn = int(vol.lba.get(0, 1)[0, 0])
    vol.sync()
    vol.write(200_000, b"later")
    vol.sync()
    crash(vol)
    with open(path, "r+b") as f:
        f.seek(vbn * BS)
        f.write(b"damaged")
    vol = opened(path)
    try:
        report = check_volume(vol)
        assert not report.clean
        assert "acknowledged writes are lost" in report.problems[0]
    finally:
        vol.close()


def test_check_finds_a_damaged_record_followed_by_a_good_one(path: str) -> None:
    vol = opened(path, True)
    vol.write(0, b"one")
    vol.sync()
    pos = vol.log.pos
    vol.write(BS, b"two")
    vol.sync()
    vol.write(2 * BS, b"three")
    vol.sync()
    off = vol.log.offset + pos * il.UNIT
    crash(vol)
    with open(path, "r+b") as f:                 # the data of record 2: its head survives
        f.seek(off + il.UNIT + 1)
        f.write(b"\xff")
    vol = opened(path)
    try:
        assert vol.read(0, 3) == b"one" and not any(vol.read(BS, 2 * BS))
        report = check_volume(vol)
        assert report.problems == ["intent log record 2 is damaged, but record 3 follows "
                                   "it: acknowledged writes are lost"]
    finally:
        vol.close()


def test_replay_never_continues_into_an_abandoned_history(path: str) -> None:
    """Records 1-4 written; record 2 damaged, so a replay stops after 1 and the next
    session writes its own record 2 of the same size over it: the old record 3
    right behind it (same token, the next sequence number) must not be replayed,
    and check does not take old 3 and 4 for lost writes (they are another history)."""
    vol = opened(path, True)
    for i in range(4):
        vol.write(i * BS, bytes([65 + i]) * 100)
        vol.sync()
    crash(vol)
    with open(path, "r+b") as f:
        vol = opened(path)
        f.seek(vol.log.offset + 2 * il.UNIT + 1)     # record 2's data unit
        vol.close()
        f.write(b"\xff")
    vol = opened(path, True)
    assert vol.log.seq == 1
    vol.write(5 * BS, b"X" * 100)                    # its own record 2, two units again
    vol.sync()
    crash(vol)
    got, records, _ = contents(path)
    assert records == 2 and got[2 * BS] == got[3 * BS] == 0 and got[5 * BS] == ord("X")


def test_a_volume_without_log_region_syncs_with_a_cp(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Version 1 volumes (and images received from them) have no log region."""
    monkeypatch.setattr("blockxfer.volume.volume.reserved_blocks", local_end)
    p = str(tmp_path / "v1.img")
    vol = Volume.create(open_device(p, write=True, create_size=16 * MiB), virtual_size=VSIZE)
    assert not vol.log.enabled
    gen = vol.generation
    vol.write(0, b"durable")
    vol.sync()
    assert vol.generation == gen + 1
    crash(vol)
    assert contents(p)[0][:7] == b"durable"


def _record(buf: mmap.mmap | None = None) -> bytes:
    root = RootRecord(7, 1_700_000_000_000_000_000, ObjectRef(10, 0xAB, 100, 2),
                      ObjectRef(11, 0xCD, 1, 1), ObjectRef(12, 0xEF, 300, 1))
    token = il.root_token(bytes(range(16)), root)
    ptrs = np.array([[40, 0x1111], [41, 0x2222]], dtype=np.uint64)
    entries = [il.Entry(3, 1, il.INLINE, ptrs[:1], b"\xa5" * BS),
               il.Entry(10, 2, il.POINTER, ptrs),
               il.Entry(20, 5, il.UNMAP)]
    return bytes(il.pack_record(token, 1, 7, 0, entries, BS, buf))


def test_a_reused_record_buffer_gives_the_same_bytes() -> None:
    """The log packs each record into the buffer of the one before (no mmap per
    FLUSH): whatever that buffer held, the bytes are those of a fresh one."""
    buf = mmap.mmap(-1, 8 * il.UNIT)
    buf.write(b"\xff" * len(buf))
    assert _record(buf) == _record()


def test_one_record_buffer_serves_every_small_record(path: str) -> None:
    vol = opened(path, True)
    want = [os.urandom(BS) for _ in range(3)]
    for k, raw in enumerate(want):
        vol.write(k * BS, raw)
        vol.sync()
        if k == 0:
            kept = vol.log._buf
    assert kept is not None and vol.log._buf is kept
    crash(vol)
    disk, records, _ = contents(path)
    assert records == 3 and disk[:3 * BS] == b"".join(want)


def test_record_golden_bytes() -> None:
    raw = _record()
    path = DATA / "intentlog-record-v2.bin"
    if not path.exists():                   # first run writes it; commit it
        path.write_bytes(raw)
    assert path.read_bytes() == raw, "the intent log record layout changed: bump the " \
        "volume format version and document it in docs/volume-format.md"
    view = memoryview(bytearray(raw))
    assert il.verify(view)
    entries = il.parse_record(view, BS)
    assert [(e.vblock, e.count, e.kind) for e in entries] == [(3, 1, 1), (10, 2, 2), (20, 5, 3)]
    assert entries[0].data == b"\xa5" * BS
    view[200] ^= 1
    assert not il.verify(view)


def test_inline_data_beyond_the_limit_becomes_pointers_once(
        path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past INLINE_LIMIT the pending entries turn into pointers; each conversion
    looks only at the entries added since the last one, and the record still
    replays every write."""
    monkeypatch.setattr(il, "INLINE_LIMIT", 2 * BS)
    vol = opened(path, True)
    want = {k: os.urandom(BS) for k in range(0, 20, 2)}
    for k, raw in want.items():
        vol.write(k * BS, raw)
    assert [e.kind for e in vol.log.entries] == [il.POINTER] * 9 + [il.INLINE]
    assert vol.log._inline_from == 9
    vol.sync()
    crash(vol)
    disk, records, _ = contents(path)
    assert records == 1
    assert all(disk[k * BS:(k + 1) * BS] == raw for k, raw in want.items())


def _slow_flush(vol: Volume, started: threading.Event, delay: float = 0.3) -> None:
    real = vol.dev.flush

    def flush() -> None:
        started.set()
        time.sleep(delay)
        real()
    vol.dev.flush = flush  # type: ignore[method-assign]  # patched on purpose


def test_group_commit_writes_go_on_and_waiting_syncs_share_a_record(path: str) -> None:
    """A sync writes its record and fdatasyncs outside the volume lock: a write
    meanwhile does not wait for the device, and the syncs that arrive meanwhile
    share the next record (one fdatasync for all of them). Every write reads back
    after a crash."""
    vol = opened(path, True)
    first = os.urandom(BS)
    vol.write(0, first)
    started = threading.Event()
    _slow_flush(vol, started)
    syncer = threading.Thread(target=vol.sync)
    syncer.start()
    assert started.wait(5)
    t = time.monotonic()
    later = {k: os.urandom(BS) for k in (3, 5, 7)}
    for k, raw in later.items():
        vol.write(k * BS, raw)                 # while the first record is in flight
    assert time.monotonic() - t < 0.2
    seq = vol.log.seq
    others = [threading.Thread(target=vol.sync) for _ in later]
    for th in others:
        th.start()
    for th in [syncer, *others]:
        th.join(10)
    assert vol.log.seq == seq + 1              # one record for the three waiting syncs
    crash(vol)
    disk, records, _ = contents(path)
    assert records == 2 and disk[:BS] == first
    assert all(disk[k * BS:(k + 1) * BS] == raw for k, raw in later.items())


def test_a_cp_waits_for_the_record_in_flight(path: str) -> None:
    """A CP starts the log over: it must not run while a record is being written
    (a late record could land on the new log's records)."""
    vol = opened(path, True)
    vol.write(0, os.urandom(BS))
    started = threading.Event()
    _slow_flush(vol, started)
    done: list[str] = []
    def sync() -> None:
        vol.sync()
        done.append("sync")
    syncer = threading.Thread(target=sync)
    syncer.start()
    assert started.wait(5)
    vol.write(BS, os.urandom(BS))
    vol.commit()
    done.append("cp")
    syncer.join(10)
    assert done == ["sync", "cp"]
    vol.write(2 * BS, b"z" * BS)
    vol.sync()
    want = vol.read(0, 3 * BS)
    crash(vol)
    disk, records, _ = contents(path)
    assert records == 1 and disk[:3 * BS] == want


def test_sync_ahead_writes_the_record_the_next_sync_would(path: str) -> None:
    """A record written ahead is a whole sync: durable, replayed after a crash, and
    the sync that follows finds nothing left to write."""
    vol = opened(path, True)
    raw = os.urandom(BS)
    vol.write(3 * BS, raw)
    vol.sync_ahead()
    assert vol.log.seq == 1 and not vol.log.entries
    vol.sync()
    assert vol.log.seq == 1                    # nothing new: no second record
    crash(vol)
    disk, records, _ = contents(path)
    assert records == 1 and disk[3 * BS:4 * BS] == raw


def test_sync_ahead_leaves_to_the_sync_what_it_must_wait_for(path: str) -> None:
    """Nothing written ahead when the record would point at data still on its way
    (a large write), when only a CP would do (a full log), or while a sync is at
    work: the sync does those, and nobody waits on the way."""
    vol = opened(path, True)
    vol.write(0, os.urandom(200_000))          # a pointer entry: the sync drains first
    vol.sync_ahead()
    assert vol.log.seq == 0 and vol.log.entries
    vol.sync()
    assert vol.log.seq == 1
    vol.log.overflow = True                    # as when the region is full
    gen = vol.generation
    vol.sync_ahead()
    assert vol.generation == gen               # no CP
    vol.sync()
    assert vol.generation == gen + 1 and not vol.log.overflow
    vol.write(BS, b"x" * BS)
    with vol._log_lock:                        # a sync holds the log
        t = time.monotonic()
        vol.sync_ahead()
        assert time.monotonic() - t < 0.1 and vol.log.entries
    vol.sync()
    assert not vol.log.entries
    vol.close()


def test_sync_ahead_on_a_read_only_or_failed_volume(path: str) -> None:
    vol = opened(path)
    vol.sync_ahead()                           # read-only: nothing to do
    vol.close()
    vol = opened(path, True)
    vol.write(0, b"y" * BS)
    vol._failed = "writing the intent log failed (test)"
    with pytest.raises(VolumeError, match="reopen the volume"):
        vol.sync_ahead()
    crash(vol)
