"""The service's parts: jobs, the session fork, descriptors and errors across the socket."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.errors import NotFound, VolumeError
from blockxfer.service import control
from blockxfer.service.jobs import Jobs
from blockxfer.service.service import Service
from blockxfer.service.session import LocalSession, ServedSession, open_session
from blockxfer.volume import Volume
from tests.clihelp import run as bxrun
from tests.nbd.serveproc import serve_process

BX = [sys.executable, "-m", "blockxfer.cli"]
MiB = 1 << 20


def bx(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return bxrun(args, input=data)


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    d = str(tmp_path / "run")
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", d)
    return d


@pytest.fixture
def service(tmp_path: Path, run_dir: str) -> Iterator[Service]:
    """A service in this process, on a real file-backed volume."""
    path = str(tmp_path / "vol.img")
    vol = Volume.create(open_device(path, write=True, create_size=32 * MiB))
    s = Service(vol, path)
    s.serve_control()
    t = threading.Thread(target=s.run, daemon=True)
    t.start()
    yield s
    s.stop()
    t.join(30)
    vol.close()


# -- jobs -------------------------------------------------------------------------------------
def test_jobs_run_on_schedule_and_failures_are_kept_not_fatal() -> None:
    jobs = Jobs()
    ran: list[str] = []
    jobs.add("good", 0.02, lambda: ran.append("good"))

    def bad() -> None:
        raise RuntimeError("the mirror target is gone")
    jobs.add("bad", 0.02, bad)
    jobs.start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not (len(ran) >= 3 and
                                               jobs.status()[1]["runs"] >= 3):
        time.sleep(0.01)
    jobs.stop()
    good, failing = jobs.status()
    assert len(ran) >= 3 and good["last_error"] is None and good["last_run"] is not None
    assert failing["runs"] >= 3 and failing["last_error"] == "the mirror target is gone"
    assert {"name", "last_run", "last_error", "next_run"} <= set(good)
    with pytest.raises(ValueError):
        jobs.add("good", 1, lambda: None)


def test_a_job_added_while_running_starts_and_shows_in_info(service: Service) -> None:
    done = threading.Event()
    service.jobs.add("tick", 0.02, done.set)
    assert done.wait(10)
    with open_session(service.path) as s:
        assert isinstance(s, ServedSession)
        jobs = s.info()["server"]["jobs"]
    assert [j["name"] for j in jobs] == ["policy", "tick"] and jobs[0]["next_run"] is not None


# -- the session fork ---------------------------------------------------------------------------
def test_session_is_local_without_a_server(tmp_path: Path, run_dir: str) -> None:
    path = str(tmp_path / "v.img")
    Volume.create(open_device(path, write=True, create_size=16 * MiB)).close()
    with open_session(path, write=True) as s:
        assert isinstance(s, LocalSession) and not s.served
        s.snapshot("a")
        assert s.destroy("a") == {"destroyed": "a", "pointer": False}


def test_read_and_write_through_passed_descriptors(service: Service, tmp_path: Path) -> None:
    data = os.urandom(3 * MiB + 123)
    src = tmp_path / "in.bin"
    src.write_bytes(data)
    with open_session(service.path) as s, open(src, "rb") as f:
        seen: list[int] = []
        assert s.write(f.fileno(), 4096 + 7, progress=seen.append)["bytes"] == len(data)
    out = tmp_path / "out.bin"
    with open_session(service.path) as s, open(out, "wb") as f:
        assert s.read(f, 4096 + 7, len(data))["bytes"] == len(data)
    assert out.read_bytes() == data


def test_progress_lines_reach_the_client(service: Service, tmp_path: Path,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(control, "PROGRESS_EVERY", 0.0)
    out = tmp_path / "out.bin"
    seen: list[int] = []
    with open_session(service.path) as s, open(out, "wb") as f:
        s.read(f, 0, 4 * MiB, progress=seen.append)
    assert sum(seen) == 4 * MiB


def test_errors_cross_with_their_class_and_code(service: Service) -> None:
    with open_session(service.path) as s:
        with pytest.raises(NotFound, match="no snapshot or pointer named 'nope'") as e:
            s.image("nope")
        assert e.value.exit_code == 5


def test_a_full_stream_into_a_served_volume_is_refused_untouched(
        tmp_path: Path, run_dir: str) -> None:
    other, vol = str(tmp_path / "other.img"), str(tmp_path / "vol.img")
    for v in (other, vol):
        assert bx("init", v, "--size", "32M").returncode == 0
    assert bx("snapshot", f"{other}@a").returncode == 0
    assert bx("snapshot", f"{vol}@mine").returncode == 0
    stream = str(tmp_path / "a.bxs")
    assert bx("send", other, "a", "-o", stream).returncode == 0
    with serve_process(vol, str(tmp_path / "nbd.sock")):
        r = bx("receive", vol, "-i", stream, "--force")
        err = r.stderr.decode()
        assert r.returncode == VolumeError.exit_code, err
        assert err.count("\n") == 1 and "incremental streams only" in err, err
        r = bx("read", f"{vol}@nope", "--length", "4096")
        assert r.returncode == 5 and r.stderr.decode().count("\n") == 1, r.stderr
        assert b"no snapshot or pointer named 'nope'" in r.stderr
        listing = json.loads(bx("snapshots", vol, "--json").stdout)
    assert [s["name"] for s in listing["snapshots"]] == ["mine"]
    assert b"clean" in bx("check", vol).stdout


def test_holds_through_the_service(service: Service) -> None:
    with open_session(service.path) as s:
        s.snapshot("a")
        assert s.holds("hold", "a", "keep") == {"holds": {"a": ["keep"]}}
        with pytest.raises(VolumeError, match="keep") as e:
            s.destroy("a")
        assert e.value.exit_code == 5
        assert s.holds() == {"holds": {"a": ["keep"]}}
        assert s.holds("release", "a", "keep") == {"holds": {}}
        assert s.destroy("a") == {"destroyed": "a", "pointer": False}


def _next_tape_script(folder: Path) -> str:
    """A --next-tape command: tape N is FOLDER/tN.vtape (8 MiB), created when missing."""
    script = folder / "next.sh"
    script.write_text(f"#!/bin/sh\nt={folder}/t$BLOCKXFER_TAPE_SEQ.vtape\n"
                      f"[ -e $t ] || {' '.join(BX)} tape create $t --capacity 8M "
                      "--early-warning 576K >&2 || exit 1\necho $t\n")
    script.chmod(0o755)
    return str(script)


def test_served_dump_spans_tapes_and_restore_applies_an_increment(
        tmp_path: Path, run_dir: str) -> None:
    """The service asks the client for the set's next tape (its --next-tape command
    runs here); an incremental image on tape is restored into a served replica."""
    src, rep = str(tmp_path / "src.img"), str(tmp_path / "rep.img")
    assert bx("init", src, "--size", "64M").returncode == 0
    assert bx("write", src, data=os.urandom(12 * MiB)).returncode == 0
    assert bx("snapshot", f"{src}@s1").returncode == 0
    full = str(tmp_path / "s1.bxs")
    assert bx("send", src, "s1", "-o", full).returncode == 0
    assert bx("receive", rep, "-i", full).returncode == 0
    assert bx("write", src, "--offset", "20M", data=os.urandom(MiB)).returncode == 0
    assert bx("snapshot", f"{src}@s2").returncode == 0
    nxt, t1, inc = _next_tape_script(tmp_path), str(tmp_path / "t1.vtape"), \
        str(tmp_path / "inc.vtape")
    assert bx("tape", "create", t1, "--capacity", "8M", "--early-warning", "576K"
              ).returncode == 0
    assert bx("tape", "create", inc, "--capacity", "64M").returncode == 0
    with serve_process(src, str(tmp_path / "src.sock")), \
            serve_process(rep, str(tmp_path / "rep.sock"), "--read-only"):
        r = bx("dump", src, "s1", "--tape", t1, "--next-tape", nxt, "--json")
        assert r.returncode == 0, r.stderr
        assert len(json.loads(r.stdout)["tapes"]) > 1 and json.loads(r.stdout)["served"]
        r = bx("dump", src, "s2 - s1", "--tape", inc)
        assert r.returncode == 0, r.stderr
        r = bx("restore", rep, "--tape", inc, "--image", "1")
        assert r.returncode == 0 and b"up to 's2'" in r.stdout, r.stderr
    back = str(tmp_path / "back.img")
    r = bx("restore", back, "--tape", t1, "--image", "1", "--next-tape", nxt)
    assert r.returncode == 0, r.stderr
    assert bx("read", f"{back}@s1").stdout == bx("read", f"{src}@s1").stdout
    assert bx("read", f"{rep}@s2").stdout == bx("read", f"{src}@s2").stdout


def test_ssh_push_into_a_served_replica_and_pull_from_a_served_source(
        tmp_path: Path, run_dir: str) -> None:
    """The far side of ssh:// (stdio-serve) routes through the service as well."""
    from tests.test_transport import FAKE_SSH
    from tests.transport_util import BLOCKXFER, ok, same_image, two_snapshots
    from tests.transport_util import bx as tbx
    script = tmp_path / "fakessh"
    script.write_text(FAKE_SSH)
    script.chmod(0o755)
    env = {"BLOCKXFER_SSH": str(script), "BLOCKXFER_REMOTE_COMMAND": BLOCKXFER}
    vol = two_snapshots(tmp_path)
    copy, pulled = tmp_path / "copy.img", tmp_path / "pulled.img"
    ok(tbx("send", vol, "a", f"ssh://h{copy}", env=env))
    with serve_process(vol, str(tmp_path / "src.sock")), \
            serve_process(str(copy), str(tmp_path / "copy.sock"), "--read-only"):
        r = ok(tbx("send", vol, "b - a", f"ssh://h{copy}", env=env))
        assert b"through the server" in r.stderr and b"received up to 'b'" in r.stderr
        listing = json.loads(ok(tbx("snapshots", str(copy), "--json")).stdout)
        assert [s["name"] for s in listing["snapshots"]] == ["a", "b"]
        ok(tbx("receive", str(pulled), f"ssh://h{vol}", "--image", "b + a", env=env))
    assert same_image(vol, str(copy), "b") and same_image(vol, str(pulled), "a")


def test_a_served_read_into_a_closed_pipe_ends_quietly(tmp_path: Path, run_dir: str) -> None:
    """`blockxfer read VOL | head -c 10` on a served volume: the service meets the
    broken pipe, the client ends as `cat` would (141, nothing on stderr)."""
    vol = str(tmp_path / "vol.img")
    assert bx("init", vol, "--size", "64M").returncode == 0
    with serve_process(vol, str(tmp_path / "nbd.sock")):
        proc = subprocess.Popen([*BX, "read", vol], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdout is not None and proc.stderr is not None
        assert len(proc.stdout.read(10)) == 10
        proc.stdout.close()
        assert proc.wait(60) == 141
        assert proc.stderr.read() == b""
        assert bx("info", vol).returncode == 0            # the service goes on
