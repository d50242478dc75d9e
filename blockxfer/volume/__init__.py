"""The write-anywhere volume: superblocks, CPs, allocator, LBA map, planes, snapshots."""

from .layout import SnapshotEntry
from .volume import Volume, has_signature, read_superblock

__all__ = ["SnapshotEntry", "Volume", "has_signature", "read_superblock"]
