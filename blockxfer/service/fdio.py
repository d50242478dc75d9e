"""Standard input in chunks, read on a thread so reading overlaps the volume's writes
(`blockxfer write`, locally or in the service, which reads the client's standard
input through the descriptor passed to it)."""

from __future__ import annotations

import os
import queue
import threading
from collections.abc import Iterator

from blockxfer.errors import DeviceError

WRITE_CHUNK = 8 << 20           # what `write` hands the volume at a time


class InputChunks:
    """Standard input in chunks of `size`. The thread reads the raw descriptor
    (os.read), never the buffered sys.stdin: a thread blocked inside the buffered
    reader when the command fails made the interpreter abort at exit ("Fatal
    Python error")."""

    def __init__(self, fd: int, size: int) -> None:
        self._fd, self._size = fd, size
        self._q: queue.Queue[bytes | OSError | None] = queue.Queue(maxsize=3)
        self._stop = threading.Event()
        threading.Thread(target=self._run, name="stdin", daemon=True).start()

    def __iter__(self) -> Iterator[bytes]:
        while (chunk := self._q.get()) is not None:
            if isinstance(chunk, OSError):
                raise DeviceError(f"read standard input: {chunk.strerror}") from chunk
            yield chunk

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        try:
            while chunk := self._fill():
                self._put(chunk)
            self._put(None)
        except OSError as e:             # handed to the main thread
            self._put(e)

    def _fill(self) -> bytes:
        parts, n = [], 0
        while n < self._size and (part := os.read(self._fd, self._size - n)):
            parts.append(part)
            n += len(part)
        return b"".join(parts)

    def _put(self, item: bytes | OSError | None) -> None:
        while not self._stop.is_set():
            try:
                self._q.put(item, timeout=0.1)
                return
            except queue.Full:
                continue
