"""Restore: any stored snapshot, alone, as an image stream that `receive` applies.

Only the blobs the snapshot's manifest names are read (ranged GETs, adjacent
blobs of one pack coalesced, several in flight); nothing of other snapshots is
replayed. Every blob is checked (its own xxh3, the manifest's copy of it, its
chunk) before its blocks become DATA records of a synthesized full stream whose
header is the one the snapshot was uploaded with, made full. The volume-side
atomicity is `receive`'s: the root is written last.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import xxhash
from bitarray import bitarray

from blockxfer.checksum import checksum
from blockxfer.errors import BlockxferError, FormatError, NotFound, StreamError
from blockxfer.stream import format as sfmt
from blockxfer.stream.decode import Data, Dealloc, StreamReader
from blockxfer.stream.receive import OpenDevice, ReceiveResult, receive_stream

from . import format as fmt
from .store import SnapshotRecord, Store

RANGE_BYTES = 8 << 20                      # one ranged GET reads at most this much
GAP = 256 << 10                            # read over a gap this small rather than split
WORKERS = 8
RECORD_BYTES = 4 << 20                     # a restored DATA record joins runs up to this much


@dataclass
class Blob:
    chunk: int
    offset: int
    length: int
    check: int
    mask: bitarray                         # blocks taken from it


@dataclass
class Fetch:
    pack: bytes
    start: int
    end: int
    blobs: list[Blob]


def plan_fetches(entries: list[fmt.Entry]) -> list[Fetch]:
    """Ranged GETs covering every blob once, adjacent blobs of a pack together."""
    blobs: dict[tuple[bytes, int], Blob] = {}
    for e in entries:
        b = blobs.get((e.pack, e.offset))
        if b is None:
            blobs[(e.pack, e.offset)] = Blob(e.chunk, e.offset, e.length, e.check, e.mask.copy())
        else:
            b.mask |= e.mask
    out: list[Fetch] = []
    for (pack, _), b in sorted(blobs.items()):
        last = out[-1] if out else None
        if (last is not None and last.pack == pack and b.offset - last.end <= GAP
                and b.offset + b.length - last.start <= RANGE_BYTES):
            last.end = b.offset + b.length
            last.blobs.append(b)
        else:
            out.append(Fetch(pack, b.offset, b.offset + b.length, [b]))
    return out


Opened = tuple[Blob, int, bitarray, bytes | memoryview]     # blob, chunk, mask, blocks


def fetched(store: Store, plan: list[Fetch], block_size: int, workers: int = WORKERS,
            ) -> Iterator[tuple[Fetch, list[Opened]]]:
    """Each fetch's blobs, checked and opened, in plan order, with `workers` GETs
    ahead. The worker that fetched a range also checks its blobs (their xxh3, and
    the decompression of a compressed one, release the GIL), so the thread that
    writes the stream only cuts runs out of them."""
    def get(f: Fetch) -> list[Opened]:
        raw = store.o.get(store.pack_key(f.pack), f.start, f.end)
        return [(b, *open_checked(f, raw, b, block_size, store)) for b in f.blobs]
    with ThreadPoolExecutor(workers, thread_name_prefix="bx-get") as pool:
        ahead: deque[tuple[Fetch, Future[list[Opened]]]] = deque()
        for f in plan:
            ahead.append((f, pool.submit(get, f)))
            if len(ahead) > workers:
                g, fut = ahead.popleft()
                yield g, fut.result()
        while ahead:
            g, fut = ahead.popleft()
            yield g, fut.result()


def open_checked(f: Fetch, raw: bytes, b: Blob, block_size: int, store: Store,
                 ) -> tuple[int, bitarray, bytes | memoryview]:
    """(chunk, mask, blocks) of one blob of a fetch, checked against the manifest."""
    what = f"chunk {b.chunk} in pack {f.pack.hex()} (offset {b.offset})"
    view = memoryview(raw)[b.offset - f.start:b.offset - f.start + b.length]
    if len(view) != b.length or fmt.blob_check(view) != b.check:
        raise FormatError(f"{store.url}: {what} is damaged or missing: its checksum differs "
                          "from the manifest's")
    chunk, mask, data = fmt.open_blob(view, block_size, f"{store.url}: {what}")
    if chunk != b.chunk or len(mask) != len(b.mask) or (b.mask & ~mask).any():
        raise FormatError(f"{store.url}: {what} does not hold the blocks the manifest names")
    return chunk, mask, data


def blob_runs(b: Blob, chunk: int, mask: bitarray, data: bytes | memoryview, block_size: int,
              ) -> Iterator[tuple[int, int, memoryview]]:
    """(first VBN, count, bytes) runs of the blocks taken from one opened blob."""
    base, pos, payload = chunk * len(mask), 0, memoryview(data)
    while (s := b.mask.find(1, pos)) >= 0:
        e = b.mask.find(0, s)
        e = len(b.mask) if e < 0 else e
        at = mask.count(1, 0, s)
        yield base + s, e - s, payload[at * block_size:(at + e - s) * block_size]
        pos = e


def blob_blocks(f: Fetch, raw: bytes, b: Blob, block_size: int, store: Store,
                ) -> Iterator[tuple[int, int, memoryview]]:
    """(first VBN, count, bytes) runs of the blocks taken from one checked blob."""
    chunk, mask, data = open_checked(f, raw, b, block_size, store)
    yield from blob_runs(b, chunk, mask, data, block_size)


def unchanged(man: fmt.Manifest, base: fmt.Manifest) -> list[fmt.Entry]:
    """The entries of `man` less the blocks it shares with `base` by reference (the same
    blob): what an incremental restore onto a target holding `base` must still write.
    Blocks equal in content but stored twice (a second full upload) are sent again,
    and `receive` refuses them as busy: never a wrong block, at worst a refusal."""
    have: dict[tuple[bytes, int], bitarray] = {}
    for e in base.entries:
        have[(e.pack, e.offset)] = have.get((e.pack, e.offset), fmt.new_mask(len(e.mask))) | e.mask
    out = []
    for e in man.entries:
        same = have.get((e.pack, e.offset))
        mask = e.mask if same is None else e.mask & ~same
        if mask.any():
            out.append(fmt.Entry(e.chunk, e.pack, e.offset, e.length, e.check, mask))
    return out


def _image(man: fmt.Manifest, base: fmt.Manifest | None,
           ) -> tuple[sfmt.Header, list[fmt.Entry]]:
    """The header of the image of the manifest's snapshot (full, or incremental from
    `base`, a snapshot the target holds complete) and the entries it reads."""
    h = sfmt.Header.unpack(man.stream_header)
    entries = man.entries if base is None else unchanged(man, base)
    plane = bitarray(h.nblocks, endian="little")
    plane.setall(0)
    for e in entries:
        lo = e.chunk * man.chunk_blocks
        plane[lo:lo + man.chunk_blocks] |= e.mask
    h.base = None if base is None else sfmt.Header.unpack(base.stream_header).top
    h.flags, h.dealloc_blocks, h.stream_id = 0, 0, os.urandom(16)
    h.image_blocks, h.image_digest = plane.count(), checksum(plane.tobytes())
    return h, entries


def stream_pieces(store: Store, man: fmt.Manifest, base: fmt.Manifest | None = None,
                  ) -> Iterator[bytes | memoryview]:
    """The bytes of an image stream of the manifest's snapshot: full, or incremental
    from `base` (a snapshot the target holds complete)."""
    h, entries = _image(man, base)
    digest, seq, nbytes, blocks = xxhash.xxh3_128(), 0, 0, 0

    def record(rtype: int, body: bytes | memoryview, *more: bytes | memoryview,
               ) -> list[bytes | memoryview]:
        nonlocal seq, nbytes
        pieces = sfmt.record(rtype, seq, body, 0, *more)
        seq += 1
        for p in pieces:
            digest.update(p)
            nbytes += len(p)
        return pieces
    yield from record(sfmt.HEADER, h.pack())
    runs = _joined(fetched(store, _by_vbn(plan_fetches(entries)), man.block_size),
                   man.block_size)
    for vbn, count, parts in runs:
        blocks += count
        yield from record(sfmt.DATA, sfmt.DATA_HEAD.pack(vbn, count), *parts)
    t = sfmt.Trailer(seq, blocks, 0, nbytes, digest.digest())
    yield from sfmt.record(sfmt.TRAILER, seq, t.pack())


class SnapshotRecords:
    """The records of the same image, for a receive on this host: straight from the
    checked blobs, without encoding a stream only to decode it again (its record
    checksums and digest cost more than the rest of a restore together). What the
    stream decoder would check of them is checked here: blocks within the volume,
    as many as the header promises."""

    def __init__(self, store: Store, man: fmt.Manifest, base: fmt.Manifest | None,
                 name: str) -> None:
        self.store, self.man, self.name = store, man, name
        self.header, self._entries = _image(man, base)

    def read_header(self) -> sfmt.Header:
        return self.header

    def __iter__(self) -> Iterator[Data | Dealloc]:
        h, blocks = self.header, 0
        runs = _joined(fetched(self.store, _by_vbn(plan_fetches(self._entries)),
                               self.man.block_size),
                       self.man.block_size)
        for seq, (vbn, count, parts) in enumerate(runs, start=1):
            if vbn < h.first_data_vbn or vbn + count > h.nblocks:
                raise StreamError(f"{self.name}: the manifest names blocks {vbn}+{count} "
                                  "outside the volume")
            blocks += count
            yield Data(vbn, count, parts[0] if len(parts) == 1 else b"".join(parts), seq)
        if blocks != h.image_blocks:
            raise StreamError(f"{self.name}: the blobs hold {blocks} blocks, the manifest "
                              f"names {h.image_blocks}")


def _by_vbn(plan: list[Fetch]) -> list[Fetch]:
    """The fetches in the order of their blocks (a plan is in pack order, and pack
    ids are random): runs that continue one another then arrive one after the other,
    and the target is written front to back."""
    return sorted(plan, key=lambda f: min(b.chunk for b in f.blobs))


def _joined(fetches: Iterator[tuple[Fetch, list[Opened]]], block_size: int,
            ) -> Iterator[tuple[int, int, list[memoryview]]]:
    """(first VBN, count, parts) of the DATA records: runs of checked blobs that
    continue one another (a run crossing chunks is in several blobs) go as one
    record of up to RECORD_BYTES, so the receiver writes large requests rather
    than one per chunk; the parts are views of the fetched bytes, not copies."""
    most = RECORD_BYTES // block_size
    start, count, parts = 0, 0, list[memoryview]()
    for _, blobs in fetches:
        for b, chunk, mask, blocks in blobs:
            for vbn, n, data in blob_runs(b, chunk, mask, blocks, block_size):
                if count and (vbn != start + count or count + n > most):
                    yield start, count, parts
                    count, parts = 0, []
                if not count:
                    start = vbn
                count += n
                parts.append(data)
    if count:
        yield start, count, parts


class PieceStream(io.RawIOBase):
    """A readable file over an iterator of byte pieces (pull: no thread, no pipe)."""

    def __init__(self, pieces: Iterator[bytes | memoryview]):
        self._it, self._cur, self._pos = pieces, memoryview(b""), 0

    def readable(self) -> bool:
        return True

    def readinto(self, buf: bytearray | memoryview) -> int:  # type: ignore[override]
        while self._pos >= len(self._cur):
            nxt = next(self._it, None)
            if nxt is None:
                return 0
            self._cur, self._pos = memoryview(nxt).cast("B"), 0
        n = min(len(buf), len(self._cur) - self._pos)
        buf[:n] = self._cur[self._pos:self._pos + n]
        self._pos += n
        return n


def _manifests(store: Store, volume: str, name: str, base: str | None,
               ) -> tuple[SnapshotRecord, fmt.Manifest, fmt.Manifest | None]:
    cat = store.need_catalog(volume)
    rec = cat.find(name=name)
    if rec is None:
        have = ", ".join(s.name for s in cat.snaps()) or "none"
        raise NotFound(f"{store.url}/{volume} holds no snapshot {name!r} (it holds: {have})")
    man = store.manifest(volume, rec)
    bman = None
    if base is not None:
        brec = cat.find(name=base)
        assert brec is not None
        bman = store.manifest(volume, brec)
    return rec, man, bman


def open_snapshot(store: Store, volume: str, name: str, *, base: str | None = None,
                  ) -> tuple[SnapshotRecord, fmt.Manifest, io.BufferedReader]:
    """A readable stream of snapshot `name`: full, or from `base` when given."""
    rec, man, bman = _manifests(store, volume, name, base)
    return rec, man, io.BufferedReader(PieceStream(stream_pieces(store, man, bman)), 1 << 20)


def snapshot_records(store: Store, volume: str, name: str, *, base: str | None = None,
                     ) -> SnapshotRecords:
    """The records of snapshot `name` (full, or from `base`), for a receive here."""
    rec, man, bman = _manifests(store, volume, name, base)
    return SnapshotRecords(store, man, bman, f"{store.url}/{volume}@{rec.name}")


def pull_base(store: Store, volume: str, name: str, target: str,
              open_device: OpenDevice) -> str | None:
    """The newest snapshot the target holds complete that the store holds too, is older
    than `name` and still in `name`'s snapshot set: the base of an incremental pull."""
    from blockxfer.volume import Volume
    if not os.path.exists(target):
        return None
    cat = store.need_catalog(volume)
    rec = cat.find(name=name)
    if rec is None:
        return None
    try:
        dev = open_device(target)
        vol = Volume.open(dev, writable=False)
    except BlockxferError:
        return None
    try:
        if vol.sb.uuid != cat.uuid:
            return None
        held = {e.guid for e in vol.snapshots() if not e.flags & 4 and not e.shadow}
    finally:
        vol.close()
    top = sfmt.Header.unpack(store.manifest(volume, rec).stream_header)
    kept = {s.guid for s in top.snapshot_set}
    cands = [s for s in cat.snaps() if s.guid in held and s.guid in kept and s.cp < rec.cp]
    return cands[-1].name if cands else None


