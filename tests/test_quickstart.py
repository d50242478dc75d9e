"""docs/quickstart.md as a newcomer runs it: every command of its `sh` blocks, in
order, one at a time, in one shell (so `cd`, `$SERVE` and background jobs carry
over), each of which must succeed. A block marked `<!-- quickstart: nbd-kernel -->`
or `<!-- quickstart: nbd-fuse -->` is one of two ways to reach the NBD export;
the kernel's is used where /dev/nbd0 exists, else nbdfuse with a loop mount.

Needs root (mount, loop devices). Whatever it mounted or started is unmounted
and stopped afterwards, even when a command fails. About 30 s here (35 commands,
each a fresh Python), so the run is `slow`; the doc's shape is checked always."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest

DOC = Path(__file__).resolve().parent.parent / "docs" / "quickstart.md"
MARK = "@@quickstart-rc"
TOOLS = ("mkfs.ext4", "debugfs", "e2fsck", "mount", "umount")


@dataclass
class Step:
    command: str
    variant: str | None


def steps(text: str) -> list[Step]:
    """The commands of the doc's sh blocks, with the variant each block is for."""
    out = []
    blocks = re.finditer(r"(?:^<!-- quickstart: ([a-z-]+) -->\n)?^```sh\n(.*?)^```", text,
                         re.M | re.S)
    for m in blocks:
        for line in m.group(2).splitlines():
            if line.strip() and not line.lstrip().startswith("#"):
                assert not line.rstrip().endswith("\\"), f"one command per line: {line}"
                out.append(Step(line, m.group(1)))
    return out


def nbd_variant() -> str:
    """The way to the export this machine has, or skip saying why neither."""
    if os.path.exists("/dev/nbd0") and shutil.which("nbd-client"):
        return "nbd-kernel"
    if shutil.which("nbdfuse") and os.path.exists("/dev/fuse"):
        return "nbd-fuse"
    pytest.skip("no NBD client: neither /dev/nbd0 with nbd-client (kernel nbd module) nor "
                "nbdfuse (apt package libnbd-bin) with /dev/fuse")


class Shell:
    """One bash fed a command at a time; each answers with its exit status."""

    def __init__(self, cwd: Path, env: dict[str, str]) -> None:
        self.err = open(cwd / "shell.stderr", "w+b")   # noqa: SIM115 (closed in close())
        self.proc = subprocess.Popen(["bash", "--norc", "--noprofile"], cwd=cwd, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.err, text=True, bufsize=1)
        self.run("set -o pipefail")

    def run(self, command: str, timeout: float = 180) -> tuple[int, str]:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        start = self.err.seek(0, os.SEEK_END)
        self.proc.stdin.write(f"{command}\nprintf '\\n{MARK} %d\\n' $?\n")
        self.proc.stdin.flush()
        out: list[str] = []
        deadline = time.monotonic() + timeout
        while True:          # background jobs share the pipe: read lines, not to EOF
            assert time.monotonic() < deadline, f"{command!r} did not finish"
            line = self.proc.stdout.readline()
            assert line, f"the shell ended at {command!r}"
            if line.startswith(MARK):
                self.err.seek(start)
                return int(line.split()[1]), "".join(out) + self.err.read().decode()
            out.append(line)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.err.close()


def clean_up(where: Path) -> None:
    """Unmount what the walk-through mounted under `where`, innermost first, and
    stop the processes it started there (found by the path in their command line)."""
    mounts = [ln.split()[1] for ln in Path("/proc/mounts").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(str(where))), reverse=True):
        if subprocess.run(["umount", point], capture_output=True).returncode:
            subprocess.run(["umount", "-l", point], capture_output=True)
    if os.path.exists("/dev/nbd0") and shutil.which("nbd-client"):
        subprocess.run(["nbd-client", "-c", "/dev/nbd0"], capture_output=True)
    for p in psutil.process_iter(["pid", "cmdline"]):
        if p.pid != os.getpid() and any(str(where) in a for a in p.info["cmdline"] or []):
            with_signal(p.pid, signal.SIGTERM)


def with_signal(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


def test_the_doc_has_both_ways_and_no_dash_names() -> None:
    found = steps(DOC.read_text())
    assert {s.variant for s in found} == {None, "nbd-kernel", "nbd-fuse"}
    assert any("blockxfer serve" in s.command for s in found)
    assert all("@" not in s.command or "-" not in s.command.split("@")[1].split()[0]
               for s in found if "blockxfer snapshot " in s.command)


@pytest.mark.slow
def test_the_quickstart_runs_command_by_command(root: None, tmp_path: Path) -> None:
    for tool in TOOLS:
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} is missing (apt package e2fsprogs / mount)")
    variant = nbd_variant()
    env = dict(os.environ, TMPDIR=str(tmp_path),
               PATH=f"{os.path.dirname(sys.executable)}:{os.environ['PATH']}")
    shell = Shell(tmp_path, env)
    outputs: dict[str, str] = {}
    try:
        for step in steps(DOC.read_text()):
            if step.variant not in (None, variant):
                continue
            code, out = shell.run(step.command)
            assert code == 0, f"{step.command}\nexited {code}:\n{out}"
            outputs[step.command] = out
    finally:
        shell.close()
        clean_up(tmp_path)
    said = {cmd.split("#")[0].strip(): out for cmd, out in outputs.items()}
    assert "tuesday's notes" in said["debugfs -R 'cat /notes.txt' tuesday.ext4"]
    assert "monday's notes" in said["debugfs -R 'cat /notes.txt' monday.ext4"]
    assert "clean" in said["blockxfer check restored.img"]
    listing = said["blockxfer snapshots copy.img"]
    assert "monday" in listing and "tuesday" in listing
