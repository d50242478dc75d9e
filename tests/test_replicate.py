"""Replication pulls end to end through the installed command, over a stand-in for ssh
that runs the far side here (no root): full, incremental, up to date; holds and
the registry; rollback and its refusal; resume after a cut, and forged or
tampered resume tickets refused; a cascade and a re-parent; --bwlimit."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path
from typing import Any

import pytest

from blockxfer.transfer.replicate_limit import TokenBucket
from tests.transport_util import BLOCKXFER, bx, ok

# minutes of whole pulls, cuts and trees: make test-slow (CI) runs them
pytestmark = pytest.mark.slow

FAKE_SSH = """#!/bin/sh
# stands in for ssh: drop the options up to "--" and the host, run the command here;
# with $CUT_AFTER, the far side's answer is cut after that many bytes
while [ "$1" != "--" ]; do shift; done; shift; shift
if [ -n "$CUT_AFTER" ]; then sh -c "$1" | head -c "$CUT_AFTER"; else exec sh -c "$1"; fi
"""


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    script = tmp_path / "fakessh"
    script.write_text(FAKE_SSH)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    e = {"BLOCKXFER_SSH": str(script), "BLOCKXFER_REMOTE_COMMAND": BLOCKXFER,
         "BLOCKXFER_STATE_DIR": str(tmp_path / "state")}
    for k, v in e.items():
        monkeypatch.setenv(k, v)
    return e


def url(path: Path | str) -> str:
    return f"ssh://host{path}"


def master(vol: Path, name: str, data: bytes, offset: int = 0) -> None:
    ok(bx("write", str(vol), "--offset", str(offset), data=data))
    ok(bx("snapshot", "--master", f"{vol}@{name}"))


def pull(src: Path | str, dst: Path, *extra: str, **kw: str) -> dict[str, Any]:
    r = ok(bx("replicate", "pull", url(src), str(dst), "--json", *extra, env=kw or None))
    return json.loads(r.stdout)


def same(one: Path, two: Path, snap: str) -> bool:
    return ok(bx("read", f"{one}@{snap}")).stdout == ok(bx("read", f"{two}@{snap}")).stdout


def destinations(vol: Path) -> dict[str, dict[str, Any]]:
    out = json.loads(ok(bx("replicate", "destinations", str(vol), "--json")).stdout)
    return {d["name"]: d for d in out["destinations"]}


def source(tmp_path: Path, size: int = 3 << 20) -> Path:
    vol = tmp_path / "a.img"
    ok(bx("init", str(vol), "--size", "64M"))
    master(vol, "m1", os.urandom(size))
    return vol


def test_snapshot_master_moves_the_master_pointer(tmp_path: Path) -> None:
    vol = source(tmp_path)
    master(vol, "m2", os.urandom(4096))
    ok(bx("snapshot", f"{vol}@plain"))
    pointers = json.loads(ok(bx("snapshots", str(vol), "--json")).stdout)["pointers"]
    assert pointers == {"master": "m2"}


def test_full_then_incremental_then_current(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    r = pull(a, b, "--name", "B")
    assert (r["kind"], r["top"]) == ("full", "m1") and same(a, b, "m1")
    master(a, "m2", os.urandom(1 << 20), 1 << 20)
    r = pull(a, b, "--name", "B")
    assert (r["kind"], r["base"], r["top"]) == ("incremental", "m1", "m2") and same(a, b, "m2")
    assert r["blocks"] < 400 and r["bytes"] > 0 and r["rate"] > 0
    assert pull(a, b, "--name", "B")["kind"] == "current"
    d = destinations(a)["B"]
    assert d["confirmed"] == "m2" and d["holds"] == ["m2"] and d["pulls"] == 3
    r2 = bx("destroy", f"{a}@m2")
    assert r2.returncode == 5 and b"replicate:B" in r2.stderr
    status = json.loads(ok(bx("replicate", "status", str(b), "--json")).stdout)["pulls"][0]
    assert status["master"] == "m2" and [p["kind"] for p in status["pulls"]] == [
        "full", "incremental", "current"]
    assert ok(bx("check", str(b))).returncode == 0
    from tests.test_cli_json import REPLICATE, documented
    keys = documented()
    got = {"replicate pull": r, "replicate status": json.loads(ok(bx(
        "replicate", "status", str(a), "--json")).stdout),
        "replicate destinations": json.loads(ok(bx("replicate", "destinations", str(a),
                                                    "--json")).stdout),
        "replicate forget": json.loads(ok(bx("replicate", "forget", str(a), "B",
                                             "--json")).stdout)}
    assert set(got) == REPLICATE
    for name, result in got.items():
        assert keys[name] <= set(result), f"{name}: documented keys missing"


def test_dry_run_changes_nothing(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    r = pull(a, b, "--name", "B", "-n")
    assert r["dry_run"] and r["kind"] == "full" and r["blocks"] > 0
    assert not b.exists() and destinations(a) == {}


def test_forget_releases_the_holds(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    pull(a, b, "--name", "B")
    r = json.loads(ok(bx("replicate", "forget", str(a), "B", "--json")).stdout)
    assert r["released"] == ["m1"] and destinations(a) == {}
    ok(bx("pointer", "--delete", str(a), "master"))
    ok(bx("destroy", f"{a}@m1"))
    assert bx("replicate", "forget", str(a), "B").returncode == 5


def test_diverged_target_refused_then_rolled_back(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    pull(a, b, "--name", "B")
    master(a, "m2", os.urandom(1 << 20))
    ok(bx("write", str(b), "--offset", str(8 << 20), data=os.urandom(1 << 20)))   # local
    before = b.read_bytes()
    r = bx("replicate", "pull", url(a), str(b), "--name", "B")
    assert r.returncode == 5 and b"--rollback" in r.stderr and b"written here" in r.stderr
    assert b.read_bytes() == before
    out = pull(a, b, "--name", "B", "--rollback")
    assert (out["kind"], out["rolled_back"]) == ("incremental", "m1")
    assert same(a, b, "m2") and same(a, b, "m1")
    assert ok(bx("read", str(b))).stdout == ok(bx("read", f"{a}@m2")).stdout
    assert ok(bx("check", str(b))).returncode == 0


def test_local_snapshot_counts_as_diverged(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    pull(a, b, "--name", "B")
    ok(bx("snapshot", f"{b}@mine"))
    master(a, "m2", os.urandom(4096))
    r = bx("replicate", "pull", url(a), str(b), "--name", "B")
    assert r.returncode == 5 and b"'mine'" in r.stderr
    out = pull(a, b, "--name", "B", "--rollback")
    assert out["discarded"] == ["mine"] and same(a, b, "m2")


def test_unrelated_volume_needs_rollback_for_a_full(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = source(tmp_path), tmp_path / "b.img"
    ok(bx("init", str(b), "--size", "64M"))
    r = bx("replicate", "pull", url(a), str(b), "--name", "B")
    assert r.returncode == 5 and b"shares no master" in r.stderr
    assert pull(a, b, "--name", "B", "--rollback")["kind"] == "full" and same(a, b, "m1")


@pytest.mark.parametrize("cut", [300_000, 5_000_000])
def test_cut_pull_resumes(tmp_path: Path, env: dict[str, str], cut: int) -> None:
    a, b = source(tmp_path, 12 << 20), tmp_path / "b.img"
    r = bx("replicate", "pull", url(a), str(b), "--name", "B", env={"CUT_AFTER": str(cut)})
    assert r.returncode != 0 and b"the next pull resumes it" in r.stderr
    st = json.loads(ok(bx("receive", "--status", str(b), "--json")).stdout)["interrupted"]
    assert st["full"] and st["token"]
    out = pull(a, b, "--name", "B")
    assert out["resumed"] and same(a, b, "m1")
    master(a, "m2", os.urandom(8 << 20))
    r = bx("replicate", "pull", url(a), str(b), "--name", "B",
           env={"CUT_AFTER": str(cut // 2)})
    assert r.returncode != 0
    assert same(a, b, "m1")                                  # an incremental cut: unchanged
    out = pull(a, b, "--name", "B")
    assert out["kind"] == "incremental" and same(a, b, "m2")
    assert ok(bx("check", str(b))).returncode == 0


def _cut_and_pending(tmp_path: Path, a: Path, b: Path) -> dict[str, object]:
    bx("replicate", "pull", url(a), str(b), "--name", "B", env={"CUT_AFTER": "1000000"})
    from blockxfer.transfer.replicate_state import PullState
    pending = PullState.load(str(b)).pending
    assert pending is not None
    return pending


def _raw_pull(a: Path, request: dict[str, object]) -> Exception | None:
    from blockxfer.transport import open_pull
    try:
        _, src = open_pull(url(a), request)
        src.close()
    except Exception as e:  # noqa: BLE001 - the refusal is the result
        return e
    return None


@pytest.mark.parametrize("tamper", ["ticket", "dest", "expression", "stream", "top"])
def test_forged_or_tampered_resume_refused(tmp_path: Path, env: dict[str, str],
                                           tamper: str) -> None:
    from blockxfer.transfer.replicate_target import inspect_target
    from drivers.blockdev import open_device
    a, b = source(tmp_path, 6 << 20), tmp_path / "b.img"
    ok(bx("init", str(tmp_path / "other.img"), "--size", "64M"))
    p = _cut_and_pending(tmp_path, a, b)
    i = inspect_target(str(b), open_device).interrupted
    assert i is not None
    stream = {k: p[k] for k in ("id", "expression", "top_guid", "base_guid")}
    req: dict[str, object] = {"dest": "B", "resume": i.token, "ticket": p["ticket"],
                              "stream": stream}
    assert _raw_pull(a, {**req, "dry_run": True}) is None      # the genuine one passes
    if tamper == "ticket":
        req["ticket"] = "0" * 64
    elif tamper == "dest":
        req["dest"] = "C"
    elif tamper == "expression":
        req["stream"] = {**stream, "expression": "m1 + m1"}
    elif tamper == "stream":
        req["stream"] = {**stream, "id": "00" * 16}
    else:
        req["stream"] = {**stream, "top_guid": "11" * 16}
    err = _raw_pull(a, req)
    assert err is not None and "resume refused" in str(err)
    assert getattr(err, "exit_code", None) == 4


def test_token_for_another_stream_refused(tmp_path: Path, env: dict[str, str]) -> None:
    """A genuine ticket with a token made for another stream (its id swapped in)."""
    import base64
    import zlib

    from blockxfer.transfer.replicate_target import inspect_target
    from drivers.blockdev import open_device
    a, b = source(tmp_path, 6 << 20), tmp_path / "b.img"
    p = _cut_and_pending(tmp_path, a, b)
    i = inspect_target(str(b), open_device).interrupted
    assert i is not None
    raw = bytearray(zlib.decompress(base64.urlsafe_b64decode(i.token + "==")))
    raw[:16] = os.urandom(16)
    forged = base64.urlsafe_b64encode(zlib.compress(bytes(raw))).decode().rstrip("=")
    err = _raw_pull(a, {"dest": "B", "resume": forged, "ticket": p["ticket"],
                        "stream": {k: p[k] for k in ("id", "expression", "top_guid",
                                                     "base_guid")}})
    assert err is not None and "resume refused" in str(err)


def test_cascade_then_reparent_incremental(tmp_path: Path, env: dict[str, str]) -> None:
    a, b, c = source(tmp_path), tmp_path / "b.img", tmp_path / "c.img"
    pull(a, b, "--name", "B")
    pull(b, c, "--name", "C")
    master(a, "m2", os.urandom(1 << 20))
    pull(a, b, "--name", "B")                   # B tells A that C still needs m1
    assert sorted(destinations(a)["B"]["holds"]) == ["m1", "m2"]
    assert pull(b, c, "--name", "C")["kind"] == "incremental" and same(a, c, "m2")
    master(a, "m3", os.urandom(1 << 20), 2 << 20)
    pull(a, b, "--name", "B")
    b.unlink()                                  # B is gone: C re-parents to A
    r = pull(a, c, "--name", "C")
    assert (r["kind"], r["base"], r["top"]) == ("incremental", "m2", "m3")
    assert same(a, c, "m3") and ok(bx("check", str(c))).returncode == 0


def test_fan_out(tmp_path: Path, env: dict[str, str]) -> None:
    a = source(tmp_path)
    copies = [tmp_path / f"{n}.img" for n in "BCD"]
    for n, c in zip("BCD", copies, strict=True):
        pull(a, c, "--name", n)
    master(a, "m2", os.urandom(1 << 20))
    for n, c in zip("BCD", copies, strict=True):
        assert pull(a, c, "--name", n)["kind"] == "incremental" and same(a, c, "m2")
    assert sorted(destinations(a)) == ["B", "C", "D"]


def test_bwlimit_holds_the_rate(tmp_path: Path, env: dict[str, str]) -> None:
    a, b = source(tmp_path, 6 << 20), tmp_path / "b.img"
    t0 = time.monotonic()
    r = pull(a, b, "--name", "B", "--bwlimit", "2M", "--no-compress")
    took = time.monotonic() - t0
    # 6 MiB at 2 MiB/s after a burst of 1 MiB: at least 2.5 s
    # (the bucket's first burst lets the rate sit a few per cent over the limit)
    assert took >= 2.4 and r["rate"] <= 2.5 * (1 << 20), (took, r["rate"])


def test_token_bucket_rate() -> None:
    now = [0.0]
    slept: list[float] = []

    def sleep(s: float) -> None:
        slept.append(s)
        now[0] += s
    bucket = TokenBucket(1 << 20, clock=lambda: now[0], sleep=sleep)
    for _ in range(40):
        bucket.take(256 << 10)                  # 10 MiB at 1 MiB/s, burst 1 MiB
    assert 8.9 <= now[0] <= 9.1


def test_pull_from_a_volume_without_master(tmp_path: Path, env: dict[str, str]) -> None:
    a = tmp_path / "a.img"
    ok(bx("init", str(a), "--size", "64M"))
    r = bx("replicate", "pull", url(a), str(tmp_path / "b.img"))
    assert r.returncode == 5 and b"no master snapshot" in r.stderr
    assert not (tmp_path / "b.img").exists()


def test_every_pulls_again_until_interrupted(tmp_path: Path, env: dict[str, str]) -> None:
    import signal
    import subprocess
    a, b = source(tmp_path), tmp_path / "b.img"
    p = subprocess.Popen([BLOCKXFER, "replicate", "pull", url(a), str(b), "--name", "B",
                          "--every", "1s"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         env={**os.environ, **env})
    try:
        deadline = time.monotonic() + 120
        from blockxfer.transfer.replicate_state import PullState
        while len(PullState.load(str(b)).pulls) < 2:
            assert p.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
    finally:
        p.send_signal(signal.SIGINT)
        p.wait(30)
    out = p.stdout.read().decode() if p.stdout else ""
    assert "full image up to master 'm1'" in out and "up to date" in out


@pytest.mark.parametrize("req", [{}, {"dest": ""}, {"dest": "B", "have": "x"},
                                 {"dest": "B", "have": ["zz"]},
                                 {"dest": "B", "resume": "t"},
                                 {"dest": "B", "bwlimit": -1}])
def test_malformed_pull_requests_refused(req: dict[str, object]) -> None:
    from blockxfer.errors import UsageError
    from blockxfer.transfer.replicate_source import PullRequest
    with pytest.raises(UsageError):
        PullRequest.from_wire(req, "peer")
