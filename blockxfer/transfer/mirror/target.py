"""Where a mirror goes: a local volume (a path or a device), or any transport URL.

A local destination is received in this process (the stream runs through an
in-memory pipe from the sender's thread) and can be looked at: which snapshots
it holds, and the plane of blocks an interrupted receive already placed, so a
retry resumes block by block and local writes there are rolled back first. A
URL (`ssh://`, `tls://`) goes through the transport's sink: the far side
receives atomically and answers the same look (`inspect`) and rollback
(`revert`). A local volume that `blockxfer serve` owns is reached through its
service instead (blockxfer/service/mirrordest.py, chosen by the wiring), with
the same look and rollback.
"""

from __future__ import annotations

import base64
import logging
import os
import struct
import threading
import zlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

from bitarray import bitarray

from blockxfer.device import BlockDevice
from blockxfer.errors import BlockxferError, FormatError, StreamError, UsageError, VolumeError
from blockxfer.stream.decode import StreamReader
from blockxfer.stream.io import ByteSink
from blockxfer.stream.receive import OpenDevice, receive_stream
from blockxfer.stream.send import plane_runs
from blockxfer.transport import (
    SourceRequest,
    ask_far,
    is_volume_url,
    open_sink,
    open_source,
    scheme_of,
)
from blockxfer.volume import Volume, has_signature
from blockxfer.volume.local import LocalArea
from blockxfer.volume.receiving import read_receiving_marker

log = logging.getLogger("blockxfer.mirror")
WriteStream = Callable[[ByteSink], Any]      # writes one whole stream into the sink
PIPE_BYTES = 16 << 20                        # what the in-memory pipe holds at most
PLANE_TEXT_MAX = 48 << 10                    # a received plane's runs, sent as text, at most


@dataclass
class Found:
    """What a destination holds, as far as this side can tell."""

    exists: bool = False
    volume_uuid: bytes | None = None
    snapshots: dict[bytes, str] = field(default_factory=dict)    # complete ones: guid -> name
    newest: bytes | None = None                                  # guid of the newest snapshot
    pending: bytes | None = None                                 # interrupted receive's stream id
    received: bitarray | None = None
    other: str | None = None                                     # it holds something else


class Target(Protocol):
    name: str

    def look(self, thorough: bool = False) -> Found | None:
        """What is there (None: this side cannot tell). A remote one is asked only
        when `thorough` (a round trip: for a retry, and for `mirror status`)."""

    def discard_local_changes(self, guid: bytes) -> bool:
        """Go back to the snapshot `guid` this mirror sent last; True when something
        written there since was discarded."""

    def receive(self, write: WriteStream, *, force: bool) -> dict[str, Any]:
        """Run one stream into the destination; it commits atomically at the end."""

    def holds_newest(self, name: str, guid: bytes) -> bool:
        """Is snapshot `name` (that guid) the destination's newest? Asked when an
        update is refused: a kill after the destination committed it but before the
        source recorded so leaves exactly that."""


def open_target(dest: str, open_device: OpenDevice, endpoint: str | None = None) -> Target:
    """The destination `dest`; `endpoint` is an s3:// one's S3 endpoint (else the
    AWS environment's)."""
    scheme = scheme_of(dest)
    if scheme == "file" and not dest.startswith("file:"):
        return LocalTarget(dest, open_device)
    if scheme == "s3":
        from .s3target import StoreTarget
        return StoreTarget(dest, endpoint)
    if not is_volume_url(dest):
        raise UsageError(f"{dest}: a mirror goes to a volume: a path or device, "
                         "ssh://[user@]host/PATH, tls://host:port/PATH or "
                         "s3://BUCKET[/PREFIX]/VOLUME")
    return UrlTarget(dest)


