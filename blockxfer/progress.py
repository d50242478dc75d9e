"""Progress of long work, on standard error.

Three ways, chosen by the command line: on a terminal a tqdm bar (bytes, rate,
ETA when the total is known); elsewhere one plain line every LOG_EVERY seconds
(for logs and cron mail); with -P ("parsable") one tab-separated line every
second, `progress WHAT SECONDS BYTES TOTAL`, and `done ...` at the end
(TOTAL is '-' when unknown), for scripts like those reading `zfs send -P`.
"""

from __future__ import annotations

import sys
import time
from typing import Literal, TextIO

from tqdm import tqdm

from blockxfer.units import human

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
            self._bar = tqdm(total=total, desc=what, unit="B", unit_scale=True,
                             unit_divisor=1024, file=self.stream, dynamic_ncols=True,
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
            self._bar.close()
        elif self.mode == "parsable":
            self._line("done", time.monotonic())
