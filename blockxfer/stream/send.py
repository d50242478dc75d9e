"""Sending an image: header, VBN-tagged data records, dealloc records, trailer.

Blocks are read by a `Reader`: a function from VBN runs to (first VBN, bytes)
chunks in any order (the CLI passes the drivers' parallel reader, which keeps
several requests in flight and spreads them over the members of a striped
array); the explicit VBN in every data record makes any order valid.
"""

from __future__ import annotations

import base64
import bisect
import os
import struct
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import xxhash
import zstandard
from bitarray import bitarray

from blockxfer.checksum import block_checksums, checksum
from blockxfer.errors import DamagedBlock, StreamError, UsageError, VolumeError
from blockxfer.image import Image, evaluate, require_restorable
from blockxfer.volume import Volume
from blockxfer.volume.blockio import MAX_REQUEST, aligned
from blockxfer.volume.layout import SnapshotEntry

from . import format as fmt
from .io import ByteSink

Reader = Callable[[Iterable[tuple[int, int]]], Iterator[tuple[int, memoryview]]]
_TOKEN = struct.Struct("<16s16sQQ")       # stream id, top guid, image digest, image blocks


def plane_runs(plane: bitarray, limit: int | None = None) -> Iterator[tuple[int, int]]:
    """Runs (first, count) of set bits, in ascending order."""
    pos, end = 0, len(plane) if limit is None else limit
    while pos < end:
        s = plane.find(1, pos, end)
        if s < 0:
            return
        e = plane.find(0, s, end)
        e = end if e < 0 else e
        yield s, e - s
        pos = e


def plain_reader(vol: Volume) -> Reader:
    """Ascending reads through the volume's own block I/O (no drivers needed)."""
    bs = vol.block_size

    def read(runs: Iterable[tuple[int, int]]) -> Iterator[tuple[int, memoryview]]:
        per = MAX_REQUEST // bs
        buf = aligned(MAX_REQUEST)
        for start, count in runs:
            for k in range(0, count, per):
                n = min(per, count - k)
                view = memoryview(buf)[:n * bs]
                vol.dev.pread(view, (start + k) * bs)
                yield start + k, view
    return read


@dataclass
class SendStats:
    records: int = 0
    data_blocks: int = 0
    bytes: int = 0


def _ref(e: SnapshotEntry) -> fmt.SnapshotRef:
    return fmt.SnapshotRef(e.id, e.guid, e.generation, e.flags, e.name)


def check_top_and_base(img: Image) -> tuple[SnapshotEntry, SnapshotEntry | None]:
    top, base = img.top, img.base
    if top is None:
        raise UsageError(f"image {img.expression!r} names no snapshot to send")
    for e in img.tops:
        if e.shadow:
            raise VolumeError(f"only a base may be a shadow snapshot; {e.name!r} is one (its "
                              "blocks may have been reused)")
    if top.incomplete:
        raise VolumeError(f"snapshot {top.name!r} is incomplete here and cannot be sent")
    if top.root is None:
        raise VolumeError(f"snapshot {top.name!r} has no root record yet")
    if base is not None and base.generation >= top.generation:
        raise UsageError(f"the base {base.name!r} must be older than the top {top.name!r}")
    if base is not None and base.incomplete:
        raise VolumeError(f"snapshot {base.name!r} is incomplete here and cannot be a base")
    return top, base


class Planes:
    """A volume's planes for one send, each loaded once (every caller gets a copy:
    evaluating an expression changes planes in place). A send asks for the same
    planes five times over: the expression, restorability, deallocations, checks."""

    def __init__(self, vol: Volume):
        self.vol = vol
        self._got: dict[int, bitarray] = {}

    def snapshots(self) -> list[SnapshotEntry]:
        return self.vol.snapshots()

    def resolve(self, name: str) -> SnapshotEntry:
        return self.vol.resolve(name)

    def plane(self, name: str) -> bitarray:
        e = self.vol.resolve(name)
        if e.id not in self._got:
            self._got[e.id] = self.vol.plane(name)
        return self._got[e.id].copy()

    def stored_plane(self, name: str) -> None:
        """Always whole planes here: each is loaded once and asked for again."""
        return None

    def freed(self, base: str, top: str) -> bitarray:
        """Blocks `base` has that `top` no longer uses (the DEALLOC records)."""
        gone = self.plane(base)
        gone &= ~self.plane(top)
        return gone


