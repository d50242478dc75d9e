"""Verify a volume: every structure and block checksum reachable from the committed
root and from each snapshot's root, whether plane bits agree with reachability,
and the intent log records that follow the committed root.

Reachable from a root: the LBA map (nodes and data), the active plane object,
the catalog, and the plane object of each snapshot the catalog lists. A block
reachable but not marked could be handed out again (data loss); a block marked
but unreachable is a leak.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from bitarray import bitarray

from blockxfer.checksum import block_checksums
from blockxfer.errors import FormatError

from .blockio import aligned
from .intentlog import Record, record_problem
from .layout import Catalog, RootRecord
from .objects import BlobObject, PlaneObject, empty_plane
from .tree import CowTree
from .volume import Volume

CHUNK_ROWS = 8192


@dataclass
class CheckReport:
    roots: int = 0
    blocks_verified: int = 0
    log_records: int = 0          # intent log records a replay applies
    problems: list[str] = field(default_factory=list)

    @property
    def clean(self) -> bool:
        return not self.problems

    def as_dict(self) -> dict[str, object]:
        return {"clean": self.clean, "roots": self.roots,
                "blocks_verified": self.blocks_verified, "log_records": self.log_records,
                "problems": self.problems}


def _reachable(vol: Volume, root: RootRecord) -> tuple[list[int], np.ndarray, bitarray]:
    """Metadata VBNs, LBA data rows (vbn, checksum) and the plane stored in the root."""
    bs, io = vol.block_size, vol.io
    lba_nodes, lba_data = CowTree(root.lba, bs, io.read_block, vol.virtual_blocks).walk()
    active = PlaneObject(root.plane, vol.nblocks, bs, io.read_block, io.read_many)
    p_nodes, p_data = active.tree.walk()
    blob = BlobObject(root.catalog, bs, io.read_block, io.read_many)
    meta = lba_nodes + p_nodes + p_data[:, 0].tolist() + blob.blocks()
    raw = blob.load()
    for e in (Catalog.unpack(raw) if raw else Catalog()).snapshots:
        n, d = PlaneObject(e.plane, vol.nblocks, bs, io.read_block, io.read_many).tree.walk()
        meta += n + d[:, 0].tolist()
    return meta, lba_data[:, :2], active.bits


def _check_root(vol: Volume, name: str, root: RootRecord, own_plane: bitarray | None,
                report: CheckReport, used: bitarray) -> np.ndarray:
    try:
        meta, data, plane = _reachable(vol, root)
    except FormatError as e:
        report.problems.append(f"{name}: {e}")
        return np.zeros((0, 2), dtype=np.uint64)
    used |= plane
    vbns = np.concatenate([np.array(meta, dtype=np.uint64), data[:, 0]])
    uniq, counts = np.unique(vbns, return_counts=True)
    if (counts > 1).any():
        report.problems.append(f"{name}: {int((counts > 1).sum())} blocks referenced twice, "
                               f"e.g. VBN {int(uniq[counts > 1][0])}")
    reach = empty_plane(len(plane))
    for v in uniq.tolist():
        reach[v] = 1
    _compare(name, reach, plane, report)
    if own_plane is not None and own_plane != plane:
        report.problems.append(f"{name}: its plane differs from the active plane of its CP")
    if plane[:vol.sb.first_data_vbn].any():
        report.problems.append(f"{name}: plane marks reserved blocks")
    report.roots += 1
    return data


def _compare(name: str, reach: bitarray, plane: bitarray, report: CheckReport) -> None:
    missing = (reach & ~plane).count()
    extra = (plane & ~reach).count()
    if missing:
        report.problems.append(f"{name}: {missing} reachable blocks are not marked in its plane "
                               f"(first VBN {(reach & ~plane).find(1)})")
    if extra:
        report.problems.append(f"{name}: {extra} blocks are marked but unreachable "
                               f"(first VBN {(plane & ~reach).find(1)})")


def _verify_data(vol: Volume, rows: np.ndarray, report: CheckReport) -> None:
    if len(rows) == 0:
        return
    order = np.argsort(rows[:, 0], kind="stable")
    rows = rows[order]
    first = np.concatenate(([True], rows[1:, 0] != rows[:-1, 0]))
    clash = ~first & (rows[:, 1] != np.roll(rows[:, 1], 1))
    if clash.any():
        report.problems.append(f"data block {int(rows[clash][0, 0])} is claimed with two "
                               "different checksums")
    rows = rows[first]
    bs = vol.block_size
    buf = aligned(CHUNK_ROWS * bs)
    for k in range(0, len(rows), CHUNK_ROWS):
        part = rows[k:k + CHUNK_ROWS]
        view = memoryview(buf)[:len(part) * bs]
        vol.io.read_ptrs_into(part, view, verify=False)
        bad = np.nonzero(block_checksums(view, bs) != part[:, 1])[0]
        for i in bad[:5].tolist():
            report.problems.append(f"data block {int(part[i, 0])}: checksum mismatch")
        if len(bad) > 5:
            report.problems.append(f"... and {len(bad) - 5} more data blocks with bad checksums")
        report.blocks_verified += len(part)


def _record_problem(vol: Volume, rec: Record, used: bitarray) -> str | None:
    return record_problem(rec, used, first_data_vbn=vol.sb.first_data_vbn,
                          nblocks=vol.nblocks, virtual_blocks=vol.virtual_blocks,
                          block_size=vol.block_size,
                          read_ptrs=lambda p, v: vol.io.read_ptrs_into(p, v, verify=False))


def _check_log(vol: Volume, used: bitarray, report: CheckReport) -> None:
    """The records after the committed root. The last one may be torn or point at
    data that never landed (its sync never returned: nothing was acknowledged);
    a record that cannot be replayed followed by one that can means lost writes."""
    records = vol.log.records()
    for k, rec in enumerate(records):
        why = _record_problem(vol, rec, used)
        if why is None:
            report.log_records += 1
            continue
        if k + 1 < len(records):
            report.problems.append(f"intent log record {rec.seq} {why}, but {len(records) - k - 1} "
                                   "records follow it: acknowledged writes are lost")
        return
    lost = vol.log.lost_after(records)
    if lost is not None:
        report.problems.append(f"intent log record {lost - 1} is damaged, but record {lost} "
                               "follows it: acknowledged writes are lost")


def check_volume(vol: Volume) -> CheckReport:
    report = CheckReport()
    used = empty_plane(len(vol.active.bits))
    rows = [_check_root(vol, "active", vol.sb.root, None, report, used)]
    for e in vol.snapshots():
        if e.shadow or e.root is None or e.incomplete:
            continue                  # incomplete here: its own blocks were never received
        try:
            own = vol.plane(e.name)
        except FormatError as err:
            report.problems.append(f"snapshot {e.name}: {err}")
            continue
        rows.append(_check_root(vol, f"snapshot {e.name}", e.root, own, report, used))
    _verify_data(vol, np.concatenate(rows), report)
    _check_log(vol, used, report)
    return report
