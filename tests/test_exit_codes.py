"""Every class of docs/exit-codes.md, driven through the installed command: the
code, and one line on stderr (no traceback)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from blockxfer.drivers.blockdev import open_device
from blockxfer.volume import Volume
from tests.clihelp import BX, bx, one_line


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """A volume with snapshot s1, its stream, a tape holding it, a damaged copy,
    a truncated stream and a file that is no volume."""
    d = str(tmp_path_factory.mktemp("codes"))
    vol, tape, stream = f"{d}/v.img", f"{d}/t.vtape", f"{d}/s1.bs"
    assert bx("init", vol, "--size", "64M").returncode == 0
    assert bx("write", vol, data=os.urandom(1 << 20)).returncode == 0
    assert bx("snapshot", f"{vol}@s1").returncode == 0
    assert bx("send", vol, "s1", "-o", stream).returncode == 0
    with open(stream, "rb") as f, open(f"{d}/cut.bs", "wb") as g:
        g.write(f.read()[:-100])
    assert bx("tape", "create", tape, "--capacity", "64M").returncode == 0
    assert bx("dump", vol, "s1", "--tape", tape).returncode == 0
    bad = f"{d}/bad.img"
    assert bx("receive", bad, "-i", stream).returncode == 0
    v = Volume.open(open_device(bad), writable=False)
    vbn = int(v.lba.get(10, 1)[0, 0])
    v.close()
    with open(bad, "r+b") as f:
        f.seek(vbn * 4096)
        f.write(b"\x5a" * 16)
    with open(f"{d}/junk", "wb") as f:
        f.write(os.urandom(1 << 20))
    with open(f"{d}/blank.vtape", "wb"):
        pass
    assert bx("tape", "create", f"{d}/empty.vtape", "--capacity", "8M").returncode == 0
    return {"d": d, "vol": vol, "tape": tape, "stream": stream, "bad": bad}


CASES = [
    # 1: check found problems
    (1, ["check", "{bad}"], None),
    # 2: usage
    (2, ["init", "{d}/x.img", "--size", "64M", "--block-size", "5000"], "power of two"),
    (2, ["init", "{d}/x.img"], "give --size"),
    (2, ["tape", "create", "{d}/x.vtape", "--capacity", "0"], "capacity"),
    (2, ["image", "{vol}", "s1 -"], "the end"),
    (2, ["read", "{vol}", "--offset", "1G"], "outside the virtual disk"),
    (2, ["read", "{vol}", "--length", "100000000000"], "0+100000000000 is outside"),
    (2, ["restore", "{d}/r.img", "--tape", "{tape}", "--vbns", "1-2"], "--image"),
    (2, ["write", "{vol}", "--offset", "ten"], "bad size"),
    (2, ["write", "{vol}", "--offset", "1G"], "past the end"),      # also with no data
    (2, ["send", "{vol}", "s1", "-o", "{vol}"], "holds a blockxfer volume"),
    # 3: damaged or foreign data
    (3, ["info", "{d}/junk"], "not a blockxfer volume"),
    (3, ["read", "{bad}"], "virtual offset"),
    (3, ["verify", "{d}/cut.bs"], None),
    (3, ["tape", "list", "{d}/empty.vtape"], "blank"),
    (3, ["inspect", "{vol}"], "a blockxfer volume, not a stream"),
    (3, ["inspect", "{d}/junk"], "not a blockxfer stream"),
    (3, ["receive", "{d}/new.img", "-i", "{d}/junk"], "not a blockxfer stream"),
    (3, ["receive", "{d}/new.img", "-i", "{d}/blank.vtape"], "the stream is empty"),
    (3, ["tape", "list", "{stream}"], "not a blockxfer virtual tape"),
    # 4: device, or a path that cannot be opened
    (4, ["info", "{d}/missing.img"], "No such file"),
    (4, ["receive", "{d}/r.img", "-i", "{d}/missing.bs"], "No such file"),
    (4, ["send", "{vol}", "s1", "-o", "{d}/nodir/out.bs"], "No such file"),
    (4, ["tape", "list", "{d}/missing.vtape"], "No such file"),
    (4, ["tape", "status", "/dev/null"], "not a tape drive"),
    (4, ["replicate", "status", "{d}/missing.img"], "no such file"),
    (4, ["tape", "create", "{tape}", "--capacity", "8M"], "already exists"),
    # 5: volume or tape state
    (5, ["snapshot", "{vol}@s1"], "already exists"),
    (5, ["destroy", "{vol}@nosuch"], "no snapshot named"),
    (5, ["read", "{vol}@nosuch"], "no snapshot or pointer"),
    (5, ["restore", "{d}/r.img", "--tape", "{tape}", "--image", "7"], "no image 7"),
    (5, ["init", "{vol}"], "already holds"),
    (5, ["tape", "erase", "{tape}"], "--force"),
]


@pytest.mark.parametrize("code, args, words", CASES,
                         ids=[f"{c}-{' '.join(a[:2])}" for c, a, _ in CASES])
def test_exit_code(place: dict[str, str], code: int, args: list[str],
                   words: str | None) -> None:
    r = bx(*[a.format(**place) for a in args])
    if code == 1:
        assert r.returncode == 1 and b"problem" in r.stdout and b"Traceback" not in r.stderr
        return
    assert r.returncode == code, r.stderr
    err = one_line(r)
    if words:
        assert words.lower() in err.lower(), err


def test_usage_from_the_parser_is_2() -> None:
    assert bx("read").returncode == 2 and bx("nosuchcommand").returncode == 2


def test_full_output_is_4(place: dict[str, str]) -> None:
    with open("/dev/full", "wb") as full:
        r = bx("read", place["vol"], stdout=full)
    assert r.returncode == 4 and "standard output" in one_line(r)


def test_interrupt_is_130_and_closed_pipe_is_141(place: dict[str, str]) -> None:
    proc = subprocess.Popen([*BX, "write", place["vol"]], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    assert proc.stdin is not None
    proc.stdin.write(os.urandom(1 << 20))
    proc.stdin.flush()
    proc.send_signal(2)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    r = subprocess.run(["bash", "-c", f"{' '.join(BX)} read {place['vol']} | head -c1 "
                                      ">/dev/null; echo ${PIPESTATUS[0]} >&2"],
                       capture_output=True, text=True, timeout=120)
    assert r.stderr == "141\n"


_BROKEN = """
import errno, os, sys
from blockxfer.cli.app import main
from blockxfer.service import session
def broken(*a, **k):
    raise OSError(errno.EIO, os.strerror(errno.EIO), "/dev/sdz")
session.open_session = broken
sys.exit(main(sys.argv[1:]))
"""


def test_an_unforeseen_system_error_is_one_line_and_4(place: dict[str, str]) -> None:
    """An OSError no check turned into a blockxfer error (EIO deep in a device) is
    still one line, code 4; the traceback only at --log-level debug."""
    for extra, lines in (([], 1), (["--log-level", "debug"], None)):
        r = subprocess.run([sys.executable, "-c", _BROKEN, "info", place["vol"], *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 4, r.stderr
        assert "Input/output error: /dev/sdz" in r.stderr.splitlines()[-1], r.stderr
        if lines is not None:
            assert len(r.stderr.splitlines()) == lines, r.stderr
        else:
            assert "Traceback" in r.stderr


@pytest.mark.usefixtures("root")
def test_init_on_an_unattached_loop_device_is_4() -> None:
    free = subprocess.run(["losetup", "-f"], capture_output=True, text=True).stdout.strip()
    if not free:
        pytest.skip("no free loop device")
    r = bx("init", free, "--size", "1M")
    assert r.returncode == 4 and "nothing attached" in one_line(r)
    r = bx("info", free)
    assert r.returncode == 3 and "is empty (0 bytes)" in one_line(r)
