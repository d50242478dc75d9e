"""What the store layout needs from an object store, and an in-memory one for tests.

The calls: get (optionally a byte range), put (optionally conditional, optionally
under an object lock's retention), retain (extend an object's retention), head,
list, delete, and whether the bucket has object lock. `s3.py` implements them
over boto3; `MemoryStore` implements them over a dict, with switches that make
it behave like a store without conditional PUT or fail on a chosen call.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Protocol

from blockxfer.errors import BlockxferError, DeviceError


class Missing(BlockxferError):
    """The object does not exist."""

    exit_code = 3


class Conflict(BlockxferError):
    """A conditional PUT lost: someone else wrote the object first."""

    exit_code = 5


@dataclass(frozen=True)
class ObjectInfo:
    key: str
    size: int
    mtime: float                           # unix seconds
    etag: str


class ObjectStore(Protocol):
    url: str

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        """Bytes [start, end) of an object (all of it by default); Missing if absent."""

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        """An object and its ETag (for a later conditional PUT)."""

    def put(self, key: str, data: bytes | bytearray | memoryview, *, if_none_match: bool = False,
            if_match: str | None = None, retain_until: float | None = None) -> str:
        """Write an object; Conflict when a condition fails. Returns the ETag. With
        `retain_until` (unix seconds) the store keeps it immutable until then.
        `data` is not kept past the return (a packer fills the buffer again)."""

    def retain(self, key: str, until: float) -> None:
        """Keep an object immutable until `until` at least (never shortens)."""

    def lock_enabled(self) -> bool:
        """Does the bucket take retention (S3 object lock)?"""

    def head(self, key: str) -> ObjectInfo | None: ...

    def list(self, prefix: str) -> Iterator[ObjectInfo]: ...

    def delete(self, key: str) -> None: ...


class MemoryStore:
    """A dict behind the ObjectStore calls. `conditional=False` ignores If-Match and
    If-None-Match as rclone does; `fail(call, n)` makes the n-th such call raise."""

    def __init__(self, *, conditional: bool = True, lock: bool = False):
        self.url = "mem://"
        self.objects: dict[str, tuple[bytes, float, str]] = {}
        self.conditional = conditional
        self.lock = lock
        self.retained: dict[str, float] = {}       # key -> retained until (enforced)
        self.calls: dict[str, int] = {}
        self.gets = 0
        self.got_bytes = 0
        self._fail: dict[str, int] = {}
        self._hook: Callable[[str, str], None] | None = None
        self._lock = threading.Lock()

    def fail(self, call: str, n: int) -> None:
        self._fail[call] = n

    def _count(self, call: str, key: str) -> None:
        with self._lock:
            self.calls[call] = self.calls.get(call, 0) + 1
            if self._fail.get(call) == self.calls[call]:
                raise DeviceError(f"injected failure of {call} {key}")

    def get(self, key: str, start: int = 0, end: int | None = None) -> bytes:
        self._count("get", key)
        if key not in self.objects:
            raise Missing(f"{key} does not exist")
        data = self.objects[key][0]
        out = data[start:len(data) if end is None else end]
        with self._lock:
            self.gets += 1
            self.got_bytes += len(out)
        return out

    def get_tagged(self, key: str) -> tuple[bytes, str]:
        data = self.get(key)
        return data, self.objects[key][2]

    def put(self, key: str, data: bytes | bytearray | memoryview, *, if_none_match: bool = False,
            if_match: str | None = None, retain_until: float | None = None) -> str:
        self._count("put", key)
        self._check_unlocked(key)
        if retain_until is not None:
            self.retain(key, retain_until)
        raw = bytes(data)
        etag = hashlib.md5(raw).hexdigest()
        with self._lock:
            old = self.objects.get(key)
            if self.conditional and if_none_match and old is not None:
                raise Conflict(f"{key} already exists")
            if self.conditional and if_match is not None and (old is None or old[2] != if_match):
                raise Conflict(f"{key} changed")
            self.objects[key] = (raw, time.time(), etag)
        return etag

    def head(self, key: str) -> ObjectInfo | None:
        self._count("head", key)
        o = self.objects.get(key)
        return None if o is None else ObjectInfo(key, len(o[0]), o[1], o[2])

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        self._count("list", prefix)
        with self._lock:
            items = sorted((k, v) for k, v in self.objects.items() if k.startswith(prefix))
        for k, (data, mtime, etag) in items:
            yield ObjectInfo(k, len(data), mtime, etag)

    def delete(self, key: str) -> None:
        self._count("delete", key)
        self._check_unlocked(key)
        with self._lock:
            self.objects.pop(key, None)

    def retain(self, key: str, until: float) -> None:
        if not self.lock:
            raise DeviceError(f"{key}: the bucket has no object lock")
        self.retained[key] = max(until, self.retained.get(key, 0.0))

    def lock_enabled(self) -> bool:
        return self.lock

    def _check_unlocked(self, key: str) -> None:
        if self.retained.get(key, 0.0) > time.time() and key in self.objects:
            raise DeviceError(f"{key} is retained by object lock (AccessDenied)")

    def age(self, key: str, seconds: float) -> None:
        """Make an object look `seconds` older (grace-period tests)."""
        data, mtime, etag = self.objects[key]
        self.objects[key] = (data, mtime - seconds, etag)
