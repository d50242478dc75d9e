"""Races of a receive into an open volume (a middle host of a replication tree: it
receives from its parent while it answers its children, or a served volume): a send
that starts after the receive began, a commit between a send's plan and its hold,
local allocations meanwhile, and the receive's progress written by the volume (its
properties) before the blocks it names are on the device. Each is made to happen
deterministically (threads, events, a device holding back writes)."""

from __future__ import annotations

import io
import os
import random
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from blockxfer.device import BlockDevice
from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import NotFound, StreamError, VolumeError
from blockxfer.service.ops import VolumeOps
from blockxfer.stream import format as fmt
from blockxfer.stream import receive as recv
from blockxfer.stream.decode import Data, Dealloc, StreamReader
from blockxfer.stream.receive import incoming
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume
from blockxfer.volume.local import LocalArea
from blockxfer.volume.receiver import Receiver
from blockxfer.volume.superblock import read_superblock_slot
from tests.test_receiver import MiB, make_source, receive, stream


@pytest.fixture
def dooming(tmp_path: Path) -> Iterator[tuple[Volume, str, bytes]]:
    """dst holds a and b; the source dropped a and reused its blocks for d: the stream
    `d - b` releases a at dst and writes over blocks only a holds there."""
    src = make_source(str(tmp_path / "src.img"))
    dst = str(tmp_path / "dst.img")
    receive(dst, stream(src, "a"))
    receive(dst, stream(src, "b - a"))
    src.destroy_snapshot("a")
    src.close()                             # reopened, it allocates from the start again
    src = Volume.open(open_device(str(tmp_path / "src.img"), write=True))
    rng = random.Random(5)
    src.write(0, rng.randbytes(4 * MiB))
    src.create_snapshot("d")
    data = stream(src, "d - b")
    t = Volume.open(open_device(dst), writable=False)
    only_a = t.plane("a") & ~t.plane("b")
    t.close()
    assert any(only_a.count(1, r.vbn, r.vbn + r.count) for r in _data(data)), \
        "the test needs a stream writing over blocks only a holds"
    yield src, dst, data
    src.close()


def _data(data: bytes) -> list[Data]:
    return [r for r in StreamReader(io.BytesIO(data), "s") if isinstance(r, Data)]


def _receiver(t: Volume, data: bytes, *, resume: bool = False) -> Receiver:
    h = StreamReader(io.BytesIO(data), "s").read_header()
    if resume:
        h.flags |= fmt.H_RESUMING
    r = t.receiver(incoming(h))
    r.begin(resume=resume)
    return r


def _place_all(r: Receiver, data: bytes) -> None:
    reader = StreamReader(io.BytesIO(data), "s")
    reader.read_header()
    for rec in reader:
        if isinstance(rec, Data):
            if r.received.count(1, rec.vbn, rec.vbn + rec.count) == 0:
                r.place(rec.vbn, rec.count, rec.payload, f"record {rec.seq}")
        elif isinstance(rec, Dealloc):
            r.apply_deallocations(rec.runs)


def _whole(t: Volume, snap: str) -> bytes:
    return t.read(0, t.virtual_size, snapshot=snap)


def test_a_send_begun_after_the_receive_keeps_its_blocks(
        dooming: tuple[Volume, str, bytes]) -> None:
    """The receive computed what it releases when it began; a send of `a` starting
    after that must not have `a`'s blocks overwritten under it: the receive stops
    (its progress kept) instead, and completes once the send has ended."""
    src, dst, data = dooming
    t = Volume.open(open_device(dst, write=True))
    try:
        want = _whole(t, "a")
        r = _receiver(t, data)
        with t.holding([t.resolve("a")]):              # a child's pull of a, say
            with pytest.raises(StreamError, match="'a', which this stream releases, is being "
                                                  "sent from here"):
                _place_all(r, data)
            assert _whole(t, "a") == want
        r.close()
        out = recv.receive_into(io.BytesIO(data), t)
        assert out.top == "d" and "a" in out.released
        assert _whole(t, "d") == src.read(0, src.virtual_size, snapshot="d")
        assert check_volume(t).clean
    finally:
        t.close()


