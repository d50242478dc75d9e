"""Reading the catalog: what is where (`catalog ls`) and what a restore of one
snapshot needs (`catalog where`), across tape sets, files and object stores."""

from __future__ import annotations

import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any

from blockxfer.errors import NotFound, UsageError


@dataclass(frozen=True)
class Medium:
    kind: str
    path: str | None
    set_id: str | None = None
    set_name: str | None = None
    seq: int | None = None
    label: str | None = None
    barcode: str | None = None
    pool: str | None = None
    file: int | None = None        # the part's tape file
    part: int = 0

    def describe(self) -> str:
        if self.kind == "tape":
            code = f", barcode {self.barcode}" if self.barcode else ""
            return (f"tape {self.label!r} (set {self.set_name!r} #{self.seq}{code}) "
                    f"file {self.file}")
        return f"{self.kind} {self.path}"

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "path": self.path, "set_id": self.set_id,
                "set": self.set_name, "seq": self.seq, "label": self.label,
                "barcode": self.barcode, "pool": self.pool, "file": self.file,
                "part": self.part}


@dataclass
class Image:
    id: int
    kind: str
    image_id: str
    volume: str
    volume_path: str | None
    expression: str
    top: str
    base: str | None
    level: int
    number: int | None
    store_volume: str | None
    blocks: int
    bytes: int | None
    complete: bool
    written: int
    verified: int | None
    media: list[Medium] = field(default_factory=list)     # in part order

    @property
    def standalone(self) -> bool:
        """Restorable alone: a full image, or any object-store snapshot (its manifest
        names every block of the snapshot)."""
        return self.base is None or self.kind == "store"

    @property
    def whole(self) -> bool:
        """Complete, and the catalog knows the medium of every part (an import of a
        set's last tape alone knows the end of an image, not its beginning)."""
        return self.complete and [m.part for m in self.media] == list(range(len(self.media)))

    def as_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "image_id": self.image_id, "volume": self.volume,
                "volume_path": self.volume_path, "expression": self.expression,
                "top": self.top, "base": self.base, "level": self.level,
                "number": self.number, "store_volume": self.store_volume,
                "blocks": self.blocks, "bytes": self.bytes, "complete": self.complete,
                "written": iso(self.written), "verified": iso(self.verified),
                "media": [m.as_dict() for m in self.media]}


def iso(t: int | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def images(db: sqlite3.Connection, volume: str | None = None) -> list[Image]:
    """Every image (of one volume: its uuid or path), oldest first, with its media."""
    q = ("SELECT i.*, v.path AS volume_path FROM images i JOIN volumes v ON v.uuid = i.volume")
    args: tuple[str, ...] = ()
    if volume is not None:
        q += " WHERE i.volume = ? OR v.path = ?"
        args = (volume, volume)
    out = []
    for r in db.execute(q + " ORDER BY i.written, i.id", args).fetchall():
        img = Image(r["id"], r["kind"], r["image_id"], r["volume"], r["volume_path"],
                    r["expression"], r["top"], r["base"], r["level"], r["number"],
                    r["store_volume"], r["blocks"], r["bytes"], bool(r["complete"]),
                    r["written"], r["verified"])
        img.media = [Medium(m["kind"], m["path"], m["set_id"], m["set_name"], m["seq"],
                            m["label"], m["barcode"], m["pool"], m["file"], m["part"])
                     for m in db.execute("SELECT m.*, p.file, p.part FROM parts p JOIN media m ON "
                                         "m.id = p.medium WHERE p.image = ? ORDER BY p.part",
                                         (r["id"],))]
        out.append(img)
    return out


def volumes_with(db: sqlite3.Connection, snapshot: str) -> list[tuple[str, str | None]]:
    return [(r[0], r[1]) for r in db.execute(
        "SELECT DISTINCT v.uuid, v.path FROM images i JOIN volumes v ON v.uuid = i.volume "
        "WHERE i.top = ?", (snapshot,))]


def resolve_volume(db: sqlite3.Connection, volume: str | None, snapshot: str) -> str:
    """The uuid of VOLUME (a uuid or a path as recorded), or of the one volume that
    has an image of `snapshot` when none is named."""
    if volume:
        row = db.execute("SELECT uuid FROM volumes WHERE uuid = ? OR path = ?",
                         (volume, volume)).fetchone()
        if row is None:
            raise NotFound(f"the catalog knows no volume {volume!r} (see 'blockxfer catalog ls')")
        return str(row[0])
    found = volumes_with(db, snapshot)
    if not found:
        raise NotFound(f"the catalog holds no image whose top is {snapshot!r} (see "
                       "'blockxfer catalog ls')")
    if len(found) > 1:
        raise UsageError(f"snapshot {snapshot!r} exists in {len(found)} volumes ("
                         + ", ".join(p or u for u, p in found) + "); name it as VOLUME@"
                         + snapshot)
    return found[0][0]


def where(db: sqlite3.Connection, volume: str, snapshot: str,
          have: frozenset[str] = frozenset()) -> list[Image]:
    """The images a restore of `snapshot` applies, oldest first: the fewest images
    (a level 0 then its increments, or one object-store snapshot), stopping at a
    snapshot the target already holds (`have`). Among equally short chains the
    newest wins (its full image written last)."""
    by_top: dict[str, list[Image]] = {}
    for img in images(db, volume):
        if img.whole:
            by_top.setdefault(img.top, []).append(img)
    best: dict[str, list[Image] | None] = {}

    def chain(snap: str, seen: frozenset[str]) -> list[Image] | None:
        if snap in best:
            return best[snap]
        options = []
        for img in by_top.get(snap, []):
            if img.standalone or img.base in have:
                options.append([img])
            elif img.base is not None and img.base not in seen:
                below = chain(img.base, seen | {snap})
                if below is not None:
                    options.append([*below, img])
        pick = min(options, key=lambda c: (len(c), -c[0].written, -c[-1].written),
                   default=None)
        best[snap] = pick
        return pick

    if snapshot in have:
        return []
    found = chain(snapshot, frozenset())
    if found is None:
        tops = sorted(by_top)
        raise NotFound(f"the catalog holds no complete chain of images that restores "
                       f"{snapshot!r} (tops it knows for this volume: "
                       f"{', '.join(tops) or 'none'})")
    return found
