"""The write-anywhere volume: superblocks, CPs, allocator, LBA map, planes, snapshots."""

from .layout import SnapshotEntry
from .superblock import has_signature, read_superblock
from .volume import Volume

__all__ = ["SnapshotEntry", "Volume", "has_signature", "read_superblock"]
