"""`blockxfer policy run` killed with SIGKILL at many points: the volume checks
clean every time, and the next run finishes the schedule (nothing left due or
expired, no class over its count, other snapshots untouched). Slow: a fresh
process per point."""

from __future__ import annotations

import json
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from blockxfer.handles import open_volume
from blockxfer.transfer.policy import PROPERTY, Policy, parse_name
from blockxfer.volume.check import check_volume
from tests.clihelp import BX, bx

pytestmark = pytest.mark.slow
POINTS = 15
KEEP = {"hourly": 2, "daily": 1, "weekly": 1, "monthly": 1}


def make(path: str) -> None:
    assert bx("init", path, "--size", "32M", "-q").returncode == 0
    with open_volume(path, write=True) as vol:
        vol.set_property(PROPERTY, Policy(KEEP).to_json())
        for name in ("hourly.20001130T10", "hourly.20001130T11", "hourly.20001130T12",
                     "daily.20001129", "weekly.2000W47", "monthly.200010", "june1"):
            vol.write(0, os.urandom(4096))
            vol.create_snapshot(name)


def calibrate(path: str) -> float:
    """How long an uninterrupted run takes on this machine today: the kill points
    fall inside it (fixed delays missed the runs on a faster machine)."""
    make(path)
    start = time.monotonic()
    assert bx("policy", "run", path, "-q").returncode == 0
    took = time.monotonic() - start
    os.unlink(path)
    print(f"an uninterrupted run takes {took:.2f} s")
    return took


def test_policy_run_killed_anywhere_is_finished_by_the_next_run(tmp_path: Path) -> None:
    seed = int(os.environ.get("BLOCKXFER_SEED", random.randrange(1 << 30)))
    rnd = random.Random(seed)
    print(f"seed {seed}")
    took = calibrate(str(tmp_path / "calibrate.img"))
    cut = 0
    for point in range(POINTS):
        path = str(tmp_path / f"v{point}.img")
        make(path)
        proc = subprocess.Popen([*BX, "policy", "run", path], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        time.sleep(rnd.uniform(0, took))      # the CLI's start-up, then the run
        cut += proc.poll() is None
        proc.kill()
        proc.wait()
        with open_volume(path) as vol:
            assert check_volume(vol).clean, (seed, point)
        assert bx("policy", "run", path, "-q").returncode == 0, (seed, point)
        left = json.loads(bx("policy", "show", path, "--json").stdout)
        assert left["due"] == [] and left["expired"] == [], (seed, point, left)
        names = [r["name"] for r in json.loads(bx("snapshots", path, "--json").stdout)
                 ["snapshots"]]
        assert "june1" in names
        for cls, keep in KEEP.items():
            assert sum(1 for n in names if (parse_name(n) or ("",))[0] == cls) == keep
        os.unlink(path)
    print(f"{cut} of {POINTS} runs were killed before they ended")
    assert cut >= POINTS // 3, "the kill points missed the runs: lengthen the delays"
