"""-n/--dry-run on send, dump, receive and restore changes nothing and says the
exact image size (from the planes) and an estimate after compression; --verify
and --no-compress work on both send and dump."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

from tests.clihelp import bx, one_line

MiB = 1 << 20


def ok(*argv: str, data: bytes | None = None) -> bytes:
    r = bx(*argv, data=data)
    assert r.returncode == 0, r.stderr.decode()
    return r.stdout


def js(*argv: str) -> dict:
    return json.loads(ok(*argv, "--json"))


def digest(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


@pytest.fixture
def vol(tmp_path: Path) -> str:
    path = str(tmp_path / "v.img")
    ok("init", path, "--size", "64M")
    ok("write", path, data=os.urandom(2 * MiB))
    ok("snapshot", f"{path}@s1")
    # compresses to nearly nothing (not zeros: all-zero blocks are left unmapped)
    ok("write", path, "--offset", "4M", data=b"\x01" * (4 * MiB))
    ok("snapshot", f"{path}@s2")
    return path


def test_send_dry_run_sizes_and_touches_nothing(vol: str, tmp_path: Path) -> None:
    out = str(tmp_path / "s.bs")
    for expr in ("s1", "s2 - s1"):
        exact = js("image", vol, expr)
        r = bx("send", "-n", vol, expr, "-o", out, "--json")
        assert r.returncode == 0 and not os.path.exists(out), r.stderr
        m = json.loads(r.stdout)
        assert m["dry_run"] and (m["blocks"], m["bytes"]) == (exact["blocks"], exact["bytes"])
    full, inc = js("send", "-n", vol, "s1"), js("send", "-n", vol, "s2 - s1")
    assert full["estimated_bytes"] > 0.9 * full["bytes"]            # random data
    assert inc["estimated_bytes"] < inc["bytes"] / 20 and inc["sampled_blocks"] > 0  # zeros
    assert js("send", "-n", vol, "s2 - s1", "--no-compress")["estimated_bytes"] == inc["bytes"]
    text = ok("send", "-n", vol, "s1").decode()
    assert text.startswith("would send 's1'") and "after compression" in text


def test_dump_dry_run_leaves_the_tape(vol: str, tmp_path: Path) -> None:
    tape = str(tmp_path / "t.vtape")
    ok("tape", "create", tape, "--capacity", "64M")
    before = digest(tape)
    m = js("dump", "-n", vol, "s1", "--tape", tape)
    assert m["dry_run"] and m["blocks"] == js("image", vol, "s1")["blocks"]
    assert digest(tape) == before


def test_receive_and_restore_dry_runs_create_nothing(vol: str, tmp_path: Path) -> None:
    d = str(tmp_path)
    ok("send", vol, "s1", "-o", f"{d}/s1.bs")
    ok("send", vol, "s2 - s1", "-o", f"{d}/inc.bs")
    m = js("receive", "-n", f"{d}/new.img", "-i", f"{d}/s1.bs")
    assert m["kind"] == "full" and m["top"] == "s1" and not m["target_exists"]
    assert not os.path.exists(f"{d}/new.img")
    m = js("receive", "-n", f"{d}/new.img", "-i", f"{d}/inc.bs")
    assert m["base"] == "s1" and not m["base_present"]
    assert "would be refused" in ok("receive", "-n", f"{d}/new.img", "-i", f"{d}/inc.bs").decode()

    tape = f"{d}/t.vtape"
    ok("tape", "create", tape, "--capacity", "64M")
    ok("dump", vol, "s1", "--tape", tape)
    ok("dump", vol, "s2 - s1", "--tape", tape)
    m = js("restore", "-n", f"{d}/back.img", "--tape", tape, "--snapshot", "s2")
    assert [i["expression"] for i in m["images"]] == ["s1", "s2 - s1"] and m["bytes"] > 0
    assert not os.path.exists(f"{d}/back.img")
    for partial in (("--vbns", "0-9"), ("--only", "s1")):
        r = bx("restore", "-n", f"{d}/back.img", "--tape", tape, "--image", "1", *partial)
        assert r.returncode == 2 and "nothing was written" in one_line(r)
        assert not os.path.exists(f"{d}/back.img")


def test_verify_and_no_compress_on_send_and_dump(vol: str, tmp_path: Path) -> None:
    d = str(tmp_path)
    m = json.loads(bx("send", vol, "s2 - s1", "-o", f"{d}/z.bs", "--no-compress", "--verify",
                      "--json").stderr)
    assert m["verified"] and m["bytes"] > 4 * MiB                  # not compressed
    small = json.loads(bx("send", vol, "s2 - s1", "-o", f"{d}/c.bs", "--json").stderr)
    assert small["bytes"] < MiB
    r = bx("send", vol, "s1", "--verify", stdout=open(os.devnull, "wb"))  # noqa: SIM115
    assert r.returncode == 2 and "-o FILE" in one_line(r)
    tape = f"{d}/t.vtape"
    ok("tape", "create", tape, "--capacity", "64M")
    m = js("dump", vol, "s2 - s1", "--tape", tape, "--no-compress", "--verify")
    assert m["verified"]
    listed = js("tape", "list", tape)["images"][0]
    assert listed["bytes"] > 4 * MiB
