"""A store: where things live under `s3://BUCKET/PREFIX`, and the catalog commit.

Readers trust only a volume's catalog: a manifest or pack that no catalog names
does not exist for them. The catalog is written last, with a conditional PUT
(If-Match its old ETag, If-None-Match for the first). A store that does not
enforce conditions (rclone) is detected once, when the store is created, and
recorded in the store marker; there the catalog's read-modify-write runs under a
lock made of write-once objects (docs/object-store-format.md, "Two writers").
"""

from __future__ import annotations

import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from blockxfer.errors import BlockxferError, FormatError, NotFound, UsageError

from . import format as fmt
from .objects import Conflict, Missing, ObjectInfo, ObjectStore

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
LOCK_STALE = 120.0                          # seconds: a lock older than this is abandoned
COMMIT_TRIES = 20


@dataclass(frozen=True)
class Location:
    """`s3://BUCKET/PREFIX[/VOLUME[@SNAP]]`, split."""

    bucket: str
    prefix: str
    volume: str | None = None
    snapshot: str | None = None


def parse_url(url: str, *, volume: bool) -> Location:
    """With `volume`, the last path component names the volume (and may carry @SNAP)."""
    if not url.startswith("s3://"):
        raise UsageError(f"{url!r} is not an s3://BUCKET/PREFIX address")
    parts = [p for p in url[5:].split("/") if p]
    if not parts:
        raise UsageError(f"{url!r} names no bucket")
    bucket, rest = parts[0], parts[1:]
    if any(p in (".", "..") for p in parts):
        raise UsageError(f"{url!r}: '.' and '..' are not allowed in a store address")
    if not volume:
        return Location(bucket, "/".join(rest))
    if not rest:
        raise UsageError(f"{url!r} names no volume: use s3://BUCKET/PREFIX/VOLUME")
    name, _, snap = rest[-1].partition("@")
    check_name(name, "volume")
    if "@" in rest[-1] and not snap:
        raise UsageError(f"{url!r}: a snapshot name must follow '@'")
    return Location(bucket, "/".join(rest[:-1]), name, snap or None)


def check_name(name: str, what: str) -> None:
    if not _NAME.match(name):
        raise UsageError(f"{name!r} is not a usable {what} name in a store (letters, digits, "
                         "'.', '_', '-')")


@dataclass
class SnapshotRecord:
    name: str
    guid: bytes
    id: int
    cp: int                                 # the snapshot's CP generation on the source
    manifest: str                           # key of its manifest
    manifest_check: int
    blocks: int
    new_bytes: int                          # bytes of packs this upload added
    base: bytes | None
    uploaded: int
    retain_until: int | None = None         # object lock: its objects immutable until then

    def as_json(self) -> dict[str, Any]:
        out = {"name": self.name, "guid": self.guid.hex(), "id": self.id, "cp": self.cp,
               "manifest": self.manifest, "manifest_check": f"{self.manifest_check:016x}",
               "blocks": self.blocks, "new_bytes": self.new_bytes,
               "base": self.base.hex() if self.base else None, "uploaded": self.uploaded}
        if self.retain_until is not None:
            out["retain_until"] = self.retain_until
        return out

    def retained(self, now: float) -> bool:
        return self.retain_until is not None and self.retain_until > now

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> SnapshotRecord:
        return cls(str(d["name"]), bytes.fromhex(d["guid"]), int(d["id"]), int(d["cp"]),
                   str(d["manifest"]), int(d["manifest_check"], 16), int(d["blocks"]),
                   int(d["new_bytes"]), bytes.fromhex(d["base"]) if d["base"] else None,
                   int(d["uploaded"]),
                   int(d["retain_until"]) if d.get("retain_until") is not None else None)


