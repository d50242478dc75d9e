"""What the command leaves behind when it fails: output files written whole or not
at all (send -o, tape create), a failing standard output as one line or a quiet
exit, a failed `write` that says what it committed, a failed `init` that leaves
no file, and commands that refuse to destroy what an operator keeps."""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import stat
import subprocess
import time

import pytest

from tests.clihelp import BX, bx, one_line
from tests.nbd.serveproc import serve_process


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def vol(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "v.img")
    assert bx("init", path, "--size", "64M").returncode == 0
    assert bx("write", path, data=os.urandom(2 << 20)).returncode == 0
    assert bx("snapshot", f"{path}@s1").returncode == 0
    return path


@pytest.fixture
def stream(vol: str) -> str:
    out = os.path.join(os.path.dirname(vol), "good.bs")
    assert bx("send", vol, "s1", "-o", out).returncode == 0
    return out


# -- item 5: output files ---------------------------------------------------------------
@pytest.mark.parametrize("expression, code", [
    ("s1 +", 2),                 # does not parse
    ("nosuch", 5),               # names no snapshot
    ("s1 - s1", 2),              # an empty image
])
def test_failed_send_leaves_the_old_file(vol: str, stream: str, expression: str,
                                         code: int) -> None:
    folder, before = os.path.dirname(stream), _digest(stream)
    names = sorted(os.listdir(folder))
    r = bx("send", vol, expression, "-o", stream)
    assert r.returncode == code, r.stderr
    one_line(r)
    assert _digest(stream) == before and sorted(os.listdir(folder)) == names


def test_send_interrupted_midway_leaves_the_old_file(vol: str, stream: str) -> None:
    """Interrupted after records went out: the old stream stays, no part file is left."""
    assert bx("write", vol, data=os.urandom(48 << 20)).returncode == 0
    assert bx("snapshot", f"{vol}@big").returncode == 0
    folder, before = os.path.dirname(stream), _digest(stream)
    names = sorted(os.listdir(folder))
    proc = subprocess.Popen([*BX, "send", vol, "big", "--no-compress", "-o", stream],
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while not any(n.endswith(".part") and os.path.getsize(os.path.join(folder, n)) > 0
                  for n in os.listdir(folder)):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert _digest(stream) == before and sorted(os.listdir(folder)) == names


def test_send_through_the_server_leaves_the_old_file(vol: str, stream: str, tmp_path: object,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path))
    before = _digest(stream)
    with serve_process(vol, os.path.join(str(tmp_path), "s.sock")):
        r = bx("send", vol, "s1 +", "-o", stream)
        assert r.returncode == 2 and _digest(stream) == before
        assert bx("send", vol, "s1", "-o", stream, "--no-compress").returncode == 0
    assert bx("verify", stream).returncode == 0 and _digest(stream) != before
    assert [n for n in os.listdir(os.path.dirname(stream)) if n.endswith(".part")] == []


def test_send_replaces_whole_and_keeps_the_mode(vol: str, stream: str) -> None:
    os.chmod(stream, 0o640)
    assert bx("send", vol, "s1", "--no-compress", "-o", stream).returncode == 0
    assert stat.S_IMODE(os.stat(stream).st_mode) == 0o640
    assert json.loads(bx("inspect", stream, "--json").stdout)["top"] == "s1"


def test_send_over_a_volume_is_refused(vol: str, tmp_path: object) -> None:
    """`send v.img s1 -o v.img` used to rename the stream over the volume it read."""
    other = os.path.join(str(tmp_path), "other.img")
    assert bx("init", other, "--size", "16M").returncode == 0
    for target in (vol, other):
        before = _digest(target)
        r = bx("send", vol, "s1", "-o", target)
        assert r.returncode == 2 and "holds a blockxfer volume" in one_line(r)
        assert _digest(target) == before
    assert bx("check", vol).returncode == 0


def test_a_file_of_the_wrong_kind_is_named(vol: str, stream: str, tmp_path: object) -> None:
    """A volume given as a stream, or a stream given as a tape, is said to be what it
    is, not reported as damage."""
    for args in (["inspect", vol], ["receive", os.path.join(str(tmp_path), "q.img"), "-i", vol]):
        r = bx(*args)
        assert r.returncode == 3 and "is a blockxfer volume, not a stream" in one_line(r)
    r = bx("restore", os.path.join(str(tmp_path), "q.img"), "--tape", stream)
    assert r.returncode == 3 and "not a blockxfer virtual tape" in one_line(r)
    assert not os.path.exists(os.path.join(str(tmp_path), "q.img"))


