"""On-disk structures of a volume, each declared once: layout, pack, unpack, checksum.

Every structure is little-endian. A block pointer is (VBN, xxh3-64 of the block);
VBN 0 means a hole. docs/volume-format.md describes the same bytes in prose.
"""

from __future__ import annotations

import struct
import uuid as uuidlib
from dataclasses import dataclass, field, replace

from blockxfer.checksum import checksum
from blockxfer.errors import FormatError

MAGIC = b"BLKXFVOL"
VERSION = 2                  # 2: the intent log region (docs/volume-format.md)
READABLE_VERSIONS = (1, 2)   # a version 1 volume has no log region; its next CP writes 2
POINTER = struct.Struct("<QQ")                 # vbn, checksum
OBJREF = struct.Struct("<QQQB7x")              # root vbn, root checksum, length, levels
ROOT = struct.Struct("<QQ")                    # generation, timestamp (ns)
SUPER = struct.Struct("<8sIIQQ16sQQ")          # magic, version, block size, nblocks,
#                                               virtual blocks, uuid, first data vbn, next id
CHECKSUM = struct.Struct("<Q")
assert POINTER.size == 16 and OBJREF.size == 32 and SUPER.size == 64

MIN_BLOCK, MAX_BLOCK = 4096, 1 << 20


def check_block_size(block_size: int) -> None:
    if block_size < MIN_BLOCK or block_size > MAX_BLOCK or block_size & (block_size - 1):
        raise FormatError(f"block size {block_size} is not a power of two between 4 KiB and 1 MiB")


@dataclass(frozen=True, slots=True)
class ObjectRef:
    """Where an object's tree starts: the root block pointer, its length and tree height."""

    vbn: int = 0
    checksum: int = 0
    length: int = 0        # data blocks for trees of blocks; bytes for the catalog
    levels: int = 0

    def pack(self) -> bytes:
        return OBJREF.pack(self.vbn, self.checksum, self.length, self.levels)

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> ObjectRef:
        return cls(*OBJREF.unpack(raw))


@dataclass(frozen=True, slots=True)
class RootRecord:
    """The root of one consistency point: LBA map, active plane and catalog."""

    generation: int
    timestamp: int
    lba: ObjectRef
    plane: ObjectRef
    catalog: ObjectRef

    SIZE = ROOT.size + 3 * OBJREF.size

    def pack(self) -> bytes:
        return (ROOT.pack(self.generation, self.timestamp)
                + self.lba.pack() + self.plane.pack() + self.catalog.pack())

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> RootRecord:
        gen, ts = ROOT.unpack_from(raw, 0)
        refs = [ObjectRef.unpack(raw[ROOT.size + i * OBJREF.size:ROOT.size + (i + 1) * OBJREF.size])
                for i in range(3)]
        return cls(gen, ts, *refs)


@dataclass(frozen=True, slots=True)
class Superblock:
    """One of the two superblock slots (VBN 0 and 1): geometry plus the committed root."""

    block_size: int
    nblocks: int
    virtual_blocks: int
    uuid: bytes
    first_data_vbn: int
    next_id: int
    root: RootRecord

    SIZE = SUPER.size + RootRecord.SIZE + CHECKSUM.size

    def pack(self) -> bytes:
        body = SUPER.pack(MAGIC, VERSION, self.block_size, self.nblocks, self.virtual_blocks,
                          self.uuid, self.first_data_vbn, self.next_id) + self.root.pack()
        return body + CHECKSUM.pack(checksum(body))

    @classmethod
    def unpack(cls, raw: bytes | memoryview) -> Superblock:
        raw = bytes(raw[:cls.SIZE])
        if raw[:8] != MAGIC:
            raise FormatError("not a blockxfer volume (wrong magic)")
        body, (ck,) = raw[:-CHECKSUM.size], CHECKSUM.unpack(raw[-CHECKSUM.size:])
        if checksum(body) != ck:
            raise FormatError("superblock checksum mismatch")
        _, version, bs, n, vb, uid, first, next_id = SUPER.unpack_from(body, 0)
        if version not in READABLE_VERSIONS:
            raise FormatError(f"volume format version {version} is not supported "
                              f"(this is {VERSION})")
        return cls(bs, n, vb, uid, first, next_id, RootRecord.unpack(body[SUPER.size:]))

    @property
    def generation(self) -> int:
        return self.root.generation

    @property
    def uuid_str(self) -> str:
        return str(uuidlib.UUID(bytes=self.uuid))