@dataclass
class Catalog:
    volume: str
    uuid: bytes
    block_size: int
    nblocks: int
    chunk_blocks: int
    generation: int = 0
    snapshots: list[SnapshotRecord] | None = None

    def snaps(self) -> list[SnapshotRecord]:
        return sorted(self.snapshots or [], key=lambda s: s.cp)

    def find(self, *, name: str | None = None, guid: bytes | None = None) -> SnapshotRecord | None:
        return next((s for s in self.snaps() if (name is not None and s.name == name)
                     or (guid is not None and s.guid == guid)), None)

    def pack(self) -> bytes:
        return fmt.seal_json(fmt.CATALOG_MAGIC, {
            "format": fmt.VERSION, "volume": self.volume, "uuid": self.uuid.hex(),
            "block_size": self.block_size, "nblocks": self.nblocks,
            "chunk_blocks": self.chunk_blocks, "generation": self.generation,
            "snapshots": [s.as_json() for s in self.snaps()]})

    @classmethod
    def unpack(cls, raw: bytes, what: str) -> Catalog:
        d = fmt.unseal_json(fmt.CATALOG_MAGIC, raw, what)
        try:
            return cls(str(d["volume"]), bytes.fromhex(str(d["uuid"])), int(d["block_size"]),  # type: ignore[call-overload]
                       int(d["nblocks"]), int(d["chunk_blocks"]), int(d["generation"]),  # type: ignore[call-overload]
                       [SnapshotRecord.from_json(s) for s in d["snapshots"]])  # type: ignore[attr-defined]
        except (KeyError, TypeError, ValueError) as e:
            raise FormatError(f"{what} is malformed ({e})") from e


class Store:
    """The objects of one store root; every key is built here."""

    def __init__(self, objects: ObjectStore, prefix: str, url: str = ""):
        self.o = objects
        self.prefix = prefix.strip("/")
        self.url = url or f"{objects.url}{self.prefix}"
        self._conditional: bool | None = None

    def key(self, *parts: str) -> str:
        return "/".join(([self.prefix] if self.prefix else []) + list(parts))

    def pack_key(self, pid: bytes) -> str:
        h = pid.hex()
        return self.key("packs", h[:2], f"{h}.pack")

    def catalog_key(self, volume: str) -> str:
        return self.key("volumes", volume, "catalog")

    def manifest_key(self, volume: str, guid: bytes, check: int) -> str:
        return self.key("volumes", volume, "manifests", f"{guid.hex()}-{check:016x}.manifest")

    # -- the store marker: format and whether conditional PUT holds --------------------------
    def conditional(self, *, create: bool = False) -> bool:
        if self._conditional is None:
            key = self.key("blockxfer-store")
            try:
                d = fmt.unseal_json(fmt.STORE_MAGIC, self.o.get(key), f"{self.url} store marker")
            except Missing:
                if not create:
                    raise NotFound(f"{self.url} holds no blockxfer store") from None
                d = {"format": fmt.VERSION, "catalog": "conditional" if self._probe() else
                     "locked", "created": int(time.time())}
                self.o.put(key, fmt.seal_json(fmt.STORE_MAGIC, d), if_none_match=True)
            self._conditional = d.get("catalog") == "conditional"
        return self._conditional

    def _probe(self) -> bool:
        """Does this store enforce If-None-Match? (rclone accepts and ignores it.)"""
        key = self.key(f"blockxfer-probe-{os.urandom(8).hex()}")
        self.o.put(key, b"1")
        try:
            self.o.put(key, b"2", if_none_match=True)
            return False
        except Conflict:
            return True
        finally:
            self.o.delete(key)

    # -- catalogs -----------------------------------------------------------------------------
    def volumes(self) -> list[str]:
        head = self.key("volumes") + "/"
        return sorted({i.key[len(head):].split("/")[0] for i in self.o.list(head)
                       if i.key.endswith("/catalog")})

    def catalog(self, volume: str) -> Catalog | None:
        return self._catalog_tagged(volume)[0]

    def need_catalog(self, volume: str) -> Catalog:
        cat = self.catalog(volume)
        if cat is None:
            raise NotFound(f"{self.url} holds no volume {volume!r} (see 'blockxfer store ls')")
        return cat

    def _catalog_tagged(self, volume: str) -> tuple[Catalog | None, str | None]:
        try:
            raw, etag = self.o.get_tagged(self.catalog_key(volume))
        except Missing:
            return None, None
        return Catalog.unpack(raw, f"{self.url}/{volume} catalog"), etag

    def commit(self, volume: str, change: Callable[[Catalog | None], Catalog]) -> Catalog:
        """Apply `change` to the newest catalog and write it last, atomically."""
        if not self.conditional(create=True):
            with self._lock(volume):
                cat, _ = self._catalog_tagged(volume)
                new = self._next(cat, change)
                self.o.put(self.catalog_key(volume), new.pack())
                return new
        for _ in range(COMMIT_TRIES):
            cat, etag = self._catalog_tagged(volume)
            new = self._next(cat, change)
            try:
                if etag is None:
                    self.o.put(self.catalog_key(volume), new.pack(), if_none_match=True)
                else:
                    self.o.put(self.catalog_key(volume), new.pack(), if_match=etag)
                return new
            except Conflict:
                time.sleep(0.05 + 0.1 * os.urandom(1)[0] / 255)
        raise Conflict(f"{self.url}/{volume}: the catalog kept changing under this commit; "
                       "try again")

    @staticmethod
    def _next(cat: Catalog | None, change: Callable[[Catalog | None], Catalog]) -> Catalog:
        new = change(cat)
        new.generation = (cat.generation if cat else 0) + 1
        return new

    def _lock(self, volume: str) -> _ObjectLock:
        return _ObjectLock(self.o, self.key("volumes", volume, "locks"))

    # -- manifests ----------------------------------------------------------------------------
    def manifest(self, volume: str, rec: SnapshotRecord) -> fmt.Manifest:
        what = f"{self.url}/{volume}@{rec.name} manifest"
        try:
            raw = self.o.get(rec.manifest)
        except Missing:
            raise FormatError(f"{what} is missing from the store; run 'blockxfer store "
                              "verify'") from None
        from blockxfer.checksum import checksum
        if checksum(raw) != rec.manifest_check:
            raise FormatError(f"{what} is damaged: its checksum does not match the catalog")
        return fmt.Manifest.unpack(raw, what)

    def put_manifest(self, volume: str, man: fmt.Manifest,
                     retain_until: float | None = None) -> tuple[str, int]:
        from blockxfer.checksum import checksum
        raw = man.pack()
        check = checksum(raw)
        key = self.manifest_key(volume, man.top_guid, check)
        self.o.put(key, raw, retain_until=retain_until)
        return key, check

    def all_objects(self, *parts: str) -> Iterator[Any]:
        return self.o.list(self.key(*parts) + "/")


