"""What one mirror update sends: the image between the destination's snapshot
and the new one, chosen by the mark-on-allocate buffers when they span exactly
those two CPs, else by the plane difference (after a restart, or a retry).

Both give the same blocks (tests/test_mirror_property.py), so a retry after a
kill may resume a receive the other began: the stream id is the update's own,
kept in the mirror state, and the destination's plane of received blocks is
taken out of the image here.
"""

from __future__ import annotations

from bitarray import bitarray

from blockxfer.checksum import checksum
from blockxfer.stream import format as fmt
from blockxfer.stream.send import BlockCheck, SendPlan, plan_send, plane_runs
from blockxfer.volume import Volume
from blockxfer.volume.layout import SnapshotEntry
from blockxfer.volume.tracking import Changes


def _ref(e: SnapshotEntry) -> fmt.SnapshotRef:
    return fmt.SnapshotRef(e.id, e.guid, e.generation, e.flags, e.name)


def plan_changes(vol: Volume, ch: Changes, stream_id: bytes) -> SendPlan:
    """The incremental `top - base` from the buffers: no plane is read or subtracted
    (the top's plane, loaded by the cut, masks the allocations), and the checksums
    its blocks are verified against come from the changed map nodes only."""
    top, base = vol.resolve(ch.top), vol.resolve(ch.base)
    assert top.root is not None
    n, image = vol.nblocks, ch.image
    header = fmt.Header(
        volume_uuid=vol.sb.uuid, block_size=vol.block_size, nblocks=n,
        virtual_blocks=vol.virtual_blocks, first_data_vbn=vol.sb.first_data_vbn,
        next_id=vol.sb.next_id, stream_id=stream_id, expression=f"{top.name} - {base.name}",
        top=_ref(top), base=_ref(base), root=top.root,
        snapshot_set=[_ref(e) for e in vol.snapshots()], image_blocks=image.count(),
        image_digest=checksum(image.tobytes()), dealloc_blocks=ch.freed.count())
    vbns, cks = vol.changed_checksums(top.name, image)
    return SendPlan(header, list(plane_runs(image, n)), image, list(plane_runs(ch.freed, n)),
                    [top], vol.block_size, n, BlockCheck(vbns, cks, vol.block_size))


def plan_planes(vol: Volume, top: str, base: str | None, stream_id: bytes) -> SendPlan:
    """The same image by subtracting planes (`top - base`, or `top` in full)."""
    plan = plan_send(vol, f"{top} - {base}" if base else top)
    plan.header.stream_id = stream_id
    return plan


def resume_plan(plan: SendPlan, received: bitarray) -> SendPlan:
    """Leave out what an interrupted receive of this very stream already placed."""
    have = bitarray(len(plan.plane), endian="little")
    have.setall(0)
    m = min(len(have), len(received))
    have[:m] = received[:m]
    plan.header.flags |= fmt.H_RESUMING
    plan.plane = plan.plane & ~have
    plan.runs = list(plane_runs(plan.plane, plan.nblocks))
    return plan