def verify_snapshot(store: Store, volume: str, name: str) -> int:
    """Read and check everything a restore of `name` would read; its block count."""
    _, man, f = open_snapshot(store, volume, name)
    reader = StreamReader(f, f"{store.url}/{volume}@{name}")
    for _ in reader:
        pass
    return man.blocks


def restore_snapshot(store: Store, volume: str, name: str, target: str,
                     open_device: OpenDevice, *, force: bool = False,
                     progress: Callable[[int], None] | None = None) -> ReceiveResult:
    """Receive snapshot `name` of `volume` onto `target`. A target holding an older
    stored snapshot of the volume gets only what changed (an incremental stream:
    blocks into free VBNs, root last). Otherwise a full restore: a target that exists
    is only written after a first pass has checked every chunk (and needs --force
    when it holds data); one that did not exist is removed again if it fails."""
    base = None if force else pull_base(store, volume, name, target, open_device)
    existed = os.path.exists(target)
    if existed and base is None:
        verify_snapshot(store, volume, name)
    f = snapshot_records(store, volume, name, base=base)
    try:
        return receive_stream(f, target, open_device, force=force, seekable=False,
                              source_hint=f"{store.url}/{volume}", progress=progress)
    except BlockxferError as e:
        if not existed and os.path.isfile(target):
            os.unlink(target)
        if isinstance(e, StreamError) and "; the target is unchanged" in str(e):
            # receive's own advice (send --resume) does not apply to a store
            why = str(e).split("; the target is unchanged")[0]
            raise StreamError(f"{why}; {target} is unchanged; see 'blockxfer store verify "
                              f"{store.url}'") from e
        raise
