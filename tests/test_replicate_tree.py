"""A middle host of a tree (A -> B -> C) through the installed command, over the stand-in
for ssh of test_replicate.py (no root): a full image from its parent keeps B's own
registry of destinations (and drops, saying so, the holds on masters it no longer
has), also when that full pull is cut and resumed."""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.test_replicate import destinations, env, master, pull, same, source, url
from tests.transport_util import BLOCKXFER, bx, ok

# several whole pulls each: make test-slow (CI) runs them
pytestmark = pytest.mark.slow
__all__ = ["env"]


def _holds(vol: Path) -> dict[str, list[str]]:
    return json.loads(ok(bx("holds", str(vol), "--json")).stdout)["holds"]


def test_full_pull_keeps_the_middle_hosts_registry(tmp_path: Path, env: dict[str, str]) -> None:
    a, b, c = source(tmp_path), tmp_path / "b.img", tmp_path / "c.img"
    pull(a, b, "--name", "B")
    pull(b, c, "--name", "C")
    master(a, "m2", os.urandom(1 << 20))
    pull(a, b, "--name", "B")
    assert pull(b, c, "--name", "C")["kind"] == "incremental"
    assert destinations(b)["C"]["holds"] == ["m1", "m2"]
    # A forgets B and drops every master B has: B can only take a full image
    ok(bx("replicate", "forget", str(a), "B"))
    master(a, "m3", os.urandom(6 << 20), 2 << 20)
    for old in ("m1", "m2"):
        ok(bx("destroy", f"{a}@{old}"))
    cut = bx("replicate", "pull", url(a), str(b), "--name", "B", "--rollback",
             env={"CUT_AFTER": "1500000"})
    assert cut.returncode != 0 and b"the next pull resumes it" in cut.stderr
    r = pull(a, b, "--name", "B", "--rollback")
    assert (r["kind"], r["resumed"]) == ("full", True) and same(a, b, "m3")
    assert sorted(r["dropped_holds"]) == ["m1 (replicate:C)", "m2 (replicate:C)"]
    text = ok(bx("replicate", "pull", url(a), str(b), "--name", "B")).stdout
    assert b"up to date" in text
    d = destinations(b)["C"]
    assert (d["confirmed"], d["pulls"], d["holds"]) == ("m1", 2, [])
    # C's next pull from B is registered on the same entry (a full: m2 is gone at B)
    assert pull(b, c, "--name", "C", "--rollback")["kind"] == "full" and same(a, c, "m3")
    d = destinations(b)["C"]
    assert (d["pulls"], d["holds"]) == (3, ["m3"])
    assert ok(bx("check", str(b))).returncode == 0


def test_a_full_receive_keeps_holds_only_on_whole_snapshots() -> None:
    from blockxfer.volume.properties import HOLDS
    from blockxfer.volume.receiver import _holds_on
    kept, gone = b"\x01" * 16, b"\x02" * 16
    props = {"replicate.dests": b"{}", HOLDS: json.dumps(
        {kept.hex(): ["replicate:C"], gone.hex(): ["replicate:D", "x"]}).encode()}
    out = _holds_on(props, {kept})
    assert out["replicate.dests"] == b"{}"
    assert json.loads(out[HOLDS]) == {kept.hex(): ["replicate:C"]}
    assert HOLDS not in _holds_on(props, set())


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Control sockets of this test's holders (a pull, a service) in its own folder."""
    folder = tmp_path / "run"
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(folder))
    return folder


def _until(what: Callable[[], bool], proc: subprocess.Popen[bytes], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not what():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.05)


def test_a_child_pulls_while_its_parent_receives(tmp_path: Path, env: dict[str, str],
                                                 run_dir: Path) -> None:
    """B's slow pull of m3 from A holds B open and answers on B's control socket: C's
    pull meanwhile gets B's newest complete master (m2) and ends before B's receive
    does; once it committed, C's next pull is the incremental m3 - m2."""
    from blockxfer.service import control
    a, b, c = source(tmp_path), tmp_path / "b.img", tmp_path / "c.img"
    pull(a, b, "--name", "B")
    pull(b, c, "--name", "C")
    master(a, "m2", os.urandom(1 << 20))
    pull(a, b, "--name", "B")
    master(a, "m3", os.urandom(8 << 20), 4 << 20)
    slow = subprocess.Popen([BLOCKXFER, "replicate", "pull", url(a), str(b), "--name", "B",
                             "--bwlimit", "512K", "--no-compress", "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, **env})
    try:
        _until(lambda: control.server_running(str(b)), slow)
        r = pull(b, c, "--name", "C")
        listing = json.loads(ok(bx("snapshots", str(b), "--json")).stdout)  # through B's pull
        assert "m3" not in {s["name"] for s in listing["snapshots"]}, "B's receive ended first"
        assert (r["kind"], r["base"], r["top"]) == ("incremental", "m1", "m2")
        assert same(b, c, "m2")
        out, err = slow.communicate(timeout=180)
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
    assert slow.returncode == 0, err.decode()
    assert json.loads(out)["kind"] == "incremental" and same(a, b, "m3")
    assert not control.server_running(str(b))
    r = pull(b, c, "--name", "C")
    assert (r["kind"], r["base"], r["top"]) == ("incremental", "m2", "m3") and same(a, c, "m3")
    assert sorted(destinations(b)["C"]["holds"]) == ["m2", "m3"]
    assert ok(bx("check", str(b))).returncode == 0
