"""Local transports: standard input and output (`-`) and plain files (`file:` or a path).

A file sink writes through `blockxfer.outfile.output_file`: a temporary name in
the target's folder, renamed over the target only when the stream is finished
(after fsync of the file and then of the folder), so a refused or interrupted
command leaves an existing file exactly as it was and no new file behind.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from typing import BinaryIO

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import DeviceError, UsageError
from blockxfer.outfile import output_file
from blockxfer.volume import has_signature

from .base import Result, Sink, Source


class StdoutSink(Sink):
    """Standard output: a failing one (ENOSPC, EIO) is one line; a closed pipe
    (EPIPE) is left to end the command quietly, as other Unix tools do."""

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
        with stdout_errors():
            return self._out.write(data)

    def _finish(self) -> Result | None:
        with stdout_errors():
            self._out.flush()
        return None

    def _abort(self) -> None:
        with contextlib.suppress(OSError):
            self._out.flush()


@contextlib.contextmanager
def stdout_errors() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise DeviceError(f"write standard output: {e.strerror}") from e


def refuse_volume(path: str) -> None:
    """A stream renamed over a volume would destroy it: `send v.img s1 -o v.img`
    replaced the very volume it read. Refused before anything is written."""
    try:
        st = os.stat(path)
    except OSError:
        return                               # missing: output_file says what is wrong
    if not stat.S_ISREG(st.st_mode) or st.st_size < 4096:
        return
    dev = open_device(path, lock=False, direct=False)
    try:
        found = has_signature(dev)
    finally:
        dev.close()
    if found in ("a blockxfer volume", "an interrupted receive"):
        raise UsageError(f"{path} holds {found}; refusing to write a stream over it: "
                         "give another output file")


class FileSink(Sink):
    """A stream into a file, written whole or not at all (`blockxfer.outfile`)."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.name = self.path = path
        refuse_volume(path)
        self._stack = contextlib.ExitStack()
        self._f = self._stack.enter_context(output_file(path))

    def write(self, data: bytes | bytearray | memoryview, /) -> int:
        try:
            return self._f.write(data)
        except OSError as e:
            raise DeviceError(f"cannot write {self.path}: {e.strerror}") from e

    def _finish(self) -> Result | None:
        self._stack.close()                  # fsync, rename over the target, fsync its folder
        return None

    def _abort(self) -> None:
        with contextlib.suppress(RuntimeError):  # output_file removes its temporary file
            self._stack.__exit__(RuntimeError, RuntimeError("aborted"), None)


class FileSource(Source):
    """A stream from a file (seekable, so a full stream can be verified first)."""

    def __init__(self, path: str) -> None:
        self.name = path
        try:
            self._f: BinaryIO = open(path, "rb")  # noqa: SIM115 - closed by close()
        except OSError as e:
            raise DeviceError(f"cannot read {path}: {e.strerror}") from e

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
