"""The systemd units the package ships: `blockxfer install-units` writes them with
this installation's command, `systemd-analyze verify` accepts each (offline: it
needs no systemd running as PID 1), and their command lines work."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from blockxfer.cli.units import PLACEHOLDER, unit_templates
from tests.clihelp import bx, one_line

UNITS = {"blockxfer@.service", "blockxfer-policy@.service", "blockxfer-policy@.timer"}


def installed(folder: Path) -> dict[str, str]:
    r = bx("install-units", "--dir", str(folder), "--json")
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)["units"]


def escape(path: str) -> str:
    tool = shutil.which("systemd-escape")
    if tool is None:
        pytest.skip("systemd-escape is missing (apt package systemd)")
    return subprocess.run([tool, "--path", path], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_the_package_ships_the_units_with_a_placeholder_command() -> None:
    templates = unit_templates()
    assert set(templates) == UNITS
    for name, text in templates.items():
        if name.endswith(".service"):
            assert f"ExecStart={PLACEHOLDER} " in text, name


def test_install_units_writes_them_once_and_refuses_a_missing_folder(tmp_path: Path) -> None:
    assert installed(tmp_path) == dict.fromkeys(UNITS, "written")
    assert installed(tmp_path) == dict.fromkeys(UNITS, "unchanged")
    for name in UNITS:
        text = (tmp_path / name).read_text()
        assert PLACEHOLDER not in text
    exec_line = next(ln for ln in (tmp_path / "blockxfer@.service").read_text().splitlines()
                     if ln.startswith("ExecStart="))
    command = exec_line.split("=", 1)[1].split()[0]
    assert os.path.isabs(command) and os.access(command, os.X_OK)
    r = bx("install-units", "--dir", str(tmp_path / "nosuch"))
    assert r.returncode == 4 and "--dir" in one_line(r)
    dry = bx("install-units", "--dir", str(tmp_path / "d"), "-n")
    assert dry.returncode == 4                      # checked before anything, even -n


@pytest.mark.parametrize("volume", ["/srv/vol.img", "/dev/md0", "/srv/my-vol.img"])
def test_systemd_analyze_verify_accepts_every_instance(tmp_path: Path, volume: str) -> None:
    verify = shutil.which("systemd-analyze")
    if verify is None:
        pytest.skip("systemd-analyze is missing (apt package systemd)")
    installed(tmp_path)
    instance = escape(volume)
    for unit in ("blockxfer@", "blockxfer-policy@"):
        for kind in (".service", ".timer") if unit == "blockxfer-policy@" else (".service",):
            name = f"{unit}{instance}{kind}"
            r = subprocess.run([verify, "verify", "--man=no", f"./{name}"], cwd=tmp_path,
                               capture_output=True, text=True, timeout=60)
            assert r.returncode == 0 and r.stderr == "", (name, r.stderr)


def test_the_policy_unit_command_runs_the_schedule(tmp_path: Path) -> None:
    """ExecStart with %f expanded (the instance unescaped, '/' in front), as systemd
    would run it."""
    vol = str(tmp_path / "v.img")
    assert bx("init", vol, "--size", "16M").returncode == 0
    assert bx("policy", "set", vol, "daily=2").returncode == 0
    installed(tmp_path)
    text = (tmp_path / "blockxfer-policy@.service").read_text()
    line = next(ln for ln in text.splitlines() if ln.startswith("ExecStart="))
    argv = [a.replace("%f", vol) for a in shlex.split(line.split("=", 1)[1])]
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "daily." in r.stdout, r.stderr
