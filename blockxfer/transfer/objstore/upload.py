"""Upload: consume an image stream, store its blocks as chunks in packs, then commit.

The stream is decoded record by record (every check of `StreamReader`); each DATA
record's blocks go into the fixed chunk of C blocks that holds their VBN; a chunk
becomes a blob (a mask and the blocks it carries) and blobs fill write-once packs
of PACK_BYTES, several uploaded at once (packer.py). Packs are named by the hash
of their bytes, so an upload that is run again after a crash finds the packs it
already wrote and skips them. Only after the trailer checks out is the manifest
written (the base's manifest merged with this stream: new blocks over old,
deallocated blocks removed), and then the catalog, last. `upload_blocks` is that
work for any source of blocks: direct.py feeds it from a volume opened here.
"""

from __future__ import annotations

import threading
import time
import uuid as uuidlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import BinaryIO

from bitarray import bitarray

from blockxfer.catalog import hooks as catalog
from blockxfer.errors import StreamError, UsageError, VolumeError
from blockxfer.stream import format as sfmt
from blockxfer.stream.decode import Data, Dealloc, StreamReader

from . import format as fmt
from .packer import PACK_BYTES, Chunker, Packer
from .store import Catalog, SnapshotRecord, Store


@dataclass
class UploadResult:
    volume: str
    snapshot: str
    incremental: bool
    blocks: int                            # blocks this stream carried
    manifest_blocks: int                   # blocks a restore of the snapshot writes
    new_bytes: int = 0                     # pack bytes written now
    packs_written: int = 0
    packs_skipped: int = 0
    already: bool = False


def merge(base: list[fmt.Entry], new: list[fmt.Entry], dealloc: list[tuple[int, int]],
          c: int) -> list[fmt.Entry]:
    """The manifest of top = base's blocks, minus those freed (dealloc) or rewritten
    (new), plus new. No data moves: this is all a reintegration needs."""
    gone: dict[int, bitarray] = {}

    def drop(k: int) -> bitarray:
        return gone.setdefault(k, fmt.new_mask(c))
    for vbn, count in dealloc:
        done = 0
        while done < count:
            k, a = divmod(vbn + done, c)
            n = min(c - a, count - done)
            drop(k)[a:a + n] = 1
            done += n
    for e in new:
        drop(e.chunk)[:] |= e.mask
    out = []
    for e in base:
        g = gone.get(e.chunk)
        mask = e.mask if g is None else e.mask & ~g
        if mask.any():
            out.append(fmt.Entry(e.chunk, e.pack, e.offset, e.length, e.check, mask))
    return out + new


Add = Callable[[int, int, memoryview], None]
Feed = Callable[[Add, int], list[tuple[int, int]]]


def check_retain(store: Store, retain_until: float | None) -> None:
    if retain_until is not None and not store.o.lock_enabled():
        raise UsageError(f"{store.url}: the bucket has no object lock, so --retain cannot "
                         "make the copy immutable; create the bucket with object lock "
                         "enabled (aws s3api create-bucket --object-lock-enabled-for-bucket)")


def upload_stream(store: Store, volume: str, f: BinaryIO, *,
                  progress: Callable[[int], None] | None = None,
                  pack_bytes: int = PACK_BYTES,
                  retain_until: float | None = None) -> UploadResult:
    """Store the image stream read from `f` as a snapshot of `volume`; with
    `retain_until`, every object its restore needs is immutable until then."""
    check_retain(store, retain_until)
    reader = StreamReader(f, "stream")
    h = reader.read_header()

    def feed(add: Add, _: int) -> list[tuple[int, int]]:
        dealloc: list[tuple[int, int]] = []
        for rec in reader:
            if isinstance(rec, Data):
                add(rec.vbn, rec.count, memoryview(rec.payload))
                if progress:
                    progress(len(rec.payload))
            elif isinstance(rec, Dealloc):
                dealloc += rec.runs
        return dealloc
    return upload_blocks(store, volume, h, feed, pack_bytes=pack_bytes,
                         retain_until=retain_until)


def upload_blocks(store: Store, volume: str, h: sfmt.Header, feed: Feed, *,
                  pack_bytes: int = PACK_BYTES,
                  retain_until: float | None = None) -> UploadResult:
    """Store the image `h` heads as a snapshot of `volume`: `feed(add, c)` calls
    `add(vbn, count, blocks)` for every run of the image's blocks (ascending VBNs
    make one blob per chunk of `c` blocks; whole chunks in one call are not copied
    on their way to the pack) and returns the runs the image deallocates. It is
    not called when the store already holds the snapshot."""
    cat = store.catalog(volume)
    base_rec = _check_header(store, volume, cat, h)
    c = cat.chunk_blocks if cat else fmt.chunk_blocks_for(h.block_size)
    res = UploadResult(volume, h.top.name, h.incremental, 0, 0)
    done = cat.find(guid=h.top.guid) if cat else None
    if done is not None:
        res.already, res.manifest_blocks = True, done.blocks
        return res
    store.conditional(create=True)
    packer = Packer(store, pack_bytes, retain_until=retain_until)
    chunker = Chunker(h.block_size, c, packer.add)

    def add(vbn: int, count: int, blocks: memoryview) -> None:
        chunker.add(vbn, count, blocks)
        res.blocks += count
    try:
        dealloc = feed(add, c)
        chunker.flush()
        packer.finish()
    except BaseException:
        packer.abort()
        raise
    base = store.manifest(volume, base_rec).entries if base_rec else []
    man = fmt.Manifest(h.volume_uuid, h.top.guid, h.base.guid if h.base else bytes(16),
                       h.block_size, h.nblocks, c, h.pack(),
                       merge(base, packer.entries, dealloc, c), int(time.time()))
    if retain_until is not None:               # older packs this snapshot's restore reads
        own = {e.pack for e in packer.entries}
        for pid in man.packs():
            if pid not in own:
                store.o.retain(store.pack_key(pid), retain_until)
    key, check = store.put_manifest(volume, man, retain_until)
    record = SnapshotRecord(h.top.name, h.top.guid, h.top.id, h.top.generation, key, check,
                            man.blocks, packer.new_bytes, h.base.guid if h.base else None,
                            int(time.time()),
                            int(retain_until) if retain_until is not None else None)
    store.commit(volume, _adder(volume, h, c, record,
                                base_rec.manifest if base_rec else None))
    _note(store, volume, h, record)
    res.manifest_blocks, res.new_bytes = man.blocks, packer.new_bytes
    res.packs_written, res.packs_skipped = packer.written, packer.skipped
    return res


