"""Partial restore of one snapshot from a tape image that holds more (a level 0
`june3 + june2 + june1` restored as just june1): the stream header and the
catalog come first, read through the location table; then the snapshot's plane;
then only the records that hold its blocks. The target ends as a volume at that
snapshot's root, committed like any receive.
"""

from __future__ import annotations

import bisect
import io
import os
from collections import OrderedDict
from dataclasses import replace

import numpy as np
from bitarray import bitarray

from blockxfer.checksum import checksum
from blockxfer.errors import BlockxferError, FormatError, NotFound, UsageError
from blockxfer.stream import format as fmt
from blockxfer.stream.decode import Data, StreamReader, parse_record
from blockxfer.stream.receive import ReceiveResult, new_target_receiver
from blockxfer.tape import Tape
from blockxfer.volume.layout import Catalog, RootRecord, SnapshotEntry
from blockxfer.volume.objects import BlobObject, PlaneObject, empty_plane
from blockxfer.volume.receiver import Receiver

from . import tapefmt as tf
from .restore import OpenDevice, _stream_record_at, pick_image
from .tapeset import ImageOnTape, OpenTape, TapeContents, list_tape

CACHE_RECORDS = 32                 # stream records (at most ~1 MiB each) kept decoded


class _Absent(FormatError):
    """A block the image does not carry (missing, not damaged)."""

    def __init__(self, vbn: int, image: int):
        super().__init__(f"block {vbn} is not in image {image}")
        self.vbn = vbn


class TapeBlocks:
    """Blocks of one image read by VBN through its location table (one tape part)."""

    def __init__(self, tape: Tape, contents: TapeContents, img: ImageOnTape):
        if img.index is None or not img.index.complete or img.descriptor.part != 0:
            raise UsageError(f"image {img.number} spans tapes or is incomplete; partial "
                             "restore reads images that lie on one tape")
        self.tape, self.contents, self.img, self.idx = tape, contents, img, img.index
        self.per = contents.label.record_size - tf.REC.size
        self.bs = img.descriptor.block_size
        rows = sorted(self.idx.records)
        self.starts = [r[0] for r in rows]
        self.rows = rows
        self.cache: OrderedDict[int, Data] = OrderedDict()   # stream offset -> record
        self.records_read = 0

    def raw_at(self, offset: int) -> bytes:
        raw, n = _stream_record_at(self.tape, self.img, self.idx, offset, self.per,
                                   self.contents)
        self.records_read += n
        return raw

    def header(self) -> fmt.Header:
        return StreamReader(io.BytesIO(self.raw_at(0)), "tape image").read_header()

    def record(self, row: tuple[int, int, int]) -> Data:
        if row[2] in self.cache:
            self.cache.move_to_end(row[2])
            return self.cache[row[2]]
        rec = parse_record(self.raw_at(row[2]), self.bs)
        if rec is None or (rec.vbn, rec.count) != (row[0], row[1]):
            raise FormatError(f"{self.tape.path}: the location table does not match the "
                              f"record at stream offset {row[2]}")
        self.cache[row[2]] = rec
        if len(self.cache) > CACHE_RECORDS:
            self.cache.popitem(last=False)
        return rec

    def row_of(self, vbn: int) -> tuple[int, int, int]:
        i = bisect.bisect_right(self.starts, vbn) - 1
        if i < 0 or not self.rows[i][0] <= vbn < self.rows[i][0] + self.rows[i][1]:
            raise _Absent(vbn, self.img.number)
        return self.rows[i]

    def read_block(self, vbn: int, ck: int) -> bytes:
        row = self.row_of(vbn)
        rec = self.record(row)
        raw = rec.payload[(vbn - rec.vbn) * self.bs:(vbn - rec.vbn + 1) * self.bs]
        if checksum(raw) != ck:
            raise FormatError(f"block {vbn} from tape has the wrong checksum")
        return bytes(raw)                  # a record's payload is a view of its body

    def read_many(self, rows: np.ndarray) -> bytes:
        return b"".join(self.read_block(int(v), int(c)) for v, c in rows)


