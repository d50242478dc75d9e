"""tests/clihelp.py, how tests run the command without an interpreter start-up
each time (5-10 s under the test bed's TCG): stdin, stdout, stderr, the working
directory and the exit status are the child's own, as for `python -m blockxfer.cli`."""

from __future__ import annotations

import os
from pathlib import Path

from tests import clihelp


def test_forked_command_has_its_own_streams_cwd_and_status(tmp_path: Path) -> None:
    r = clihelp.run(["init", "v.img", "--size", "32M"], cwd=str(tmp_path), text=True)
    assert r.returncode == 0 and "v.img" in r.stdout and r.stderr == "", r
    data = os.urandom(300_000)                       # more than a pipe holds
    assert clihelp.run(["write", str(tmp_path / "v.img")], input=data).returncode == 0
    r = clihelp.run(["read", str(tmp_path / "v.img"), "--length", str(len(data))])
    assert r.returncode == 0 and r.stdout == data
    r = clihelp.run(["init", str(tmp_path / "v.img"), "--size", "32M"], text=True)
    assert r.returncode == 5 and r.stderr.count("\n") == 1 and "--force" in r.stderr
    r = clihelp.run(["no-such-command"], text=True)
    assert r.returncode == 2 and "invalid choice" in r.stderr


def test_forked_server_runs_until_sigterm(tmp_path: Path) -> None:
    import signal
    import time

    from blockxfer.handles import init_volume
    from blockxfer.service import control
    path = str(tmp_path / "v.img")
    init_volume(path, size=32 << 20, block_size=4096, force=False).close()
    proc = clihelp.Forked(["serve", path, "--listen", f"unix:{tmp_path}/s.sock"],
                          str(tmp_path / "serve.log"))
    try:
        deadline = time.monotonic() + 30
        while not control.server_running(path):
            assert proc.poll() is None and time.monotonic() < deadline, proc.log
            time.sleep(0.05)
        assert clihelp.run(["info", path, "--json"]).returncode == 0   # routed to it
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0, (tmp_path / "serve.log").read_text()
