"""One owner per volume: an flock on a lock file named by the volume's identity.

Every blockxfer process that opens a volume claims it here first: shared to
read, exclusive to write. The lock file is `<run dir>/owner-<identity key>.lock`
(run dir `/run/blockxfer`, or `$BLOCKXFER_RUN_DIR`: every blockxfer on the
machine must agree on it), so a loop device and its backing file, a symlink, a
bind mount, a second loop device over the same file and a relative path all
meet on the same lock (`drivers.identity`). flock belongs to the open file, so
a process that dies, even by SIGKILL, releases it: no lock is ever stale. The
last holder removes the file when it lets go (holding it exclusively, so
nobody else holds it), and whoever gets a lock checks that its file is still
the one at that name, else opens the new one: an unlinked file cannot let two
owners in. A SIGKILLed owner's file stays until the next owner lets go. A user
who cannot create the run directory (not root) locks a volume file itself.

Within one process a second claim of the same volume shares the first (as the
POSIX record locks before it did): the process is one owner. The exclusive
holder writes who it is (pid, the path it opened) into the lock file, which
is how another command finds a serving owner's control socket whatever name
it was given (`owner_path`). A refusal names every holder: pid and command line
from /proc/locks and psutil, not from the file, which may be older.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import threading
from dataclasses import dataclass
from pathlib import Path

import psutil

from blockxfer.errors import DeviceBusy, DeviceError

from .identity import Identity, identify

RUN_DIR = "/run/blockxfer"
PROC = Path("/proc")
_CMDLINE_MAX = 160
RECORD_MAX = 16384      # a record is a pid and a path (PATH_MAX 4096)
_RETRIES = 16


def run_dir() -> str:
    return os.environ.get("BLOCKXFER_RUN_DIR", RUN_DIR)


def lock_path(identity: Identity) -> str:
    return os.path.join(run_dir(), f"owner-{identity.key}.lock")


@dataclass(frozen=True, slots=True)
class Holder:
    """A process holding a volume's lock."""

    pid: int
    exclusive: bool
    cmdline: str

    def __str__(self) -> str:
        return f"process {self.pid} ({self.cmdline})"


@dataclass(slots=True)
class _Held:
    fd: int
    exclusive: bool
    lock_file: str | None       # None: the volume file itself (never removed)
    count: int = 0


_held: dict[str, _Held] = {}
_mutex = threading.Lock()


@dataclass(slots=True)
class Claim:
    """This process's hold on one volume; `release` once, when the device closes."""

    identity: Identity
    exclusive: bool
    released: bool = False

    def release(self) -> None:
        with _mutex:
            if self.released:
                return
            self.released = True
            held = _held[self.identity.key]
            held.count -= 1
            if held.count == 0:
                del _held[self.identity.key]
                _let_go(held)


def claim(path: str, *, exclusive: bool) -> Claim:
    """Claim the volume `path` names, or raise DeviceBusy naming who holds it."""
    ident = identify(path)
    with _mutex:
        held = _held.get(ident.key)
        if held is None:
            held = _take(path, ident, exclusive)
            _held[ident.key] = held
        elif exclusive and not held.exclusive:
            _upgrade(path, held)
        held.count += 1
    return Claim(ident, exclusive)


def _take(path: str, ident: Identity, exclusive: bool) -> _Held:
    for _ in range(_RETRIES):
        fd, lock_file = _open_lock_file(ident, path)
        try:
            if not _flock(fd, exclusive):
                holders = lock_holders(fd)
                if holders or not _flock(fd, exclusive):    # none: it let go meanwhile
                    raise _busy(path, fd, holders, exclusive)
            if lock_file is None or _still_named(fd, lock_file):
                if exclusive:
                    _record(fd, path)
                return _Held(fd, exclusive, lock_file)
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)            # its last holder removed it meanwhile: take the new one
    raise DeviceBusy(f"{path}: its lock file {lock_path(ident)} keeps being replaced")


def _still_named(fd: int, lock_file: str) -> bool:
    try:
        st = os.stat(lock_file)
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (st.st_dev, st.st_ino) == (mine.st_dev, mine.st_ino)


def _let_go(held: _Held) -> None:
    """Close the lock; the last holder (it gets the lock exclusively) removes the file
    first. Another process that opened it meanwhile finds it unnamed and retries."""
    with contextlib.suppress(DeviceError, OSError):
        if held.lock_file is not None and _flock(held.fd, True):
            os.unlink(held.lock_file)
    os.close(held.fd)