# Snapshot flags
SHADOW, MASTER, INCOMPLETE = 1, 2, 4
_SNAP = struct.Struct("<Q16sQQIQH")   # id, guid, created ns, generation, flags, blocks, name len
_PTR = struct.Struct("<HQ")                 # name len, snapshot id
_CATALOG = struct.Struct("<8sII")          # magic, snapshots, pointers
CATALOG_MAGIC = b"BXCATLOG"


@dataclass(slots=True)
class SnapshotEntry:
    """A snapshot: its plane object and the root record of the CP that took it."""

    id: int
    name: str
    guid: bytes
    created: int              # ns since the epoch
    generation: int           # CP generation that took it
    flags: int
    blocks: int               # bits set in its plane
    plane: ObjectRef
    root: RootRecord | None   # filled by the CP after the one that took it (see volume.py)

    @property
    def shadow(self) -> bool:
        return bool(self.flags & SHADOW)

    @property
    def master(self) -> bool:
        return bool(self.flags & MASTER)

    @property
    def incomplete(self) -> bool:
        """Not all of its blocks were received here: neither readable nor a base."""
        return bool(self.flags & INCOMPLETE)

    def pack(self) -> bytes:
        name = self.name.encode()
        root = self.root.pack() if self.root else bytes(RootRecord.SIZE)
        return (_SNAP.pack(self.id, self.guid, self.created, self.generation, self.flags,
                           self.blocks, len(name)) + name + self.plane.pack() + root)


@dataclass(slots=True)
class Catalog:
    """The snapshot table and the named pointers, stored as one object in the volume."""

    snapshots: list[SnapshotEntry] = field(default_factory=list)
    pointers: dict[str, int] = field(default_factory=dict)     # name -> snapshot id

    def pack(self) -> bytes:
        parts = [_CATALOG.pack(CATALOG_MAGIC, len(self.snapshots), len(self.pointers))]
        parts += [s.pack() for s in self.snapshots]
        for name, sid in sorted(self.pointers.items()):
            raw = name.encode()
            parts.append(_PTR.pack(len(raw), sid) + raw)
        return b"".join(parts)

    @classmethod
    def unpack(cls, raw: bytes) -> Catalog:
        try:
            return cls._unpack(raw)
        except (struct.error, UnicodeDecodeError) as e:
            raise FormatError(f"catalog is malformed: {e}") from e

    @classmethod
    def _unpack(cls, raw: bytes) -> Catalog:
        magic, nsnap, nptr = _CATALOG.unpack_from(raw, 0)
        if magic != CATALOG_MAGIC:
            raise FormatError("catalog has the wrong magic")
        pos, cat = _CATALOG.size, cls()
        for _ in range(nsnap):
            sid, guid, created, gen, flags, blocks, nlen = _SNAP.unpack_from(raw, pos)
            pos += _SNAP.size
            name = raw[pos:pos + nlen].decode()
            pos += nlen
            plane = ObjectRef.unpack(raw[pos:pos + OBJREF.size])
            pos += OBJREF.size
            rraw = raw[pos:pos + RootRecord.SIZE]
            pos += RootRecord.SIZE
            root = RootRecord.unpack(rraw) if any(rraw) else None
            cat.snapshots.append(SnapshotEntry(sid, name, guid, created, gen, flags, blocks,
                                               plane, root))
        for _ in range(nptr):
            nlen, sid = _PTR.unpack_from(raw, pos)
            pos += _PTR.size
            cat.pointers[raw[pos:pos + nlen].decode()] = sid
            pos += nlen
        return cat

    def copy(self) -> Catalog:
        return Catalog([replace(s) for s in self.snapshots], dict(self.pointers))
