"""What the server exports, and the one lock that serializes volume calls.

`""` and `"active"` are the live volume (read-write unless the server is
read-only); `"@NAME"` is snapshot NAME, always read-only. Snapshots are looked
up when a client asks, so one taken while the server runs is exported at once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from . import protocol as p

ACTIVE_NAMES = ("", "active")
SNAPSHOT_PREFIX = "@"
MAX_PAYLOAD = 32 << 20       # largest READ/WRITE we accept (NBD_INFO_BLOCK_SIZE maximum)


class VolumeLike(Protocol):
    block_size: int

    @property
    def virtual_size(self) -> int: ...  # read-only: a Volume's is a property
    def read(self, offset: int, length: int, snapshot: str | None = None) -> bytes: ...
    def write(self, offset: int, data: bytes | memoryview) -> None: ...
    def trim(self, offset: int, length: int) -> None: ...
    def write_zeroes(self, offset: int, length: int) -> None: ...
    def extents(self, offset: int, length: int,
                snapshot: str | None = None) -> list[tuple[int, int, bool]]: ...
    def commit(self) -> None: ...
    def sync(self) -> None: ...
    def snapshot_names(self) -> list[str]: ...
    def create_snapshot(self, name: str, *, shadow: bool = False,
                        master: bool = False) -> None: ...
    def close(self) -> None: ...


class LockedVolume:
    """A Volume is not thread-safe: every call from any thread goes through here
    (reads too, unless the volume sets `concurrent_reads`)."""

    def __init__(self, volume: VolumeLike) -> None:
        self.volume = volume
        self.lock = threading.Lock()

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        with self.lock:
            return getattr(self.volume, method)(*args, **kwargs)

    def sync(self) -> None:
        """Make the writes so far durable. Outside the lock when the volume says its
        sync is thread-safe (the real Volume: it writes its intent log record
        outside its own lock too, so other connections' writes go on meanwhile,
        and concurrent FLUSHes share one record and one fdatasync)."""
        if getattr(self.volume, "concurrent_sync", False):
            self.volume.sync()
            return
        with self.lock:
            self.volume.sync()

    def sync_ahead(self) -> None:
        """Start making the writes so far durable, for a FLUSH expected next (the
        real Volume's `sync_ahead`; nothing for a volume without an intent log)."""
        ahead = getattr(self.volume, "sync_ahead", None)
        if ahead is not None:
            ahead()

    def read(self, offset: int, length: int,
             snapshot: str | None = None) -> tuple[bytes | memoryview, Callable[[], None]]:
        """Data, and the function to call once it has been sent. Outside the lock
        when the volume says its reads are thread-safe (the real Volume: reads from
        several connections then overlap on the device instead of queueing behind
        one another), and without a copy when it lends its buffers (`read_leased`)."""
        if getattr(self.volume, "concurrent_reads", False):
            leased = getattr(self.volume, "read_leased", None)
            if leased is not None:
                return leased(offset, length, snapshot)
            return self.volume.read(offset, length, snapshot), _nothing
        with self.lock:
            return self.volume.read(offset, length, snapshot), _nothing


def _nothing() -> None:
    pass


@dataclass(frozen=True, slots=True)
class Export:
    name: str
    snapshot: str | None       # None: the live volume
    read_only: bool
    size: int
    block_size: int

    @property
    def description(self) -> str:
        return f"snapshot {self.snapshot}" if self.snapshot else "live volume"

    def flags(self, structured: bool) -> int:
        f = p.FLAG_HAS_FLAGS | p.FLAG_SEND_FLUSH | p.FLAG_SEND_FUA | p.FLAG_CAN_MULTI_CONN
        f |= p.FLAG_READ_ONLY if self.read_only else p.FLAG_SEND_TRIM | p.FLAG_SEND_WRITE_ZEROES
        if structured:          # we always answer a READ with one chunk, so DF holds
            f |= p.FLAG_SEND_DF
        return f


class ExportTable:
    def __init__(self, vol: LockedVolume, *, read_only: bool = False) -> None:
        self.vol, self.read_only = vol, read_only

    def _export(self, name: str, snapshot: str | None) -> Export:
        v = self.vol.volume
        ro = self.read_only or snapshot is not None
        return Export(name, snapshot, ro, v.virtual_size, v.block_size)

    def resolve(self, name: str) -> Export | None:
        if name in ACTIVE_NAMES:
            return self._export(name, None)
        if name.startswith(SNAPSHOT_PREFIX):
            snap = name[len(SNAPSHOT_PREFIX):]
            if snap in self.vol.call("snapshot_names"):
                return self._export(name, snap)
        return None

    def all(self) -> list[Export]:
        snaps = self.vol.call("snapshot_names")
        return [self._export("", None)] + [self._export(SNAPSHOT_PREFIX + s, s) for s in snaps]
