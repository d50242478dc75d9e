"""Receiving a stream onto a target: blocks at the same VBNs, the root written last.

Atomicity: data lands only in VBNs free in the target's committed state (for an
incremental: not in its active plane nor in any snapshot it keeps), and the new
superblock is the last write. A stream cut short or damaged leaves the target at
its previous state; the VBNs received so far are kept in the local area, and the
error carries a resume token.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
from bitarray import bitarray

from blockxfer.device import BlockDevice
from blockxfer.errors import BlockxferError, FormatError, StreamError, VolumeError
from blockxfer.volume import Volume, has_signature
from blockxfer.volume.layout import Superblock
from blockxfer.volume.local import LocalArea, LocalState
from blockxfer.volume.objects import empty_plane
from blockxfer.volume.receiving import (
    InterruptedReceive,
    ReceivingMarker,
    begin_overwrite,
    read_receiving_marker,
)
from blockxfer.volume.volume import read_superblock_slot, reserved_blocks, write_superblock

from . import format as fmt
from .decode import Data, StreamReader
from .io import ByteSource, SeekableSource
from .send import make_token

OpenDevice = Callable[..., BlockDevice]      # (path, write=, create_size=) -> device
PERSIST_EVERY = 64 << 20                      # bytes between saves of the received plane


@dataclass
class ReceiveResult:
    top: str
    incremental: bool
    blocks: int
    released: list[str] = field(default_factory=list)
    incomplete: list[str] = field(default_factory=list)
    resumed: bool = False


class _Target:
    """The target device, its committed state and what a stream may write there."""

    def __init__(self, dev: BlockDevice, h: fmt.Header, vol: Volume | None):
        self.dev, self.h, self.vol = dev, h, vol
        self.area = LocalArea(dev, h.block_size, h.nblocks)
        self.slot = vol.slot if vol else 1
        self.local = vol.local if vol else self.area.read(0)
        if vol:
            self.area.slot = vol.local_area.slot
        bits_per_block = 8 * h.block_size
        self.nbits = -(-h.nblocks // bits_per_block) * bits_per_block
        self.busy, self.valid = self._planes()
        self.touched = False                  # a full receive has begun to overwrite it

    def _planes(self) -> tuple[bitarray, bitarray]:
        """Blocks the target still uses (no stream block may land there), and blocks
        it holds valid (the complete snapshots it keeps), each plane loaded once. The
        blocks an incomplete snapshot lacks hold nothing here: a stream may fill them."""
        busy, valid = empty_plane(self.nbits), empty_plane(self.nbits)
        busy[:self.h.first_data_vbn] = 1
        busy[self.h.nblocks:] = 1
        if self.vol is not None:
            keep = {s.guid for s in self.h.snapshot_set}
            busy |= self.vol.active.bits
            for e in self.vol.snapshots():
                if e.guid in keep and not e.shadow and not e.incomplete:
                    valid |= self.vol.plane(e.name)
            busy |= valid
        return busy, valid


def _open_target(path: str, h: fmt.Header, open_device: OpenDevice, force: bool,
                 name: str) -> tuple[BlockDevice, Volume | None]:
    size = h.nblocks * h.block_size
    if h.incremental and not os.path.exists(path):
        assert h.base is not None
        raise StreamError(f"{path} does not exist; this incremental stream needs a target "
                          f"holding base snapshot {h.base.name!r}: receive a full stream first")
    dev = open_device(path, write=True, create_size=None if os.path.exists(path) else size)
    try:
        if dev.size < size:
            raise VolumeError(f"{path} is too small for this stream: {dev.size} bytes, "
                              f"it needs {size}")
        if h.incremental:
            try:
                vol = Volume.open(dev)
            except FormatError as e:
                assert h.base is not None
                raise StreamError(f"{e}; this incremental stream needs base snapshot "
                                  f"{h.base.name!r} there") from e
            return dev, _check_incremental(vol, h, path)
        return dev, _check_full(dev, h, path, force)
    except BaseException:
        dev.close()
        raise


def _check_full(dev: BlockDevice, h: fmt.Header, path: str, force: bool) -> Volume | None:
    pending = LocalArea(dev, h.block_size, h.nblocks).read(0)
    if h.flags & fmt.H_RESUMING and pending.pending and pending.stream_id == h.stream_id:
        return None                          # resuming this very receive
    marker = read_receiving_marker(dev)
    if marker is not None and marker.stream_id == h.stream_id:
        return None                          # the same stream again, after an interruption
    found = has_signature(dev)
    if found and not force:
        raise VolumeError(f"{path} already holds {found}; use --force to overwrite it")
    return None


def _check_incremental(vol: Volume, h: fmt.Header, path: str) -> Volume:
    assert h.base is not None
    if vol.sb.uuid != h.volume_uuid:
        raise StreamError(f"this stream is for volume {_uuid(h.volume_uuid)}, but {path} is "
                          f"volume {vol.uuid}")
    base = next((e for e in vol.snapshots() if e.guid == h.base.guid), None)
    if base is None or base.incomplete:
        state = "is incomplete" if base else "is missing"
        raise StreamError(f"{path} cannot take this incremental: its base snapshot "
                          f"{h.base.name!r} {state} there; receive {h.base.name!r} first")
    newest = max((e.generation for e in vol.snapshots()), default=-1)
    if vol.generation != newest:
        raise StreamError(f"{path} was changed after it received its newest snapshot; "
                          "receive a full stream with --force to start over")
    if h.root.generation <= vol.generation:
        raise StreamError(f"this stream's top {h.top.name!r} is not newer than what {path} "
                          "holds")
    return vol


def _uuid(raw: bytes) -> str:
    import uuid
    return str(uuid.UUID(bytes=raw))


def receive_stream(f: ByteSource, path: str, open_device: OpenDevice, *, force: bool = False,
                   seekable: bool = False, source_hint: str = "SOURCE",
                   retry: str | None = None,
                   progress: Callable[[int], None] | None = None) -> ReceiveResult:
    """Apply a stream to the volume (or new volume) at `path`. With `seekable` (`f` is
    then a SeekableSource) a full stream is verified whole before anything is written.
    `retry`, when given, replaces the resume hint of a failure (a source that cannot
    `send --resume`)."""
    reader = StreamReader(f, "stream")
    h = reader.read_header()
    if seekable and isinstance(f, SeekableSource) and not h.incremental:
        _verify_rest(reader)
        f.seek(0)
        reader = StreamReader(f, "stream")
        reader.read_header()
    created = not os.path.exists(path)
    dev, vol = _open_target(path, h, open_device, force, path)
    t: _Target | None = None
    try:
        t = _Target(dev, h, vol)
        return _receive(reader, h, t, progress)
    except _Cut as cut:
        how = retry or (f"resume with blockxfer send {source_hint} \"{h.expression}\" "
                        f"--resume {cut.token}")
        state = _state_after(path, h, t, created, removable=retry is not None)
        raise StreamError(f"{cut.cause}; {state}, {cut.kept} of {h.image_blocks} blocks "
                          f"received; {how}") from cut.cause
    except BlockxferError as e:
        if t is None or not t.touched:
            raise
        state = _state_after(path, h, t, created, removable=True)
        raise type(e)(f"{e}; {state}") from e
    finally:
        if vol is not None:
            vol.io.close()
        dev.close()


class _Cut(Exception):
    """The stream failed after blocks were placed: what a resume needs to know."""

    def __init__(self, cause: BaseException, token: str, kept: int):
        super().__init__(str(cause))
        self.cause, self.token, self.kept = cause, token, kept


def _state_after(path: str, h: fmt.Header, t: _Target | None, created: bool,
                 removable: bool) -> str:
    """What a failed receive left at `path`, for the error's one line. A file this
    receive created is removed when nothing could resume into it."""
    if t is None or t.vol is not None:
        return "the target is unchanged"
    if created and removable and os.path.isfile(path):
        os.remove(path)
        return f"the target is unchanged ({path} did not exist and was removed)"
    return (f"{path} holds an interrupted receive of stream {h.stream_id.hex()} "
            "(its old contents were overwritten; 'blockxfer info' shows it)")


def _verify_rest(reader: StreamReader) -> None:
    for _ in reader:
        pass


def _receive(reader: StreamReader, h: fmt.Header, t: _Target,
             progress: Callable[[int], None] | None) -> ReceiveResult:
    from blockxfer.volume.blockio import BlockIO

    st, resumed = t.local, False
    if h.flags & fmt.H_RESUMING:
        if not (st.pending and st.stream_id == h.stream_id and st.received is not None):
            raise StreamError(f"{t.dev.path} has no interrupted receive of this stream to "
                              "resume; send it again without --resume")
        received, resumed = st.received, True
    else:
        received = empty_plane(t.nbits)
    t.touched = True
    if t.vol is None and not resumed:
        _begin_overwrite(t.dev, h)
    st = LocalState(st.seq, t.vol.generation if t.vol else 0, h.stream_id, h.top.guid,
                    h.base.guid if h.base else bytes(16), h.image_digest, h.image_blocks,
                    0, st.incomplete, st.released, received)
    io = BlockIO(t.dev, h.block_size)
    since = 0
    try:
        for rec in reader:
            if isinstance(rec, Data):
                _place(io, t, received, rec)
                since += len(rec.payload)
                if progress:
                    progress(len(rec.payload))
                if since >= PERSIST_EVERY:
                    _persist(io, t, st, received)
                    since = 0
    except (BlockxferError, OSError) as e:
        _persist(io, t, st, received, quiet=True)
        io.close()
        token = make_token(h.stream_id, h.top.guid, h.image_digest, h.image_blocks, received)
        raise _Cut(e, token, received.count()) from e
    io.drain()
    t.dev.flush()
    io.close()
    if received.count() != h.image_blocks:
        raise StreamError(f"stream ended with {received.count()} of {h.image_blocks} blocks; "
                          "send the image again")
    return _commit(h, t, received, resumed)


def _begin_overwrite(dev: BlockDevice, h: fmt.Header) -> None:
    """A new or overwritten target: the receiving marker replaces the old superblocks
    (in an order a kill cannot break) and no old local state survives."""
    try:
        current: tuple[Superblock, int] | None = read_superblock_slot(dev)
    except (FormatError, InterruptedReceive):
        current = None
    marker = ReceivingMarker(h.block_size, h.nblocks, h.stream_id, h.volume_uuid,
                             h.top.guid, h.image_blocks, h.top.name)
    begin_overwrite(dev, marker, reserved_blocks(h.nblocks, h.block_size) * h.block_size,
                    current)


def _place(io: object, t: _Target, received: bitarray, rec: Data) -> None:
    from blockxfer.volume.blockio import BlockIO
    assert isinstance(io, BlockIO)
    lo, hi = rec.vbn, rec.vbn + rec.count
    if received.count(1, lo, hi):
        raise StreamError(f"stream repeats block {lo + received.find(1, lo, hi) - lo} "
                          f"(record {rec.seq})")
    if t.busy.count(1, lo, hi):
        vbn = t.busy.find(1, lo, hi)
        raise StreamError(f"stream writes block {vbn}, which the target still uses "
                          f"(record {rec.seq}); it does not continue what the target holds")
    view = io.write_buffer(len(rec.payload))
    view[:] = rec.payload
    io.write_runs([(lo, rec.count)], view, wait=False)
    received[lo:hi] = 1


def _persist(io: object, t: _Target, st: LocalState, received: bitarray,
             quiet: bool = False) -> None:
    from blockxfer.volume.blockio import BlockIO
    assert isinstance(io, BlockIO)
    try:
        io.drain()
        t.dev.flush()
        st.received, st.received_blocks = received, received.count()
        t.area.write(st)
    except (BlockxferError, OSError):
        if not quiet:
            raise


def _commit(h: fmt.Header, t: _Target, received: bitarray, resumed: bool) -> ReceiveResult:
    """Decide what is complete and released, record it, then write the new root."""
    sb = Superblock(h.block_size, h.nblocks, h.virtual_blocks, h.volume_uuid,
                    h.first_data_vbn, h.next_id, h.root)
    have = received | t.valid
    _check_top_covered(t, h, have)
    keep = {s.guid for s in h.snapshot_set}
    before = [e.name for e in t.vol.snapshots()] if t.vol is not None else []
    cand = Volume(t.dev, sb, writable=False, slot=t.slot)
    try:
        released = [e for e in cand.catalog.snapshots if e.guid not in keep]
        incomplete = [e for e in cand.catalog.snapshots if e.guid in keep and not e.shadow
                      and (cand.plane(e.name) & ~have).any()]
    finally:
        cand.io.close()
    if any(e.guid == h.top.guid for e in incomplete):
        raise StreamError(f"stream does not carry all blocks of its top {h.top.name!r}")
    t.area.write(LocalState(t.local.seq, h.root.generation,
                            incomplete={e.guid for e in incomplete},
                            released={e.guid for e in released}))
    write_superblock(t.dev, sb, 1 - t.slot)
    gone = [n for n in before if n not in {s.name for s in h.snapshot_set}]
    return ReceiveResult(h.top.name, h.incremental, int(received.count()),
                         sorted(set(gone) | {e.name for e in released}),
                         [e.name for e in incomplete], resumed)


def _check_top_covered(t: _Target, h: fmt.Header, have: bitarray) -> None:
    """Refuse a partial image (one that lacks blocks of its top, e.g. an old stream of
    `june1 & june3`) before anything reads a block it never wrote: such a block is
    missing, not damaged, and no checksum error may say otherwise."""
    from blockxfer.volume.blockio import BlockIO
    from blockxfer.volume.layout import Catalog
    from blockxfer.volume.objects import BlobObject, PlaneObject

    def partial(what: str) -> StreamError:
        return StreamError(f"image {h.expression!r} is partial, not restorable: it lacks "
                           f"{what} of its top {h.top.name!r} (missing, not damaged); "
                           "send an image that holds its top's blocks")

    def read_block(vbn: int, ck: int) -> bytes:
        if not have[vbn]:
            raise partial(f"metadata block {vbn}")
        return io.read_block(vbn, ck)

    def read_many(rows: np.ndarray) -> bytes:
        absent = [int(v) for v in rows[:, 0] if not have[int(v)]]
        if absent:
            raise partial(f"{len(absent)} metadata blocks (from {absent[0]})")
        return io.read_many(rows)

    io = BlockIO(t.dev, h.block_size)
    try:
        cat = Catalog.unpack(BlobObject(h.root.catalog, h.block_size, read_block,
                                        read_many).load())
        top = next((e for e in cat.snapshots if e.guid == h.top.guid), None)
        if top is None:
            raise StreamError(f"the stream's catalog does not list its top {h.top.name!r}")
        plane = PlaneObject(top.plane, h.nblocks, h.block_size, read_block, read_many).bits
        lacking = (plane & ~have).count()
        if lacking:
            raise partial(f"{lacking} blocks")
    finally:
        io.close()


__all__ = ["ReceiveResult", "receive_stream", "read_superblock_slot"]


def open_new_target(path: str, h: fmt.Header, open_device: OpenDevice,
                    force: bool) -> BlockDevice:
    """A target for a full image, checked (size, --force) and wiped, ready for blocks."""
    dev, _ = _open_target(path, h, open_device, force, path)
    try:
        _begin_overwrite(dev, h)
    except BaseException:
        dev.close()
        raise
    return dev


def commit_blocks(dev: BlockDevice, h: fmt.Header, received: bitarray) -> ReceiveResult:
    """Commit `h.root` on a target whose blocks in `received` were written and flushed:
    the same decisions as a receive (incomplete, released), then the superblock."""
    dev.flush()
    return _commit(h, _Target(dev, h, None), received, False)
