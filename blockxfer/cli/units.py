"""`blockxfer install-units [--dir DIR]`: the systemd units the package ships
(blockxfer/data/systemd/, package data) written where systemd reads them, with
the absolute path of this installation's `blockxfer` in their ExecStart.

Why a command and not setup.py data_files: a wheel puts data files under its
environment's prefix (a venv's share/, /usr/local/share), where systemd never
looks, and a unit needs the absolute path of the command, which only the
installed package knows. Package data survives any wheel install.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
from importlib import resources

from blockxfer.errors import DeviceError, UsageError

from .spec import Command, Report, arg

PLACEHOLDER = "@BLOCKXFER@"
DEFAULT_DIR = "/etc/systemd/system"


def unit_templates() -> dict[str, str]:
    """Unit file name -> its text, with the command still a placeholder."""
    folder = resources.files("blockxfer.data") / "systemd"
    return {f.name: f.read_text(encoding="utf-8") for f in folder.iterdir()
            if f.name.endswith((".service", ".timer"))}


def installed_command() -> str:
    """This installation's `blockxfer` console script, by absolute path."""
    beside = os.path.join(os.path.dirname(sys.executable), "blockxfer")
    found = beside if os.access(beside, os.X_OK) else shutil.which("blockxfer")
    if found is None:
        raise UsageError("cannot find the installed 'blockxfer' command; give its path "
                         "with --command")
    return os.path.abspath(found)


def render(text: str, command: str) -> str:
    return text.replace(PLACEHOLDER, command)


def _content(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        return None


def install_units(folder: str, command: str, *, dry_run: bool = False) -> dict[str, str]:
    """Write each unit into `folder` (whole or not at all); name -> 'written',
    'unchanged' or, with `dry_run`, 'would write'."""
    from blockxfer.outfile import output_file
    if not os.path.isabs(command) or not os.access(command, os.X_OK):
        raise UsageError(f"--command {command}: give the absolute path of an executable "
                         "blockxfer")
    if not os.path.isdir(folder):
        raise DeviceError(f"{folder}: no such folder (is systemd installed?); give --dir")
    done = {}
    for name, text in sorted(unit_templates().items()):
        path = os.path.join(folder, name)
        body = render(text, command).encode()
        if _content(path) == body:
            done[name] = "unchanged"
        elif dry_run:
            done[name] = "would write"
        else:
            with output_file(path) as f:
                f.write(body)
            done[name] = "written"
    return done


def cmd_install_units(a: argparse.Namespace) -> Report:
    command = a.command or installed_command()
    done = install_units(a.dir, command, dry_run=a.dry_run)
    text = [f"{os.path.join(a.dir, n)}: {what}" for n, what in done.items()]
    if any(w == "written" for w in done.values()):
        text.append("now: systemctl daemon-reload")
    return Report({"dir": a.dir, "command": command, "units": done, "dry_run": a.dry_run},
                  text)


COMMANDS = (
    Command("install-units", "install the systemd units (volume service, policy timer)",
            "Write blockxfer@.service (a volume's service: serve), blockxfer-policy@.service "
            "and blockxfer-policy@.timer (policy run every 15 minutes) into --dir, with "
            "this installation's blockxfer in ExecStart. The instance is the volume's path "
            "escaped with 'systemd-escape --path' (docs/policies.md).",
            ("blockxfer install-units   # then systemctl daemon-reload; systemctl enable --now "
             "blockxfer@dev-md0.service",
             "blockxfer install-units --dir /tmp/units -n   # what it would write"),
            cmd_install_units,
            (arg("--dir", default=DEFAULT_DIR, metavar="DIR",
                 help=f"where to write them (default {DEFAULT_DIR})"),
             arg("--command", metavar="PATH",
                 help="the blockxfer the units run (default: this installation's)"),
             arg("-n", "--dry-run", action="store_true",
                 help="print which units would be written; write nothing"))),
)
