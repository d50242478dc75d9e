"""The command line: the exact surface of issue 2, JSON listings, one-line errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.clihelp import run as bxrun

BX = [sys.executable, "-m", "blockxfer.cli"]


def bx(*args: str, data: bytes | None = None) -> subprocess.CompletedProcess[bytes]:
    return bxrun(args, input=data)


@pytest.fixture
def vol(tmp_path: object) -> str:
    path = os.path.join(str(tmp_path), "v.img")
    r = bx("init", path, "--size", "64M")
    assert r.returncode == 0, r.stderr
    return path


def test_end_to_end(vol: str) -> None:
    data = os.urandom(3 << 20)
    assert bx("write", vol, "--offset", "8192", data=data).returncode == 0
    assert bx("snapshot", f"{vol}@june1", "--master").returncode == 0
    assert bx("write", vol, data=b"z" * 4096).returncode == 0
    assert bx("snapshot", f"{vol}@june2").returncode == 0
    r = bx("read", f"{vol}@june1", "--offset", "8192", "--length", str(len(data)))
    assert r.returncode == 0 and r.stdout == data
    snaps = json.loads(bx("snapshots", vol, "--json").stdout)
    assert [s["name"] for s in snaps["snapshots"]] == ["june1", "june2"]
    assert snaps["snapshots"][0]["master"] is True
    assert bx("pointer", vol, "master", "june1").returncode == 0
    img = json.loads(bx("image", vol, "june2 - master", "--json").stdout)
    assert set(img) >= {"expression", "blocks", "bytes", "top", "base"}
    assert img["top"] == "june2" and img["base"] == "june1" and 0 < img["blocks"] < 100
    assert bx("pointer", vol, "master", "--delete").returncode == 0
    assert bx("destroy", f"{vol}@june1").returncode == 0
    chk = json.loads(bx("check", vol, "--json").stdout)
    assert chk["clean"] is True
    info = json.loads(bx("info", vol, "--json").stdout)
    assert info["snapshots"] == 1 and info["block_size"] == 4096


@pytest.mark.parametrize("args, code, words", [
    (["snapshot", "{vol}@june1"], 0, ""),
    (["snapshot", "{vol}@june1"], 5, "already exists"),
    (["destroy", "{vol}@nope"], 5, "no snapshot named 'nope'"),
    (["image", "{vol}", "june1 - (june1)"], 2, "position 9"),
    (["image", "{vol}", "june1 -"], 2, "the end"),
    (["read", "{vol}@ghost"], 5, "no snapshot or pointer named 'ghost'"),
    (["init", "{vol}"], 5, "already holds a blockxfer volume"),
    (["init", "{dir}/new.img"], 2, "give --size"),
    (["init", "{dir}/bs.img", "--size", "64M", "--block-size", "5000"], 2, "power of two"),
    (["init", "{dir}/tiny.img", "--size", "16K"], 5, "too small"),
    (["info", "{dir}/missing"], 4, "no such file"),
])
def test_errors_are_one_line(vol: str, args: list[str], code: int, words: str) -> None:
    d = os.path.dirname(vol)
    if args[0] in ("image", "read") or "already exists" in words:
        bx("snapshot", f"{vol}@june1")
    r = bx(*[a.format(vol=vol, dir=d) for a in args])
    err = r.stderr.decode()
    assert r.returncode == code, err
    if words:
        assert words in err and err.count("\n") == 1 and "Traceback" not in err


def test_not_a_volume(tmp_path: object) -> None:
    path = os.path.join(str(tmp_path), "junk")
    with open(path, "wb") as f:
        f.write(os.urandom(1 << 20))
    r = bx("info", path)
    assert r.returncode == 3 and b"not a blockxfer volume" in r.stderr


def test_send_receive_dump_restore_commands(vol: str, tmp_path: object) -> None:
    d = str(tmp_path)
    for day in (1, 2):
        data = os.urandom(1 << 20)
        assert bx("write", vol, "--offset", str(day << 20), data=data).returncode == 0
        assert bx("snapshot", f"{vol}@d{day}").returncode == 0
    s0, s1 = f"{d}/l0.bs", f"{d}/l1.bs"
    assert bx("send", vol, "d1", "-o", s0).returncode == 0
    assert bx("send", vol, "d2 - d1", "--order", "striped", "--members", "3", "--chunk", "64K",
              "-o", s1).returncode == 0
    assert bx("verify", s1).returncode == 0
    info = json.loads(bx("inspect", s1, "--json").stdout)
    assert info["base"] == "d1" and info["top"] == "d2"
    copy = f"{d}/copy.img"
    r = bx("receive", copy, "-i", s1)
    assert r.returncode == 3 and b"base snapshot 'd1'" in r.stderr and not os.path.exists(copy)
    assert bx("receive", copy, "-i", s0).returncode == 0
    assert bx("receive", copy, "-i", s1).returncode == 0
    assert bx("read", f"{copy}@d2").stdout == bx("read", f"{vol}@d2").stdout
    tape = f"{d}/t.vtape"
    assert bx("tape", "create", tape, "--capacity", "64M").returncode == 0
    assert bx("dump", vol, "d1", "--tape", tape, "--label", "T1", "--verify").returncode == 0
    assert bx("dump", vol, "d2 - d1", "--tape", tape).returncode == 0
    listing = json.loads(bx("tape", "list", tape, "--json").stdout)
    assert [i["expression"] for i in listing["images"]] == ["d1", "d2 - d1"]
    assert listing["label"]["serial"] == "T1"
    back = f"{d}/back.img"
    assert bx("restore", back, "--tape", tape, "--snapshot", "d2").returncode == 0
    assert bx("read", f"{back}@d2").stdout == bx("read", f"{vol}@d2").stdout
    r = bx("receive", back, "-i", f"{d}/missing.bs")
    assert r.returncode == 4 and b"cannot read" in r.stderr