def build_header(vol: Volume, img: Image, stream_id: bytes,
                 planes: Planes | None = None) -> fmt.Header:
    top, base = check_top_and_base(img)
    src = planes or Planes(vol)
    require_restorable(img, src)
    assert top.root is not None
    dealloc = src.freed(base.name, top.name).count() if base else 0
    return fmt.Header(
        volume_uuid=vol.sb.uuid, block_size=vol.block_size, nblocks=vol.nblocks,
        virtual_blocks=vol.virtual_blocks, first_data_vbn=vol.sb.first_data_vbn,
        next_id=vol.sb.next_id, stream_id=stream_id, expression=img.expression,
        top=_ref(top), base=_ref(base) if base else None, root=top.root,
        snapshot_set=[_ref(e) for e in vol.snapshots()], image_blocks=img.blocks,
        image_digest=checksum(img.plane.tobytes()), dealloc_blocks=dealloc)


class _Sink:
    """Writes records, keeping the running digest and the counts."""

    def __init__(self, out: ByteSink, progress: Callable[[int], None] | None,
                 index: Callable[[int, int, int, int], None] | None = None):
        self.out, self.progress, self.index = out, progress, index
        self.digest = xxhash.xxh3_128()
        self.stats = SendStats()

    def put(self, rtype: int, body: bytes | memoryview, flags: int = 0,
            *more: bytes | memoryview) -> None:
        pieces = fmt.record(rtype, self.stats.records, body, flags, *more)
        if self.index is not None and rtype == fmt.DATA:
            vbn, count = fmt.DATA_HEAD.unpack_from(body, 0)
            self.index(rtype, self.stats.bytes, vbn, count)
        for p in pieces:
            if rtype != fmt.TRAILER:
                self.digest.update(p)
            self.out.write(p)
        self.stats.records += 1
        n = sum(len(p) for p in pieces)
        self.stats.bytes += n
        if self.progress:
            self.progress(n)


SAMPLE = 64 << 10                        # bytes of a record tried before the whole of it
Encoded = tuple[int, memoryview, bytes | None]   # first block in the chunk, blocks, packed


def _shrinks(zc: zstandard.ZstdCompressor, sample: bytes | memoryview) -> bool:
    return len(zc.compress(sample)) < len(sample) - len(sample) // 32


def _packed(zc: zstandard.ZstdCompressor, data: memoryview) -> bytes | None:
    packed = zc.compress(data)
    return packed if len(packed) < len(data) else None


