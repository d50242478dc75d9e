"""Receive state kept in the volume's reserved local area, never replicated.

A receiver may not allocate blocks of its own (an incoming image owns the same
VBNs as its source), so what only this copy knows lives in the reserved area:
which snapshots are incomplete or released here, and, during a receive, the
plane of VBNs already received (for resume, claim 64). Two slots, each a header
block followed by a plane; the newer valid slot whose root generation is the
committed one wins, so writing it never races the superblock.
"""

from __future__ import annotations

import struct
import threading
from dataclasses import dataclass, field

from bitarray import bitarray

from blockxfer.checksum import checksum
from blockxfer.device import BlockDevice
from blockxfer.errors import FormatError

from .blockio import aligned
from .objects import empty_plane

MAGIC = b"BXLOCAL2"
MAGIC_V1 = b"BXLOCAL1"                   # before local properties: read, never written
_HEAD = struct.Struct("<8sQQ16s16s16sQQQIIB7x")
# magic, seq, root generation, pending stream id, pending top guid, pending base guid,
# pending image digest, pending image blocks, received blocks, incomplete count,
# released count, plane present; then the guids (16 bytes each), then (BXLOCAL2) the
# local properties: u16 count, each u8 key length, u16 value length, key, value
_CK = struct.Struct("<Q")
_PROPS = struct.Struct("<H")
_PROP = struct.Struct("<BH")


@dataclass
class LocalState:
    seq: int = 0
    root_generation: int = 0
    stream_id: bytes = bytes(16)          # a receive in progress (zero: none)
    top_guid: bytes = bytes(16)
    base_guid: bytes = bytes(16)
    image_digest: int = 0
    image_blocks: int = 0
    received_blocks: int = 0
    incomplete: set[bytes] = field(default_factory=set)
    released: set[bytes] = field(default_factory=set)
    received: bitarray | None = None      # plane of VBNs received so far
    props: dict[str, bytes] = field(default_factory=dict)   # this copy's own settings

    @property
    def pending(self) -> bool:
        return self.stream_id != bytes(16)

    def pack(self, block_size: int) -> bytes:
        guids = sorted(self.incomplete) + sorted(self.released)
        body = _HEAD.pack(MAGIC, self.seq, self.root_generation, self.stream_id, self.top_guid,
                          self.base_guid, self.image_digest, self.image_blocks,
                          self.received_blocks, len(self.incomplete), len(self.released),
                          self.received is not None) + b"".join(guids) + pack_props(self.props)
        if len(body) + _CK.size > block_size:
            raise FormatError("the local area is full (too many incomplete or released "
                              "snapshots, or local properties too large)")
        return body + _CK.pack(checksum(body))

    @classmethod
    def unpack(cls, raw: bytes) -> LocalState:
        if raw[:8] not in (MAGIC, MAGIC_V1):
            raise FormatError("no local state")
        try:
            f = _HEAD.unpack_from(raw, 0)
            ninc, nrel = f[9], f[10]
            end = _HEAD.size + 16 * (ninc + nrel)
            props: dict[str, bytes] = {}
            if raw[:8] == MAGIC:
                props, end = unpack_props(raw, end)
            if end + _CK.size > len(raw) or _CK.unpack_from(raw, end)[0] != checksum(raw[:end]):
                raise FormatError("local state checksum mismatch")
        except (struct.error, UnicodeDecodeError) as e:
            raise FormatError(f"local state is malformed: {e}") from e
        g = [raw[_HEAD.size + 16 * i:_HEAD.size + 16 * (i + 1)] for i in range(ninc + nrel)]
        st = cls(f[1], f[2], f[3], f[4], f[5], f[6], f[7], f[8], set(g[:ninc]), set(g[ninc:]))
        st.received = empty_plane(0) if f[11] else None
        st.props = props
        return st


def pack_props(props: dict[str, bytes]) -> bytes:
    parts = [_PROPS.pack(len(props))]
    for key, value in sorted(props.items()):
        k = key.encode()
        parts.append(_PROP.pack(len(k), len(value)) + k + value)
    return b"".join(parts)


def unpack_props(raw: bytes, pos: int) -> tuple[dict[str, bytes], int]:
    """The properties packed at `pos` and the offset after them."""
    (count,) = _PROPS.unpack_from(raw, pos)
    pos += _PROPS.size
    props: dict[str, bytes] = {}
    for _ in range(count):
        klen, vlen = _PROP.unpack_from(raw, pos)
        pos += _PROP.size
        props[raw[pos:pos + klen].decode()] = raw[pos + klen:pos + klen + vlen]
        pos += klen + vlen
    return props, pos


class LocalArea:
    """The two slots after the superblocks: VBN 2 + k * (1 + plane blocks)."""

    def __init__(self, dev: BlockDevice, block_size: int, nblocks: int):
        self.dev, self.bs, self.nblocks = dev, block_size, nblocks
        self.plane_blocks = -(-nblocks // (8 * block_size))
        self.slot = -1
        self.received_root = False        # the committed root came from a receive
        # One process may write through two LocalState copies (a receive into an open
        # volume saves its progress while the volume sets a property): one lock and
        # one sequence, so the writes alternate slots and the newest always wins.
        self._lock = threading.Lock()
        self._seq = 0

    def _vbn(self, slot: int) -> int:
        return 2 + slot * (1 + self.plane_blocks)

    def read(self, root_generation: int) -> LocalState:
        best: tuple[LocalState, int] | None = None
        buf = aligned(self.bs)
        for slot in (0, 1):
            self.dev.pread(memoryview(buf)[:self.bs], self._vbn(slot) * self.bs)
            try:
                st = LocalState.unpack(bytes(buf[:self.bs]))
            except FormatError:
                continue
            if st.root_generation <= root_generation and (best is None or st.seq > best[0].seq):
                best = (st, slot)
        if best is None:
            return LocalState(root_generation=root_generation)
        st, self.slot = best
        self._seq = st.seq
        self.received_root = st.root_generation == root_generation
        if st.root_generation != root_generation:   # state of an older root: keep only facts
            st = LocalState(st.seq, root_generation, incomplete=st.incomplete,
                            released=st.released, props=st.props)
        elif st.received is not None:
            st.received = self._read_plane(self.slot)
        return st

    def _read_plane(self, slot: int) -> bitarray:
        size = self.plane_blocks * self.bs
        buf = aligned(size)
        self.dev.pread(memoryview(buf)[:size], (self._vbn(slot) + 1) * self.bs)
        plane = bitarray(endian="little")
        plane.frombytes(bytes(buf[:size]))
        return plane

    def write(self, st: LocalState) -> None:
        """Write `st` into the other slot (plane first, then header), durably."""
        with self._lock:
            self._write(st)

    def _write(self, st: LocalState) -> None:
        slot = 1 - self.slot if self.slot >= 0 else 0
        st.seq = self._seq = max(st.seq, self._seq) + 1
        if st.received is not None:
            raw = st.received.tobytes()
            buf = aligned(self.plane_blocks * self.bs)
            buf[:len(raw)] = raw
            self.dev.pwrite(memoryview(buf)[:self.plane_blocks * self.bs],
                            (self._vbn(slot) + 1) * self.bs)
        head = aligned(self.bs)
        raw = st.pack(self.bs)
        head[:len(raw)] = raw
        self.dev.pwrite(memoryview(head)[:self.bs], self._vbn(slot) * self.bs)
        self.dev.flush()
        self.slot = slot
