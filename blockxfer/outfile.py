"""Output files written whole or not at all: the one helper every command uses.

`output_file(path)` hands out a file at a temporary name in the target's folder
(same file system, so the final rename is atomic). When the caller's block ends
without an error the data and the file are fsynced, the file is renamed over
`path` and the folder is fsynced, so after a crash `path` holds the old file or
the whole new one. On any error the temporary file is removed and `path` is
untouched: a typo in a `send` expression no longer destroys a good stream.

`path` that exists and is a character device or a pipe (/dev/null,
/dev/stdout) is opened and written in place: renaming over it would replace
the node. A block device is refused: it may hold a volume, and only
`open_device` (owner lock, in-use checks) may write one. OS errors become
blockxfer errors here (DeviceError, exit 4).
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from typing import BinaryIO

from blockxfer.errors import DeviceError, UsageError


@contextmanager
def output_file(path: str, *, replace: bool = True) -> Iterator[BinaryIO]:
    """Write `path` atomically (see the module docstring). With replace=False an
    existing `path` is refused, checked again at the rename (no race)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as e:
        raise DeviceError(f"cannot write {path}: {e.strerror}") from e
    if mode is not None and not replace:
        raise DeviceError(f"{path} already exists; remove it first or choose another name")
    if mode is not None and stat.S_ISBLK(mode):
        raise UsageError(f"{path} is a block device: a stream or image file goes to a file; "
                         "to put a volume on a device use 'blockxfer receive' or 'restore'")
    if mode is not None and not stat.S_ISREG(mode):
        with _in_place(path) as f:
            yield f
        return
    folder = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.", suffix=".part",
                                   dir=folder)
    except OSError as e:
        raise DeviceError(f"cannot write {path}: {e.strerror}") from e
    try:
        os.fchmod(fd, stat.S_IMODE(mode) if mode is not None else 0o666 & ~_umask())
        with os.fdopen(fd, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path, replace)
        _fsync_dir(folder)
    except OSError as e:
        _discard(tmp)
        raise DeviceError(f"write {path}: {e.strerror}; {path} was left as it was") from e
    except BaseException:
        _discard(tmp)
        raise


@contextmanager
def _in_place(path: str) -> Iterator[BinaryIO]:
    try:
        with open(path, "wb") as f:
            yield f
    except OSError as e:
        raise DeviceError(f"write {path}: {e.strerror}") from e


def _publish(tmp: str, path: str, replace: bool) -> None:
    if replace:
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)             # fails if `path` appeared meanwhile
    except FileExistsError as e:
        raise DeviceError(f"{path} already exists; remove it first or choose another "
                          "name") from e
    os.unlink(tmp)


def _discard(tmp: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)


def _fsync_dir(folder: str) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno != errno.EINVAL:    # some file systems cannot fsync a folder
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask
