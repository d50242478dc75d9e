"""`ssh://[user@]host[:port]/path`: an OpenSSH pipe to `blockxfer stdio-serve` on the far side.

The way `zfs send | ssh host zfs receive` is used, with the far side's answer
read back over the same pipe. The path is absolute (`ssh://host/srv/vol.img`);
`ssh://host/~/vol.img` is relative to the remote user's home, as in git.
`$BLOCKXFER_SSH` is the ssh command with its options (default `ssh`), and
`$BLOCKXFER_REMOTE_COMMAND` the far side's blockxfer (default `blockxfer`). For
a restricted key, put `command="blockxfer stdio-serve --volume PATH"` in the
far side's `authorized_keys` (docs/transport.md).
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shlex
import subprocess
import tempfile
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from blockxfer.errors import BlockxferError, DeviceError, UsageError

from .wire import widen_pipe

SSH_FAILED = 255                     # ssh's own exit status for a connection failure


@dataclass(frozen=True, slots=True)
class SshUrl:
    user: str | None
    host: str
    port: int | None
    path: str

    @classmethod
    def parse(cls, url: str) -> SshUrl:
        u = urlsplit(url)
        if u.scheme != "ssh" or not u.hostname or not u.path or u.path == "/":
            raise UsageError(f"{url!r}: an ssh URL is ssh://[user@]host[:port]/path")
        try:
            port = u.port
        except ValueError as e:
            raise UsageError(f"{url!r}: the port is not a number") from e
        path = unquote(u.path)
        if path.startswith("/~/"):
            path = path[3:]
        return cls(u.username, u.hostname, port, path)

    def destination(self) -> str:
        return f"{self.user}@{self.host}" if self.user else self.host


class SshChannel:
    """One ssh process whose stdin and stdout carry the wire protocol."""

    def __init__(self, url: SshUrl) -> None:
        self.peer = url.destination()
        ssh = shlex.split(os.environ.get("BLOCKXFER_SSH", "ssh"))
        remote = shlex.split(os.environ.get("BLOCKXFER_REMOTE_COMMAND", "blockxfer"))
        port = ["-p", str(url.port)] if url.port else []
        cmd = [*ssh, *port, "--", url.destination(), shlex.join([*remote, "stdio-serve"])]
        self._err = tempfile.TemporaryFile()  # noqa: SIM115 - closed by close()
        try:
            self._proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                          stderr=self._err)
        except OSError as e:
            raise DeviceError(f"cannot run {ssh[0]}: {e.strerror}") from e
        assert self._proc.stdin is not None and self._proc.stdout is not None
        widen_pipe(self._proc.stdin.fileno())
        widen_pipe(self._proc.stdout.fileno())
        self.writer, self.reader = self._proc.stdin, self._proc.stdout

    def _stderr_tail(self) -> str:
        self._err.seek(0)
        lines = [ln.strip() for ln in self._err.read().decode(errors="replace").splitlines()]
        return next((ln for ln in reversed(lines) if ln), "")

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()
        self._proc.wait()
        self._err.close()

    def abort(self) -> None:
        with contextlib.suppress(OSError):
            self.writer.close()
        self._proc.kill()
        self._proc.wait()

    def alive(self) -> bool:
        """ssh still runs and the far side sent nothing (it sends nothing unasked)."""
        from .endpoint import quiet
        return self._proc.poll() is None and quiet(self.reader)

    @property
    def pid(self) -> int:
        return self._proc.pid

    def explain(self, e: BlockxferError, cause: OSError | None = None) -> BlockxferError:
        """ssh's own failure (no route, refused key) rather than "closed early"."""
        try:
            code = self._proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            return e
        tail = self._stderr_tail()
        if code == SSH_FAILED:
            return DeviceError(f"ssh to {self.peer} failed: {tail or 'exit status 255'}")
        if code != 0 and tail:
            return type(e)(f"{self.peer}: {tail}")
        return e


_EARLY: dict[str, SshChannel] = {}


def prestart(url: str) -> None:
    """Start the ssh process for `url` now: `blockxfer send ... ssh://` calls this
    before its own imports, so the far side connects and starts up meanwhile, as
    both ends of `zfs send | ssh host zfs receive` start at once. Nothing is sent
    until the sink adopts the channel; one left unadopted (a usage error) is cut
    at exit."""
    try:
        _EARLY[url] = SshChannel(SshUrl.parse(url))
    except BlockxferError:
        return                           # the command reports it in its own turn
    atexit.register(_cut_unadopted)


def channel(url: str) -> tuple[SshChannel, str]:
    """The channel to `url` (the one started early, if any) and the path there."""
    u = SshUrl.parse(url)
    return _EARLY.pop(url, None) or SshChannel(u), u.path


def _cut_unadopted() -> None:
    while _EARLY:
        _EARLY.popitem()[1].abort()
