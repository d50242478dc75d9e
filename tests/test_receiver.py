"""The volume's receive-side API (blockxfer/volume/receiver.py): deallocations,
a receive into an open volume, rollback, what survives progress saves, and that
only the volume writes superblocks."""

from __future__ import annotations

import io
import os
import random
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import StreamError, VolumeError
from blockxfer.stream import receive as recv
from blockxfer.stream.decode import Data, Dealloc, StreamReader
from blockxfer.stream.receive import incoming, receive_stream
from blockxfer.stream.send import send_image
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume

MiB = 1 << 20
BS = 4096


def make_source(path: str) -> Volume:
    """Three snapshots, each overwriting part of the one before (so `b - a` frees)."""
    vol = Volume.create(open_device(path, write=True, create_size=24 * MiB),
                        virtual_size=16 * MiB)
    rng = random.Random(3)
    for name in ("a", "b", "c"):
        vol.write(0, rng.randbytes(2 * MiB))
        vol.write(rng.randrange(8) * MiB, rng.randbytes(512 * 1024))
        vol.create_snapshot(name)
    return vol


def stream(vol: Volume, expression: str) -> bytes:
    buf = io.BytesIO()
    send_image(vol, expression, buf)
    return buf.getvalue()


def receive(path: str, data: bytes) -> recv.ReceiveResult:
    return receive_stream(io.BytesIO(data), path, open_device)


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[tuple[Volume, str]]:
    src = make_source(str(tmp_path / "src.img"))
    dst = str(tmp_path / "dst.img")
    receive(dst, stream(src, "a"))
    yield src, dst
    src.close()


def dealloc_runs(data: bytes) -> list[tuple[int, int]]:
    return [run for rec in StreamReader(io.BytesIO(data), "s") if isinstance(rec, Dealloc)
            for run in rec.runs]


def test_deallocated_blocks_are_free_once_no_kept_snapshot_holds_them(
        pair: tuple[Volume, str]) -> None:
    src, dst = pair
    b_a = stream(src, "b - a")
    freed = dealloc_runs(b_a)
    assert freed, "the test needs a stream that deallocates"
    receive(dst, b_a)
    src.destroy_snapshot("a")
    receive(dst, stream(src, "c - b"))              # the source released a
    t = Volume.open(open_device(dst, write=True))
    try:
        busy = t.active.bits | t.pinned()
        for vbn, count in freed:
            assert not busy.count(1, vbn, vbn + count), (vbn, count)
        before = t.free_blocks()
        t.write(0, os.urandom(BS))                      # and the allocator hands them out
        assert t.free_blocks() == before - 1
        assert check_volume(t).clean
    finally:
        t.close()


def test_deallocation_of_a_block_the_top_uses_is_refused(pair: tuple[Volume, str]) -> None:
    src, dst = pair
    data = stream(src, "b - a")
    t = Volume.open(open_device(dst, write=True))
    gen = t.generation
    r = t.receiver(incoming(StreamReader(io.BytesIO(data), "s").read_header()))
    r.begin(resume=False)
    reader = StreamReader(io.BytesIO(data), "s")
    reader.read_header()
    used = None
    for rec in reader:
        if isinstance(rec, Data):
            r.place(rec.vbn, rec.count, rec.payload, f"record {rec.seq}")
            used = rec.vbn
    assert used is not None
    r.apply_deallocations([(used, 1)])                  # the top's own block
    with pytest.raises(StreamError, match=f"deallocates block {used}"):
        r.commit()
    r.close()
    t.io.close()
    t.dev.close()
    t = Volume.open(open_device(dst), writable=False)
    assert t.generation == gen and t.snapshot_names() == ["a"]
    t.close()


def test_receive_into_an_open_volume(pair: tuple[Volume, str]) -> None:
    """The volume a server holds open takes an incremental and goes on from it."""
    src, dst = pair
    data = stream(src, "b - a")
    t = Volume.open(open_device(dst, write=True))
    try:
        t.track_changes()
        r = t.receiver(incoming(StreamReader(io.BytesIO(data), "s").read_header()))
        r.begin(resume=False)
        reader = StreamReader(io.BytesIO(data), "s")
        reader.read_header()
        for rec in reader:
            if isinstance(rec, Data):
                r.place(rec.vbn, rec.count, rec.payload, f"record {rec.seq}")
            elif isinstance(rec, Dealloc):
                r.apply_deallocations(rec.runs)
        r.commit()
        r.close()
        allocated, _ = t.changes()                      # mark-on-allocate saw the receive
        assert (r.received & ~allocated).count() == 0
        assert t.snapshot_names() == ["a", "b"]
        assert t.read(0, t.virtual_size, snapshot="b") == src.read(0, src.virtual_size,
                                                                   snapshot="b")
        assert t.read(0, t.virtual_size) == src.read(0, src.virtual_size, snapshot="b")
        t.create_snapshot("local")                      # it goes on as a volume
        assert check_volume(t).clean
    finally:
        t.close()