def restore_snapshot_only(tape_path: str, target: str, image: int, snapshot: str, *,
                          open_tape: OpenTape, open_device: OpenDevice,
                          force: bool = False) -> tuple[ReceiveResult, int]:
    """Restore `snapshot` alone from image `image`; returns the result and the number
    of tape records read."""
    tape = open_tape(tape_path, False)
    try:
        contents = list_tape(tape)
        src = TapeBlocks(tape, contents, pick_image(contents, image, None))
        h = src.header()
        entry, root, plane = _plan(src, h, image, snapshot)
        # the target becomes a new volume at that snapshot: checked as for a full image
        # (--force to overwrite), whatever the image's own kind
        created = not os.path.exists(target)
        ref = fmt.SnapshotRef(entry.id, entry.guid, entry.generation, entry.flags, entry.name)
        sub = replace(h, root=root, top=ref, base=None, image_blocks=plane.count())
        r = new_target_receiver(target, sub, open_device, force)
        try:
            _copy_blocks(src, r, plane)
            out = r.commit()
            return ReceiveResult(ref.name, False, int(r.received.count()), sorted(out.released),
                                 out.incomplete), src.records_read
        except BlockxferError:
            if created:                  # nothing to resume from a tape: leave no file
                r.close()
                r.dev.close()
                os.remove(target)
            raise
        finally:
            r.close()
            r.dev.close()
    finally:
        tape.close()


def _plan(src: TapeBlocks, h: fmt.Header, image: int,
          snapshot: str) -> tuple[SnapshotEntry, RootRecord, bitarray]:
    """Everything decided before the target is opened: the snapshot, its root, and
    its plane, which the image must hold whole (an incremental image lacks what its
    base holds: that needs the bases first, which --snapshot does)."""
    cure = (f"restore it with --snapshot {snapshot} (bases first) instead"
            if h.base is not None else "this image cannot restore it")
    try:
        cat = Catalog.unpack(BlobObject(h.root.catalog, h.block_size, src.read_block,
                                        src.read_many).load())
        entry = next((e for e in cat.snapshots if e.name == snapshot), None)
        if entry is None:
            raise NotFound(f"image {image} does not hold snapshot {snapshot!r}")
        root = entry.root or (h.root if entry.generation == h.root.generation else None)
        if root is None or entry.shadow:
            raise UsageError(f"snapshot {snapshot!r} cannot be restored on its own")
        plane = PlaneObject(entry.plane, h.nblocks, h.block_size, src.read_block,
                            src.read_many).bits
    except _Absent as e:
        raise UsageError(f"image {image} lacks block {e.vbn} that snapshot {snapshot!r} "
                         f"needs; {cure}; nothing was written") from e
    held = empty_plane(len(plane))
    for vbn, count, _ in src.rows:
        held[vbn:vbn + count] = 1
    lacking = (plane & ~held).count()
    if lacking:
        raise UsageError(f"image {image} lacks {lacking} blocks of snapshot {snapshot!r}; "
                         f"{cure}; nothing was written")
    return entry, root, plane


def _copy_blocks(src: TapeBlocks, r: Receiver, plane: bitarray) -> None:
    """Place every block of `plane` from the image; the records are read in tape order."""
    bs = src.bs
    for row in sorted(src.rows, key=lambda r: r[2]):
        vbn, count, _ = row
        if not plane.count(1, vbn, vbn + count):
            continue
        rec = src.record(row)
        pos = vbn
        while pos < vbn + count:
            s = plane.find(1, pos, vbn + count)
            if s < 0:
                break
            e = plane.find(0, s, vbn + count)
            e = vbn + count if e < 0 else e
            r.place(s, e - s, rec.payload[(s - vbn) * bs:(e - vbn) * bs],
                    f"stream offset {row[2]}")
            pos = e
    missing = (plane & ~r.received).count()
    if missing:
        raise FormatError(f"image {src.img.number} lacks {missing} blocks of the snapshot: it "
                          "cannot be restored from this image alone")
