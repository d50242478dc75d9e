"""What the encoder writes to and the decoder reads from: only these few methods.

Files, pipes, tape writers and every transport's sink and source satisfy them,
so nothing in `blockxfer.stream` pretends to need a whole `BinaryIO`.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable


class ByteSink(Protocol):
    """`write` is done with `data` when it returns (written or copied): the encoder
    passes views of the reader's buffers, which the reader then fills again."""

    def write(self, data: bytes | bytearray | memoryview, /) -> int: ...
    def flush(self) -> None: ...


class ByteSource(Protocol):
    def read(self, n: int = -1, /) -> bytes: ...


@runtime_checkable
class SeekableSource(ByteSource, Protocol):
    """A source that can be read twice (a full stream is verified before it lands)."""

    def seekable(self) -> bool: ...
    def seek(self, offset: int, whence: int = 0, /) -> int: ...