def test_claimed_blocks_are_not_allocated(pair: tuple[Volume, str]) -> None:
    _, dst = pair
    t = Volume.open(open_device(dst, write=True))
    try:
        free = t.free_blocks()
        start = t.active.bits.find(0, t.sb.first_data_vbn)
        t.claim(start, start + 4, t.busy_now())
        assert t.free_blocks() == free - 4
        t.write(0, os.urandom(4 * BS))
        assert not t.active.bits.count(1, start, start + 4)
        t.release_claims()
    finally:
        t.close()


def test_rollback_to_a_snapshot(tmp_path: Path) -> None:
    vol = make_source(str(tmp_path / "v.img"))
    try:
        want = vol.read(0, vol.virtual_size, snapshot="b")
        c = vol.read(0, vol.virtual_size, snapshot="c")
        vol.write(MiB, os.urandom(3 * MiB))              # the active state moves on
        vol.commit()
        free = vol.free_blocks()
        vol.rollback("b")
        assert vol.read(0, vol.virtual_size) == want
        assert vol.free_blocks() > free                   # what was written since is free
        assert vol.read(0, vol.virtual_size, snapshot="c") == c
        assert check_volume(vol).clean
        vol.write(0, b"x" * BS)                            # and it takes writes again
        vol.commit()
        assert check_volume(vol).clean
    finally:
        vol.close()
    vol = Volume.open(open_device(str(tmp_path / "v.img")), writable=False)
    try:
        assert vol.read(BS, vol.virtual_size - BS) == want[BS:]
    finally:
        vol.close()


def test_rollback_refuses_a_shadow_snapshot(tmp_path: Path) -> None:
    vol = make_source(str(tmp_path / "v.img"))
    try:
        vol.create_snapshot("sh", shadow=True)
        with pytest.raises(VolumeError, match="shadow"):
            vol.rollback("sh")
        with pytest.raises(VolumeError, match="no snapshot"):
            vol.rollback("nosuch")
    finally:
        vol.close()


def test_incomplete_snapshots_survive_progress_saves(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A receive long enough to save its progress still records which snapshots are
    incomplete here (the commit's local state once lost to an older save)."""
    src = make_source(str(tmp_path / "src.img"))
    data = stream(src, "c")
    src.close()
    monkeypatch.setattr(recv, "PERSIST_EVERY", 1)
    dst = str(tmp_path / "dst.img")
    res = receive(dst, data)
    assert set(res.incomplete) == {"a", "b"}
    t = Volume.open(open_device(dst), writable=False)
    try:
        assert {e.name for e in t.snapshots() if e.incomplete} == {"a", "b"}
        with pytest.raises(VolumeError, match="incomplete"):
            t.read(0, BS, snapshot="a")
    finally:
        t.close()


def test_only_the_volume_writes_superblocks() -> None:
    root = Path(__file__).resolve().parent.parent
    volume = root / "blockxfer" / "volume"
    offenders = []
    for path in [*(root / "blockxfer").rglob("*.py"), *(root / "drivers").rglob("*.py")]:
        if path.is_relative_to(volume):
            continue
        text = path.read_text()
        if re.search(r"write_superblock|Superblock\(|\.commit_foreign_root", text):
            offenders.append(str(path.relative_to(root)))
    assert offenders == []


def test_commit_waits_for_a_send_of_a_snapshot_it_releases(pair: tuple[Volume, str]) -> None:
    """A middle host sending `a` to a child while its parent's stream releases `a`: the
    commit is refused (the blocks received are kept for a resume), `a` stays whole,
    and the next attempt after the send commits."""
    src, dst = pair
    receive(dst, stream(src, "b - a"))
    before = src.read(0, src.virtual_size, snapshot="a")
    src.destroy_snapshot("a")
    data = stream(src, "c - b")
    t = Volume.open(open_device(dst, write=True))
    try:
        with t.holding([t.resolve("a")]):
            with pytest.raises(StreamError, match="'a', which this stream releases"):
                recv.receive_into(io.BytesIO(data), t)
            saved = t.local_area.read(t.generation)          # what a resume starts from
            assert saved.pending and saved.received is not None and saved.received.count()
            assert t.snapshot_names() == ["a", "b"]
            assert t.read(0, t.virtual_size, snapshot="a") == before
        out = recv.receive_into(io.BytesIO(data), t)
        assert out.top == "c" and "a" in out.released and "c" in t.snapshot_names()
        assert check_volume(t).clean
    finally:
        t.close()
