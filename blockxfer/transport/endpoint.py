"""Client side of a remote stream endpoint, over any channel (ssh pipe, TLS socket).

`EndpointSink` pushes a stream into a volume on the far side (the far side
receives it); `EndpointSource` pulls the stream of an image from a volume on the
far side (the far side sends it). Both speak `wire`; the channel only carries
bytes and, when it fails, says why in the operator's terms. `Sessions` keeps a
connection open between replication pulls (a service's schedule): the far side
grants it per request (`keep`/`kept`, wire.py), and a kept connection found dead
when it is used again is replaced by a new one, once, before anything was asked
on it.
"""

from __future__ import annotations

import logging
import select
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from blockxfer.errors import BlockxferError, StreamError

from . import wire
from .base import Result, Sink, Source

log = logging.getLogger("blockxfer.transport")
KEEP_MARGIN = 5.0        # seconds before the far side's idle end a kept channel is let go
#                          (a quarter of a shorter idle time)
SESSION_WAIT = 60.0      # seconds a pull waits for the channel another pull to its URL uses
_OPENING = object()      # Sessions: a URL whose pull is opening a new channel


class Channel(Protocol):
    @property
    def peer(self) -> str: ...
    @property
    def reader(self) -> wire.Reader: ...
    @property
    def writer(self) -> wire.Writer: ...

    def close(self) -> None:
        """Orderly end: the far side has answered; wait for it."""

    def alive(self) -> bool:
        """Between requests: the channel is still open (nothing came from the far side,
        which sends nothing unasked)."""

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


def quiet(stream: object) -> bool:
    """Nothing to read on an idle channel (a file object or socket): the far side has
    not closed it."""
    fileno = getattr(stream, "fileno", None)
    if fileno is None:
        return True
    try:
        readable, _, _ = select.select([fileno()], [], [], 0)
    except (OSError, ValueError):
        return False
    return not readable


class ChannelGone(StreamError):
    """A kept channel was found closed when its next request was sent: nothing was
    asked on it, so the request goes out again on a new one."""


def _reopened(ch: Channel, request: dict[str, Any]) -> Result:
    """`_open` on a kept channel: a far side gone meanwhile (its idle time ended, it
    was killed, the link was cut) is `ChannelGone`, not an error."""
    try:
        wire.write_request(ch.writer, request)
        return wire.read_status(ch.reader, ch.peer)
    except (OSError, wire.Closed) as e:
        ch.abort()
        raise ChannelGone(f"{ch.peer}: the kept connection was closed") from e
    except BaseException:
        ch.abort()
        raise


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
        self._release()
        return self.result

    def _release(self) -> None:
        """The far side answered its result: end the connection."""
        self._ch.close()

    def close(self) -> None:
        if self.result is None:
            self._ch.abort()


class EndpointPull(EndpointSource):
    """A replication pull (`op: replicate`): the far side answers with its plan (what
    it will send, `plan`), then the stream when the plan has one. With `sessions`,
    the channel goes back to them when the far side keeps it (`kept`); `reused`: the
    channel was kept from an earlier pull (ChannelGone when it is found closed)."""

    def __init__(self, ch: Channel, volume: str, request: dict[str, Any], *,
                 sessions: Sessions | None = None, url: str = "",
                 reused: bool = False) -> None:
        self.name = f"{ch.peer}:{volume}"
        self._ch, self._volume = ch, volume
        self._sessions, self._url = sessions, url
        self.result = None
        req = {**request, "op": "replicate", "volume": volume}
        self.plan = _reopened(ch, req) if reused else _open(ch, req)
        self._frames = wire.FrameReader(ch.reader, ch.peer)
        if not self.plan.get("stream"):
            self._frames.ended = True        # no frames: only the final status follows
            self.finish()

    def _release(self) -> None:
        kept = (self.result or {}).get("kept")
        if self._sessions is not None and isinstance(kept, int | float) and kept > 0:
            margin = min(KEEP_MARGIN, float(kept) / 4)
            self._sessions.give(self._url, _Kept(self._ch, self._volume,
                                                 time.monotonic() + float(kept) - margin))
        else:
            self._ch.close()


@dataclass
class _Kept:
    ch: Channel
    volume: str
    until: float                         # time.monotonic() the channel is let go at


