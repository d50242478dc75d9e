"""Progress of long work, on standard error.

Three ways, chosen by the command line: on a terminal a tqdm bar (bytes, rate,
ETA when the total is known); elsewhere one plain line every LOG_EVERY seconds
(for logs and cron mail); with -P ("parsable") one tab-separated line every
second, `progress WHAT SECONDS BYTES TOTAL`, and `done ...` at the end
(TOTAL is '-' when unknown), for scripts like those reading `zfs send -P`.
"""

from __future__ import annotations

import os
import sys
import time
from typing import TYPE_CHECKING, Literal, TextIO

from blockxfer.units import human

if TYPE_CHECKING:
    from tqdm import tqdm

Mode = Literal["auto", "quiet", "parsable"]
LOG_EVERY = 5.0
PARSABLE_EVERY = 1.0


class Progress:
    def __init__(self, what: str, total: int | None = None, stream: TextIO | None = None,
                 mode: Mode = "auto") -> None:
        self.what, self.total, self.mode = what, total, mode
        self.stream = stream or sys.stderr
        self.done = 0
        self.start = self._last = time.monotonic()
        self._bar: tqdm | None = None
        if mode == "auto" and self.stream.isatty():
            from tqdm import tqdm  # only for a terminal: it takes a while to import
            self._bar = tqdm(total=total, desc=what, unit="B", unit_scale=True,
                             unit_divisor=1024, file=self.stream, **_shape(self.stream),
                             mininterval=0.25, leave=True)

    def add(self, n: int) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        every = PARSABLE_EVERY if self.mode == "parsable" else LOG_EVERY
        if self.mode != "quiet" and now - self._last >= every:
            self._last = now
            self._line("progress", now)

    def _line(self, kind: str, now: float) -> None:
        elapsed = now - self.start
        if self.mode == "parsable":
            total = "-" if self.total is None else str(self.total)
            self.stream.write(f"{kind}\t{self.what}\t{elapsed:.1f}\t{self.done}\t{total}\n")
        else:
            rate = self.done / max(elapsed, 1e-9)
            of = f" of {human(self.total)}" if self.total else ""
            self.stream.write(f"blockxfer {self.what}: {human(self.done)}{of}, "
                              f"{human(rate)}/s, {elapsed:.0f}s\n")
        self.stream.flush()

    def finish(self) -> None:
        if self._bar is not None:
            if self.total is not None and self._bar.n != self.total:
                self._bar.total = self._bar.n   # the total was an estimate: end at 100%
                self._bar.refresh()
            self._bar.close()
        elif self.mode == "parsable":
            self._line("done", time.monotonic())


def _shape(stream: TextIO) -> dict[str, int]:
    """The terminal's size for tqdm; 80x24 where it says 0 (a new pty, a serial
    console), on which tqdm would draw nothing at all."""
    try:
        size = os.get_terminal_size(stream.fileno())
        return {"ncols": size.columns or 80, "nrows": size.lines or 24}
    except (OSError, ValueError):
        return {"ncols": 80, "nrows": 24}