def _upgrade(path: str, held: _Held) -> None:
    """Shared to exclusive within this process. Linux drops the shared lock before it
    tries the exclusive one, so on failure the shared one is taken back."""
    if _flock(held.fd, True):
        held.exclusive = True
        _record(held.fd, path)
        return
    error = _busy(path, held.fd, lock_holders(held.fd), True)
    if not _flock(held.fd, False):
        raise DeviceBusy(f"{path}: lost this process's read lock to another writer") from error
    raise error


def _open_lock_file(ident: Identity, volume: str) -> tuple[int, str | None]:
    """(fd, lock file) in the run directory, or (fd of the volume file, None)."""
    path = lock_path(ident)
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        return os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600), path
    except OSError as e:
        if e.errno not in (errno.EACCES, errno.EPERM, errno.EROFS) or ident.kind != "file":
            raise DeviceError(f"volume lock {path}: {e.strerror}") from e
    # Not root (no /run/blockxfer): lock the file itself. Every name of a file meets
    # on its inode; only loop devices need the run directory, and they need root.
    try:
        return os.open(volume, os.O_RDONLY | os.O_CLOEXEC), None
    except OSError as e:
        raise DeviceError(f"volume lock {volume}: {e.strerror}") from e


def _flock(fd: int, exclusive: bool) -> bool:
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
        return True
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise DeviceError(f"volume lock: {e.strerror}") from e


def _record(fd: int, path: str) -> None:
    """Say who the exclusive owner is: its pid and the path it opened (for the
    control socket, which is named after that path). Written over any old record,
    padded to its length, without truncating: ftruncate costs a journal commit."""
    data = json.dumps({"pid": os.getpid(), "path": os.path.realpath(path)}).encode()
    with contextlib.suppress(OSError):     # only a hint: the lock itself is what counts
        old = os.fstat(fd).st_size
        os.pwrite(fd, data.ljust(max(old - 1, len(data))) + b"\n", 0)


def _busy(path: str, fd: int, holders: list[Holder], exclusive: bool) -> DeviceBusy:
    who = ", ".join(map(str, holders)) or "another process"
    rec = _recorded(fd)
    seen = rec.get("path") if rec.get("pid") in {h.pid for h in holders} else None
    alias = (f"is the same volume as {seen}, in use by"
             if isinstance(seen, str) and seen != os.path.realpath(path) else "is in use by")
    # a reader is refused only by a writer: say how to read a served volume meanwhile
    hint = "" if exclusive else " (read a served volume through its NBD export)"
    return DeviceBusy(f"{path} {alias} {who}; stop it or wait for it to finish{hint}")


def _recorded(fd: int) -> dict[str, object]:
    try:
        data = json.loads(os.pread(fd, RECORD_MAX, 0).strip() or b"{}")
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def lock_holders(fd: int, *, proc: Path = PROC) -> list[Holder]:
    """Every other process holding an flock on the open lock file `fd` (/proc/locks)."""
    st = os.fstat(fd)
    want = (os.major(st.st_dev), os.minor(st.st_dev), st.st_ino)
    found: dict[int, Holder] = {}
    for pid, exclusive in parse_locks(_read(proc / "locks"), want):
        if pid != os.getpid() and pid not in found:
            found[pid] = Holder(pid, exclusive, command_line(pid))
    return list(found.values())


def parse_locks(text: str, want: tuple[int, int, int]) -> list[tuple[int, bool]]:
    """(pid, exclusive) of each granted FLOCK on file `want` (major, minor, inode).
    A line is `1: FLOCK  ADVISORY  WRITE 4242 00:19:1234 0 EOF`; waiters have `->`."""
    out = []
    for line in text.splitlines():
        f = line.split()
        if len(f) < 6 or f[1] != "FLOCK":
            continue
        try:
            major, minor, ino = f[5].split(":")
            where = (int(major, 16), int(minor, 16), int(ino))
            pid = int(f[4])
        except ValueError:
            continue
        if where == want:
            out.append((pid, f[3] == "WRITE"))
    return out


def command_line(pid: int) -> str:
    try:
        text = " ".join(psutil.Process(pid).cmdline())
    except psutil.Error:
        return "gone"
    text = text or "?"
    return text if len(text) <= _CMDLINE_MAX else text[:_CMDLINE_MAX - 3] + "..."


def owner_path(path: str) -> str | None:
    """The path the process holding `path`'s volume exclusively opened it by; None
    when nobody holds it exclusively (or it cannot be told)."""
    try:
        ident = identify(path)
    except DeviceError:
        return None
    try:
        fd = os.open(lock_path(ident), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        rec = _recorded(fd)
        writers = {h.pid for h in lock_holders(fd) if h.exclusive}
    finally:
        os.close(fd)
    seen = rec.get("path")
    return seen if rec.get("pid") in writers and isinstance(seen, str) else None


def _read(p: Path) -> str:
    try:
        return p.read_text()
    except OSError:
        return ""
