"""The one door the transfer layer uses: note what was written where.

A failure to write the catalog is a warning, never a failed backup: the media are
the truth and `blockxfer catalog import` rebuilds the catalog from them.
"""

from __future__ import annotations

import logging
import os
import sqlite3
from collections.abc import Callable, Mapping

from . import records
from .db import catalog_path, connect
from .records import ImageRecord, TapeRef

log = logging.getLogger("blockxfer.catalog")
_explicit: str | None = None        # --catalog PATH, set by the command line


def use(path: str | None) -> None:
    """The catalog the commands of this process use (None: $BLOCKXFER_CATALOG or the
    default)."""
    global _explicit
    _explicit = path


def current_path() -> str:
    return catalog_path(_explicit)


def exists() -> bool:
    """Is there a catalog yet? (Reading commands do not create one.)"""
    return os.path.exists(current_path())


def open_catalog() -> sqlite3.Connection:
    return connect(current_path())


def _keep(what: str, write: Callable[[sqlite3.Connection], object]) -> None:
    try:
        db = open_catalog()
        try:
            write(db)
        finally:
            db.close()
    except Exception as e:   # any failure here must not fail the backup
        where = str(e) if current_path() in str(e) else f"catalog {current_path()}: {e}"
        log.warning("warning: %s; %s is not recorded there, but the backup itself is "
                    "complete ('blockxfer catalog import' adds it from the medium)", where, what)


def note_image(rec: ImageRecord) -> None:
    _keep(f"{rec.kind} image {rec.expression!r}", lambda db: records.add_image(db, rec))


def note_barcodes(set_id: str, barcodes: Mapping[int, str]) -> None:
    if barcodes:
        _keep("the set's barcodes", lambda db: records.set_barcodes(db, set_id, barcodes))


def note_verified(kind: str, image_id: str, when: int) -> None:
    _keep("the verification", lambda db: records.set_verified(db, kind, image_id, when))


def note_pool(set_id: str, pool: str) -> None:
    from . import pools
    _keep(f"the set's tapes in pool {pool!r}", lambda db: pools.assign_set(db, pool, set_id))


def forget_tape(set_id: str, seq: int) -> None:
    _keep("the erased tape", lambda db: records.forget_tape(db, set_id, seq))


__all__ = ["ImageRecord", "TapeRef", "current_path", "exists", "forget_tape", "note_barcodes",
           "note_image", "note_pool", "note_verified", "open_catalog", "use"]
