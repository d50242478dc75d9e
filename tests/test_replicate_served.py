"""Replication from and into volumes `blockxfer serve` owns (a real service each, an NBD
client writing to the source all along), over the stand-in for ssh of
test_replicate.py: the source's service answers the pull (plan, holds and registry
changed in it), the destination's service receives it (incrementals only: a full
image is refused), and `replicate pull --every` into a served target becomes its
service's job until `replicate stop`."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.nbd.serveproc import serve_process
from tests.test_replicate import destinations, env, master, pull, same, source, url
from tests.test_replicate_tree import run_dir
from tests.test_service_served import NbdLoad
from tests.transport_util import bx, ok

# two services and several pulls: make test-slow (CI) runs it
pytestmark = pytest.mark.slow
__all__ = ["env", "run_dir"]


def _snapshots(vol: Path) -> set[str]:
    out = json.loads(ok(bx("snapshots", str(vol), "--json")).stdout)
    return {s["name"] for s in out["snapshots"]}


def test_pulls_from_and_into_served_volumes(tmp_path: Path, env: dict[str, str],
                                            run_dir: Path) -> None:
    a, b, c = source(tmp_path), tmp_path / "b.img", tmp_path / "c.img"
    pull(a, b, "--name", "B")
    ok(bx("init", str(c), "--size", "64M"))
    sa, sb, sc = (str(tmp_path / f"{n}.sock") for n in "abc")
    with serve_process(str(a), sa), serve_process(str(b), sb, "--read-only"), \
            serve_process(str(c), sc):
        writer = NbdLoad(sa, "")
        try:
            master(a, "m2", b"\x07" * (1 << 20), 1 << 20)          # through A's service
            r = pull(a, b, "--name", "B")
            assert (r["kind"], r["base"], r["top"]) == ("incremental", "m1", "m2")
            assert same(a, b, "m2")
            d = destinations(a)["B"]
            assert (d["confirmed"], d["holds"]) == ("m1", ["m1", "m2"])
            refused = bx("destroy", f"{a}@m2")
            assert refused.returncode == 5 and b"replicate:B" in refused.stderr
            full = bx("replicate", "pull", url(a), str(c), "--name", "C", "--rollback")
            assert full.returncode == 5 and b"incremental pulls only" in full.stderr
            assert _snapshots(c) == set()
            out = ok(bx("replicate", "pull", url(a), str(b), "--name", "B", "--every", "1s"))
            assert b"up to date" in out.stdout and b"every 1 s" in out.stdout
            master(a, "m3", b"\x09" * (1 << 20), 2 << 20)
            deadline = time.monotonic() + 90
            while "m3" not in _snapshots(b):
                assert time.monotonic() < deadline, "the service's job did not pull m3"
                time.sleep(0.3)
            assert same(a, b, "m3")
            jobs = json.loads(ok(bx("info", str(b), "--json")).stdout)["server"]["jobs"]
            job = next(j for j in jobs if j["name"] == "replicate pull")
            assert job["runs"] >= 1 and job["every_seconds"] == 1.0
            stopped = json.loads(ok(bx("replicate", "stop", str(b), "--json")).stdout)
            assert stopped["stopped"]["source"] == url(a)
            from tests.test_cli_json import documented
            assert documented()["replicate stop"] <= set(stopped)
            assert destinations(a)["B"]["confirmed"] in ("m2", "m3")
        finally:
            writer.finish()
        assert writer.errors == [] and writer.requests > 0
    assert ok(bx("check", str(b))).returncode == 0
    assert ok(bx("check", str(a))).returncode == 0