class _ObjectLock:
    """Mutual exclusion from write-once objects and a strongly consistent LIST: put
    my lock, list; go ahead only when no other live lock is listed, else take mine
    back and retry later. If my LIST missed another writer's lock, that writer's
    PUT came after my PUT, so its LIST sees mine and it backs off. A lock is dead
    when older than LOCK_STALE, or at once when its writer (same host) is gone."""

    def __init__(self, o: ObjectStore, prefix: str, wait: float = LOCK_STALE + 30):
        self.o, self.prefix, self.wait = o, prefix, wait
        self.key = ""

    def __enter__(self) -> _ObjectLock:
        end = time.monotonic() + self.wait
        while time.monotonic() < end:
            self.key = f"{self.prefix}/{time.time_ns():020d}-{os.urandom(6).hex()}.lock"
            self.o.put(self.key, f"{socket.gethostname()} {os.getpid()}\n".encode())
            others = [i for i in self.o.list(self.prefix + "/") if i.key != self.key]
            live = [i for i in others if not self._dead(i)]
            for i in others:
                if i not in live:
                    self.o.delete(i.key)      # abandoned by a killed writer
            if not live:
                return self
            self.o.delete(self.key)
            time.sleep(0.05 + 0.2 * os.urandom(1)[0] / 255)
        raise Conflict(f"{self.prefix}: another writer holds the catalog lock; try again")

    def _dead(self, info: ObjectInfo) -> bool:
        if time.time() - info.mtime >= LOCK_STALE:
            return True
        try:
            host, pid = self.o.get(info.key).decode().split()
        except (BlockxferError, ValueError, UnicodeDecodeError):
            return False                      # gone meanwhile, or not ours to judge
        if host != socket.gethostname() or int(pid) == os.getpid():
            return False
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            return True
        except (PermissionError, ValueError):
            pass
        return False

    def __exit__(self, *exc: object) -> None:
        self.o.delete(self.key)
