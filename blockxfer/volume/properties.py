"""What only this copy of a volume knows about itself: local properties and holds.

Local properties are small settings kept in the volume's local area (see local.py):
a mirror's configuration, a policy, the destinations a source serves. They are
never replicated and survive consistency points and received roots, so a volume
that is both a replica and a source keeps its own. Each change is durable when
the call returns (the local area's two slots make it atomic).

Holds work like `zfs hold`: a tag on a snapshot that keeps it from being destroyed
(by an operator or by a retention policy) while a mirror, a destination or a
backup still needs it. They are a local property keyed by snapshot guid, so a
rename-free, replica-safe identity.
"""

from __future__ import annotations

import json

from blockxfer.errors import UsageError

from .state import VolumeState

HOLDS = "holds"
MAX_KEY = 64


class Properties(VolumeState):
    def get_property(self, key: str) -> bytes | None:
        with self._lock:
            return self.local.props.get(key)

    def properties(self) -> dict[str, bytes]:
        with self._lock:
            return dict(self.local.props)

    def set_property(self, key: str, value: bytes | None) -> None:
        """Set (or with None, remove) a local property, durably."""
        if not key or len(key.encode()) > MAX_KEY or not key.isascii():
            raise UsageError(f"property name {key!r} must be 1..{MAX_KEY} ASCII characters")
        with self._lock:
            self._check_usable(write=True)
            old = self.local.props.get(key)
            if value is None:
                self.local.props.pop(key, None)
            else:
                self.local.props[key] = bytes(value)
            try:
                self.local.root_generation = self.generation
                self.local_area.write(self.local)
            except Exception:
                if old is None:
                    self.local.props.pop(key, None)
                else:
                    self.local.props[key] = old
                raise

    # -- holds ------------------------------------------------------------------------------
    def _hold_table(self) -> dict[str, list[str]]:
        raw = self.local.props.get(HOLDS)
        return json.loads(raw) if raw else {}

    def holds(self) -> dict[str, set[str]]:
        """Snapshot name -> the tags holding it."""
        with self._lock:
            table = self._hold_table()
            return {e.name: set(table[e.guid.hex()]) for e in self.catalog.snapshots
                    if table.get(e.guid.hex())}

    def hold(self, snapshot: str, tag: str) -> None:
        """Keep `snapshot` from being destroyed until `release(snapshot, tag)`."""
        if not tag or len(tag) > 128:
            raise UsageError("a hold tag must be 1..128 characters")
        with self._lock:
            e = self.resolve(snapshot)
            table = self._hold_table()
            tags = set(table.get(e.guid.hex(), [])) | {tag}
            table[e.guid.hex()] = sorted(tags)
            self._save_holds(table)

    def release(self, snapshot: str, tag: str) -> None:
        with self._lock:
            e = self.resolve(snapshot)
            table = self._hold_table()
            tags = table.get(e.guid.hex(), [])
            if tag not in tags:
                raise UsageError(f"snapshot {e.name!r} has no hold {tag!r}; "
                                 "see 'blockxfer holds'")
            tags.remove(tag)
            if tags:
                table[e.guid.hex()] = tags
            else:
                del table[e.guid.hex()]
            self._save_holds(table)

    def _save_holds(self, table: dict[str, list[str]]) -> None:
        live = {e.guid.hex() for e in self.catalog.snapshots}
        table = {g: t for g, t in table.items() if g in live and t}   # drop the gone
        self.set_property(HOLDS, json.dumps(table, separators=(",", ":")).encode()
                          if table else None)