class LocalTarget:
    def __init__(self, path: str, open_device: OpenDevice) -> None:
        self.name = self.path = path
        self._open = open_device

    def look(self, thorough: bool = False) -> Found:
        if not os.path.exists(self.path):
            return Found()
        dev: BlockDevice = self._open(self.path, write=False)
        try:
            marker = read_receiving_marker(dev)
            if marker is not None and has_signature(dev) == "an interrupted receive":
                st = LocalArea(dev, marker.block_size, marker.nblocks).read(0)
                return Found(True, marker.volume_uuid, pending=st.stream_id if st.pending
                             else None, received=st.received)
            try:
                vol = Volume.open(dev, writable=False)
            except FormatError:
                return Found(True, other=has_signature(dev))
            try:
                return found_in(vol)
            finally:
                vol.io.close()
        finally:
            dev.close()

    def holds_newest(self, name: str, guid: bytes) -> bool:
        return self.look().newest == guid

    def discard_local_changes(self, guid: bytes) -> bool:
        dev: BlockDevice = self._open(self.path, write=True)
        try:
            vol = Volume.open(dev)
        except BaseException:
            dev.close()
            raise
        with vol:
            name = next((e.name for e in vol.snapshots() if e.guid == guid), None)
            if name is None:
                raise VolumeError(f"{self.path} no longer holds the mirror's last snapshot; "
                                  "start the mirror again with --force (a full image)")
            return vol.revert_to_received(name)

    def receive(self, write: WriteStream, *, force: bool) -> dict[str, Any]:
        pipe = Pipe()

        def send() -> Any:
            try:
                return write(pipe)
            finally:
                pipe.close_write()

        def take() -> Any:
            try:
                return receive_stream(pipe, self.path, self._open, force=force,
                                      retry="the mirror resumes it at its next update")
            finally:
                pipe.close_read()
        res, stats = beside(send, take)
        return {"top": res.top, "blocks": res.blocks, "resumed": res.resumed, "stats": stats}


def found_in(vol: Volume) -> Found:
    """What an open volume holds, as a mirror sees its destination."""
    done = [e for e in vol.snapshots() if not e.incomplete and not e.shadow]
    newest = max(vol.snapshots(), key=lambda e: e.generation, default=None)
    st = vol.local
    return Found(True, vol.sb.uuid, {e.guid: e.name for e in done},
                 newest.guid if newest is not None and vol.generation == newest.generation
                 else None,
                 st.stream_id if st.pending else None, st.received)


class UrlTarget:
    """A volume behind ssh:// or tls://. Its far side (`stdio-serve`, `tls-serve`) is
    asked what it holds (op `inspect`: the same look as a local destination's, with
    the plane an interrupted receive placed) and to roll local writes back (op
    `revert`). A far side that cannot answer (an older one, a served volume, a key
    allowed only to send) is not looked at: the update is then sent whole."""

    def __init__(self, url: str) -> None:
        self.name = self.url = url
        self._seen: Found | None = None
        self._mine: bytes | None = None       # the mirror's last snapshot there

    def look(self, thorough: bool = False) -> Found | None:
        self._seen = None
        if not thorough:                      # an update in the steady state: no round trip
            return None
        try:
            self._seen = found_from_dict(ask_far(self.url, {"op": "inspect"}))
        except BlockxferError as e:
            log.info("%s: not looked at (%s); the update is sent whole", self.url, e)
        return self._seen

    def discard_local_changes(self, guid: bytes) -> bool:
        """Ask the far side to go back to `guid` when it was looked at and holds more
        than that (written there since). Not looked at: `receive` finds out when the
        far side refuses the incremental, and does it then."""
        self._mine = guid
        if self._seen is None:
            return False
        return self._revert(self._seen, guid)

    def _revert(self, seen: Found, guid: bytes) -> bool:
        if seen.volume_uuid is None or seen.newest == guid or guid not in seen.snapshots:
            return False
        far = ask_far(self.url, {"op": "revert", "guid": guid.hex()})
        return bool(far.get("discarded"))

    def holds_newest(self, name: str, guid: bytes) -> bool:
        """Ask the far side to send `name` and read only the stream's header: its
        top's guid says whether it is ours (the send is then cut off)."""
        try:
            with open_source(self.url, SourceRequest(expression=name)) as src:
                h = StreamReader(src, self.url).read_header()
        except BlockxferError:
            return False
        newest = max(h.snapshot_set, key=lambda s: s.generation, default=None)
        return h.top.guid == guid and newest is not None and newest.guid == guid

    def receive(self, write: WriteStream, *, force: bool) -> dict[str, Any]:
        try:
            return self._receive(write, force)
        except StreamError:                   # refused: written there since? roll back once
            if self._mine is None or self._seen is not None or not self._rolled_back():
                raise
        return self._receive(write, force)

    def _rolled_back(self) -> bool:
        assert self._mine is not None
        try:
            seen = found_from_dict(ask_far(self.url, {"op": "inspect"}))
        except BlockxferError:
            return False
        if not self._revert(seen, self._mine):
            return False
        log.info("%s: discarded what was written there since the last update", self.url)
        return True

    def _receive(self, write: WriteStream, force: bool) -> dict[str, Any]:
        with open_sink(self.url, force=force) as sink:
            stats = write(sink)
        far = sink.result or {}
        if not isinstance(far, dict) or "top" not in far:
            raise StreamError(f"{self.url} did not say what it received")
        return {"top": far["top"], "blocks": far.get("blocks", 0),
                "resumed": bool(far.get("resumed")), "stats": stats}


