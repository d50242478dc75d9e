"""Client side of a remote stream endpoint, over any channel (ssh pipe, TLS socket).

`EndpointSink` pushes a stream into a volume on the far side (the far side
receives it); `EndpointSource` pulls the stream of an image from a volume on the
far side (the far side sends it). Both speak `wire`; the channel only carries
bytes and, when it fails, says why in the operator's terms.
"""

from __future__ import annotations

from typing import Any, Protocol

from blockxfer.errors import BlockxferError, StreamError

from . import wire
from .base import Result, Sink, Source


class Channel(Protocol):
    @property
    def peer(self) -> str: ...
    @property
    def reader(self) -> wire.Reader: ...
    @property
    def writer(self) -> wire.Writer: ...

    def close(self) -> None:
        """Orderly end: the far side has answered; wait for it."""

    def abort(self) -> None:
        """Cut the connection (and stop the far side's process, if any)."""

    def explain(self, e: BlockxferError, cause: OSError | None = None) -> BlockxferError:
        """A better error than `e` when the channel itself failed (ssh exit 255, a
        refused certificate...); `cause` is the OS error behind it, if any."""


def _why(e: OSError) -> str:
    return str(e.strerror or getattr(e, "reason", None) or e)


def _status(ch: Channel) -> Result:
    try:
        return wire.read_status(ch.reader, ch.peer)
    except StreamError as e:
        raise ch.explain(e) from e
    except OSError as e:
        raise ch.explain(StreamError(f"{ch.peer}: {_why(e)}"), e) from e


def _request(ch: Channel, request: dict[str, Any]) -> None:
    """Send the request (the far side answers once it has checked it)."""
    try:
        wire.write_request(ch.writer, request)
    except OSError as e:
        ch.abort()
        raise ch.explain(StreamError(f"{ch.peer}: {_why(e)}"), e) from e


def _ready(ch: Channel) -> Result:
    """Wait for the far side's answer to the request; abort on refusal."""
    try:
        return _status(ch)
    except BaseException:
        ch.abort()
        raise


def _open(ch: Channel, request: dict[str, Any]) -> Result:
    """Send the request and wait for the far side to be ready; abort on refusal."""
    _request(ch, request)
    return _ready(ch)


def ask(ch: Channel, request: dict[str, Any]) -> Result:
    """A request the far side answers with its result at once (no stream)."""
    result = _open(ch, request)
    ch.close()
    return result


class EndpointSink(Sink):
    """Streams into `volume` on the far side, which receives it atomically.

    The request goes out at once but its answer is awaited only at the first
    write: the far side starts up (ssh, a Python process, its imports) while this
    side plans the send. A refusal still arrives before any stream byte goes."""

    def __init__(self, ch: Channel, volume: str, *, force: bool = False) -> None:
        super().__init__()
        self.name = f"{ch.peer}:{volume}"
        self._ch = ch
        _request(ch, {"op": "receive", "volume": volume, "force": force})
        self._started: wire.FrameWriter | None = None

    @property
    def _frames(self) -> wire.FrameWriter:
        if self._started is None:
            _ready(self._ch)
            self._started = wire.FrameWriter(self._ch.writer)
        return self._started

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        frames = self._frames
        try:
            return frames.write(data)
        except OSError as e:              # the far side stopped reading: ask it why
            raise self._far_error(e) from e

    def _far_error(self, e: OSError) -> BlockxferError:
        try:
            _status(self._ch)
        except BlockxferError as far:
            return far
        return self._ch.explain(StreamError(f"{self._ch.peer}: {_why(e)}"), e)

    def _finish(self) -> Result | None:
        try:
            self._frames.end()
        except OSError as e:
            self._ch.abort()
            raise self._far_error(e) from e
        try:
            result = _status(self._ch)
        except BaseException:
            self._ch.abort()
            raise
        self._ch.close()
        return result

    def _abort(self) -> None:
        self._ch.abort()


class EndpointSource(Source):
    """The stream of `expression` from `volume` on the far side."""

    def __init__(self, ch: Channel, volume: str, expression: str, *,
                 resume: str | None = None, compress: bool = True) -> None:
        self.name = f"{ch.peer}:{volume}"
        self._ch = ch
        self.result: Result | None = None
        _open(ch, {"op": "send", "volume": volume, "expression": expression,
                   "resume": resume, "compress": compress})
        self._frames = wire.FrameReader(ch.reader, ch.peer)

    def read(self, n: int = -1, /) -> bytes:
        try:
            data = self._frames.read(n)
        except OSError as e:
            raise self._ch.explain(StreamError(f"{self._ch.peer}: {_why(e)}"), e) from e
        if not data and self.result is None:
            self.result = _status(self._ch)  # the far side's error, not "truncated"
        return data

    def finish(self) -> Result | None:
        """The decoder stopped at the trailer: read the end frame and the far side's
        result (raising its error, if it had one)."""
        try:
            self._frames.drain()
            if self.result is None:
                self.result = _status(self._ch)
        except BaseException:
            self._ch.abort()
            raise
        self._ch.close()
        return self.result

    def close(self) -> None:
        if self.result is None:
            self._ch.abort()



class EndpointPull(EndpointSource):
    """A replication pull (`op: replicate`): the far side answers with its plan (what
    it will send, `plan`), then the stream when the plan has one."""

    def __init__(self, ch: Channel, volume: str, request: dict[str, Any]) -> None:
        self.name = f"{ch.peer}:{volume}"
        self._ch = ch
        self.result = None
        self.plan = _open(ch, {**request, "op": "replicate", "volume": volume})
        self._frames = wire.FrameReader(ch.reader, ch.peer)
        if not self.plan.get("stream"):
            self._frames.ended = True        # no frames: only the final status follows
            self.finish()