def test_a_snapshot_whose_blocks_are_being_reused_is_offered_to_nobody(
        dooming: tuple[Volume, str, bytes]) -> None:
    """Once the receive wrote over `a`'s blocks, `a` is no longer listed, resolved or
    held (a send of it would read the new blocks), though the root in force still
    names it until the commit; a reopen after an abandoned receive agrees."""
    _, dst, data = dooming
    t = Volume.open(open_device(dst, write=True))
    try:
        a = t.resolve("a")
        r = _receiver(t, data)
        _place_all(r, data)
        assert "a" not in t.snapshot_names()
        with pytest.raises(NotFound):
            t.resolve("a")
        with pytest.raises(VolumeError, match="being released by a receive"), t.holding([a]):
            pass
        r.close()                                        # abandoned
        assert "a" not in t.snapshot_names()
    finally:
        t.close()
    t = Volume.open(open_device(dst), writable=False)
    try:
        assert "a" not in t.snapshot_names()
    finally:
        t.close()


class _NotingLock:
    """A lock that notes when the thread named `who` first tries to take it."""

    def __init__(self, who: str) -> None:
        self._lock, self._who, self.tried = threading.Lock(), who, threading.Event()

    def __enter__(self) -> None:
        if threading.current_thread().name == self._who:
            self.tried.set()
        self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()


class _WaitingOutput(io.BytesIO):
    """A send's output whose writes wait for the rival thread to end: the send, and
    its hold, last until the rival has tried (a rival that got the lock after a
    whole send had ended would rightly succeed; under load that happened)."""

    def __init__(self, outcome: dict[str, object]) -> None:
        super().__init__()
        self.outcome = outcome

    def write(self, b: Any) -> int:
        th = self.outcome.get("thread")
        if isinstance(th, threading.Thread):
            th.join(60)
        return super().write(b)