def test_send_to_a_device_node_writes_in_place(vol: str) -> None:
    assert bx("send", vol, "s1", "-o", "/dev/null").returncode == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_send_into_a_missing_folder(vol: str, tmp_path: object) -> None:
    r = bx("send", vol, "s1", "-o", os.path.join(str(tmp_path), "nodir", "x.bs"))
    assert r.returncode == 4 and "No such file" in one_line(r)


def test_tape_create_refused_leaves_nothing(tmp_path: object) -> None:
    t = os.path.join(str(tmp_path), "t.vtape")
    r = bx("tape", "create", t, "--capacity", "0")
    assert r.returncode == 2 and not os.path.exists(t)
    one_line(r)
    assert bx("tape", "create", t, "--capacity", "64M").returncode == 0
    before = _digest(t)
    r = bx("tape", "create", t, "--capacity", "128M")
    assert r.returncode == 4 and "already exists" in one_line(r) and _digest(t) == before
    assert sorted(os.listdir(str(tmp_path))) == ["t.vtape"]


# -- item 10: standard output errors ----------------------------------------------------
@pytest.mark.parametrize("args", [["read", "{v}"], ["send", "{v}", "s1"], ["info", "{v}"]])
def test_full_standard_output_is_one_line(vol: str, args: list[str]) -> None:
    with open("/dev/full", "wb") as full:
        r = bx(*[a.format(v=vol) for a in args], stdout=full)
    assert r.returncode == 4 and "standard output: No space left" in one_line(r)


@pytest.mark.parametrize("args", [["read", "{v}"], ["send", "{v}", "s1"],
                                  ["snapshots", "{v}", "--json"]])
def test_closed_pipe_is_quiet(vol: str, args: list[str]) -> None:
    cmd = " ".join([*BX, *[a.format(v=vol) for a in args]])
    r = subprocess.run(["bash", "-c", f"{cmd} | head -c1 >/dev/null; "
                                      "echo ${PIPESTATUS[0]} >&2"],
                       capture_output=True, text=True, timeout=120)
    assert r.stderr.strip() in ("0", "141"), r.stderr      # 0: it all fit in the pipe


def test_read_of_a_closed_pipe_is_quiet_and_141(vol: str) -> None:
    r = subprocess.run(["bash", "-c", f"{' '.join(BX)} read {vol} | head -c1 >/dev/null; "
                                      "echo ${PIPESTATUS[0]} >&2"],
                       capture_output=True, text=True, timeout=120)
    assert r.stderr == "141\n"


# -- item 9: write that fails midway ----------------------------------------------------
@pytest.mark.parametrize("offset, size, code, committed", [
    ("40M", 24 << 20, 2, 16 << 20),      # runs past the end of the 57.6 MiB virtual disk
    ("0", 40 << 20, 5, None),            # the volume fills up (a snapshot pins 40 MiB)
])
def test_write_failing_midway_says_what_it_committed(tmp_path: object, offset: str, size: int,
                                                     code: int, committed: int | None) -> None:
    path = os.path.join(str(tmp_path), "w.img")
    assert bx("init", path, "--size", "64M").returncode == 0
    if code == 5:
        assert bx("write", path, data=os.urandom(40 << 20)).returncode == 0
        assert bx("snapshot", f"{path}@pin").returncode == 0
    data = os.urandom(size)
    src = os.path.join(str(tmp_path), "in.bin")
    with open(src, "wb") as f:
        f.write(data)
    for how in ("file", "pipe"):
        if how == "file":
            with open(src, "rb") as f:
                r = bx("write", path, "--offset", offset, stdin=f)
        else:
            r = bx("write", path, "--offset", offset, data=data)
        err = one_line(r)
        assert r.returncode == code and "Fatal" not in err, err
        if "nothing was written" in err:
            done = 0
        else:
            assert "were written and committed, the rest was not" in err
            done = int(err.split(" bytes) from offset")[0].rsplit("(", 1)[1])
        if committed is not None:
            assert done == committed
        else:                            # the second round finds it full already
            assert done < size and (done > 0 or how == "pipe")
        start = int(offset.rstrip("M")) << 20
        back = bx("read", path, "--offset", str(start), "--length", str(done)).stdout
        assert back == data[:done]
    assert bx("check", path).returncode == 0


# -- item 11: init ----------------------------------------------------------------------
@pytest.mark.parametrize("args, code", [
    (["--size", "64M", "--block-size", "5000"], 2),
    (["--size", "64M", "--block-size", "2M"], 2),
    (["--size", "16K"], 5),
    (["--size", "64M", "--virtual-size", "1G"], 5),
])
def test_failed_init_leaves_no_file(tmp_path: object, args: list[str], code: int) -> None:
    path = os.path.join(str(tmp_path), "n.img")
    r = bx("init", path, *args)
    assert r.returncode == code
    one_line(r)
    assert os.listdir(str(tmp_path)) == []


