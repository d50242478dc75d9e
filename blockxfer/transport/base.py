"""What every transport offers: a sink that takes a stream, a source that gives one.

A sink is written to and then either finished (the bytes are durable where they
went, and the far side, if any, has said what it did with them) or aborted
(whatever it created is gone; a target it would have replaced is untouched).
Used as a context manager it aborts on an exception and finishes otherwise.
A source is read to its end and closed. Neither knows the stream format: that
is `blockxfer.stream`'s business; a transport only moves bytes and reports the
far side's result or error.
"""

from __future__ import annotations

from typing import Any

from blockxfer.stream.io import ByteSink, ByteSource

Result = dict[str, Any]
__all__ = ["ByteSink", "ByteSource", "Result", "Sink", "Source"]


class Sink:
    """Base of every sink: the finish/abort life cycle around `write`."""

    name = "sink"

    def __init__(self) -> None:
        self.result: Result | None = None
        self._done = False

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        raise NotImplementedError

    def flush(self) -> None:
        """Nothing to do by default: `finish` makes the bytes durable."""

    def _finish(self) -> Result | None:
        raise NotImplementedError

    def _abort(self) -> None:
        raise NotImplementedError

    def finish(self) -> Result | None:
        """Make the stream durable where it went; the far side's result, if any."""
        if not self._done:
            self._done = True
            self.result = self._finish()
        return self.result

    def abort(self) -> None:
        """Undo: remove what this sink created; the destination stays as it was."""
        if not self._done:
            self._done = True
            self._abort()

    def __enter__(self) -> Sink:
        return self

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self.finish()
        else:
            self.abort()


class Source:
    """Base of every source: read to the end, then close."""

    name = "source"

    def read(self, n: int = -1, /) -> bytes:
        raise NotImplementedError

    def seekable(self) -> bool:
        return False

    def seek(self, offset: int, whence: int = 0, /) -> int:
        raise OSError(f"{self.name} cannot seek")

    def finish(self) -> Result | None:
        """The whole stream was consumed: the far side's result, if any."""
        return None

    def close(self) -> None:
        """Release the source (cutting a remote one off if it was not finished)."""

    def __enter__(self) -> Source:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
