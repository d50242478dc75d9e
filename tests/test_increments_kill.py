"""The updater killed (SIGKILL) at many points of an update: the increments are
still at the previous state or at the new one, that state reintegrates byte for
byte, and the next update converges (stray blocks punched, stray snapshots
dropped). Every write, fsync, rename and remove of the process counts as a point,
so the kills land in the source's snapshot and hold writes, the block copy, the
metadata, the header commit and the journal's application alike."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from blockxfer.cli.increments import wire
from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import BlockxferError
from blockxfer.transfer.increments import mirror_status, mirror_update, reintegrate
from blockxfer.volume import Volume
from tests.clihelp import call_forked
from tests.test_increments import assert_reintegrated, churn, contents, make_source

POINTS = ("pwrite", "pwritev", "write", "fsync", "fdatasync", "replace", "rename", "remove",
          "unlink", "ftruncate")


def child() -> None:
    """Run one mirror update, killing this process at the K-th durable operation
    (K=0: never); print how many there were."""
    k = int(os.environ["INCR_KILL_AT"])
    seen = [0]

    def counted(real: Any) -> Any:
        def op(*args: Any, **kw: Any) -> Any:
            seen[0] += 1
            if seen[0] == k:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kw)
        return op
    for name in POINTS:
        setattr(os, name, counted(getattr(os, name)))
    wire()
    mirror_update(os.environ["INCR_SRC"], os.environ["INCR_BASE"], os.environ["INCR_DIR"])
    print(seen[0])


def run_child(src: str, base: str, incr: str, k: int) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, INCR_KILL_AT=str(k), INCR_SRC=src, INCR_BASE=base, INCR_DIR=incr)
    return call_forked(child, env=env, text=True)       # a fork: no interpreter start-up


@pytest.fixture(autouse=True)
def _wired() -> None:
    wire()


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A mirror three updates in (state A), the source changed since, and what
    the next update makes of it (state B)."""
    wire()
    d = tmp_path_factory.mktemp("kills")
    src, base, incr = str(d / "src.img"), str(d / "base.bxs"), str(d / "incr")
    make_source(src).close()
    mirror_update(src, base, incr)
    rng, changed = random.Random(11), set[int]()
    for _ in range(3):
        with Volume.open(open_device(src, write=True)) as vol:
            churn(vol, rng, changed)
        mirror_update(src, base, incr)
    with Volume.open(open_device(src, write=True)) as vol:
        for _ in range(5):                       # enough to need a journal
            churn(vol, rng, changed)
    state_a = _expected(src, str(mirror_status(incr)["newest_snapshot"]))
    shutil.copyfile(src, str(d / "src.pristine"))
    shutil.copytree(incr, str(d / "incr.pristine"))
    work = str(d / "ref")
    os.makedirs(work)
    shutil.copyfile(src, f"{work}/src.img")
    shutil.copytree(incr, f"{work}/incr")
    r = run_child(f"{work}/src.img", base, f"{work}/incr", 0)
    assert r.returncode == 0, r.stderr
    top = str(mirror_status(f"{work}/incr")["newest_snapshot"])
    return {"dir": d, "base": base, "ops": int(r.stdout.split()[-1]),
            "states": {str(state_a[0]): state_a[1], top: _expected(f"{work}/src.img", top)[1]}}


def _expected(src: str, top: str) -> tuple[str, tuple[dict[str, bytes], bytes]]:
    snaps, _ = contents(src)
    return top, (snaps, snaps[top])


def _points(total: int, n: int, seed: int) -> list[int]:
    return sorted(random.Random(seed).sample(range(1, total + 1), min(n, total)))


