"""Shared bench helpers: dropping caches, timing, running peers, printing ratios."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable

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


def run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def row(name: str, ours: float, peer: float, nbytes: int, goal: float | None = None) -> str:
    """One line: both rates in GB/s and ours/peer (higher is better)."""
    a, b = nbytes / ours / 1e9, nbytes / peer / 1e9
    ratio = a / b
    mark = "" if goal is None else ("  ok" if ratio >= goal else f"  BELOW GOAL {goal}")
    return f"{name:38} ours {a:6.2f} GB/s   peer {b:6.2f} GB/s   ratio {ratio:5.2f}{mark}"