def _compressor(enabled: bool, block_size: int
                ) -> Callable[[memoryview, np.ndarray | None], Iterator[Encoded]]:
    """zstd level 1 per record, kept only when smaller. Metadata that travels with
    the data (LBA leaves, planes) shrinks several times. The file data in a chunk
    (`known`: the blocks the maps point at) is tried on a SAMPLE of its blocks
    first; when that does not shrink by 1/32 (random or encrypted data, the habit
    btrfs has too) the data blocks go as they are, and a chunk that mixes them
    with metadata goes as several records, so that neither is compressed in vain
    (a whole compression of the data was most of an incremental send's time)."""
    zc = zstandard.ZstdCompressor(level=1)
    per = max(1, SAMPLE // block_size)

    def encode(data: memoryview, known: np.ndarray | None) -> Iterator[Encoded]:
        if not enabled:
            yield 0, data, None
            return
        if known is None or not known.any():
            yield 0, data, _packed(zc, data)
            return
        if known[:per].all():            # the usual: data first, sampled in place
            sample: bytes | memoryview = data[:per * block_size]
        else:
            blocks = np.frombuffer(data, dtype=np.uint8).reshape(-1, block_size)
            sample = blocks[np.nonzero(known)[0][:per]].tobytes()
        if _shrinks(zc, sample):
            yield 0, data, _packed(zc, data)
            return
        edges = [0, *(np.nonzero(np.diff(known.astype(np.int8)))[0] + 1).tolist(), len(known)]
        for a, b in pairwise(edges):
            piece = data[a * block_size:b * block_size]
            yield a, piece, None if known[a] else _packed(zc, piece)
    return encode


class BlockCheck:
    """The checksums the snapshots' maps keep for an image's data blocks, looked up
    per chunk in bulk: a send streams raw VBN runs, so without this a damaged block
    would travel (and a dump would finish) as if it were sound."""

    def __init__(self, vbns: np.ndarray, checksums: np.ndarray, block_size: int):
        self.vbns, self.checksums, self.bs = vbns, checksums, block_size

    @classmethod
    def of(cls, vol: Volume, img: Image, planes: Planes | None = None) -> BlockCheck:
        """The checks for `img`'s blocks. The map subtrees a base shares with the
        tops are skipped when that base holds none of the image's blocks (the usual
        'top - base'), so an incremental reads only the part of the map it changed."""
        skip = None
        src = planes or Planes(vol)
        for e in img.bases:
            plane = src.plane(e.name)
            if not (plane & img.plane).any():
                skip = plane if skip is None else skip | plane
        vbns, cks = vol.data_checksums([e.name for e in img.tops], skip, img.plane)
        return cls(vbns, cks, vol.block_size)

    def verify(self, first: int, data: memoryview) -> bool:
        """Refuse a chunk holding a data block whose bytes do not match its map's
        checksum (metadata blocks, not in the maps' leaves, are checked by the
        receiver when it reads them). True when every block was a data block."""
        known = self.known(first, data)
        return known is not None and bool(known.all())

    def _all_data(self, first: int, n: int) -> int | None:
        """Where the checks of blocks first.. first+n-1 start, when every one of them
        is a data block (the usual chunk): one slice of checks then, not a search
        per block (each numpy call costs under the test bed's emulation). The VBNs
        are sorted and distinct, so the ends being there means all are."""
        i = int(np.searchsorted(self.vbns, first))
        last = i + n - 1
        if n > 0 and last < len(self.vbns) and self.vbns[i] == first \
                and self.vbns[last] == first + n - 1:
            return i
        return None

    def known(self, first: int, data: memoryview) -> np.ndarray | None:
        """`verify`, answering which blocks of the chunk are data blocks (None: none)."""
        if not len(self.vbns):
            return None
        n = len(data) // self.bs
        i = self._all_data(first, n)
        if i is not None:
            known = np.ones(n, dtype=bool)
            bad = np.nonzero(self.checksums[i:i + n] != block_checksums(data, self.bs))[0]
        else:
            want = np.arange(first, first + n, dtype=np.uint64)
            at = np.minimum(np.searchsorted(self.vbns, want), len(self.vbns) - 1)
            known = self.vbns[at] == want
            if not known.any():
                return None
            bad = np.nonzero(known & (self.checksums[at] != block_checksums(data, self.bs)))[0]
        if len(bad):
            raise DamagedBlock(f"checksum mismatch in block VBN {first + int(bad[0])} "
                              f"({len(bad)} bad blocks in one read): the volume is damaged, "
                              "nothing more was sent; run 'blockxfer check'")
        return known


@dataclass
class SendPlan:
    """Everything a send decides from the volume's state; streaming it needs only
    the device (so a server can stream outside its volume lock)."""

    header: fmt.Header
    runs: list[tuple[int, int]]
    plane: bitarray
    dealloc: list[tuple[int, int]]
    tops: list[SnapshotEntry]
    block_size: int
    nblocks: int
    check: BlockCheck | None = None


def plan_send(vol: Volume, expression: str, *, resume: str | None = None,
              implicit: bool = False) -> SendPlan:
    planes = Planes(vol)
    img = evaluate(expression, planes, vol.block_size)
    header = build_header(vol, img, os.urandom(16), planes)
    plane = img.plane
    if resume:
        header.stream_id, received = parse_token(resume, header, len(plane))
        header.flags = fmt.H_RESUMING
        plane = plane & ~received
    if implicit:
        header.flags |= fmt.H_IMPLICIT
    dealloc: list[tuple[int, int]] = []
    if header.base is not None:
        gone = planes.freed(header.base.name, header.top.name)
        dealloc = list(plane_runs(gone, vol.nblocks))
    return SendPlan(header, list(plane_runs(plane, vol.nblocks)), plane, dealloc, img.tops,
                    vol.block_size, vol.nblocks, BlockCheck.of(vol, img, planes))


def send_image(vol: Volume, expression: str, out: ByteSink, *, reader: Reader | None = None,
               compress: bool = True, resume: str | None = None, implicit: bool = False,
               progress: Callable[[int], None] | None = None,
               index: Callable[[int, int, int, int], None] | None = None) -> SendStats:
    """Write the stream of an image to `out`; `index(type, offset, vbn, count)` hears
    where each data record starts (the tape writer's location table)."""
    plan = plan_send(vol, expression, resume=resume, implicit=implicit)
    return stream_plan(plan, out, reader or plain_reader(vol), compress=compress,
                       progress=progress, index=index)


def stream_plan(plan: SendPlan, out: ByteSink, reader: Reader, *, compress: bool = True,
                progress: Callable[[int], None] | None = None,
                index: Callable[[int, int, int, int], None] | None = None) -> SendStats:
    header, bs = plan.header, plan.block_size
    sink = _Sink(out, progress, index)
    sink.put(fmt.HEADER, header.pack())
    rank = _ranks(plan.runs) if header.flags & fmt.H_IMPLICIT else None
    if rank:
        raw = plan.plane[:plan.nblocks].tobytes()
        sink.put(fmt.BITMAP, zstandard.ZstdCompressor(level=3).compress(raw))
    encode = _compressor(compress, bs)
    for vbn, data in reader(plan.runs):
        known = plan.check.known(vbn, data) if plan.check is not None else None
        for off, piece, packed in encode(data, known):
            first = rank(vbn + off) if rank else vbn + off
            rflags = (fmt.F_ZSTD if packed is not None else 0) | (fmt.F_IMPLICIT if rank else 0)
            # the blocks go to the sink as the reader gave them: sinks write or copy
            # what they are given before returning, so the reader may reuse its buffer
            sink.put(fmt.DATA, fmt.DATA_HEAD.pack(first, len(piece) // bs), rflags,
                     packed if packed is not None else piece)
            sink.stats.data_blocks += len(piece) // bs
    for k in range(0, len(plan.dealloc), 65536):
        sink.put(fmt.DEALLOC, b"".join(fmt.RUN.pack(v, c) for v, c in plan.dealloc[k:k + 65536]))
    trailer = fmt.Trailer(sink.stats.records, sink.stats.data_blocks,
                          header.dealloc_blocks, sink.stats.bytes, sink.digest.digest())
    sink.put(fmt.TRAILER, trailer.pack())
    out.flush()
    return sink.stats


def _ranks(runs: list[tuple[int, int]]) -> Callable[[int], int]:
    """VBN -> its ordinal among the image's blocks (for implicit tagging)."""
    starts = [s for s, _ in runs]
    before, total = [], 0
    for _, c in runs:
        before.append(total)
        total += c

    def rank(vbn: int) -> int:
        i = bisect.bisect_right(starts, vbn) - 1
        return before[i] + vbn - starts[i]
    return rank


# -- resume tokens ------------------------------------------------------------------------
def make_token(stream_id: bytes, top_guid: bytes, digest: int, blocks: int,
               received: bitarray) -> str:
    """A token naming an interrupted receive and the VBNs it already has (as runs)."""
    runs = b"".join(struct.pack("<QQ", s, c) for s, c in plane_runs(received))
    raw = _TOKEN.pack(stream_id, top_guid, digest, blocks) + runs
    return base64.urlsafe_b64encode(zlib.compress(raw, 9)).decode().rstrip("=")


def parse_token(token: str, header: fmt.Header, nbits: int) -> tuple[bytes, bitarray]:
    try:
        raw = zlib.decompress(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)),
                              bufsize=1 << 16)
        sid, top, digest, blocks = _TOKEN.unpack_from(raw, 0)
    except (ValueError, zlib.error, struct.error) as e:
        shown = token if len(token) <= 24 else token[:20] + "..."
        raise UsageError(f"not a resume token: {shown!r}; pass the token printed by the "
                         "interrupted receive") from e
    if (top, digest, blocks) != (header.top.guid, header.image_digest, header.image_blocks):
        raise StreamError("resume token belongs to another image; send the same expression "
                          "from the same volume")
    received = bitarray(nbits, endian="little")
    received.setall(0)
    for off in range(_TOKEN.size, len(raw) - 15, 16):
        s, c = struct.unpack_from("<QQ", raw, off)
        if s + c > nbits:
            raise StreamError("resume token names blocks outside the volume")
        received[s:s + c] = 1
    return sid, received
