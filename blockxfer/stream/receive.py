"""Receiving a stream onto a target: decode and check records, hand them to the
volume's receiver (blockxfer/volume/receiver.py), which places the blocks at the
same VBNs and commits the root last.

A stream cut short or damaged leaves the target at its previous state; the VBNs
received so far are kept in the target's local area, and the error carries a
resume token.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from blockxfer.device import BlockDevice
from blockxfer.errors import BlockxferError, FormatError, StreamError, VolumeError
from blockxfer.volume import Volume, has_signature
from blockxfer.volume.receiver import IncomingImage, Receiver, interrupted_here

from . import format as fmt
from .decode import Data, Dealloc, Records, StreamReader
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


def incoming(h: fmt.Header) -> IncomingImage:
    """What the volume needs to know of the image a stream header describes."""
    return IncomingImage(h.block_size, h.nblocks, h.virtual_blocks, h.volume_uuid,
                         h.first_data_vbn, h.next_id, h.root, h.stream_id, h.expression,
                         h.top.guid, h.top.name, h.base.guid if h.base else None,
                         h.image_digest, h.image_blocks,
                         frozenset(s.guid for s in h.snapshot_set))


def _receiver(dev: BlockDevice, h: fmt.Header, vol: Volume | None,
              carry: dict[str, bytes] | None = None) -> Receiver:
    return vol.receiver(incoming(h)) if vol is not None else \
        Receiver.for_device(dev, incoming(h), carry)


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
    if interrupted_here(dev, incoming(h), bool(h.flags & fmt.H_RESUMING)):
        return None                          # this very receive again, or resumed
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


def receive_stream(f: ByteSource | Records, path: str, open_device: OpenDevice, *,
                   force: bool = False, seekable: bool = False, source_hint: str = "SOURCE",
                   retry: str | None = None,
                   progress: Callable[[int], None] | None = None,
                   carry: dict[str, bytes] | None = None) -> ReceiveResult:
    """Apply a stream (its bytes, or its records already checked) to the volume (or
    new volume) at `path`. With `seekable` (`f` is then a SeekableSource) a full
    stream is verified whole before anything is written. `retry`, when given,
    replaces the resume hint of a failure (a source that cannot `send --resume`).
    `carry`: local properties a full image keeps from the volume it overwrites
    (`Receiver.for_device`)."""
    reader = f if isinstance(f, Records) else StreamReader(f, "stream")
    h = reader.read_header()
    if seekable and isinstance(f, SeekableSource) and not h.incremental:
        assert isinstance(reader, StreamReader)
        _verify_rest(reader)
        f.seek(0)
        reader = StreamReader(f, "stream")
        reader.read_header()
    created = not os.path.exists(path)
    dev, vol = _open_target(path, h, open_device, force, path)
    r: Receiver | None = None
    try:
        r = _receiver(dev, h, vol, carry)
        return _receive(reader, h, r, progress)
    except _Cut as cut:
        how = retry or (f"resume with blockxfer send {source_hint} \"{h.expression}\" "
                        f"--resume {cut.token}")
        state = _state_after(path, h, r, created, removable=retry is not None)
        raise StreamError(f"{cut.cause}; {state}, {cut.kept} of {h.image_blocks} blocks "
                          f"received; {how}") from cut.cause
    except BlockxferError as e:
        if r is None or not r.touched:
            raise
        state = _state_after(path, h, r, created, removable=True)
        raise type(e)(f"{e}; {state}") from e
    finally:
        if r is not None:
            r.close()
        if vol is not None:
            vol.io.close()
        dev.close()


class _Cut(Exception):
    """The stream failed after blocks were placed: what a resume needs to know."""

    def __init__(self, cause: BaseException, token: str, kept: int):
        super().__init__(str(cause))
        self.cause, self.token, self.kept = cause, token, kept


def _state_after(path: str, h: fmt.Header, r: Receiver | None, created: bool,
                 removable: bool) -> str:
    """What a failed receive left at `path`, for the error's one line. A file this
    receive created is removed when nothing could resume into it."""
    if r is None or r.vol is not None:
        return "the target is unchanged"
    if created and removable and os.path.isfile(path):
        os.remove(path)
        return f"the target is unchanged ({path} did not exist and was removed)"
    was = "it did not exist before" if created else "its old contents were overwritten"
    return (f"{path} holds an interrupted receive of stream {h.stream_id.hex()} "
            f"({was}; 'blockxfer info' shows it)")


def _verify_rest(reader: StreamReader) -> None:
    for _ in reader:
        pass


def receive_into(f: ByteSource, vol: Volume, *, lock: AbstractContextManager[Any] | None = None,
                 source_hint: str = "SOURCE", retry: str | None = None,
                 progress: Callable[[int], None] | None = None) -> ReceiveResult:
    """Apply an incremental stream to a volume that is already open (a served one:
    its NBD clients keep reading meanwhile). `lock` is held to check the target and
    set up the receiver, and again for the commit; blocks are placed outside it, in
    VBNs the volume's allocator leaves alone (claimed). A full stream would replace
    what the volume's users see, so it is refused here."""
    reader = StreamReader(f, "stream")
    h = reader.read_header()
    path = vol.dev.path
    if not h.incremental:
        raise VolumeError(f"{path} is open in a server: it takes incremental streams only; "
                          "a full stream replaces the whole volume, so stop 'blockxfer serve' "
                          "first")
    with lock or nullcontext():
        _check_incremental(vol, h, path)
        r = vol.receiver(incoming(h))
    try:
        return _receive(reader, h, r, progress, lock)
    except _Cut as cut:
        how = retry or (f"resume with blockxfer send {source_hint} \"{h.expression}\" "
                        f"--resume {cut.token}")
        raise StreamError(f"{cut.cause}; the target is unchanged, {cut.kept} of "
                          f"{h.image_blocks} blocks received; {how}") from cut.cause
    except BlockxferError as e:
        raise type(e)(f"{e}; the target is unchanged") from e
    finally:
        r.close()