R = TypeVar("R")


def beside(send: Callable[[], Any], receive: Callable[[], R]) -> tuple[R, Any]:
    """The two halves of a local update: `send` writes the stream on a thread while
    `receive` takes it here; what each returned. The sender's reason goes first
    when it is ours (a damaged block explains the cut-off stream the receive saw),
    then the receive's, then anything else the sender hit."""
    sent: dict[str, Any] = {}

    def run() -> None:
        try:
            sent["stats"] = send()
        except BaseException as e:       # noqa: BLE001 - ordered with the receive's below
            sent["error"] = e
    t = threading.Thread(target=run, name="mirror-send", daemon=True)
    t.start()
    failed: BlockxferError | None = None
    try:
        res = receive()
    except BlockxferError as e:
        failed = e
    t.join()
    mine = sent.get("error")
    if isinstance(mine, BlockxferError):
        raise mine
    if failed is not None:
        raise failed
    if mine is not None:
        raise mine
    return res, sent.get("stats")


class Pipe:
    """A bounded in-memory pipe between the sender's thread and the receiver."""

    def __init__(self, limit: int = PIPE_BYTES) -> None:
        self._chunks: deque[bytes] = deque()
        self._size, self._limit = 0, limit
        self._cv = threading.Condition()
        self._eof = self._gone = False
        self._head = b""

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        raw = bytes(data)
        with self._cv:
            self._cv.wait_for(lambda: self._size < self._limit or self._gone)
            if self._gone:
                raise BrokenPipeError("the receiving side stopped")
            self._chunks.append(raw)
            self._size += len(raw)
            self._cv.notify_all()
        return len(raw)

    def flush(self) -> None:
        """Everything written is readable at once."""

    def read(self, n: int = -1, /) -> bytes:
        out = bytearray(self._head)
        self._head = b""
        while n < 0 or len(out) < n:
            with self._cv:
                self._cv.wait_for(lambda: bool(self._chunks) or self._eof)
                if not self._chunks:
                    break
                chunk = self._chunks.popleft()
                self._size -= len(chunk)
                self._cv.notify_all()
            out += chunk
        if n >= 0 and len(out) > n:
            self._head = bytes(out[n:])
            del out[n:]
        return bytes(out)

    def close_write(self) -> None:
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def close_read(self) -> None:
        with self._cv:
            self._gone = True
            self._chunks.clear()
            self._size = 0
            self._cv.notify_all()


# -- a destination's look, as the far side of ssh:// or tls:// answers it ---------------
_RUN = struct.Struct("<QQ")


def found_to_dict(f: Found, limit: int = PLANE_TEXT_MAX) -> dict[str, Any]:
    """The look as JSON data; the received plane goes as compressed runs of at most
    `limit` characters of text (beyond, it is left out: the update is sent whole)."""
    plane = None
    if f.received is not None:
        raw = b"".join(_RUN.pack(s, c) for s, c in plane_runs(f.received, len(f.received)))
        plane = base64.b64encode(zlib.compress(raw, 6)).decode()
        if len(plane) > limit:                # too scattered to send as text: no resume
            plane = None
    return {"exists": f.exists, "uuid": f.volume_uuid.hex() if f.volume_uuid else None,
            "snapshots": {g.hex(): n for g, n in f.snapshots.items()},
            "newest": f.newest.hex() if f.newest else None,
            "pending": f.pending.hex() if f.pending and plane else None,
            "received": plane, "nbits": len(f.received) if f.received is not None else 0,
            "other": f.other}


def found_from_dict(d: dict[str, Any]) -> Found:
    try:
        received = None
        if d.get("received"):
            received = bitarray(int(d["nbits"]), endian="little")
            received.setall(0)
            raw = zlib.decompress(base64.b64decode(d["received"]))
            for off in range(0, len(raw) - _RUN.size + 1, _RUN.size):
                start, count = _RUN.unpack_from(raw, off)
                received[start:start + count] = 1
        return Found(bool(d["exists"]), _unhex(d.get("uuid")),
                     {bytes.fromhex(g): str(n) for g, n in d.get("snapshots", {}).items()},
                     _unhex(d.get("newest")), _unhex(d.get("pending")), received, d.get("other"))
    except (KeyError, TypeError, ValueError, zlib.error, struct.error) as e:
        raise StreamError(f"the far side's answer to 'inspect' is malformed: {e}") from e


def _unhex(v: Any) -> bytes | None:
    return bytes.fromhex(v) if v else None