def _after_kill(m: dict[str, Any], work: Path, k: int) -> None:
    src, incr, base = str(work / "src.img"), str(work / "incr"), m["base"]
    st = mirror_status(incr)
    assert st["consistent"], (k, st)
    top = str(st["newest_snapshot"])
    assert top in m["states"], (k, top)
    want_snaps, want_active = m["states"][top]
    got_snaps, got_active = contents(_reintegrated(work / "t1.img", base, incr))
    assert got_active == want_active, k
    for name in set(want_snaps) & set(got_snaps):
        assert got_snaps[name] == want_snaps[name], (k, name)
    mirror_update(src, base, incr)               # converges
    assert_reintegrated(_reintegrated(work / "t2.img", base, incr), src)
    st = mirror_status(incr)
    assert int(str(st["structure_bytes"])) <= 1.05 * int(str(st["changed_bytes"])) + 65536, k
    with Volume.open(open_device(src), writable=False) as vol:
        ours = [e.name for e in vol.snapshots() if e.name.startswith("incr.")]
    assert len(ours) == 2, (k, ours)


def _reintegrated(target: Path, base: str, incr: str) -> str:
    reintegrate(str(target), base, incr)
    return str(target)


def _kill_updates(m: dict[str, Any], points: list[int]) -> set[str]:
    d, seen = m["dir"], set()
    for k in points:
        work = d / f"k{k}"
        work.mkdir()
        shutil.copyfile(d / "src.pristine", work / "src.img")
        shutil.copytree(d / "incr.pristine", work / "incr")
        r = run_child(str(work / "src.img"), m["base"], str(work / "incr"), k)
        assert r.returncode == -signal.SIGKILL, (k, r.returncode, r.stderr)
        seen.add(str(mirror_status(str(work / "incr"))["newest_snapshot"]))
        _after_kill(m, work, k)
        shutil.rmtree(work)
    return seen


def test_update_killed_at_points(mirrored: dict[str, Any]) -> None:
    """Ten points, always run: the first and last few operations and some between."""
    ops = mirrored["ops"]
    points = sorted({1, 2, 3, ops // 3, ops // 2, 2 * ops // 3, ops - 3, ops - 2, ops - 1, ops})
    assert len(_kill_updates(mirrored, points)) == 2      # both before and after the commit


@pytest.mark.slow
def test_update_killed_at_many_points(mirrored: dict[str, Any]) -> None:
    """40 random points of the same update."""
    assert mirrored["ops"] > 40
    assert len(_kill_updates(mirrored, _points(mirrored["ops"], 40, seed=3))) == 2


def test_first_update_killed_resumes(tmp_path: Path) -> None:
    """Kills while the base is written: nothing to reintegrate yet (one clear
    line), and the next update finishes the base, reusing its snapshot."""
    pristine = str(tmp_path / "src.pristine")
    make_source(pristine).close()
    ref = tmp_path / "ref"
    ref.mkdir()
    shutil.copyfile(pristine, ref / "src.img")
    r = run_child(str(ref / "src.img"), str(ref / "base.bxs"), str(ref / "incr"), 0)
    assert r.returncode == 0, r.stderr
    for k in _points(int(r.stdout.split()[-1]), 6, seed=4):
        work = tmp_path / f"k{k}"
        work.mkdir()
        shutil.copyfile(pristine, work / "src.img")
        src, base, incr = str(work / "src.img"), str(work / "base.bxs"), str(work / "incr")
        r = run_child(src, base, incr, k)
        assert r.returncode == -signal.SIGKILL, (k, r.stderr)
        if os.path.exists(os.path.join(incr, "header")):
            try:
                ready = mirror_status(incr)["state"] == "ready"
            except BlockxferError:
                ready = False
            if not ready:
                with pytest.raises(BlockxferError, match="no complete base|no increments"
                                   "|neither header slot"):
                    reintegrate(str(work / "t.img"), base, incr)
        mirror_update(src, base, incr)
        mirror_update(src, base, incr)
        assert_reintegrated(_reintegrated(work / "t.img", base, incr), src)
        with Volume.open(open_device(src), writable=False) as vol:
            assert len([e for e in vol.snapshots() if e.name.startswith("incr.")]) == 2
        shutil.rmtree(work)
