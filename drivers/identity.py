"""Which volume a path names: the object behind the name, whatever the name.

One volume is reachable by many names: a file, a symlink or a relative path to
it, a bind mount of it, a hard link, one or more loop devices over it, a device
node and its /dev/disk/by-* links. `identify` maps each such name to one
`Identity`:

- a regular file: its st_dev and st_ino;
- a loop device: its backing file's, from LOOP_GET_STATUS64 (lo_device,
  lo_inode: the kernel's own answer, right even for a deleted or bind-mounted
  backing file), or from sysfs `loop/backing_file` when the ioctl is refused;
  a loop device over a block device is that block device (followed through
  stacked loop devices);
- any other block device: its device number (st_rdev).

`drivers.owner` keys the volume's lock by `Identity.key`. This module only
looks; the stat and loop lookups are parameters so unit tests run on fakes.
Partitions are not folded into their disk: /dev/sda and /dev/sda1 are two
identities. Writers of both still cannot overlap: `open_device` opens a block
device O_EXCL to write, and the kernel refuses an exclusive claim of a disk
while one of its partitions is claimed, and the other way round.
"""

from __future__ import annotations

import fcntl
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from blockxfer.errors import DeviceError

from . import ioctls

SYS = Path("/sys")


@dataclass(frozen=True, slots=True)
class Identity:
    kind: str       # "file" or "block"
    dev: int        # file: st_dev of its file system; block: the device number
    ino: int = 0    # file: st_ino; block: 0

    @property
    def key(self) -> str:
        """A file name for this identity: the same for every alias of the volume."""
        return f"{self.kind}-{os.major(self.dev)}-{os.minor(self.dev)}-{self.ino}"

    def __str__(self) -> str:
        where = f"{os.major(self.dev)}:{os.minor(self.dev)}"
        return f"file {self.ino} on {where}" if self.kind == "file" else f"block device {where}"


@dataclass(frozen=True, slots=True)
class LoopBacking:
    """What a loop device reads and writes: a file (dev, ino) or a block device (rdev)."""

    dev: int
    ino: int
    rdev: int = 0


StatFn = Callable[[str], os.stat_result]
LoopFn = Callable[[str | None, int], LoopBacking | None]
MAX_STACK = 8       # loop over loop over ...: deeper than this is refused as a loop


def identify(path: str, *, stat_fn: StatFn = os.stat, loop_fn: LoopFn | None = None,
             sysfs: Path = SYS) -> Identity:
    """The identity of the volume `path` names (symlinks followed)."""
    try:
        st = stat_fn(path)
    except OSError as e:
        raise DeviceError(f"{path}: {e.strerror}") from e
    if stat.S_ISREG(st.st_mode):
        return Identity("file", st.st_dev, st.st_ino)
    if not stat.S_ISBLK(st.st_mode):
        raise DeviceError(f"{path} is neither a regular file nor a block device")
    return _block_identity(path, st.st_rdev, loop_fn or _loop_fn(sysfs))


def _block_identity(path: str, rdev: int, loop_fn: LoopFn) -> Identity:
    node: str | None = path     # only the first device has a node we know
    for _ in range(MAX_STACK):
        backing = loop_fn(node, rdev)
        if backing is None:
            return Identity("block", rdev)
        if not backing.rdev:
            return Identity("file", backing.dev, backing.ino)
        node, rdev = None, backing.rdev
    raise DeviceError(f"{path}: loop devices stacked deeper than {MAX_STACK}")


def _loop_fn(sysfs: Path) -> LoopFn:
    return lambda path, rdev: loop_backing(path, rdev, sysfs=sysfs)


def loop_backing(path: str | None, rdev: int, *, sysfs: Path = SYS,
                 ioctl: Callable[[int, int, bytes], bytes] = fcntl.ioctl) -> LoopBacking | None:
    """The backing object of loop device `rdev` (its node `path` when known); None when
    it is not a loop device or nothing is attached (sysfs has a `loop` folder only then)."""
    loop = sysfs / "dev" / "block" / f"{os.major(rdev)}:{os.minor(rdev)}" / "loop"
    if not loop.is_dir():
        return None
    if path is None:
        return _from_sysfs(loop)
    try:
        return _status64(path, ioctl)
    except OSError:
        return _from_sysfs(loop)


def _status64(path: str, ioctl: Callable[[int, int, bytes], bytes]) -> LoopBacking:
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        raw = ioctl(fd, ioctls.LOOP_GET_STATUS64, bytes(ioctls.LOOP_INFO64.size))
    finally:
        os.close(fd)
    lo_device, lo_inode, lo_rdevice = ioctls.LOOP_INFO64.unpack(raw)[:3]
    rdev = decode_dev(lo_rdevice)
    if rdev:
        return LoopBacking(0, 0, rdev)
    return LoopBacking(decode_dev(lo_device), lo_inode)


def _from_sysfs(loop: Path) -> LoopBacking | None:
    try:
        st = os.stat(loop.joinpath("backing_file").read_text().strip())
    except OSError:
        return None         # detached meanwhile, or the backing file is gone from view
    if stat.S_ISBLK(st.st_mode):
        return LoopBacking(0, 0, st.st_rdev)
    return LoopBacking(st.st_dev, st.st_ino)


def decode_dev(huge: int) -> int:
    """The kernel's huge_encode_dev (linux/kdev_t.h) back to a userspace dev_t."""
    major = (huge & 0xFFF00) >> 8
    minor = (huge & 0xFF) | ((huge >> 12) & 0xFFF00)
    return os.makedev(major, minor)
