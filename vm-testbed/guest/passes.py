"""Run the test bed's pytest passes from one interpreter (called by stage2.sh).

    passes.py DIR NAME...

Under TCG a fresh interpreter takes tens of seconds to import pytest, its
plugins, numpy and blockxfer before the first test. This one imports them once
and forks a child per pass, in order; each child runs `pytest.main` with the
pass's own environment (its devices: the BLOCKXFER_TEST_* variables the test
modules read when the child imports them), its output going to the console and
to its log through `tee`. For each NAME, DIR holds (written by stage2.sh):

    NAME.env   the pass's environment, `env -0`
    NAME.args  pytest's arguments, NUL-separated
    NAME.log   (written) pytest's output
    NAME.rc    (written) pytest's exit status

Exits 0 when every pass ran (whatever their statuses).
"""

from __future__ import annotations

import os
import subprocess
import sys

# numpy and blockxfer: imported once here rather than in each pass (all import them)
import numpy  # noqa: F401
import pytest

import blockxfer.cli.app  # noqa: F401


def _read0(path: str) -> list[str]:
    with open(path, "rb") as f:
        return [x.decode() for x in f.read().split(b"\0") if x]


def _child(d: str, name: str) -> None:
    """One pass; never returns."""
    rc = 3
    try:
        env = dict(kv.split("=", 1) for kv in _read0(f"{d}/{name}.env") if "=" in kv)
        tee = subprocess.Popen(["tee", f"{d}/{name}.log"], stdin=subprocess.PIPE)
        assert tee.stdin is not None
        os.dup2(tee.stdin.fileno(), 1)
        os.dup2(tee.stdin.fileno(), 2)
        tee.stdin.close()
        os.environ.clear()
        os.environ.update(env)
        rc = int(pytest.main(_read0(f"{d}/{name}.args")))
        sys.stdout.flush()
        sys.stderr.flush()
        os.close(1)                     # tee sees its end and finishes the log
        os.close(2)
        tee.wait()
    finally:
        with open(f"{d}/{name}.rc", "w") as f:
            f.write(f"{rc}\n")
        os._exit(0)


def main() -> int:
    d = sys.argv[1]
    for name in sys.argv[2:]:
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            _child(d, name)
        os.waitpid(pid, 0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