def test_failed_init_keeps_an_existing_file(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "keep.img")
    with open(path, "wb") as f:
        f.write(b"precious" * 4096)
    r = bx("init", path, "--block-size", "3K")
    assert r.returncode == 2 and _read(path) == b"precious" * 4096


# -- item 14: tape erase, demo --dir, info ----------------------------------------------
def test_tape_erase_refuses_a_tape_with_images(vol: str, tmp_path: object) -> None:
    t = os.path.join(str(tmp_path), "t.vtape")
    assert bx("tape", "create", t, "--capacity", "64M").returncode == 0
    assert bx("tape", "erase", t).returncode == 0                 # blank: nothing to lose
    assert bx("dump", vol, "s1", "--tape", t, "--label", "KEEP").returncode == 0
    before = _digest(t)
    r = bx("tape", "erase", t)
    assert r.returncode == 5 and "1 image" in one_line(r) and "--force" in r.stderr.decode()
    assert _digest(t) == before
    plan = json.loads(bx("tape", "erase", t, "--dry-run", "--json").stdout)
    assert plan["needs_force"] is True
    assert bx("tape", "erase", t, "--force").returncode == 0
    assert bx("tape", "list", t).returncode == 3                  # blank now


def test_tape_erase_refuses_foreign_data(tmp_path: object) -> None:
    t = os.path.join(str(tmp_path), "t.vtape")
    assert bx("tape", "create", t, "--capacity", "8M").returncode == 0
    from blockxfer.drivers.tapes import open_tape
    with open_tape(t) as tape:
        tape.write_record(b"somebody else's backup".ljust(4096, b"\0"))
    r = bx("tape", "erase", t)
    assert r.returncode == 5 and "not a readable blockxfer tape" in one_line(r)


def test_demo_keeps_a_folder_it_did_not_make(tmp_path: object) -> None:
    d = os.path.join(str(tmp_path), "mine")
    os.makedirs(d)
    with open(os.path.join(d, "thesis.tex"), "w") as f:
        f.write("years of work")
    r = bx("demo", "--dir", d)
    assert r.returncode == 2 and "did not make" in one_line(r)
    assert _read(os.path.join(d, "thesis.tex")) == b"years of work"


@pytest.mark.slow
def test_demo_runs_again_in_its_own_folder(tmp_path: object) -> None:
    d = os.path.join(str(tmp_path), "demo")
    assert bx("demo", "--dir", d, timeout=600).returncode == 0
    r = bx("demo", "--dir", d, timeout=600)
    assert r.returncode == 0 and b"identical" in r.stdout
    with open(os.path.join(d, "notes.txt"), "w") as f:
        f.write("mine")
    r = bx("demo", "--dir", d)
    assert r.returncode == 2 and os.path.exists(os.path.join(d, "notes.txt"))


def test_info_reports_free_blocks_unserved(vol: str, tmp_path: object,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    local = json.loads(bx("info", vol, "--json").stdout)
    assert isinstance(local["free_blocks"], int) and local["free_blocks"] > 0
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path))
    with serve_process(vol, os.path.join(str(tmp_path), "s.sock"), "--read-only"):
        served = json.loads(bx("info", vol, "--json").stdout)
    assert served["free_blocks"] == local["free_blocks"]


def test_info_for_people(vol: str, tmp_path: object, monkeypatch: pytest.MonkeyPatch) -> None:
    """Sizes with units beside the counts, the commit as a date, the server in one
    line; --json keeps the plain numbers (above)."""
    text = bx("info", vol).stdout.decode()
    assert re.search(r"^virtual_size\s+\S+ [KMGT]iB \(\d+ bytes\)$", text, re.M), text
    assert re.search(r"^committed\s+\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", text, re.M), text
    monkeypatch.setenv("BLOCKXFER_RUN_DIR", str(tmp_path))
    with serve_process(vol, os.path.join(str(tmp_path), "s.sock"), "--read-only"):
        text = bx("info", vol).stdout.decode()
    assert re.search(r"^server\s+pid \d+, read-only, \d+ clients, exports ", text, re.M), text


def test_write_refused_before_any_byte_says_nothing_was_written(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "tiny.img")
    assert bx("init", path, "--size", "8M").returncode == 0
    r = bx("write", path, data=os.urandom(20 << 20))      # the first 8 MiB piece is too big
    err = one_line(r)
    assert r.returncode == 2 and err.rstrip().endswith("nothing was written"), err
