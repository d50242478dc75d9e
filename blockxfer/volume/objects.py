"""Objects stored as trees: a plane (one bit per VBN) and a blob (the catalog).

A plane's data blocks are slices of one in-memory bitarray (little-endian bit
order: VBN v is bit v % 8 of byte v // 8). An all-zero data block is a hole, so
the plane of a sparse 1 TiB volume takes a handful of blocks.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
from bitarray import bitarray

from blockxfer.checksum import checksum

from .layout import ObjectRef
from .tree import CowTree, ReadBlock, Writes, levels_for

ReadMany = Callable[[np.ndarray], bytes]     # rows (vbn, checksum) -> verified bytes


def empty_plane(nbits: int) -> bitarray:
    a = bitarray(nbits, endian="little")
    a.setall(0)
    return a


Stored = tuple[np.ndarray, bytes]     # a plane's stored data blocks: indices, their bytes


def merge_stored(plane: bitarray, stored: Stored, block_size: int, subtract: bool) -> None:
    """`plane |= other` (or `plane &= ~other`) where `other` is given by its stored
    data blocks (the rest are zero): work in proportion to what is stored, not to
    the 32 MiB a plane of a 1 TiB volume spans. `plane` is whole data blocks long."""
    index, raw = stored
    if not len(index):
        return
    rows = np.frombuffer(memoryview(plane), dtype=np.uint8).reshape(-1, block_size)
    other = np.frombuffer(raw, dtype=np.uint8).reshape(-1, block_size)
    if subtract:
        rows[index] &= ~other
    else:
        rows[index] |= other


class PlaneObject:
    """A plane kept in memory, stored copy-on-write as a tree of bitmap blocks."""

    def __init__(self, ref: ObjectRef, nblocks: int, block_size: int,
                 read_block: ReadBlock, read_many: ReadMany):
        self.block_size = block_size
        self.bits_per_block = block_size * 8
        self.data_blocks = -(-nblocks // self.bits_per_block)
        self.tree = CowTree(ref, block_size, read_block, self.data_blocks)
        self._read_many = read_many
        self._bits: bitarray | None = None
        self.dirty: set[int] = set()
        self.fresh: dict[int, int] = {}

    @property
    def bits(self) -> bitarray:
        if self._bits is None:
            self._bits = self._load()
        return self._bits

    def stored(self) -> Stored:
        """The data blocks the tree stores (holes are all zero), read and verified."""
        _, data = self.tree.walk()
        if not len(data):
            return np.zeros(0, dtype=np.intp), b""
        return data[:, 2].astype(np.intp), self._read_many(data[:, :2])

    def _load(self) -> bitarray:
        bits = empty_plane(self.data_blocks * self.bits_per_block)
        merge_stored(bits, self.stored(), self.block_size, subtract=False)
        return bits

    def mark_range(self, start: int, stop: int, value: bool) -> None:
        """Set bits [start, stop) to `value` and note the data blocks it touches."""
        if stop <= start:
            return
        self.bits[start:stop] = value
        bpb = self.bits_per_block
        self.dirty.update(range(start // bpb, (stop - 1) // bpb + 1))

    def mark_one(self, index: int, value: bool) -> None:
        """`mark_range` of one bit (a random 4 KiB write): no range to build."""
        self.bits[index] = value
        self.dirty.add(index // self.bits_per_block)

    def mark_scattered(self, index: list[int], value: bool) -> None:
        """`mark_range` for distinct scattered bits (one block each)."""
        self.bits[index] = value
        bpb = self.bits_per_block
        self.dirty.update({i // bpb for i in index})

    def track(self, bits: bitarray) -> None:
        """Follow another plane during phase 1 (a snapshot being taken follows the
        active plane): share its bits and mark every non-empty data block."""
        self._bits = bits
        rows = np.frombuffer(memoryview(bits), dtype=np.uint64).reshape(self.data_blocks, -1)
        self.dirty.update(np.nonzero(rows.any(axis=1))[0].tolist())

    def _zero(self, i: int) -> bool:
        bpb = self.bits_per_block
        return self.bits.count(1, i * bpb, (i + 1) * bpb) == 0

    def allocate(self, alloc: Callable[[int], list[int]], free: Callable[[int], None]) -> int:
        """Phase 1 for data blocks, then for the tree. Returns blocks moved."""
        changes = 0
        need = []
        for i in sorted(self.dirty - self.fresh.keys()):
            old = int(self.tree.get(i, 1)[0, 0])
            if self._zero(i):
                if old:
                    free(old)
                    self.tree.set(i, np.zeros((1, 2), dtype=np.uint64))
                    changes += 1
                continue
            need.append((i, old))
        if need:
            for (i, old), vbn in zip(need, alloc(len(need)), strict=True):
                if old:
                    free(old)
                self.fresh[i] = vbn
                self.tree.set(i, np.array([[vbn, 0]], dtype=np.uint64))
            changes += len(need)
        return changes + self.tree.allocate(alloc, free)

    def write(self, out: Writes) -> ObjectRef:
        """Phase 2: data blocks with their checksums, then the tree."""
        view, bs = memoryview(self.bits).cast("B"), self.block_size
        for i in sorted(self.fresh):
            raw = bytes(view[i * bs:(i + 1) * bs])
            self.tree.set(i, np.array([[self.fresh[i], checksum(raw)]], dtype=np.uint64))
            out.append((self.fresh[i], raw))
        self.dirty.clear()
        self.fresh.clear()
        return self.tree.write(out)

    @property
    def is_dirty(self) -> bool:
        return bool(self.dirty) or self.tree.dirty


class BlobObject:
    """A byte string rewritten whole whenever it changes (the catalog: a few blocks)."""

    def __init__(self, ref: ObjectRef, block_size: int, read_block: ReadBlock,
                 read_many: ReadMany):
        self.block_size = block_size
        self.ref = ref
        self._read_block = read_block
        self._read_many = read_many
        self._new: CowTree | None = None
        self._fresh: list[int] = []

    def _tree(self, ref: ObjectRef) -> CowTree:
        n = max(1, -(-ref.length // self.block_size))
        return CowTree(ObjectRef(ref.vbn, ref.checksum, n, ref.levels), self.block_size,
                       self._read_block, n)

    def load(self) -> bytes:
        if self.ref.vbn == 0:
            return b""
        _, data = self._tree(self.ref).walk()
        return self._read_many(data[:, :2])[:self.ref.length]

    def blocks(self) -> list[int]:
        """Every VBN the committed blob occupies (nodes and data)."""
        if self.ref.vbn == 0:
            return []
        nodes, data = self._tree(self.ref).walk()
        return nodes + data[:, 0].tolist()

    def allocate(self, length: int, alloc: Callable[[int], list[int]],
                 free: Callable[[int], None]) -> int:
        """Phase 1: free the old copy once, place a new one of `length` bytes."""
        changes = 0
        if self._new is None:
            for vbn in self.blocks():
                free(vbn)
            n = max(1, -(-length // self.block_size))
            self._new = CowTree(ObjectRef(), self.block_size, self._read_block, n)
            self._fresh = alloc(n)
            ptrs = np.zeros((n, 2), dtype=np.uint64)
            ptrs[:, 0] = self._fresh
            self._new.set(0, ptrs)
            changes += n
        return changes + self._new.allocate(alloc, free)

    def write(self, data: bytes, out: Writes) -> ObjectRef:
        assert self._new is not None, "allocate() comes first"
        bs, n = self.block_size, len(self._fresh)
        padded = data.ljust(n * bs, b"\0")
        if len(padded) != n * bs:
            raise ValueError("blob grew between phase 1 and phase 2")
        ptrs = np.zeros((n, 2), dtype=np.uint64)
        for k, vbn in enumerate(self._fresh):
            raw = padded[k * bs:(k + 1) * bs]
            ptrs[k] = (vbn, checksum(raw))
            out.append((vbn, raw))
        self._new.set(0, ptrs)
        root = self._new.write(out)
        self.ref = ObjectRef(root.vbn, root.checksum, len(data), levels_for(n, bs // 16))
        self._new, self._fresh = None, []
        return self.ref
