"""Local transports: standard input and output (`-`) and plain files (`file:` or a path).

A file sink writes to a temporary name in the target's folder and renames it over
the target only when the stream is finished (after fsync of the file and then
of the folder), so a refused or interrupted command leaves an existing file
exactly as it was and no new file behind.
"""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
from typing import BinaryIO

from blockxfer.errors import DeviceError, UsageError

from .base import Result, Sink, Source


def _os_error(what: str, path: str, e: OSError) -> DeviceError:
    return DeviceError(f"{what} {path}: {e.strerror}")


class StdoutSink(Sink):
    name = "standard output"

    def __init__(self, out: BinaryIO | None = None) -> None:
        super().__init__()
        if out is None:
            if sys.stdout.isatty():
                raise UsageError("refusing to write a binary stream to a terminal; "
                                 "give an output (-o FILE or a URL) or use a pipe")
            out = sys.stdout.buffer
        self._out = out

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        return self._out.write(data)

    def _finish(self) -> Result | None:
        self._out.flush()
        return None

    def _abort(self) -> None:
        with contextlib.suppress(OSError):
            self._out.flush()


class FileSink(Sink):
    """A stream into a file, replacing it atomically when finished."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = self.path = path
        folder = os.path.dirname(os.path.abspath(path))
        try:
            fd, self._tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                             suffix=".part", dir=folder)
        except OSError as e:
            raise _os_error("cannot write into the folder of", path, e) from e
        self._f = os.fdopen(fd, "wb", buffering=1 << 20)

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            raise _os_error("cannot write", self.path, e) from e

    def _finish(self) -> Result | None:
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            os.replace(self._tmp, self.path)
            _fsync_dir(os.path.dirname(os.path.abspath(self.path)))
        except OSError as e:
            self._abort()
            raise _os_error("cannot write", self.path, e) from e
        return None

    def _abort(self) -> None:
        with contextlib.suppress(OSError):
            self._f.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._tmp)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FileSource(Source):
    """A stream from a file (seekable, so a full stream can be verified first)."""

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise UsageError(f"cannot read {path}: {e.strerror}") from e

    def read(self, n: int = -1, /) -> bytes:
        return self._f.read(n)

    def seekable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0, /) -> int:
        return self._f.seek(offset, whence)

    def close(self) -> None:
        self._f.close()


class StdinSource(Source):
    name = "standard input"

    def __init__(self, f: BinaryIO | None = None) -> None:
        if f is None:
            if sys.stdin.isatty():
                raise UsageError("give the stream as an input (-i FILE or a URL) "
                                 "or on standard input")
            f = sys.stdin.buffer
        self._f = f

    def read(self, n: int = -1, /) -> bytes:
        return self._f.read(n)
