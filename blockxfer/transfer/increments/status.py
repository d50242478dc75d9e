"""What an increments directory holds, for `mirror status` and `blockxfer increments
status`: its state, newest mirrored snapshot, and its size on disk against the real
changed set (docs/increments.md)."""

from __future__ import annotations

from .format import READY
from .mirror import slot_or_none
from .store import Directory


def mirror_status(increments_dir: str) -> dict[str, object]:
    """What the directory holds, and its size on disk against the real changed set
    (the blocks that differ from the base)."""
    d = Directory(increments_dir)
    if not d.exists():                                # no update has made it yet
        return {"directory": d.path, "state": "none", "updates": 0, "consistent": False,
                "structure_bytes": 0}
    if slot_or_none(d) is None:                       # the first update is writing it
        return {"directory": d.path, "state": "empty", "updates": 0, "consistent": False,
                "structure_bytes": d.allocated_bytes()}
    slot, meta = d.state()
    out: dict[str, object] = {
        "directory": d.path, "base": slot.base_url, "base_snapshot": slot.base_name,
        "base_image": slot.base_image or None, "volume": _uuid(slot.volume_uuid),
        "block_size": slot.block_size, "state": "ready" if slot.state == READY else
        "base pending", "updates": slot.updates,
        "last_update": slot.updated / 1e9 if slot.updated else None}
    if meta is None:
        out.update(consistent=False, structure_bytes=d.allocated_bytes())
        return out
    changed = meta.present.count() * slot.block_size
    size = d.allocated_bytes()
    out.update({
        "consistent": True, "newest_snapshot": meta.header.top.name,
        "newest_generation": meta.header.root.generation,
        "snapshots": [s.name for s in meta.header.snapshot_set],
        "held_blocks": meta.present.count(), "changed_bytes": changed,
        "structure_bytes": size, "ratio": round(size / changed, 4) if changed else None,
        "written_blocks": slot.written, "written_bytes": slot.written * slot.block_size,
        "journal_pending": bool(slot.flags & 1)})
    return out


def _uuid(raw: bytes) -> str:
    import uuid
    return str(uuid.UUID(bytes=raw))


__all__ = ["mirror_status"]
