"""The catalog database: SQLite in WAL mode, its schema versioned by a migration table.

One row per image (tape, stream file or object-store snapshot), one row per medium
(a tape of a set, a file, a store), and one row per part of an image on a medium
(an image spanning tapes has one part per tape). Pools give tapes a retention.
The media are the truth: everything here can be rebuilt by `catalog import`.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from blockxfer.errors import DeviceError

DEFAULT_PATH = "/var/lib/blockxfer/catalog.db"
ENV = "BLOCKXFER_CATALOG"

# Each migration takes the schema from version i to i + 1; never edit one that shipped.
MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE pools (
        name TEXT PRIMARY KEY,
        retention INTEGER NOT NULL,            -- seconds an image is kept
        created INTEGER NOT NULL);
    CREATE TABLE volumes (
        uuid TEXT PRIMARY KEY,
        path TEXT);                            -- where it was last seen
    CREATE TABLE media (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('tape', 'file', 'store')),
        set_id TEXT,                           -- tape: hex of the set's 16 random bytes
        set_name TEXT,
        seq INTEGER,                           -- tape: its number in the set, from 1
        label TEXT,                            -- tape: the label's serial
        barcode TEXT,                          -- tape: the cartridge's, from the changer
        path TEXT,                             -- tape: drive or virtual tape, file, s3:// store
        pool TEXT REFERENCES pools(name) ON DELETE SET NULL,
        UNIQUE (kind, set_id, seq));
    CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL CHECK (kind IN ('tape', 'file', 'store')),
        image_id TEXT NOT NULL,                -- tape descriptor id, stream id, store key
        volume TEXT NOT NULL REFERENCES volumes(uuid),
        expression TEXT NOT NULL,
        top TEXT NOT NULL,
        base TEXT,
        level INTEGER NOT NULL,
        snapshots TEXT NOT NULL DEFAULT '',    -- the volume's snapshots, comma-separated
        number INTEGER,                        -- tape: image number on its first tape
        store_volume TEXT,                     -- store: the volume's name in the store
        blocks INTEGER NOT NULL DEFAULT 0,
        bytes INTEGER,
        complete INTEGER NOT NULL DEFAULT 1,
        written INTEGER NOT NULL,
        verified INTEGER,
        UNIQUE (kind, image_id));
    CREATE TABLE parts (
        image INTEGER NOT NULL REFERENCES images(id) ON DELETE CASCADE,
        part INTEGER NOT NULL,
        medium INTEGER NOT NULL REFERENCES media(id) ON DELETE CASCADE,
        file INTEGER,                          -- tape file of the part's data
        PRIMARY KEY (image, part));
    CREATE INDEX images_top ON images(volume, top);
    CREATE INDEX parts_medium ON parts(medium);
    """,
)
SCHEMA_VERSION = len(MIGRATIONS)


def catalog_path(explicit: str | None = None) -> str:
    """--catalog PATH, else $BLOCKXFER_CATALOG, else the default."""
    return explicit or os.environ.get(ENV) or DEFAULT_PATH


def _migrate(db: sqlite3.Connection, path: str) -> None:
    """Apply the missing migrations, each with its row, under one write lock: two
    processes opening a new catalog at once migrate it once."""
    db.execute("BEGIN IMMEDIATE")
    try:
        db.execute("CREATE TABLE IF NOT EXISTS migrations (version INTEGER PRIMARY KEY, "
                   "applied INTEGER NOT NULL)")
        have = db.execute("SELECT coalesce(max(version), 0) FROM migrations").fetchone()[0]
        if have > SCHEMA_VERSION:
            raise DeviceError(f"catalog {path} has schema version {have}, newer than this "
                              f"blockxfer knows ({SCHEMA_VERSION}); upgrade blockxfer")
        for version in range(have + 1, SCHEMA_VERSION + 1):
            for statement in MIGRATIONS[version - 1].split(";"):   # no ';' inside them
                if statement.strip():
                    db.execute(statement)
            db.execute("INSERT INTO migrations VALUES (?, ?)", (version, int(time.time())))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


def connect(path: str) -> sqlite3.Connection:
    """Open (creating the file and its folder) and bring the schema up to date."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(path, timeout=30, isolation_level=None)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA foreign_keys=ON")
        db.execute("PRAGMA synchronous=FULL")
        _migrate(db, path)
    except (OSError, sqlite3.Error) as e:
        raise DeviceError(f"catalog {path}: {e}") from e
    return db


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
