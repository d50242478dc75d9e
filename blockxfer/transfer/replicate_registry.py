"""The source's registry of replication destinations, and the holds it keeps for them.

Kept in the source volume's local properties (never replicated, survives CPs
and receives): `replicate.dests` is compact JSON, one entry per destination
name: its identity (who authenticated: the certificate's name, the ssh peer),
the newest master it has confirmed (it names it in its next pull), the master
last sent to it, last contact, and the last pull's size and time. Every master
a registered destination still needs (the one it confirmed, the one in flight,
and until a pull confirms that one, what it held before: replicate_source.py)
carries the hold `replicate:<name>`, so neither `destroy` nor a retention policy
can take it; `forget` releases them. The local area is small (~3 KiB): an entry
is ~200 bytes, guids are shortened to 16 hex digits.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from typing import Any

from blockxfer.errors import FormatError, NotFound
from blockxfer.volume import Volume

PROPERTY = "replicate.dests"
HOLD = "replicate:"


def hold_tag(dest: str) -> str:
    return HOLD + dest


def short(guid: bytes) -> str:
    return guid.hex()[:16]


@dataclass
class Destination:
    """One destination as the source knows it (JSON keys are the field names)."""

    id: str                        # identity the transport authenticated
    m: str | None = None           # newest master it confirmed (name)
    mg: str | None = None          # ... its guid, shortened
    s: str | None = None           # master last sent to it (name)
    t: int = 0                     # last contact, Unix seconds
    n: int = 0                     # pulls answered
    b: int = 0                     # bytes of the last stream
    d: float = 0.0                 # seconds of the last stream

    def row(self, name: str) -> dict[str, Any]:
        """As `replicate destinations --json` shows it."""
        return {"name": name, "identity": self.id, "confirmed": self.m,
                "confirmed_guid": self.mg, "sent": self.s, "last_contact": self.t,
                "pulls": self.n, "last_bytes": self.b, "last_seconds": self.d}


def load(vol: Volume) -> dict[str, Destination]:
    raw = vol.get_property(PROPERTY)
    if not raw:
        return {}
    try:
        data = json.loads(raw)
        return {k: Destination(**v) for k, v in data.items()}
    except (ValueError, TypeError) as e:
        raise FormatError(f"{vol.dev.path}: property {PROPERTY} is damaged ({e}); "
                          "'blockxfer replicate forget' each destination to start over") from e


def save(vol: Volume, dests: dict[str, Destination]) -> None:
    body = {k: {f: v for f, v in asdict(d).items() if v not in (None, 0, 0.0)} | {"id": d.id}
            for k, d in sorted(dests.items())}
    vol.set_property(PROPERTY, json.dumps(body, separators=(",", ":")).encode())


def contact(vol: Volume, name: str, identity: str, confirmed: tuple[str, bytes] | None,
            sent: str | None) -> Destination:
    """Record a pull: who, what it confirmed, what it is sent now."""
    dests = load(vol)
    d = dests.get(name) or Destination(identity)
    d.id, d.t, d.n = identity, int(time.time()), d.n + 1
    if confirmed is not None:
        d.m, d.mg = confirmed[0], short(confirmed[1])
    d.s = sent
    dests[name] = d
    save(vol, dests)
    return d


def finished(vol: Volume, name: str, nbytes: int, seconds: float) -> None:
    dests = load(vol)
    if name in dests:
        dests[name].b, dests[name].d = nbytes, round(seconds, 3)
        save(vol, dests)


def hold_only(vol: Volume, dest: str, keep: set[str]) -> None:
    """The destination's holds on exactly `keep`: new ones first, then the old
    released, so a master it needs is never unheld in between."""
    tag = hold_tag(dest)
    for snap in sorted(keep):
        if tag not in vol.holds().get(snap, set()):
            vol.hold(snap, tag)
    for snap, tags in vol.holds().items():
        if tag in tags and snap not in keep:
            vol.release(snap, tag)


def forget(vol: Volume, dest: str) -> list[str]:
    """Drop a destination: its entry and every hold it had; the snapshots released."""
    dests = load(vol)
    tag = hold_tag(dest)
    held = sorted(s for s, tags in vol.holds().items() if tag in tags)
    if dest not in dests and not held:
        raise NotFound(f"{vol.dev.path} has no replication destination {dest!r}; "
                       "see 'blockxfer replicate destinations'")
    for snap in held:
        vol.release(snap, tag)
    dests.pop(dest, None)
    save(vol, dests)
    return held


def listing(vol: Volume) -> list[dict[str, Any]]:
    holds = vol.holds()
    rows = []
    for name, d in sorted(load(vol).items()):
        row = d.row(name)
        row["holds"] = sorted(s for s, tags in holds.items() if hold_tag(name) in tags)
        rows.append(row)
    return rows