def test_a_commit_between_a_sends_plan_and_its_hold_waits(
        dooming: tuple[Volume, str, bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """A send through the volume's lock plans `a`, then holds it: a receive releasing
    `a` that runs in between (its setup and commit take the same lock) must find `a`
    held already, so the send streams `a` as it was."""
    _, dst, data = dooming
    t = Volume.open(open_device(dst, write=True))
    try:
        want = _whole(t, "a")
        lock = _NotingLock("rival")
        ops = VolumeOps(t, lock=lock)
        outcome: dict[str, object] = {}

        def rival() -> None:
            try:
                outcome["result"] = recv.receive_into(io.BytesIO(data), t, lock=lock)
            except StreamError as e:
                outcome["error"] = e
        hold = t.holding

        def late_hold(entries: Any) -> Any:
            th = threading.Thread(target=rival, name="rival")
            th.start()
            # the rival at the lock, not merely started: under load a thread that had
            # not run yet within a fixed wait received after the whole send, and won
            assert lock.tried.wait(60), "the rival never reached the volume's lock"
            th.join(1.0)           # done at once if the send's lock is no longer held
            outcome["thread"] = th
            return hold(entries)
        monkeypatch.setattr(t, "holding", late_hold)
        out = _WaitingOutput(outcome)
        ops.send(out, "a")
        th = outcome["thread"]
        assert isinstance(th, threading.Thread)
        th.join()
        assert isinstance(outcome.get("error"), StreamError), outcome
        copy = str(Path(dst).parent / "copy.img")
        recv.receive_stream(io.BytesIO(out.getvalue()), copy, open_device)
        c = Volume.open(open_device(copy), writable=False)
        try:
            assert _whole(c, "a") == want
        finally:
            c.close()
    finally:
        t.close()


def test_blocks_allocated_here_during_a_receive_are_not_overwritten(tmp_path: Path) -> None:
    """A served volume written while it receives: a block its allocator hands out
    after the receive began is refused to the stream, so the local data stays."""
    src = make_source(str(tmp_path / "src.img"))
    dst = str(tmp_path / "dst.img")
    receive(dst, stream(src, "a"))
    data = stream(src, "b - a")
    src.close()
    t = Volume.open(open_device(dst, write=True))
    try:
        r = _receiver(t, data)
        local = os.urandom(2 * MiB)
        t.write(0, local)                        # data goes to free blocks at once
        with pytest.raises(StreamError, match="allocated here after the receive began"):
            _place_all(r, data)
        r.close()
        assert t.read(0, len(local)) == local
    finally:
        t.close()


def _interrupted_after_one_record(tmp_path: Path) -> tuple[str, bytes, Data]:
    """dst holds a; the receive of `b - a` into it placed its first record, saved
    its progress and was cut off there."""
    src = make_source(str(tmp_path / "src.img"))
    dst = str(tmp_path / "dst.img")
    receive(dst, stream(src, "a"))
    data = stream(src, "b - a")
    src.close()
    first = _data(data)[0]
    t = Volume.open(open_device(dst, write=True))
    r = _receiver(t, data)
    r.place(first.vbn, first.count, first.payload, "record")
    r.save_progress()
    r.close()
    t.close()
    return dst, data, first


def test_a_resumed_receive_claims_the_blocks_it_placed_before(tmp_path: Path) -> None:
    """Blocks an interrupted receive placed are free in the committed state; when it
    resumes in an open volume, no local allocation may take them."""
    dst, data, first = _interrupted_after_one_record(tmp_path)
    t = Volume.open(open_device(dst, write=True))
    try:
        r = _receiver(t, data, resume=True)
        placed = r.received.copy()
        assert placed.count() == first.count
        before = t.active.bits.copy()
        t.write(0, os.urandom(4 * MiB))
        assert not (t.active.bits & ~before & placed).any()
        r.close()
    finally:
        t.close()


def test_a_resume_over_blocks_allocated_here_since_starts_over(tmp_path: Path) -> None:
    """Blocks of an interrupted receive taken by a local write before it resumed
    hold other data now: the resume is refused and its progress dropped, so the
    next attempt sends the stream whole."""
    dst, data, first = _interrupted_after_one_record(tmp_path)
    t = Volume.open(open_device(dst, write=True))   # a served replica written, say
    t.write(0, os.urandom(4 * MiB))                  # takes the blocks placed
    assert t.active.bits.count(1, first.vbn, first.vbn + first.count)
    try:
        with pytest.raises(StreamError, match="without resuming"):
            _receiver(t, data, resume=True)
        assert not LocalArea(t.dev, t.block_size, t.nblocks).read(t.generation).pending
    finally:
        t.close()


class HeldBackDevice:
    """A device whose writes at or beyond `from_byte` wait until `go` is set (the data
    region: what a process killed meanwhile never wrote), the rest passing through."""

    def __init__(self, dev: BlockDevice, from_byte: int) -> None:
        self._dev, self.from_byte, self.go = dev, from_byte, threading.Event()
        self.path, self.size = dev.path, dev.size
        self.logical_block_size = dev.logical_block_size
        self.physical_block_size = dev.physical_block_size

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        self._dev.pread(buf, offset)

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None:
        if offset >= self.from_byte:
            assert self.go.wait(30)
        self._dev.pwrite(data, offset)

    def flush(self) -> None:
        self._dev.flush()

    def discard(self, offset: int, length: int) -> None:
        self._dev.discard(offset, length)

    def close(self) -> None:
        self._dev.close()


def test_a_property_write_never_records_blocks_not_yet_written(tmp_path: Path) -> None:
    """A resumed receive into an open volume while the volume writes a property (a
    child's pull recording itself on a middle host): the local state on the device
    may name as received only blocks already written there, or a kill and a resume
    would commit blocks that never arrived."""
    src = make_source(str(tmp_path / "src.img"))
    dst = str(tmp_path / "dst.img")
    receive(dst, stream(src, "a"))
    data = stream(src, "b - a")
    want = src.read(0, src.virtual_size, snapshot="b")
    src.close()
    records = _data(data)
    assert len(records) >= 2
    t = Volume.open(open_device(dst, write=True))
    r = _receiver(t, data)
    r.place(records[0].vbn, records[0].count, records[0].payload, "record")
    r.save_progress()
    r.close()
    t.close()
    raw = open_device(dst, write=True)
    dev = HeldBackDevice(raw, read_superblock_slot(raw)[0].first_data_vbn * 4096)
    t = Volume.open(dev)
    try:
        r = _receiver(t, data, resume=True)
        second = records[1]
        r.place(second.vbn, second.count, second.payload, "record")   # not written yet
        t.set_property("replicate.dests", b"{}")
        on_disk = LocalArea(dev, t.block_size, t.nblocks).read(t.generation)
        assert on_disk.props.get("replicate.dests") == b"{}"
        assert on_disk.received is not None
        assert not on_disk.received.count(1, second.vbn, second.vbn + second.count)
        dev.go.set()
        _place_all(r, data)
        r.commit()
        r.close()
        assert _whole(t, "b") == want
        assert check_volume(t).clean
    finally:
        dev.go.set()
        t.close()
