"""The mirroring timer (the patent's steps 332-333): an update, then the next one
an interval after the previous one started.

Effective next consistency point: when an update outlasts the interval, the next
starts at once from the newest CP (the snapshot it takes then); the ticks missed
meanwhile are counted, never queued, so a slow transfer never builds a backlog.
A failed update is retried at the next tick.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from blockxfer.errors import BlockxferError

log = logging.getLogger("blockxfer.mirror")


@dataclass
class Tick:
    """What the loop reports after each update (for a status file or a service)."""

    started: float
    ended: float
    next_due: float
    skipped: int
    error: str | None


def next_due(started: float, ended: float, interval: float) -> tuple[float, int]:
    """When the next update starts, and how many ticks the last one overran."""
    if ended - started < interval:
        return started + interval, 0
    return ended, int((ended - started) // interval)


def run_loop(update: Callable[[], object], interval: float, stop: threading.Event, *,
             on_tick: Callable[[Tick], None] | None = None,
             clock: Callable[[], float] = time.time) -> None:
    """Run `update` every `interval` seconds until `stop` is set."""
    due = clock()
    while not stop.is_set():
        wait = due - clock()
        if wait > 0 and stop.wait(wait):
            break
        started = clock()
        error: str | None = None
        try:
            update()
        except BlockxferError as e:
            error = str(e)
            log.warning("mirror update failed (retried at the next tick): %s", e)
        ended = clock()
        due, skipped = next_due(started, ended, interval)
        if skipped:
            log.info("the update took %.1f s: %d ticks skipped, the next starts now from "
                     "the newest CP", ended - started, skipped)
        if on_tick is not None:
            on_tick(Tick(started, ended, due, skipped, error))