def _receive(reader: Records, h: fmt.Header, r: Receiver,
             progress: Callable[[int], None] | None,
             lock: AbstractContextManager[Any] | None = None) -> ReceiveResult:
    """Decode -> the receiver: blocks placed, progress saved now and then, the root
    committed once every block has arrived."""
    r.begin(resume=bool(h.flags & fmt.H_RESUMING))
    before = [e.name for e in r.snapshots()]
    since = 0
    try:
        for rec in reader:
            if isinstance(rec, Data):
                r.place(rec.vbn, rec.count, rec.payload, f"record {rec.seq}")
                since += len(rec.payload)
                if progress:
                    progress(len(rec.payload))
                if since >= PERSIST_EVERY:
                    r.save_progress()
                    since = 0
            elif isinstance(rec, Dealloc):
                r.apply_deallocations(rec.runs)
    except (BlockxferError, OSError) as e:
        r.save_progress(quiet=True)
        with lock or nullcontext():
            r.offer_resume()             # an open volume: resumable while it is unchanged
        r.close()
        token = make_token(h.stream_id, h.top.guid, h.image_digest, h.image_blocks,
                           r.received)
        raise _Cut(e, token, r.received.count()) from e
    with lock or nullcontext():
        out = r.commit()
    gone = [n for n in before if n not in {s.name for s in h.snapshot_set}]
    return ReceiveResult(h.top.name, h.incremental, int(r.received.count()),
                         sorted(set(gone) | set(out.released)), out.incomplete, r.resumed)


__all__ = ["ReceiveResult", "receive_stream", "receive_into", "new_target_receiver", "incoming"]


def new_target_receiver(path: str, h: fmt.Header, open_device: OpenDevice,
                        force: bool) -> Receiver:
    """A receiver writing a full image at `path`, checked (size, --force) and begun
    (the target marked as being overwritten). Close its device when done."""
    dev, _ = _open_target(path, h, open_device, force, path)
    try:
        r = Receiver.for_device(dev, incoming(h))
        r.begin(resume=False)
    except BaseException:
        dev.close()
        raise
    return r
