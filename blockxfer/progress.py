"""Progress on a terminal: bytes done, rate and ETA on one line; silent otherwise."""

from __future__ import annotations

import sys
import time
from typing import TextIO

from blockxfer.units import human


class Progress:
    def __init__(self, what: str, total: int | None = None, stream: TextIO | None = None):
        self.what, self.total = what, total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.done = 0
        self.start = self._last = time.monotonic()

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.25:
            self._last = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        rate = self.done / max(now - self.start, 1e-9)
        line = f"{self.what}: {human(self.done)}"
        if self.total:
            eta = (self.total - self.done) / rate if rate else 0
            line += f" of {human(self.total)} ({100 * self.done / self.total:.0f}%), ETA {eta:.0f}s"
        self.stream.write(f"\r{line}, {human(rate)}/s \x1b[K")
        self.stream.flush()

    def finish(self) -> None:
        if self.enabled:
            self._draw(time.monotonic())
            self.stream.write("\n")
