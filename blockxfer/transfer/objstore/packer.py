"""Blocks into chunks, chunks into blobs, blobs into write-once packs.

`Chunker` gathers the blocks of one fixed chunk of C blocks at a time and hands
each chunk on as a blob (a mask and the blocks it carries); `Packer` fills packs
of PACK_BYTES with blobs and PUTs them, several at once. Packs are named by the
hash of their bytes, so an upload run again after a crash finds the packs it
already wrote (a HEAD before the PUT) and skips them; once the HEADs find
nothing for a while, the rest is new and goes without one.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

import xxhash
from bitarray import bitarray

from . import format as fmt
from .objects import ObjectInfo
from .store import Store

PACK_BYTES = 8 << 20
WORKERS = 8
GRACE = 6 * 3600.0            # gc keeps unreferenced packs this long (an upload may need them)


class Packer:
    """Blobs into packs, packs to the store with WORKERS PUTs in flight; memory is
    bounded by (WORKERS + 2) packs."""

    def __init__(self, store: Store, pack_bytes: int = PACK_BYTES, workers: int = WORKERS,
                 retain_until: float | None = None):
        self.store, self.pack_bytes, self.retain_until = store, pack_bytes, retain_until
        self.entries: list[fmt.Entry] = []
        # Pack buffers are used again once their PUT is done: a fresh 8 MiB per pack
        # cost more in page faults than the copy into it. `_len` bytes of `_buf` are
        # the pack; a buffer only shrinks to its pack's size (by less than half, which
        # CPython's bytearray does in place), so the next pack refills it in place.
        self._free: list[bytearray] = []
        self._buf, self._len = bytearray(), 0
        self._write(fmt.pack_header())
        self._pending: list[tuple[int, int, int, int, bitarray]] = []
        self._pool = ThreadPoolExecutor(workers, thread_name_prefix="bx-pack")
        self._slots = threading.BoundedSemaphore(workers + 1)
        self._futures: list[Future[int]] = []
        self.written = self.skipped = self.new_bytes = 0
        self._lock = threading.Lock()
        # HEADs in a row that found nothing: past WORKERS + 1 of them, the packs after
        # are PUT without a HEAD. An interrupted run wrote its packs in this order,
        # with at most WORKERS + 1 in flight, so what follows such a gap is new; and a
        # PUT of a pack that was there anyway is harmless (write-once: the same bytes
        # under the name of their hash; it only refreshes the pack for gc's grace).
        self.workers, self._misses = workers, 0

    @property
    def count(self) -> int:
        """Blobs added so far (`entries[i]` is the i-th once `finish` returns)."""
        return len(self.entries) + len(self._pending)

    def add(self, chunk: int, mask: bitarray, data: bytes | memoryview) -> None:
        """The blob of these blocks, made in place at the end of the pack: its payload
        is copied once, into the pack, and never joined into a blob of its own."""
        head, payload, check = fmt.blob_pieces(chunk, mask, data)
        at = self._len
        self._write(head)
        self._write(payload)
        self._write(fmt.CHECK.pack(check))
        self._pending.append((chunk, at, self._len - at, check, mask.copy()))
        if self._len >= self.pack_bytes:
            self._seal()

    def add_blob(self, blob: bytes, check: int) -> None:
        """A blob as it is (a repack copies blobs verbatim, checksums and all)."""
        _, _, _, _, chunk, c, _ = fmt.BLOB.unpack_from(blob, 0)
        mask = bitarray(endian="little")
        mask.frombytes(blob[fmt.BLOB.size:fmt.BLOB.size + c // 8])
        self._pending.append((chunk, self._len, len(blob), check, mask))
        self._write(blob)
        if self._len >= self.pack_bytes:
            self._seal()

    def _write(self, piece: bytes | memoryview) -> None:
        """Append to the pack: over what a pack before left in the buffer, or past it."""
        n = len(piece)
        self._buf[self._len:self._len + n] = piece
        self._len += n

    def _seal(self) -> None:
        if not self._pending:
            return
        raw = self._buf                                         # handed over, not copied
        del raw[self._len:]
        with self._lock:
            self._buf, self._len = self._free.pop() if self._free else bytearray(), 0
        self._write(fmt.pack_header())
        pid = xxhash.xxh3_128_digest(raw)
        self.entries += [fmt.Entry(c, pid, off, n, ck, m) for c, off, n, ck, m in self._pending]
        self._pending = []
        self._raise_failed()
        self._slots.acquire()
        fut = self._pool.submit(self._put, pid, raw)
        fut.add_done_callback(lambda _: self._slots.release())
        self._futures.append(fut)

    def _put(self, pid: bytes, raw: bytearray) -> int:
        try:
            return self._put_new(pid, raw)
        finally:
            with self._lock:                   # done with: the next pack's buffer
                self._free.append(raw)

    def _put_new(self, pid: bytes, raw: bytearray) -> int:
        key = self.store.pack_key(pid)
        if self._misses <= self.workers:
            info = self.store.o.head(key)
            with self._lock:
                self._misses = self._misses + 1 if info is None else 0
            if info is not None and _same(info, raw) and time.time() - info.mtime < GRACE / 2:
                if self.retain_until is not None:
                    self.store.o.retain(key, self.retain_until)
                with self._lock:
                    self.skipped += 1         # written by an earlier, interrupted run
                return 0
        self.store.o.put(key, raw, retain_until=self.retain_until)
        with self._lock:
            self.written += 1
            self.new_bytes += len(raw)
        return len(raw)

    def _raise_failed(self) -> None:
        """Fail fast on a PUT that failed; forget those that are done."""
        pending = []
        for f in self._futures:
            if not f.done():
                pending.append(f)
            elif (e := f.exception()) is not None:
                raise e
        self._futures = pending

    def finish(self) -> None:
        self._seal()
        try:
            for f in self._futures:
                f.result()
        finally:
            self._pool.shutdown(wait=True)

    def abort(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)


def _same(info: ObjectInfo, raw: bytes | bytearray) -> bool:
    """Is the object present whole? Its size, and its ETag where that is the MD5 of a
    single PUT (S3, SeaweedFS, rclone with --etag-hash): a pack cut short by a killed
    upload, or a partial file a server left, is written again."""
    if info.size != len(raw):
        return False
    etag = info.etag.strip('"')
    if len(etag) != 32 or not all(c in "0123456789abcdef" for c in etag.lower()):
        return True                            # not an MD5 (multipart, other servers)
    return hashlib.md5(raw).hexdigest() == etag.lower()


class Chunker:
    """Gathers the blocks of one chunk at a time; a chunk seen again later (records
    in another order) simply becomes a second blob."""

    def __init__(self, block_size: int, chunk_blocks: int, emit: Callable[..., None]):
        self.bs, self.c, self.emit = block_size, chunk_blocks, emit
        self.current = -1
        self.mask = fmt.new_mask(chunk_blocks)
        self.full = ~fmt.new_mask(chunk_blocks)
        self.buf = bytearray(block_size * chunk_blocks)

    def add(self, vbn: int, count: int, payload: bytes | memoryview) -> None:
        view, done = memoryview(payload), 0
        while done < count:
            k, a = divmod(vbn + done, self.c)
            n = min(self.c - a, count - done)
            if n == self.c:                   # the whole chunk: its blob straight from the
                if k != self.current:         # record (the same bytes as through buf)
                    self.flush()
                self.current = -1
                self.mask.setall(0)
                self.emit(k, self.full, view[done * self.bs:(done + n) * self.bs])
                done += n
                continue
            if k != self.current:
                self.flush()
                self.current = k
            self.mask[a:a + n] = 1
            self.buf[a * self.bs:(a + n) * self.bs] = view[done * self.bs:(done + n) * self.bs]
            done += n

    def flush(self) -> None:
        if self.current < 0 or not self.mask.any():
            return
        if self.mask.all():
            data: bytes | memoryview = memoryview(self.buf)
        else:
            data = b"".join(self.buf[s * self.bs:e * self.bs] for s, e in _runs(self.mask))
        self.emit(self.current, self.mask, data)
        self.mask.setall(0)


def _runs(mask: bitarray) -> list[tuple[int, int]]:
    """Runs of set bits as (start, end)."""
    out, pos = [], 0
    while (s := mask.find(1, pos)) >= 0:
        e = mask.find(0, s)
        e = len(mask) if e < 0 else e
        out.append((s, e))
        pos = e
    return out
