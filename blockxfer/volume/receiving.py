"""The receiving marker: what a target holds while a full image overwrites it.

A full receive (`receive --force`, a tape restore) writes blocks at the source's
VBNs, all over whatever the target held; the old volume cannot survive that, and
the new one exists only once its superblock is written. In between, slot A holds
this marker instead of a superblock, so the target is never an unrecognisable
device: opening it says "receiving stream <id> (interrupted)", and running the
same receive again completes it. `begin_overwrite` orders the writes so that a
kill at any point leaves the old volume or the marker (docs/volume-format.md).
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass

from blockxfer.checksum import checksum
from blockxfer.device import BlockDevice
from blockxfer.errors import FormatError, VolumeError

from .blockio import aligned
from .layout import Superblock

MAGIC = b"BXRECVNG"
VERSION = 1
MARK_SIZE = 4096                 # written and read as one 4 KiB block at byte 0
_MARK = struct.Struct("<8sIIQ16s16s16sQH")
# magic, version, block size, nblocks, stream id, volume uuid, top guid, image blocks,
# top name length; then the name and xxh3-64 of everything before it
_CK = struct.Struct("<Q")


class InterruptedReceive(VolumeError):
    """The target holds a full receive that was interrupted (the marker, no superblock)."""


@dataclass(frozen=True)
class ReceivingMarker:
    block_size: int
    nblocks: int
    stream_id: bytes
    volume_uuid: bytes
    top_guid: bytes
    image_blocks: int
    top_name: str

    @property
    def stream(self) -> str:
        return self.stream_id.hex()

    def pack(self) -> bytes:
        name = self.top_name.encode()
        body = _MARK.pack(MAGIC, VERSION, self.block_size, self.nblocks, self.stream_id,
                          self.volume_uuid, self.top_guid, self.image_blocks, len(name)) + name
        return body + _CK.pack(checksum(body))

    @classmethod
    def unpack(cls, raw: bytes) -> ReceivingMarker:
        if raw[:8] != MAGIC:
            raise FormatError("no receiving marker")
        try:
            magic, version, bs, n, sid, vol, top, blocks, nlen = _MARK.unpack_from(raw, 0)
            end = _MARK.size + nlen
            (ck,) = _CK.unpack_from(raw, end)
            if ck != checksum(raw[:end]) or version != VERSION:
                raise FormatError("receiving marker checksum mismatch")
            name = raw[_MARK.size:end].decode()
        except (struct.error, UnicodeDecodeError) as e:
            raise FormatError("receiving marker is malformed") from e
        return cls(bs, n, sid, vol, top, blocks, name)

    def describe(self, path: str) -> str:
        return (f"{path}: receiving stream {self.stream} (interrupted): a full image up to "
                f"{self.top_name!r} of volume {uuidlib.UUID(bytes=self.volume_uuid)} was being "
                "written over it; run the same receive (or restore) again to complete it, or "
                "receive another full image with --force")


def read_receiving_marker(dev: BlockDevice) -> ReceivingMarker | None:
    """The marker in slot A, if the device holds a valid one."""
    if dev.size < MARK_SIZE:
        return None
    buf = aligned(MARK_SIZE)
    dev.pread(memoryview(buf)[:MARK_SIZE], 0)
    try:
        return ReceivingMarker.unpack(bytes(buf[:MARK_SIZE]))
    except FormatError:
        return None


def refuse_interrupted(dev: BlockDevice) -> None:
    """Called when no superblock is valid: name an interrupted receive if that is it."""
    marker = read_receiving_marker(dev)
    if marker is not None:
        raise InterruptedReceive(marker.describe(dev.path))


def _write_at(dev: BlockDevice, raw: bytes, offset: int, size: int) -> None:
    buf = aligned(size)
    buf[:len(raw)] = raw
    dev.pwrite(memoryview(buf)[:size], offset)


def begin_overwrite(dev: BlockDevice, marker: ReceivingMarker, reserved: int,
                    current: tuple[Superblock, int] | None) -> None:
    """Make the target a marked, empty receiving target in an order a kill cannot break.

    `reserved` is the new geometry's reserved bytes (superblocks and local area);
    `current` the superblock in force and its slot, if the target is a volume.
      1. the current superblock is copied into slot B (so slot A may go);
      2. the marker replaces slot A: the old volume still opens from slot B;
      3. slot B is zeroed, then the rest of the new reserved area: now only the
         marker is valid.
    No old block is overwritten before step 3 is durable; the new superblock later
    replaces the marker in slot A with one write."""
    if current is not None:
        sb, slot = current
        if slot == 0:
            _write_at(dev, sb.pack(), sb.block_size, sb.block_size)
            dev.flush()
    _write_at(dev, marker.pack(), 0, MARK_SIZE)
    dev.flush()
    if current is not None:              # slot B first: no old block goes while it holds
        _write_at(dev, b"", current[0].block_size, current[0].block_size)
        dev.flush()
    if reserved > MARK_SIZE:
        _write_at(dev, b"", MARK_SIZE, reserved - MARK_SIZE)
    dev.flush()


def refuse_on_replica(path: str, replica: bool, what: str, where: str) -> None:
    """A replica whose committed root is the one it received takes incrementals
    only while nothing here changes it: any local CP moves its generation past its
    newest snapshot and may take VBNs the source owns. So a catalog change that the
    source can make instead is refused, with the way to do it."""
    if replica:
        raise VolumeError(f"{path} is a replica (its state was received): {what} here would "
                          f"stop every later incremental from applying; {where} (to stop "
                          "replicating into it, take a snapshot here first)")
