"""Writing the catalog: media, images and their parts, each write one transaction.

Callers hand in plain values (no tape, stream or store objects), so this package
sits below the transfer layer that calls it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from .db import transaction


@dataclass(frozen=True)
class TapeRef:
    """One tape of a set, as its label says."""

    set_id: str                    # hex
    set_name: str
    seq: int
    label: str
    path: str                      # the drive or virtual tape it was read or written through
    barcode: str | None = None


@dataclass
class ImageRecord:
    kind: str                      # tape, file, store
    image_id: str
    volume: str                    # uuid
    expression: str
    top: str
    base: str | None
    written: int
    blocks: int = 0
    bytes: int | None = None
    snapshots: Sequence[str] = ()
    number: int | None = None      # tape: image number on its first tape
    store_volume: str | None = None
    complete: bool = True
    verified: int | None = None
    volume_path: str | None = None
    # (part, medium, tape file): medium is a TapeRef, or a path / store URL
    parts: list[tuple[int, TapeRef | str, int | None]] = field(default_factory=list)


def _medium(db: sqlite3.Connection, kind: str, m: TapeRef | str) -> int:
    if isinstance(m, TapeRef):
        row = db.execute("SELECT id, barcode FROM media WHERE kind='tape' AND set_id=? AND seq=?",
                         (m.set_id, m.seq)).fetchone()
        if row is None:
            return int(db.execute(
                "INSERT INTO media(kind, set_id, set_name, seq, label, barcode, path) "
                "VALUES ('tape', ?, ?, ?, ?, ?, ?)",
                (m.set_id, m.set_name, m.seq, m.label, m.barcode, m.path)).lastrowid or 0)
        db.execute("UPDATE media SET set_name=?, label=?, path=?, barcode=coalesce(?, barcode) "
                   "WHERE id=?", (m.set_name, m.label, m.path, m.barcode, row["id"]))
        return int(row["id"])
    row = db.execute("SELECT id FROM media WHERE kind=? AND path=?", (kind, m)).fetchone()
    if row is not None:
        return int(row["id"])
    return int(db.execute("INSERT INTO media(kind, path) VALUES (?, ?)", (kind, m)).lastrowid
               or 0)


def _level(db: sqlite3.Connection, volume: str, base: str | None) -> int:
    """The patent's level: 0 for a full image, else one more than its base's image."""
    if base is None:
        return 0
    row = db.execute("SELECT min(level) FROM images WHERE volume=? AND top=?",
                     (volume, base)).fetchone()
    return 1 if row[0] is None else int(row[0]) + 1


def add_image(db: sqlite3.Connection, rec: ImageRecord) -> int:
    """Insert or update one image (keyed by kind and image id) and its parts."""
    with transaction(db):
        db.execute("INSERT INTO volumes(uuid, path) VALUES (?, ?) ON CONFLICT(uuid) DO UPDATE "
                   "SET path=coalesce(excluded.path, path)", (rec.volume, rec.volume_path))
        level = 0 if rec.kind == "store" and rec.base is None else _level(db, rec.volume,
                                                                          rec.base)
        row = db.execute("SELECT id, complete FROM images WHERE kind=? AND image_id=?",
                         (rec.kind, rec.image_id)).fetchone()
        values = (rec.volume, rec.expression, rec.top, rec.base, level,
                  ",".join(rec.snapshots), rec.store_volume, rec.blocks, rec.written)
        if row is None:
            image = int(db.execute(
                "INSERT INTO images(volume, expression, top, base, level, snapshots, "
                "store_volume, blocks, written, kind, image_id, number, bytes, complete, "
                "verified) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (*values, rec.kind, rec.image_id, rec.number, rec.bytes, int(rec.complete),
                 rec.verified)).lastrowid or 0)
        else:
            image = int(row["id"])
            # an import of a later tape of the set completes what an earlier one began
            db.execute("UPDATE images SET number=coalesce(?, number), "
                       "bytes=coalesce(?, bytes), complete=max(complete, ?), "
                       "verified=coalesce(?, verified) WHERE id=?",
                       (rec.number, rec.bytes, int(rec.complete), rec.verified, image))
        for part, medium, file in rec.parts:
            mid = _medium(db, rec.kind, medium)
            db.execute("INSERT INTO parts(image, part, medium, file) VALUES (?,?,?,?) "
                       "ON CONFLICT(image, part) DO UPDATE SET medium=excluded.medium, "
                       "file=excluded.file", (image, part, mid, file))
        return image


def add_tape(db: sqlite3.Connection, ref: TapeRef) -> None:
    with transaction(db):
        _medium(db, "tape", ref)


def set_barcodes(db: sqlite3.Connection, set_id: str, barcodes: Mapping[int, str]) -> None:
    """The cartridges a dump through a changer used: sequence number -> barcode."""
    with transaction(db):
        for seq, code in barcodes.items():
            db.execute("UPDATE media SET barcode=? WHERE kind='tape' AND set_id=? AND seq=?",
                       (code, set_id, seq))


def set_verified(db: sqlite3.Connection, kind: str, image_id: str, when: int) -> None:
    with transaction(db):
        db.execute("UPDATE images SET verified=? WHERE kind=? AND image_id=?",
                   (when, kind, image_id))


def forget_tape(db: sqlite3.Connection, set_id: str, seq: int) -> int:
    """The tape was erased or relabelled: drop it, and every image with a part on it
    (an image missing a part cannot be restored). Returns the images dropped."""
    with transaction(db):
        row = db.execute("SELECT id FROM media WHERE kind='tape' AND set_id=? AND seq=?",
                         (set_id, seq)).fetchone()
        if row is None:
            return 0
        images = [r[0] for r in db.execute("SELECT DISTINCT image FROM parts WHERE medium=?",
                                           (row["id"],))]
        db.executemany("DELETE FROM images WHERE id=?", [(i,) for i in images])
        db.execute("DELETE FROM media WHERE id=?", (row["id"],))
        return len(images)
