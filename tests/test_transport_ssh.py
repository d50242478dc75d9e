"""ssh:// end to end through a real sshd the test starts on 127.0.0.1 (root; openssh-server
from tests/apt-packages.txt): push, pull, a forced command pinning one volume, and a key
the server does not know."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.sshd import Sshd, keygen, need_sshd, sshd
from tests.transport_util import BLOCKXFER, bx, ok, same_image, two_snapshots


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Sshd]:
    need_sshd()
    with sshd(tmp_path / "sshd") as s:
        yield s


def _env(s: Sshd) -> dict[str, str]:
    return {"BLOCKXFER_SSH": s.ssh_command(), "BLOCKXFER_REMOTE_COMMAND": BLOCKXFER}


@pytest.mark.root
def test_ssh_push_then_pull(tmp_path: Path, server: Sshd) -> None:
    vol = two_snapshots(tmp_path)
    copy = tmp_path / "copy.img"
    url = f"ssh://root@127.0.0.1:{server.port}{copy}"
    ok(bx("send", vol, "a", url, env=_env(server)))
    ok(bx("send", vol, "b - a", url, env=_env(server)))
    assert same_image(vol, str(copy), "b") and same_image(vol, str(copy), "a")
    back = tmp_path / "back.img"
    ok(bx("receive", str(back), url, "--image", "b + a", env=_env(server)))
    assert same_image(vol, str(back), "b")
    assert ok(bx("check", str(back))).returncode == 0


@pytest.mark.root
def test_forced_command_pins_the_volume(tmp_path: Path, server: Sshd) -> None:
    vol = two_snapshots(tmp_path)
    pub = (server.client_key.with_suffix(".pub")).read_text().strip()
    server.authorize(f'command="{BLOCKXFER} stdio-serve --volume {vol} --allow send",'
                     f"restrict {pub}")
    env = _env(server)
    env["BLOCKXFER_REMOTE_COMMAND"] = "blockxfer-ignored-by-forced-command"
    base = f"ssh://root@127.0.0.1:{server.port}"
    ok(bx("receive", str(tmp_path / "r.img"), f"{base}{vol}", "--image", "b + a", env=env))
    other = tmp_path / "other.img"
    r = bx("receive", str(tmp_path / "r2.img"), f"{base}{other}", "--image", "b", env=env)
    assert r.returncode == 4 and b"is for another volume" in r.stderr
    r = bx("send", vol, "a", f"{base}{vol}", env=env)          # receive is not allowed
    assert r.returncode == 4 and b"may not receive here" in r.stderr


@pytest.mark.root
def test_unknown_key_refused(tmp_path: Path, server: Sshd) -> None:
    vol = two_snapshots(tmp_path)
    keygen(tmp_path / "stranger")
    env = _env(server)
    env["BLOCKXFER_SSH"] = env["BLOCKXFER_SSH"].replace(str(server.client_key),
                                                        str(tmp_path / "stranger"))
    r = bx("send", vol, "a", f"ssh://root@127.0.0.1:{server.port}{tmp_path}/x.img", env=env)
    assert r.returncode == 4, r.stderr
    line = r.stderr.decode().strip()
    assert line.startswith("blockxfer: ssh to root@127.0.0.1 failed:") and "\n" not in line
    assert "Permission denied" in line
    assert not (tmp_path / "x.img").exists()
