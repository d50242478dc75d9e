"""The man page (argparse-manpage) renders with man -l, and the bash completion
(shtab) completes subcommands and, after VOLUME@, snapshot names."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.clihelp import bx

BIN = os.path.dirname(sys.executable)


@pytest.mark.skipif(shutil.which("man") is None, reason="man-db not installed "
                    "(tests/apt-packages.txt)")
def test_man_page_renders(tmp_path: Path) -> None:
    page = tmp_path / "blockxfer.1"
    page.write_bytes(bx("man").stdout)
    r = subprocess.run(["man", "-l", str(page)], capture_output=True, text=True,
                       env={**os.environ, "MANWIDTH": "100", "MANPAGER": "cat", "PAGER": "cat"})
    assert r.returncode == 0, r.stderr
    text = " ".join(r.stdout.split())                 # man fills and justifies lines
    for words in ("NAME", "SYNOPSIS", "VOLUME@SNAPSHOT", "blockxfer send",
                  "OPTIONS 'blockxfer dump'",
                  "EXAMPLES", "TOPIC"):
        assert words in text, words
    assert "Run blockxfer COMMAND --help" in text          # no line lost to a roff request


def complete(script: Path, *words: str, cwd: Path | None = None) -> list[str]:
    """What bash offers for the last of `words` after `blockxfer`."""
    line = " ".join(("blockxfer", *words))
    code = (f"source {script}; COMP_WORDS=(blockxfer {' '.join(words)}); "
            f"COMP_CWORD={len(words)}; COMP_LINE='{line}'; COMP_POINT=${{#COMP_LINE}}; "
            "_shtab_blockxfer; printf '%s\\n' \"${COMPREPLY[@]}\"")
    r = subprocess.run(["bash", "-c", code], capture_output=True, text=True, cwd=cwd,
                       env={**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}"})
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.split("\n") if w]


def test_bash_completion_completes_commands_and_snapshots(tmp_path: Path) -> None:
    script = tmp_path / "blockxfer.bash"
    script.write_bytes(bx("completion", "bash").stdout)
    assert complete(script, "sn") == ["snapshot", "snapshots"]
    assert complete(script, "tape", "l") == ["label", "list"]
    assert "--dry-run" in complete(script, "send", "--d")
    vol = tmp_path / "v.img"
    assert bx("init", str(vol), "--size", "16M").returncode == 0
    for name in ("june1", "june2", "other"):
        assert bx("snapshot", f"{vol}@{name}").returncode == 0
    assert complete(script, "read", "v.img@ju", cwd=tmp_path) == ["v.img@june1", "v.img@june2"]


def test_zsh_completion_is_generated() -> None:
    text = bx("completion", "zsh").stdout.decode()
    assert text.startswith("#compdef blockxfer") and "snapshots" in text
    if shutil.which("zsh"):
        r = subprocess.run(["zsh", "-n"], input=text, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