def _note(store: Store, volume: str, h: sfmt.Header, rec: SnapshotRecord) -> None:
    """Tell the catalog (a failure there is only a warning): a stored snapshot is
    restorable alone, whatever the stream it came from."""
    base = h.base.name if h.base else None
    catalog.note_image(catalog.ImageRecord(
        "store", f"{store.url}/{rec.manifest}", str(uuidlib.UUID(bytes=h.volume_uuid)),
        h.expression, h.top.name, base,
        rec.uploaded, rec.blocks, rec.new_bytes, store_volume=volume,
        parts=[(0, store.url, None)]))


def _check_header(store: Store, volume: str, cat: Catalog | None,
                  h: sfmt.Header) -> SnapshotRecord | None:
    """Refuse, before any data moves, a stream that does not fit this volume's chain."""
    where = f"{store.url}/{volume}"
    if cat is not None:
        if cat.uuid != h.volume_uuid:
            raise VolumeError(f"{where} holds another volume ({cat.uuid.hex()}); store this one "
                              "under another name")
        if (cat.block_size, cat.nblocks) != (h.block_size, h.nblocks):
            raise VolumeError(f"{where} holds this volume with another geometry; store it under "
                              "another name")
        same = cat.find(name=h.top.name)
        if same is not None and same.guid != h.top.guid:
            raise VolumeError(f"{where} already holds another snapshot named {h.top.name!r}; "
                              f"remove it first (blockxfer store rm {where}@{h.top.name})")
    if h.base is None:
        return None
    base = cat.find(guid=h.base.guid) if cat else None
    if base is None:
        raise StreamError(f"{where} does not hold the base snapshot {h.base.name!r} of this "
                          "incremental; upload a full image or an increment from a snapshot "
                          "the store holds (see 'blockxfer store ls')")
    return base


def _adder(volume: str, h: sfmt.Header, c: int, rec: SnapshotRecord,
           base_manifest: str | None) -> Callable[[Catalog | None], Catalog]:
    """The commit: add `rec`, provided the base manifest the new one was merged from
    is still the base's (a base removed, or repacked, meanwhile may lose its packs)."""
    def add(cat: Catalog | None) -> Catalog:
        if cat is None:
            cat = Catalog(volume, h.volume_uuid, h.block_size, h.nblocks, c, 0, [])
        elif cat.uuid != h.volume_uuid or cat.chunk_blocks != c:
            raise VolumeError(f"{volume}: another volume was stored under this name meanwhile")
        if h.base is not None:
            base = cat.find(guid=h.base.guid)
            if base is None or base.manifest != base_manifest:
                raise StreamError(f"{volume}: the base {h.base.name!r} was removed or repacked "
                                  "while this upload ran; run it again (the packs already "
                                  "written are reused)")
        if cat.find(guid=rec.guid) is None:     # else another writer stored it first: keep
            cat.snapshots = cat.snaps() + [rec]  # its manifest, which others may merge from
        return cat
    return add


def upload_image(store: Store, volume: str, produce: Callable[[BinaryIO], object], *,
                 progress: Callable[[int], None] | None = None,
                 retain_until: float | None = None) -> UploadResult:
    """Run `produce(out)` (a send into `out`) on a thread and upload what it writes."""
    import contextlib
    import fcntl
    import os
    rfd, wfd = os.pipe()
    with contextlib.suppress(OSError):         # 1 MiB, not 64 KiB: 16 times fewer hand-overs
        fcntl.fcntl(wfd, fcntl.F_SETPIPE_SZ, 1 << 20)  # between the two threads per MiB
    errors: list[BaseException] = []

    def run() -> None:
        try:
            with os.fdopen(wfd, "wb", buffering=1 << 20) as out:
                produce(out)
        except BaseException as e:         # handed to the uploading thread
            errors.append(e)
    t = threading.Thread(target=run, name="bx-send", daemon=True)
    t.start()
    inp = os.fdopen(rfd, "rb", buffering=1 << 20)
    try:
        result = upload_stream(store, volume, inp, progress=progress,
                               retain_until=retain_until)
    except BaseException:
        inp.close()                        # the sender stops on a broken pipe
        t.join()
        if errors and not isinstance(errors[0], BrokenPipeError):
            raise errors[0] from None      # the sender's failure explains the cut stream
        raise
    inp.close()
    t.join()
    if errors and not (result.already and isinstance(errors[0], BrokenPipeError)):
        raise errors[0]                    # (already stored: we stopped reading on purpose)
    return result
