"""Running the installed `blockxfer` command from tests, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys

# the venv's console script when it is there (what `pip install` gives), else the module
_SCRIPT = os.path.join(os.path.dirname(sys.executable), "blockxfer")
BX = [_SCRIPT] if os.path.exists(_SCRIPT) else [sys.executable, "-m", "blockxfer.cli"]


def bx(*args: str, data: bytes | None = None, timeout: float = 120,
       **kw: object) -> subprocess.CompletedProcess[bytes]:
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    return subprocess.run([*BX, *args], input=data, timeout=timeout,
                          **kw)  # type: ignore[call-overload]


def one_line(r: subprocess.CompletedProcess[bytes]) -> str:
    """The error line of a refused command; fails if it is more (a traceback)."""
    err = r.stderr.decode()
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err