class _Lent:
    """A channel of `Sessions` while a pull uses it: its end (close, abort) tells
    them the URL is free for the next pull; otherwise the channel itself."""

    def __init__(self, ch: Channel, sessions: Sessions, url: str) -> None:
        self._ch, self._sessions, self._url = ch, sessions, url
        self.inner = ch                      # the channel itself (tests look at its process)

    @property
    def peer(self) -> str:
        return self._ch.peer

    @property
    def reader(self) -> wire.Reader:
        return self._ch.reader

    @property
    def writer(self) -> wire.Writer:
        return self._ch.writer

    def close(self) -> None:
        try:
            self._ch.close()
        finally:
            self._sessions.done(self._url, self)

    def abort(self) -> None:
        try:
            self._ch.abort()
        finally:
            self._sessions.done(self._url, self)

    def alive(self) -> bool:
        return self._ch.alive()

    def explain(self, e: BlockxferError, cause: OSError | None = None) -> BlockxferError:
        return self._ch.explain(e, cause)


Opener = Callable[[str], tuple[Channel, str]]


def open_channel(url: str) -> tuple[Channel, str]:
    """A new channel to the far side of an ssh:// or tls:// URL, and the volume there."""
    from . import _far
    return _far(url)


class Sessions:
    """Channels kept open between replication pulls, one per source URL: what a
    service pulling on a schedule holds (docs/replication.md, the session).

    `pull` asks the far side to keep the connection some seconds after the
    answer; the channel comes back here when it does. The next pull to that URL
    takes it: one found closed (the far side's idle time ended, it was killed, the
    link was cut) is replaced by a new channel, once, before the request counts.
    A channel being used is lent to one pull: a second pull to the URL meanwhile
    (`replicate pull` run by hand into a served copy during a scheduled one) waits
    for it, up to SESSION_WAIT, rather than log in again: pulls into one target
    follow each other anyway."""

    def __init__(self, opener: Opener | None = None) -> None:
        self._open = opener or open_channel
        self._idle: dict[str, _Kept] = {}
        self._lent: dict[str, object] = {}   # URL -> the channel a pull uses (or _OPENING)
        self._lock = threading.Condition()
        self._closed = False
        self.opened = 0                      # channels opened (the bench and tests)
        self.reopened = 0                    # kept channels found closed and replaced

    def pull(self, url: str, request: dict[str, Any], keep: float = 0.0) -> EndpointPull:
        """The pull of `request` from `url`, on the channel kept for it if there is one;
        asking the far side to keep it `keep` seconds after (0: end it)."""
        req = {**request, "keep": keep} if keep > 0 else dict(request)
        kept = self._take(url)
        if kept is not None:
            try:
                return EndpointPull(kept.ch, kept.volume, req, sessions=self, url=url,
                                    reused=True)
            except ChannelGone as e:
                self.reopened += 1
                log.info("%s; opening a new one", e)
                self._lend(url, _OPENING)    # still this pull's to open
        try:
            ch, volume = self._open(url)
        except BaseException:
            self.done(url, _OPENING)
            raise
        self.opened += 1
        lent = _Lent(ch, self, url)
        self._lend(url, lent)
        return EndpointPull(lent, volume, req, sessions=self, url=url)

    def _take(self, url: str) -> _Kept | None:
        """The URL's kept channel, lent to the caller; None (the URL marked as being
        used all the same) when there is none or it is no longer open."""
        with self._lock:
            self._lock.wait_for(lambda: url not in self._lent, timeout=SESSION_WAIT)
            kept = self._idle.pop(url, None)
            self._lent[url] = kept.ch if kept is not None else _OPENING
        if kept is None:
            return None
        if time.monotonic() < kept.until and kept.ch.alive():
            return kept
        self._lend(url, _OPENING)            # before the abort frees the URL for others
        kept.ch.abort()                      # the far side ends it (or has): not used again
        return None

    def _lend(self, url: str, ch: object) -> None:
        with self._lock:
            self._lent[url] = ch

    def done(self, url: str, ch: object) -> None:
        """The pull using `ch` has ended with it (given back, closed or cut)."""
        with self._lock:
            if self._lent.get(url) is ch:
                del self._lent[url]
                self._lock.notify_all()

    def give(self, url: str, kept: _Kept) -> None:
        with self._lock:
            keep = not self._closed and url not in self._idle
            if keep:
                self._idle[url] = kept
        if not keep:
            kept.ch.close()                  # closed meanwhile, or another pull's is there
        self.done(url, kept.ch)

    def kept(self, url: str) -> bool:
        with self._lock:
            return url in self._idle

    def close(self) -> None:
        """End every kept channel (the far sides read EOF and exit), and those the
        pulls under way would give back."""
        with self._lock:
            idle, self._idle = list(self._idle.values()), {}
            self._closed = True
        for k in idle:
            k.ch.close()
