"""Media pools and retention (Bareos habits): a pool per purpose with a retention;
a tape in a pool expires when every image with a part on it is older than that;
an expired tape may be recycled (erased or relabelled) without --force."""

from __future__ import annotations

import re
import sqlite3
import time
from dataclasses import dataclass
from typing import Any

from blockxfer.errors import NotFound, UsageError

from .db import transaction

_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def parse_retention(text: str) -> int:
    """'30d', '12h', '2w', '1y' -> seconds."""
    m = re.fullmatch(r"\s*(\d+)\s*([smhdwy])\s*", text)
    if not m:
        raise UsageError(f"retention {text!r}: give a number and a unit, e.g. 30d, 12h, 2w, 1y")
    return int(m.group(1)) * _UNITS[m.group(2)]


def create_pool(db: sqlite3.Connection, name: str, retention: int) -> None:
    if not _NAME.match(name):
        raise UsageError(f"{name!r} is not a usable pool name (letters, digits, '.', '_', '-')")
    with transaction(db):
        if db.execute("SELECT 1 FROM pools WHERE name=?", (name,)).fetchone():
            raise UsageError(f"pool {name!r} already exists (see 'blockxfer catalog pool ls')")
        db.execute("INSERT INTO pools VALUES (?, ?, ?)", (name, retention, int(time.time())))


def pools(db: sqlite3.Connection) -> list[dict[str, Any]]:
    return [{"name": r["name"], "retention": r["retention"],
             "tapes": db.execute("SELECT count(*) FROM media WHERE pool=?",
                                 (r["name"],)).fetchone()[0]}
            for r in db.execute("SELECT * FROM pools ORDER BY name")]


def assign(db: sqlite3.Connection, pool: str, tapes: list[str]) -> list[str]:
    """Put tapes (by label, barcode or set name: every tape of the set) in `pool`."""
    with transaction(db):
        require_pool(db, pool)
        done = []
        for t in tapes:
            rows = db.execute("SELECT id, label FROM media WHERE kind='tape' AND "
                              "(label=? OR barcode=? OR set_name=?)", (t, t, t)).fetchall()
            if not rows:
                raise NotFound(f"the catalog knows no tape {t!r} (label, barcode or set); "
                               "nothing was assigned")
            db.executemany("UPDATE media SET pool=? WHERE id=?", [(pool, r["id"]) for r in rows])
            done += [r["label"] for r in rows]
        return done


def require_pool(db: sqlite3.Connection, pool: str) -> None:
    if not db.execute("SELECT 1 FROM pools WHERE name=?", (pool,)).fetchone():
        raise NotFound(f"no pool {pool!r}; create it with 'blockxfer catalog pool create "
                       f"{pool} --retention 30d'; nothing was written")


def assign_set(db: sqlite3.Connection, pool: str, set_id: str) -> None:
    """Every tape of a set joins `pool` (a dump with --pool)."""
    with transaction(db):
        db.execute("UPDATE media SET pool=? WHERE kind='tape' AND set_id=?", (pool, set_id))


@dataclass(frozen=True)
class TapeState:
    set_id: str
    set_name: str
    seq: int
    label: str
    barcode: str | None
    pool: str | None
    images: int
    expires: int | None            # None: never (no pool) or holds nothing

    def expired(self, now: float) -> bool:
        return self.images == 0 or (self.expires is not None and self.expires <= now)

    def as_dict(self, now: float) -> dict[str, Any]:
        return {"label": self.label, "set": self.set_name, "seq": self.seq,
                "set_id": self.set_id, "barcode": self.barcode, "pool": self.pool,
                "images": self.images,
                "expires": None if self.expires is None else
                time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.expires)),
                "expired": self.expired(now)}


def tape_states(db: sqlite3.Connection) -> list[TapeState]:
    rows = db.execute(
        "SELECT m.set_id, m.set_name, m.seq, m.label, m.barcode, m.pool, p.retention, "
        "count(DISTINCT pt.image) AS n, max(i.written) AS newest FROM media m "
        "LEFT JOIN pools p ON p.name = m.pool LEFT JOIN parts pt ON pt.medium = m.id "
        "LEFT JOIN images i ON i.id = pt.image WHERE m.kind = 'tape' "
        "GROUP BY m.id ORDER BY m.set_name, m.seq").fetchall()
    return [TapeState(r["set_id"], r["set_name"], r["seq"], r["label"], r["barcode"], r["pool"],
                      r["n"], None if r["retention"] is None or r["newest"] is None
                      else r["newest"] + r["retention"]) for r in rows]


def tape_state(db: sqlite3.Connection, set_id: str, seq: int) -> TapeState | None:
    return next((t for t in tape_states(db) if t.set_id == set_id and t.seq == seq), None)


def expired_tapes(db: sqlite3.Connection, now: float | None = None) -> list[TapeState]:
    """Tapes in a pool whose every image is past the pool's retention: recyclable."""
    now = time.time() if now is None else now
    return [t for t in tape_states(db) if t.pool is not None and t.expired(now)]
