"""Reading a stream: records checked one by one (magic, bounds, sequence, checksum)
and the whole (counts, digest) before anything is committed.

Every length is bounded before anything is allocated, so a hostile stream costs
at most one record body (MAX_BODY) of memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import NoReturn, Protocol, runtime_checkable

import numpy as np
import xxhash
import zstandard

from blockxfer.errors import StreamError
from blockxfer.volume.layout import MAGIC as VOLUME_MAGIC

from . import format as fmt
from .io import ByteSource


@dataclass
class Data:
    vbn: int
    count: int
    payload: bytes | memoryview        # a view of the record's body: no copy of the blocks
    seq: int


@dataclass
class Dealloc:
    runs: list[tuple[int, int]]
    seq: int


@runtime_checkable
class Records(Protocol):
    """What a receive applies: a header, then data and dealloc records, checked.
    `StreamReader` decodes them from stream bytes; a source that holds the blocks
    already checked (an object store's blobs) may hand them over directly."""

    def read_header(self) -> fmt.Header: ...
    def __iter__(self) -> Iterator[Data | Dealloc]: ...


class StreamReader:
    """Iterate a stream's records; `header` after the first, `trailer` at the end."""

    def __init__(self, f: ByteSource, name: str = "stream"):
        self.f, self.name = f, name
        self.digest = xxhash.xxh3_128()
        self.seq = 0
        self.offset = 0
        self.header: fmt.Header | None = None
        self.trailer: fmt.Trailer | None = None
        self.data_blocks = 0
        self.dealloc_blocks = 0
        self._starts: list[int] = []
        self._counts: list[int] = []
        self._zstd = zstandard.ZstdDecompressor()
        self._bitmap: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None
        self.any_seq = False

    def _fail(self, what: str) -> StreamError:
        return StreamError(f"{self.name}: {what} (record {self.seq}, byte {self.offset})")

    def _read(self, n: int, what: str) -> bytes:
        raw = self.f.read(n)
        while raw is not None and len(raw) < n:
            more = self.f.read(n - len(raw))
            if not more:
                break
            raw += more
        if raw is None or len(raw) < n:
            raise self._fail(f"stream is truncated inside {what}")
        return raw

    def _record(self) -> tuple[int, int, bytes]:
        head = self.f.read(fmt.RECORD.size)
        if not head:
            if self.offset == 0:
                raise StreamError(f"{self.name}: the stream is empty: no bytes arrived (see the "
                                  "error of the command that should have made it)")
            raise self._fail("stream is truncated: it ends before its trailer")
        if self.offset == 0 and not head.startswith(fmt.RECORD_MAGIC[:len(head)]):
            self._not_a_stream(head)
        if len(head) < fmt.RECORD.size:
            head += self._read(fmt.RECORD.size - len(head), "a record header")
        magic, rtype, flags, _, length, seq, _ = fmt.RECORD.unpack(head)
        if magic != fmt.RECORD_MAGIC:     # at offset 0 the check above said what it is
            raise self._fail("stream is damaged: bad record magic")
        if length > fmt.MAX_BODY:
            raise self._fail(f"stream is damaged: record claims {length} bytes")
        body = self._read(length, "a record body")
        (ck,) = fmt.CHECK.unpack(self._read(fmt.CHECK.size, "a record checksum"))
        h = xxhash.xxh3_64(head)
        h.update(body)
        if h.intdigest() != ck:
            raise self._fail("stream is damaged: record checksum mismatch")
        if seq != self.seq and not self.any_seq:
            raise self._fail(f"records are out of order: expected {self.seq}, found {seq}")
        if rtype != fmt.TRAILER:
            self.digest.update(head)
            self.digest.update(body)
            self.digest.update(fmt.CHECK.pack(ck))
        self.seq += 1
        self.offset += len(head) + length + fmt.CHECK.size
        return rtype, flags, body

    def _not_a_stream(self, head: bytes) -> NoReturn:
        if head.startswith(VOLUME_MAGIC):
            raise StreamError(f"{self.name}: this is a blockxfer volume, not a stream; "
                              "make a stream of it with 'blockxfer send'")
        raise StreamError(f"{self.name}: this is not a blockxfer stream (it does not start "
                          "with a stream record); make one with 'blockxfer send'")

    def _record_any(self) -> tuple[int, int, bytes]:
        self.any_seq = True
        return self._record()

    def read_header(self) -> fmt.Header:
        rtype, _, body = self._record()
        if rtype != fmt.HEADER:
            raise self._fail("stream does not start with a header")
        h = fmt.Header.unpack(body)
        if h.block_size < 4096 or h.block_size > 1 << 20 or h.block_size & (h.block_size - 1):
            raise self._fail(f"stream header has an impossible block size {h.block_size}")
        if not h.first_data_vbn < h.nblocks < 1 << 40 or h.image_blocks > h.nblocks:
            raise self._fail("stream header has impossible block counts")
        self.header = h
        return h

    def __iter__(self) -> Iterator[Data | Dealloc]:
        """Data and dealloc records up to the trailer, which is then checked."""
        h = self.header or self.read_header()
        while True:
            rtype, flags, body = self._record()
            if rtype == fmt.DATA:
                yield from self._data_pieces(h, flags, body)
            elif rtype == fmt.BITMAP:
                self._read_bitmap(h, body)
            elif rtype == fmt.DEALLOC:
                yield self._dealloc(h, body)
            elif rtype == fmt.TRAILER:
                self._finish(h, body)
                return
            else:
                raise self._fail(f"unexpected record type {rtype}")

    def _read_bitmap(self, h: fmt.Header, body: bytes) -> None:
        """The image plane, sent first when data records carry ordinals."""
        if self._bitmap is not None or self.data_blocks or not h.flags & fmt.H_IMPLICIT:
            raise self._fail("unexpected bitmap record")
        size = -(-h.nblocks // 8)
        try:
            raw = self._zstd.decompress(body, max_output_size=size)
        except zstandard.ZstdError as e:
            raise self._fail(f"bitmap does not decompress ({e})") from e
        bits = np.unpackbits(np.frombuffer(raw, dtype=np.uint8), bitorder="little")
        edges = np.diff(np.concatenate(([0], bits[:h.nblocks].astype(np.int8), [0])))
        starts, ends = np.nonzero(edges == 1)[0], np.nonzero(edges == -1)[0]
        counts = ends - starts
        if int(counts.sum()) > h.image_blocks or (len(starts) and starts[0] < h.first_data_vbn):
            raise self._fail("bitmap does not match the header")
        self._bitmap = (starts, counts, np.concatenate(([0], np.cumsum(counts))))

    def _data_pieces(self, h: fmt.Header, flags: int, body: bytes) -> Iterator[Data]:
        if not flags & fmt.F_IMPLICIT:
            yield self._data(h, flags, body)
            return
        if self._bitmap is None:
            raise self._fail("data record by ordinal before any bitmap")
        starts, counts, ranks = self._bitmap
        whole = self._data(h, flags & ~fmt.F_IMPLICIT, body, ordinal=True)
        first, n, bs = whole.vbn, whole.count, h.block_size
        if first + n > ranks[-1]:
            raise self._fail("data record names ordinals past the bitmap")
        i, done = int(np.searchsorted(ranks, first, side="right") - 1), 0
        while done < n:
            off = first + done - int(ranks[i])
            take = min(int(counts[i]) - off, n - done)
            vbn = int(starts[i]) + off
            self._note(vbn, take)
            yield Data(vbn, take, whole.payload[done * bs:(done + take) * bs], whole.seq)
            done += take
            i += 1

    def _note(self, vbn: int, count: int) -> None:
        self._starts.append(vbn)
        self._counts.append(count)

    def _data(self, h: fmt.Header, flags: int, body: bytes, ordinal: bool = False) -> Data:
        if len(body) < fmt.DATA_HEAD.size:
            raise self._fail("data record is too short")
        vbn, count = fmt.DATA_HEAD.unpack_from(body, 0)
        if count == 0 or (not ordinal and vbn < h.first_data_vbn) or vbn + count > h.nblocks:
            raise self._fail(f"data record names blocks {vbn}+{count} outside the volume")
        want = count * h.block_size
        payload: bytes | memoryview = memoryview(body)[fmt.DATA_HEAD.size:]
        if flags & fmt.F_ZSTD:
            try:
                payload = self._zstd.decompress(payload, max_output_size=want)
            except zstandard.ZstdError as e:
                raise self._fail(f"compressed data record does not decompress ({e})") from e
        if len(payload) != want:
            raise self._fail(f"data record holds {len(payload)} bytes for {count} blocks")
        if not ordinal:
            self._note(vbn, count)
        self.data_blocks += count
        return Data(vbn, count, payload, self.seq - 1)

    def _dealloc(self, h: fmt.Header, body: bytes) -> Dealloc:
        if len(body) % fmt.RUN.size:
            raise self._fail("dealloc record has a partial run")
        runs = [fmt.RUN.unpack_from(body, i) for i in range(0, len(body), fmt.RUN.size)]
        for vbn, count in runs:
            if vbn < h.first_data_vbn or vbn + count > h.nblocks:
                raise self._fail(f"dealloc record names blocks {vbn}+{count} outside the volume")
            self.dealloc_blocks += count
        return Dealloc(runs, self.seq - 1)

    def _finish(self, h: fmt.Header, body: bytes) -> None:
        t = fmt.Trailer.unpack(body)
        if t.digest != self.digest.digest():
            raise self._fail("stream digest mismatch")
        if (t.records, t.data_blocks, t.dealloc_blocks) != (self.seq - 1, self.data_blocks,
                                                             self.dealloc_blocks):
            raise self._fail("stream trailer counts do not match its records")
        if not h.flags & fmt.H_RESUMING and self.data_blocks != h.image_blocks:
            raise self._fail(f"stream carries {self.data_blocks} blocks, header promised "
                             f"{h.image_blocks}")
        extra = self.f.read(1)
        if extra:
            raise self._fail("stream has bytes after its trailer")
        self._check_overlaps()
        self.trailer = t

    def _check_overlaps(self) -> None:
        if len(self._starts) < 2:
            return
        starts = np.array(self._starts, dtype=np.int64)
        counts = np.array(self._counts, dtype=np.int64)
        order = np.argsort(starts, kind="stable")
        s, c = starts[order], counts[order]
        bad = np.nonzero(s[1:] < s[:-1] + c[:-1])[0]
        if len(bad):
            raise self._fail(f"stream repeats block {int(s[bad[0] + 1])}")


def parse_record(raw: bytes | memoryview, block_size: int) -> Data | None:
    """One record on its own (partial restore): checksum checked, DATA decoded;
    None for other types. The sequence is not checked: the caller knows where it is."""
    import io
    reader = StreamReader(io.BytesIO(bytes(raw)), "tape record")
    rtype, flags, body = reader._record_any()
    if rtype != fmt.DATA:
        return None
    vbn, count = fmt.DATA_HEAD.unpack_from(body, 0)
    payload = body[fmt.DATA_HEAD.size:]
    if flags & fmt.F_ZSTD:
        payload = zstandard.ZstdDecompressor().decompress(payload,
                                                          max_output_size=count * block_size)
    if len(payload) != count * block_size:
        raise StreamError("data record holds the wrong number of bytes")
    return Data(vbn, count, payload, -1)
