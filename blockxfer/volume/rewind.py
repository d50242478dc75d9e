"""Rewinding a replica to a master it holds: the state it had right after it received it.

A replica that was written locally (or whose snapshots were changed locally)
no longer takes incrementals: its generation moved past its newest snapshot,
and local CPs may have taken VBNs the source owns. `replicate pull --rollback`
brings it back without a full transfer: the master's own root record (the root
the receive committed, kept in the catalog entry) names an LBA map, an active
plane and a catalog whose blocks all lie in the master's plane, which the
master pins here, so they are intact. That root is written into both
superblock slots (the first write leaves the current state in force in the
other slot: a kill in between leaves the volume as it was), after the local
area says which of that catalog's snapshots this copy does not hold whole.
Everything written since becomes free. What it does not do: rewind a volume a
server holds open, or to a snapshot that is incomplete, a shadow, or rootless.
"""

from __future__ import annotations

from dataclasses import replace

from blockxfer.device import BlockDevice
from blockxfer.errors import VolumeError

from .blockio import BlockIO
from .layout import Catalog
from .local import LocalState
from .objects import BlobObject
from .superblock import write_superblock
from .volume import Volume


def rewind_to(dev: BlockDevice, name: str) -> list[str]:
    """Make the volume on `dev` (opened for writing, not otherwise open) the replica
    it was when `name` was its newest snapshot; the names of the snapshots this
    discards (taken or received after it)."""
    vol = Volume.open(dev, writable=False)
    try:
        e = vol.resolve(name)
        if e.shadow or e.incomplete or e.root is None:
            what = "a shadow" if e.shadow else "incomplete" if e.incomplete else "rootless"
            raise VolumeError(f"{dev.path}: cannot roll back to {e.name!r}: it is {what} "
                              "here")
        whole = {s.guid for s in vol.snapshots() if not s.incomplete and not s.shadow}
        after = [s.name for s in vol.snapshots() if s.generation > e.generation]
        root, sb, slot, area, local = e.root, vol.sb, vol.slot, vol.local_area, vol.local
        io = BlockIO(dev, vol.block_size)
        try:
            cat = Catalog.unpack(BlobObject(root.catalog, vol.block_size, io.read_block,
                                            io.read_many).load())
        finally:
            io.close()
    finally:
        vol.io.close()
    lacking = {s.guid for s in cat.snapshots if not s.shadow and s.guid not in whole}
    # what this copy knows of the current state too: a kill before the superblocks
    # leaves it in force with these facts, which must still hold for it
    area.write(LocalState(local.seq, root.generation, incomplete=lacking | local.incomplete,
                          released=set(local.released), props=dict(local.props)))
    new = replace(sb, root=root)
    write_superblock(dev, new, 1 - slot)    # the current state still holds in `slot`
    write_superblock(dev, new, slot)
    return after
