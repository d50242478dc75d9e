"""The end of `make bench`: one table of every recorded row against its goal, saved
as JSON so the next run can show its figures beside this one's.

`bench/results/latest.json` holds the last run; when a run ends, the one before it
moves to `previous.json` and each row shows the previous run's ratio (or value)
next to its own, matched by bench and row name. The folder is git-ignored.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from typing import Any

from bench.common import Row

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def _commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, cwd=os.path.dirname(RESULTS)).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""


def to_json(rows: list[Row], benches: list[str], failed: list[str]) -> dict[str, Any]:
    return {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": platform.node(),
        "commit": _commit(),
        "loadavg": list(os.getloadavg()),     # the figures are noisy on a shared host
        "benches": benches,
        "failed": failed,
        "rows": [{**asdict(r), "ratio": r.ratio, "ok": r.ok} for r in rows],
    }


def load(path: str) -> dict[tuple[str, str], float] | None:
    """(bench, row name) -> the score (ratio, or value) of a saved run; None if absent
    or unreadable (a run must not fail over its predecessor's file)."""
    try:
        with open(path) as f:
            data = json.load(f)
        return {(r["bench"], r["name"]): r["ratio"] if r["ratio"] is not None else r["ours"]
                for r in data["rows"]}
    except (OSError, ValueError, KeyError, TypeError):
        return None


def table(rows: list[Row], previous: dict[tuple[str, str], float] | None) -> str:
    head = f"{'bench':16} {'row':40} {'ratio':>8} {'goal':>9} {'':10}"
    if previous is not None:
        head += f" {'previous':>9}"
    lines = [head, "-" * len(head)]
    for r in rows:
        goal = "" if r.goal is None else (f"<{r.goal:g}" if r.better == "lower" and r.ratio is None
                                          else f">={r.goal:g}")
        if r.ratio is None:
            score, goal = f"{r.ours:.1f}{r.unit}", f"{goal}{r.unit if r.goal is not None else ''}"
        else:
            score = f"{r.ratio:.2f}"
        missed = "ABOVE" if r.ratio is None and r.better == "lower" else "BELOW"
        state = "" if r.ok is None else ("ok" if r.ok else missed)
        line = f"{r.bench:16} {r.name[:40]:40} {score:>8} {goal:>9} {state:10}"
        if previous is not None:
            before = previous.get((r.bench, r.name))
            line += f" {'-' if before is None else f'{before:.2f}':>9}"
        lines.append(line.rstrip())
    return "\n".join(lines)


def finish(rows: list[Row], benches: list[str], failed: list[str],
           folder: str | None = None) -> str:
    """Rotate latest.json to previous.json, write this run as latest.json, and return
    the summary table (with the previous run's figures when there was one)."""
    folder = folder or RESULTS
    os.makedirs(folder, exist_ok=True)
    latest, prev = os.path.join(folder, "latest.json"), os.path.join(folder, "previous.json")
    previous = load(latest)
    if previous is not None:
        os.replace(latest, prev)
    tmp = latest + ".tmp"
    with open(tmp, "w") as f:
        json.dump(to_json(rows, benches, failed), f, indent=2)
        f.write("\n")
    os.replace(tmp, latest)
    return table(rows, previous)
