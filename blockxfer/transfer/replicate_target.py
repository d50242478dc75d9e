"""What a replication target holds, as a pull needs to know it (read-only).

Its whole masters (newest first: what it tells the source), whether it was
changed here since it received its newest master (diverged), the masters its
own destinations need (held `replicate:*`), and an interrupted receive with
its resume token: either into the volume (an incremental; the received plane is
in its local area) or over the device (a full image; the receiving marker says
so, and the local area in the new geometry holds the plane).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from blockxfer.device import BlockDevice
from blockxfer.errors import BlockxferError
from blockxfer.stream.receive import OpenDevice
from blockxfer.stream.send import make_token
from blockxfer.volume import Volume
from blockxfer.volume.local import LocalArea, LocalState
from blockxfer.volume.receiving import read_receiving_marker

from .replicate_registry import HOLD


@dataclass
class Interrupted:
    stream_id: str
    top_guid: str
    received: int
    blocks: int
    token: str
    full: bool

    def as_dict(self) -> dict[str, object]:
        return {"stream": self.stream_id, "top_guid": self.top_guid, "received": self.received,
                "blocks": self.blocks, "token": self.token, "full": self.full}


@dataclass
class Target:
    path: str
    exists: bool = False
    volume: bool = False                  # holds a volume that opens
    marker: bool = False                  # holds an interrupted full receive
    masters: list[tuple[str, bytes]] = field(default_factory=list)   # newest first
    newest: str | None = None             # its newest snapshot, master or not
    diverged: str | None = None           # why it no longer takes incrementals
    needed: list[bytes] = field(default_factory=list)
    interrupted: Interrupted | None = None
    props: dict[str, bytes] = field(default_factory=dict)       # this copy's own settings
    held: list[tuple[str, str, list[str]]] = field(default_factory=list)  # name, guid, tags

    @property
    def newest_master(self) -> tuple[str, bytes] | None:
        return self.masters[0] if self.masters else None


def _interrupted(st: LocalState, full: bool) -> Interrupted | None:
    if not st.pending or st.received is None:
        return None
    token = make_token(st.stream_id, st.top_guid, st.image_digest, st.image_blocks,
                       st.received)
    return Interrupted(st.stream_id.hex(), st.top_guid.hex(), int(st.received.count()),
                       st.image_blocks, token, full)


def from_volume(t: Target, vol: Volume) -> None:
    """Fill `t` from the open volume."""
    t.volume = True
    snaps = sorted(vol.snapshots(), key=lambda e: e.generation, reverse=True)
    t.masters = [(e.name, e.guid) for e in snaps
                 if e.master and not e.shadow and not e.incomplete and e.root is not None]
    newest = snaps[0] if snaps else None
    t.newest = newest.name if newest else None
    if newest is not None:
        if not newest.master or newest.incomplete:
            t.diverged = (f"its newest snapshot {newest.name!r} is not a whole master "
                          "received from a source")
        elif vol.generation != newest.generation:
            t.diverged = (f"it was written here after it received master {newest.name!r} "
                          f"(CP {vol.generation}, the master is CP {newest.generation})")
    holds = vol.holds()
    t.needed = [e.guid for e in snaps
                if any(tag.startswith(HOLD) for tag in holds.get(e.name, ()))]
    t.props = vol.properties()
    t.held = [(e.name, e.guid.hex(), sorted(holds[e.name])) for e in snaps if e.name in holds]
    t.interrupted = _interrupted(vol.local, full=False)


def _from_device(t: Target, dev: BlockDevice) -> None:
    marker = read_receiving_marker(dev)
    if marker is None:
        return
    t.marker = True
    st = LocalArea(dev, marker.block_size, marker.nblocks).read(0)
    t.interrupted = _interrupted(st, full=True)


def inspect_target(path: str, open_device: OpenDevice) -> Target:
    t = Target(path, exists=os.path.exists(path))
    if not t.exists:
        return t
    dev = open_device(path, write=False)
    try:
        try:
            vol = Volume.open(dev, writable=False)
        except BlockxferError:
            _from_device(t, dev)
            return t
        try:
            from_volume(t, vol)
        finally:
            vol.io.close()
    finally:
        dev.close()
    return t
