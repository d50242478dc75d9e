"""Stream sinks and sources opened by URL (benji's habit).

    -                        standard input or output
    PATH, file:PATH          a file (written to a temporary name, renamed when finished)
    ssh://[user@]host/PATH   a volume on another host, through `blockxfer stdio-serve`
    tls://host:port/PATH     a volume behind `blockxfer tls-serve`, mutual TLS

A scheme this build does not know (`s3://` registers itself when its module is
present) is refused with the list of those it knows. Pushing into an ssh or TLS
URL runs a receive on the far side; pulling from one runs a send there, so a
source URL of a volume needs the image expression.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from blockxfer.errors import UsageError

from .base import ByteSink, ByteSource, Result, Sink, Source
from .endpoint import Sessions
from .local import FileSink, FileSource, StdinSource, StdoutSink

if TYPE_CHECKING:
    from .endpoint import Channel

__all__ = ["ByteSink", "ByteSource", "Result", "Sessions", "Sink", "Source", "ask_far", "open_sink",
           "open_source", "open_pull", "register", "scheme_of", "is_volume_url"]


@dataclass(frozen=True, slots=True)
class SourceRequest:
    """What a source that is a volume must be asked for."""

    expression: str | None = None
    resume: str | None = None
    compress: bool = True


SinkFactory = Callable[[str, bool], Sink]
SourceFactory = Callable[[str, SourceRequest], Source]
_SCHEMES: dict[str, tuple[SinkFactory, SourceFactory, bool]] = {}
_URL = re.compile(r"^([a-z][a-z0-9+.-]*)://")


def register(scheme: str, sink: SinkFactory, source: SourceFactory, *,
             volume: bool = False) -> None:
    """Add a scheme; `volume` when the far end is a volume (a source needs an image)."""
    _SCHEMES[scheme] = (sink, source, volume)


def scheme_of(url: str) -> str:
    """'ssh', 'tls', 's3', ... for a URL; 'file' for a path or `file:`; '-' for stdio."""
    if url == "-":
        return "-"
    m = _URL.match(url)
    if m:
        return m.group(1)
    return "file"


def is_volume_url(url: str) -> bool:
    entry = _SCHEMES.get(scheme_of(url))
    return bool(entry and entry[2])


def local_path(url: str | None) -> str | None:
    """The file a `file:` URL or plain path names; None for -, volumes and stores."""
    if url in (None, "-") or scheme_of(str(url)) != "file":
        return None
    return _file_path(str(url))


def _file_path(url: str) -> str:
    if url.startswith("file://"):
        return url[len("file://"):]
    if url.startswith("file:"):
        return url[len("file:"):]
    return url


def _entry(url: str) -> tuple[SinkFactory, SourceFactory, bool]:
    scheme = scheme_of(url)
    if scheme not in _SCHEMES:
        known = ", ".join(f"{s}://" for s in sorted(_SCHEMES))
        raise UsageError(f"{url!r}: unknown transport {scheme!r}; use -, a path, {known}")
    return _SCHEMES[scheme]


def open_sink(url: str | None, *, force: bool = False) -> Sink:
    """Where a stream goes. `force` lets a far-side receive overwrite a volume."""
    if url in (None, "-"):
        return StdoutSink()
    assert url is not None
    return _entry(url)[0](url, force)


def open_source(url: str | None, request: SourceRequest | None = None) -> Source:
    """Where a stream comes from; a volume URL needs `request.expression`."""
    if url in (None, "-"):
        return StdinSource()
    assert url is not None
    sink, source, volume = _entry(url)
    request = request or SourceRequest()
    if volume and not request.expression:
        raise UsageError(f"{url} is a volume: name the image to pull from it "
                         "(for example --image 'june5 - june4')")
    return source(url, request)


def open_pull(url: str, request: dict[str, Any]) -> tuple[Result, Source]:
    """Ask the volume at an ssh:// or tls:// URL for a replication pull: its plan (what
    it sends) and the stream (empty when the plan has none). Refusals raise here."""
    from .endpoint import EndpointPull
    if scheme_of(url) not in ("ssh", "tls"):
        raise UsageError(f"{url!r}: replicate from an ssh:// or tls:// URL of a volume")
    channel, volume = _far(url)
    pull = EndpointPull(channel, volume, request)
    return pull.plan, pull


def ask_far(url: str, request: dict[str, Any]) -> Result:
    """One request the volume at an ssh:// or tls:// URL answers at once, without a
    stream (a mirror's `inspect` and `revert`); its result, or its error raised."""
    from .endpoint import ask
    if scheme_of(url) not in ("ssh", "tls"):
        raise UsageError(f"{url!r}: not an ssh:// or tls:// URL of a volume")
    channel, volume = _far(url)
    return ask(channel, {**request, "volume": volume})


def _far(url: str) -> tuple[Channel, str]:
    """The channel to the far side of an ssh:// or tls:// URL, and the volume there."""
    if scheme_of(url) == "ssh":
        from .ssh import channel
        return channel(url)
    from .tls import TlsChannel, TlsUrl
    t = TlsUrl.parse(url)
    return TlsChannel(t), t.path


def _far_sink(url: str, force: bool) -> Sink:
    from .endpoint import EndpointSink
    channel, volume = _far(url)
    return EndpointSink(channel, volume, force=force)


def _far_source(url: str, req: SourceRequest) -> Source:
    from .endpoint import EndpointSource
    channel, volume = _far(url)
    assert req.expression is not None
    return EndpointSource(channel, volume, req.expression, resume=req.resume,
                          compress=req.compress)


register("file", lambda url, force: FileSink(_file_path(url)),
         lambda url, req: FileSource(_file_path(url)))
register("ssh", _far_sink, _far_source, volume=True)
register("tls", _far_sink, _far_source, volume=True)
