"""`blockxfer demo`: the main job end to end on a file-backed volume."""

from __future__ import annotations

import argparse
import sys
from contextlib import nullcontext, redirect_stdout

from .spec import Command, Report, arg


def cmd_demo(a: argparse.Namespace) -> Report:
    from blockxfer.demo import run_demo
    with redirect_stdout(sys.stderr) if a.json else nullcontext():  # stdout: the JSON only
        code = run_demo(a.dir)
    return Report({"dir": a.dir, "ok": code == 0}, code=code)


COMMANDS = (
    Command("demo", "run the main job end to end on a file-backed volume",
            "Run the main job end to end in a folder: a volume, writes, snapshots, an "
            "incremental stream, a dump to a virtual tape and restores, each checked.",
            ("blockxfer demo", "blockxfer demo --dir /var/tmp/bx-demo"),
            cmd_demo,
            (arg("--dir", default="/tmp/blockxfer-demo", metavar="DIR",
                 help="the folder to work in (default /tmp/blockxfer-demo)"),)),
)
