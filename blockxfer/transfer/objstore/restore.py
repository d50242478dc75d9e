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
from blockxfer.stream.decode import StreamReader
from blockxfer.stream.receive import OpenDevice, ReceiveResult, receive_stream

from . import format as fmt
from .store import SnapshotRecord, Store

RANGE_BYTES = 8 << 20                      # one ranged GET reads at most this much
GAP = 256 << 10                            # read over a gap this small rather than split
WORKERS = 8


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


def fetched(store: Store, plan: list[Fetch], workers: int = WORKERS,
            ) -> Iterator[tuple[Fetch, bytes]]:
    """The bytes of each fetch, in plan order, with `workers` GETs ahead."""
    with ThreadPoolExecutor(workers, thread_name_prefix="bx-get") as pool:
        ahead: deque[tuple[Fetch, Future[bytes]]] = deque()
        for f in plan:
            ahead.append((f, pool.submit(store.o.get, store.pack_key(f.pack), f.start, f.end)))
            if len(ahead) > workers:
                g, fut = ahead.popleft()
                yield g, fut.result()
        while ahead:
            g, fut = ahead.popleft()
            yield g, fut.result()


def blob_blocks(f: Fetch, raw: bytes, b: Blob, block_size: int, store: Store,
                ) -> Iterator[tuple[int, int, memoryview]]:
    """(first VBN, count, bytes) runs of the blocks taken from one checked blob."""
    what = f"chunk {b.chunk} in pack {f.pack.hex()} (offset {b.offset})"
    view = memoryview(raw)[b.offset - f.start:b.offset - f.start + b.length]
    if len(view) != b.length or fmt.blob_check(view) != b.check:
        raise FormatError(f"{store.url}: {what} is damaged or missing: its checksum differs "
                          "from the manifest's")
    chunk, mask, data = fmt.open_blob(view, block_size, f"{store.url}: {what}")
    if chunk != b.chunk or len(mask) != len(b.mask) or (b.mask & ~mask).any():
        raise FormatError(f"{store.url}: {what} does not hold the blocks the manifest names")
    base, pos, payload = chunk * len(mask), 0, memoryview(data)
    while (s := b.mask.find(1, pos)) >= 0:
        e = b.mask.find(0, s)
        e = len(b.mask) if e < 0 else e
        at = mask.count(1, 0, s)
        yield base + s, e - s, payload[at * block_size:(at + e - s) * block_size]
        pos = e


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


def stream_pieces(store: Store, man: fmt.Manifest, base: fmt.Manifest | None = None,
                  ) -> Iterator[bytes | memoryview]:
    """The bytes of an image stream of the manifest's snapshot: full, or incremental
    from `base` (a snapshot the target holds complete)."""
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
    digest, seq, nbytes, blocks = xxhash.xxh3_128(), 0, 0, 0

    def record(rtype: int, body: bytes | memoryview) -> list[bytes | memoryview]:
        nonlocal seq, nbytes
        pieces = sfmt.record(rtype, seq, body)
        seq += 1
        for p in pieces:
            digest.update(p)
            nbytes += len(p)
        return pieces
    yield from record(sfmt.HEADER, h.pack())
    for f, raw in fetched(store, plan_fetches(entries)):
        for b in f.blobs:
            for vbn, count, data in blob_blocks(f, raw, b, man.block_size, store):
                blocks += count
                yield from record(sfmt.DATA, sfmt.DATA_HEAD.pack(vbn, count) + bytes(data))
    t = sfmt.Trailer(seq, blocks, 0, nbytes, digest.digest())
    yield from sfmt.record(sfmt.TRAILER, seq, t.pack())


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


def open_snapshot(store: Store, volume: str, name: str, *, base: str | None = None,
                  ) -> tuple[SnapshotRecord, fmt.Manifest, io.BufferedReader]:
    """A readable stream of snapshot `name`: full, or from `base` when given."""
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
    return rec, man, io.BufferedReader(PieceStream(stream_pieces(store, man, bman)), 1 << 20)


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
    _, _, f = open_snapshot(store, volume, name, base=base)
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
