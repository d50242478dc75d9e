"""--json gives the RESULT of every command as one JSON object, its keys as
docs/cli-json.md lists them; -q prints nothing; -P prints parsable progress."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest

from blockxfer.cli.app import GROUPS
from blockxfer.cli.spec import Command
from tests.clihelp import bx

ROOT = Path(__file__).resolve().parent.parent
# stdout is their wire protocol, or they run until a signal (docs/cli-json.md)
NO_JSON = {"stdio-serve", "tls-serve", "serve"}
# run with --json against a real S3 server in tests/test_objstore_s3.py
ELSEWHERE = {"store ls", "store verify", "store rm", "store prune", "store gc",
             "store recover"}
# run with --json in tests/test_mirror_cli.py (a daemon, a timer)
MIRRORED = {"mirror start", "mirror status", "mirror stop", "mirror update"}
# run with --json in tests/test_increments.py (keys: docs/increments.md)
INCREMENTS = {"reintegrate", "increments status"}
# run with --json (and checked against this page) in tests/test_replicate.py
REPLICATE = {"replicate pull", "replicate status", "replicate destinations", "replicate forget"}
# run with --json (and checked against this page) in tests/test_replicate_served.py
REPLICATE_SERVED = {"replicate stop"}


def leaves(commands: tuple[Command, ...], prefix: str = "") -> dict[str, Command]:
    out: dict[str, Command] = {}
    for c in commands:
        name = f"{prefix}{c.name}"
        out.update(leaves(c.subcommands, f"{name} ") if c.subcommands else {name: c})
    return out


ALL = {name: c for group in GROUPS for name, c in leaves(group).items()}


def documented() -> dict[str, set[str]]:
    """Command -> the keys docs/cli-json.md lists for it."""
    doc = (ROOT / "docs" / "cli-json.md").read_text()
    out: dict[str, set[str]] = {}
    for m in re.finditer(r"^### `([a-z -]+)`\n(.*?)(?=^#|\Z)", doc, re.M | re.S):
        out[m.group(1)] = set(re.findall(r"^- `([a-z_]+)`", m.group(2), re.M))
    return out


def run_json(*argv: str, data: bytes | None = None, on_stderr: bool = False) -> dict:
    r = bx(*argv, "--json", data=data)
    assert r.returncode in (0, 1), r.stderr.decode()
    text = (r.stderr if on_stderr else r.stdout).decode()
    return json.loads(text[text.index("{"):])


def test_every_command_gives_its_result_as_json(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    d = str(tmp_path)
    monkeypatch.setenv("BLOCKXFER_CATALOG", f"{d}/catalog.db")
    vol, copy, back, tape = f"{d}/v.img", f"{d}/c.img", f"{d}/b.img", f"{d}/t.vtape"
    got: dict[str, dict] = {}
    got["init"] = run_json("init", vol, "--size", "32M")
    got["write"] = run_json("write", vol, data=os.urandom(1 << 20))
    got["snapshot"] = run_json("snapshot", f"{vol}@s1")
    got["info"] = run_json("info", vol)
    got["read"] = run_json("read", f"{vol}@s1", "--length", "4096", on_stderr=True)
    got["snapshots"] = run_json("snapshots", vol)
    got["pointer"] = run_json("pointer", vol, "last", "s1")
    run_json("pointer", vol, "last", "--delete")
    got["image"] = run_json("image", vol, "s1")
    got["check"] = run_json("check", vol)
    got["send"] = run_json("send", vol, "s1", "-o", f"{d}/s1.bs", on_stderr=True)
    got["inspect"] = run_json("inspect", f"{d}/s1.bs")
    got["verify"] = run_json("verify", f"{d}/s1.bs")
    got["receive"] = run_json("receive", copy, "-i", f"{d}/s1.bs")
    got["tape create"] = run_json("tape", "create", tape, "--capacity", "64M")
    got["tape label"] = run_json("tape", "label", tape, "T1")
    got["dump"] = run_json("dump", vol, "s1", "--tape", tape)
    got["tape list"] = run_json("tape", "list", tape)
    got["catalog ls"] = run_json("catalog", "ls")
    got["catalog where"] = run_json("catalog", "where", f"{vol}@s1")
    got["catalog import"] = run_json("catalog", "import", "--tape", tape)
    got["catalog pool create"] = run_json("catalog", "pool", "create", "weekly",
                                          "--retention", "30d")
    got["catalog pool assign"] = run_json("catalog", "pool", "assign", "weekly", "T1")
    got["catalog pool ls"] = run_json("catalog", "pool", "ls")
    got["catalog expired"] = run_json("catalog", "expired")
    got["restore"] = run_json("restore", back, "--tape", tape, "--snapshot", "s1")
    got["tape status"] = run_json("tape", "status", tape)
    got["tape rewind"] = run_json("tape", "rewind", tape)
    got["tape erase"] = run_json("tape", "erase", tape, "--force")
    got["tape eject"] = run_json("tape", "eject", tape)
    got["hold"] = run_json("hold", "t", f"{vol}@s1")
    got["holds"] = run_json("holds", vol)
    got["release"] = run_json("release", "t", f"{vol}@s1")
    got["policy set"] = run_json("policy", "set", vol, "daily=1")
    got["policy show"] = run_json("policy", "show", vol)
    got["policy run"] = run_json("policy", "run", vol)
    got["policy clear"] = run_json("policy", "clear", vol)
    got["install-units"] = run_json("install-units", "--dir", d)
    got["destroy"] = run_json("destroy", f"{vol}@s1")
    got["devices"] = run_json("devices")
    got["help"] = run_json("help", "snapshot")
    got["man"] = run_json("man")
    got["completion"] = run_json("completion", "bash")
    got["demo"] = run_json("demo", "--dir", f"{d}/demo")

    assert set(got) == set(ALL) - NO_JSON - ELSEWHERE - MIRRORED - INCREMENTS - REPLICATE \
        - REPLICATE_SERVED, \
        "a command without a --json run here"
    keys = documented()
    for name, result in got.items():
        assert name in keys, f"docs/cli-json.md has no section for {name!r}"
        assert keys[name] <= set(result), f"{name}: documented keys missing: " \
                                          f"{keys[name] - set(result)}"
    assert got["send"]["blocks"] == got["receive"]["blocks"] == got["dump"]["blocks"]
    assert got["restore"]["images"][0]["top"] == "s1" and got["check"]["clean"]
    assert got["write"]["bytes"] == 1 << 20 and got["demo"]["ok"]
    assert [i["kind"] for i in got["catalog ls"]["images"]] == ["file", "tape"]
    assert got["catalog where"]["steps"][0]["top"] == "s1"
    assert got["catalog pool assign"]["tapes"] == ["T1"] and got["catalog expired"]["tapes"] == []


def test_commands_without_json_say_why_in_the_doc() -> None:
    doc = (ROOT / "docs" / "cli-json.md").read_text()
    for name in NO_JSON:
        assert f"`{name}`" in doc


def test_quiet_prints_nothing_and_parsable_prints_progress_lines(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "32M", "-q").stdout == b""
    assert bx("write", vol, data=os.urandom(1 << 20)).returncode == 0
    r = bx("snapshot", f"{vol}@s1", "-q")
    assert r.returncode == 0 and r.stdout == b"" and r.stderr == b""
    r = bx("send", vol, "s1", "-o", str(tmp_path / "s.bs"), "-P")
    assert r.returncode == 0, r.stderr
    lines = r.stderr.decode().splitlines()
    done = [ln.split("\t") for ln in lines if ln.startswith("done\t")]
    assert len(done) == 1 and done[0][1] == "send" and int(done[0][3]) >= 1 << 20, lines


def test_destroy_names_snapshots_and_pointers(tmp_path: Path) -> None:
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M").returncode == 0
    assert bx("snapshot", f"{vol}@s1").returncode == 0
    assert bx("pointer", vol, "last", "s1").returncode == 0
    gone = run_json("destroy", f"{vol}@last")
    assert gone["pointer"] == "last" and gone["deleted"]
    listing = run_json("snapshots", vol)
    assert listing["pointers"] == {} and [r["name"] for r in listing["snapshots"]] == ["s1"]
    assert run_json("destroy", f"{vol}@s1")["destroyed"] == "s1"
