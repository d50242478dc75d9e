"""Shared bench helpers: dropping caches, timing, running peers, and `row()`, through
which every bench reports a figure (printed at once, summarized by `make bench`)."""

from __future__ import annotations

import os
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SCRATCH = os.environ.get("BLOCKXFER_BENCH_DIR", "/var/tmp/blockxfer-bench")


def drop_caches() -> None:
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        pass  # not root: numbers include whatever the page cache holds


def timed(fn: Callable[[], object]) -> float:
    drop_caches()
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def interleaved(ours: Callable[[], object], peer: Callable[[], object],
                rounds: int = 5) -> tuple[float, float]:
    """Median seconds of each, run alternately with caches dropped before every run
    (ours, peer, ours, ...): a noisy shared machine then slows both alike."""
    a: list[float] = []
    b: list[float] = []
    for _ in range(rounds):
        a.append(timed(ours))
        b.append(timed(peer))
    return statistics.median(a), statistics.median(b)


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def stop(proc: subprocess.Popen[bytes], wait: float = 30.0) -> None:
    """End a server a bench started: SIGTERM, SIGKILL if it is still there after
    `wait` seconds (a stuck peer must not hang the run)."""
    proc.terminate()
    try:
        proc.wait(wait)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


Better = Literal["higher", "lower"]


@dataclass
class Row:
    """One figure against its goal, as `make bench` summarizes and saves it. With a
    peer, `ratio` is ours/peer in the better direction and the goal applies to it;
    without one, the goal applies to `ours` itself (a time or a size limit)."""

    bench: str
    name: str
    ours: float
    peer: float | None
    unit: str
    goal: float | None
    better: Better = "higher"

    @property
    def ratio(self) -> float | None:
        if self.peer is None:
            return None
        if self.better == "lower":            # a time or a size: peer/ours
            return self.peer / self.ours if self.ours else None
        return self.ours / self.peer if self.peer else None

    @property
    def score(self) -> float:
        """What the goal is compared with: the ratio, or the value itself."""
        return self.ours if self.ratio is None else self.ratio

    @property
    def ok(self) -> bool | None:
        if self.goal is None:
            return None
        if self.ratio is None and self.better == "lower":
            return self.ours < self.goal
        return self.score >= self.goal


ROWS: list[Row] = []            # every row of this run, in order (see bench/__main__.py)
current_bench = ""              # set by bench/__main__.py while a bench runs


def row(name: str, ours: float, peer: float | None = None, nbytes: int | None = None,
        goal: float | None = None, *, unit: str = "GB/s", better: Better = "higher") -> str:
    """Record one figure for the summary and return its line. With `nbytes`, ours
    and peer are the seconds each took to move that many bytes (shown as GB/s);
    otherwise they are already in `unit`. Higher is better unless `better` says
    lower (then a peer's ratio is peer/ours, and a lone value must stay under `goal`)."""
    if nbytes is not None:
        ours = nbytes / ours / 1e9
        peer = None if peer is None else nbytes / peer / 1e9
    r = Row(current_bench, name, ours, peer, unit, goal, better)
    ROWS.append(r)
    missed = "ABOVE" if r.ratio is None and better == "lower" else "BELOW"
    mark = "" if r.ok is None else ("  ok" if r.ok else f"  {missed} GOAL {_goal_text(r)}")
    if peer is None:
        return f"{name:38} ours {ours:8.2f} {unit:6}{mark}"
    return (f"{name:38} ours {ours:8.2f} {unit:6} peer {peer:8.2f} {unit:6} "
            f"ratio {r.ratio or 0:5.2f}{mark}")


def _goal_text(r: Row) -> str:
    if r.goal is None:
        return ""
    if r.ratio is None:
        return f"{'<' if r.better == 'lower' else '>='} {r.goal:g} {r.unit}"
    return f">= {r.goal:g}x"
