"""Superblocks: the two slots at VBN 0 and 1, and what the start of a device holds.

The superblock is the volume's root of trust and its only pointer that is written
in place: a CP writes the new one into the slot not holding the current one, last
and durably. Only this package writes it (a receive asks the volume to commit a
foreign root; see receiver.py).
"""

from __future__ import annotations

from blockxfer.device import BlockDevice
from blockxfer.errors import FormatError

from . import layout
from .blockio import aligned
from .layout import Superblock
from .receiving import InterruptedReceive, refuse_interrupted


def _plane_blocks(nblocks: int, block_size: int) -> int:
    return -(-nblocks // (block_size * 8))


LOG_BYTES = 16 << 20            # the intent log region, at most
LOG_SHARE = 64                  # ... and at most 1/64 of the device


def local_end(nblocks: int, block_size: int) -> int:
    """The VBN after the local receive-state area: where the intent log starts."""
    return 2 + 2 * (1 + _plane_blocks(nblocks, block_size))


def log_blocks(nblocks: int, block_size: int) -> int:
    """Blocks of the intent log region a new volume gets."""
    return max(1, min(LOG_BYTES, nblocks * block_size // LOG_SHARE) // block_size)


def reserved_blocks(nblocks: int, block_size: int) -> int:
    """VBNs before the first allocatable one: 2 superblock slots, the local
    receive-state area (2 copies of a header block plus a plane), the intent log."""
    return local_end(nblocks, block_size) + log_blocks(nblocks, block_size)


def write_superblock(dev: BlockDevice, sb: Superblock, slot: int) -> None:
    """Write `sb` into `slot` (always the one not holding the current superblock)
    and make it durable."""
    buf = aligned(sb.block_size)
    raw = sb.pack()
    buf[:len(raw)] = raw
    dev.pwrite(memoryview(buf)[:sb.block_size], slot * sb.block_size)
    dev.flush()


def read_superblock(dev: BlockDevice) -> Superblock:
    """The valid superblock with the highest generation."""
    return read_superblock_slot(dev)[0]


def read_superblock_slot(dev: BlockDevice) -> tuple[Superblock, int]:
    """The valid superblock with the highest generation, and its slot."""
    buf = aligned(layout.MAX_BLOCK)
    view = memoryview(buf)
    found: list[tuple[Superblock, int]] = []
    problems: list[str] = []
    offsets = [0] + [1 << k for k in range(12, 21)]
    for off in offsets:
        if off + 4096 > dev.size:
            break
        dev.pread(view[:4096], off)
        try:
            sb = Superblock.unpack(view[:4096])
        except FormatError as e:
            problems.append(str(e))
            continue
        if off in (0, sb.block_size):
            found.append((sb, 0 if off == 0 else 1))
    if not found:
        if dev.size == 0:
            raise FormatError(f"{dev.path} is empty (0 bytes): a loop or NBD device with "
                              "nothing attached, or an empty file; attach or create the volume")
        refuse_interrupted(dev)              # a full receive was overwriting it
        if any("checksum" in p for p in problems):
            raise FormatError(f"{dev.path}: both superblocks are damaged; the volume cannot "
                              "be opened")
        raise FormatError(f"{dev.path} is not a blockxfer volume (no superblock); "
                          "create one with 'blockxfer init'")
    return max(found, key=lambda f: f[0].generation)


def has_signature(dev: BlockDevice) -> str | None:
    """What the start of the device holds, if anything: a volume or other data."""
    buf = aligned(65536)
    n = min(65536, dev.size - dev.size % 4096)
    if n <= 0:
        return None
    try:
        read_superblock(dev)
        return "a blockxfer volume"
    except InterruptedReceive:
        return "an interrupted receive"
    except FormatError:
        pass
    dev.pread(memoryview(buf)[:n], 0)
    if any(buf[:n]):
        return "data"
    return None


