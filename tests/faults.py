"""Fakes below the device interface: the real volume code runs above them."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable

from blockxfer.drivers.blockdev import FileDevice


class FaultyDevice:
    """Wraps a device: after `after` writes, either SIGKILL the process ('kill') or
    silently drop every later write and flush ('drop'). Counts writes either way."""

    def __init__(self, dev: FileDevice, after: int | None = None, mode: str = "kill"):
        self._dev, self.after, self.mode, self.writes = dev, after, mode, 0
        self.path, self.size = dev.path, dev.size
        self.logical_block_size = dev.logical_block_size
        self.physical_block_size = dev.physical_block_size

    def _dropping(self) -> bool:
        return self.after is not None and self.writes >= self.after

    def pread(self, buf: memoryview | bytearray, offset: int) -> None:
        self._dev.pread(buf, offset)

    def pwrite(self, data: bytes | memoryview | bytearray, offset: int) -> None:
        if self._dropping():
            if self.mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            return
        self._dev.pwrite(data, offset)
        self.writes += 1

    def flush(self) -> None:
        if not self._dropping():
            self._dev.flush()

    def discard(self, offset: int, length: int) -> None:
        pass

    def close(self) -> None:
        self._dev.close()


def forked_reports(child: Callable[[int], object]) -> tuple[bytes, int]:
    """Run `child(w)` in a forked child (no pytest machinery there), which reports
    its progress as bytes written to the descriptor `w` and may be killed anywhere;
    returns every byte it reported and its wait status, once it has ended."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        try:
            child(w)
        finally:
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 64):
        chunks.append(chunk)
    os.close(r)
    _, status = os.waitpid(pid, 0)
    return b"".join(chunks), status
