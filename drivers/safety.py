"""Who uses a device, and whether blockxfer may write to it.

A device is in use when it (or one of its partitions) is mounted, has holders
in sysfs (device-mapper, an md array: then it is an md member), is active
swap, backs a loop device, or is open O_EXCL by another process. Any of these
refuses writing, with a message naming who holds it; `force` never overrides
them. `force` overrides only a leftover signature (a file system, an old
volume, a partition table) on a device nobody uses. The sysfs and proc roots
are parameters so unit tests run on captured trees. This module only looks:
it never changes a device.
"""

from __future__ import annotations

import errno
import os
import stat
from dataclasses import dataclass
from pathlib import Path

from blockxfer.errors import DeviceBusy, DeviceError

SYS, PROC = Path("/sys"), Path("/proc")


@dataclass(frozen=True, slots=True)
class DeviceUser:
    kind: str       # mounted, md-member, holder, swap, loop-backing, exclusive
    detail: str     # for the operator: "/mnt/data", "md0", "pid 42 (mkfs)"

    def __str__(self) -> str:
        return f"{self.kind} {self.detail}".strip()


@dataclass(frozen=True, slots=True)
class WriteCheck:
    """The plan for writing to a device: what is on it, who uses it."""

    path: str
    users: tuple[DeviceUser, ...] = ()
    signature: str | None = None
    forced: bool = False


def _read(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError:
        return ""


def _block_ids(name: str, sysfs: Path) -> list[tuple[str, str]]:
    """(name, "maj:min") of the device and each of its partitions."""
    base = sysfs / "class" / "block" / name
    ids = [(name, _read(base / "dev"))]
    if base.is_dir():
        for sub in sorted(base.iterdir()):
            if (sub / "partition").exists():
                ids.append((sub.name, _read(sub / "dev")))
    return ids


def _mounts(devnos: set[str], proc: Path) -> list[DeviceUser]:
    users = []
    for line in _read(proc / "self" / "mountinfo").splitlines():
        f = line.split()
        if len(f) > 4 and f[2] in devnos:
            users.append(DeviceUser("mounted", f[4]))
    return users


def _holders(ids: list[tuple[str, str]], sysfs: Path) -> list[DeviceUser]:
    users = []
    for name, _ in ids:
        d = sysfs / "class" / "block" / name / "holders"
        for h in sorted(d.iterdir()) if d.is_dir() else []:
            if h.name.startswith("md"):
                users.append(DeviceUser("md-member", f"of {h.name}"))
            else:
                dm = _read(sysfs / "class" / "block" / h.name / "dm" / "name")
                users.append(DeviceUser("holder", f"{h.name} ({dm})" if dm else h.name))
    return users


def _swaps(devnos: set[str], path: str, proc: Path) -> list[DeviceUser]:
    users = []
    for line in _read(proc / "swaps").splitlines()[1:]:
        name = line.split()[0] if line.split() else ""
        try:
            st = os.stat(name)
            hit = stat.S_ISBLK(st.st_mode) and _devno(st.st_rdev) in devnos
        except OSError:
            hit = False
        if hit or os.path.realpath(name) == os.path.realpath(path):
            users.append(DeviceUser("swap", name))
    return users


def _loop_backing(path: str, sysfs: Path) -> list[DeviceUser]:
    """Loop devices over the file `path`, matched by name or by inode (a bind mount or
    a hard link of the backing file is the same file under another name)."""
    real = os.path.realpath(path)
    block = sysfs / "block"
    users = []
    for d in sorted(block.glob("loop*")) if block.is_dir() else []:
        backing = _read(d / "loop" / "backing_file")
        if backing and (backing == real or _same_file(backing, path)):
            users.append(DeviceUser("loop-backing", f"of /dev/{d.name}"))
    return users


def _same_file(a: str, b: str) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def openers(path: str, *, proc: Path = PROC) -> list[str]:
    """'pid N (name)' of every process with `path` open (needs root to see all)."""
    real, found = os.path.realpath(path), []
    for pdir in proc.iterdir() if proc.is_dir() else []:
        if not pdir.name.isdigit():
            continue
        try:
            fds = list((pdir / "fd").iterdir())
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(fd) == real:
                    found.append(f"pid {pdir.name} ({_read(pdir / 'comm')})")
                    break
            except OSError:
                continue
    return found


def _exclusive(path: str, proc: Path) -> list[DeviceUser]:
    try:
        os.close(os.open(path, os.O_RDONLY | os.O_EXCL | os.O_CLOEXEC))
        return []
    except OSError as e:
        if e.errno != errno.EBUSY:
            return []
    who = ", ".join(openers(path, proc=proc)) or "the kernel or another process"
    return [DeviceUser("exclusive", f"open O_EXCL by {who}")]


def _devno(rdev: int) -> str:
    return f"{os.major(rdev)}:{os.minor(rdev)}"


def users_of_block(name: str, *, path: str | None = None, sysfs: Path = SYS,
                   proc: Path = PROC) -> list[DeviceUser]:
    """Everything that uses block device `name` (as in /sys/class/block/NAME)."""
    ids = _block_ids(name, sysfs)
    devnos = {d for _, d in ids if d}
    users = _mounts(devnos, proc) + _holders(ids, sysfs) + _swaps(devnos, path or "", proc)
    if path and not users:
        users += _exclusive(path, proc)     # EBUSY explained by nothing above
    return users


def block_name(path: str, *, sysfs: Path = SYS) -> str | None:
    """The sysfs name of a block device node (loop0, md127, sda1), None for a file."""
    st = os.stat(path)
    if not stat.S_ISBLK(st.st_mode):
        return None
    return os.path.basename(os.path.realpath(sysfs / "dev" / "block" / _devno(st.st_rdev)))


def device_users(path: str, *, sysfs: Path = SYS, proc: Path = PROC) -> list[DeviceUser]:
    """Who uses the device or file at `path`; empty when nobody does."""
    try:
        name = block_name(path, sysfs=sysfs)
    except OSError as e:
        raise DeviceError(f"{path}: {e.strerror}") from e
    if name is None:
        return _loop_backing(path, sysfs)
    return users_of_block(name, path=path, sysfs=sysfs, proc=proc)


def describe_users(path: str, *, sysfs: Path = SYS, proc: Path = PROC) -> str:
    users = device_users(path, sysfs=sysfs, proc=proc)
    return "; ".join(map(str, users)) or "held by an unknown user"


# (offset, magic, what it is); the blockxfer volume superblock magic is listed too
SIGNATURES: list[tuple[int, bytes, str]] = [
    (0, b"BLKXFER", "a blockxfer volume"),
    (1080, b"\x53\xef", "an ext2/3/4 file system"),
    (0, b"XFSB", "an XFS file system"),
    (65600, b"_BHRfS_M", "a btrfs file system"),
    (4086, b"SWAPSPACE2", "swap space"),
    (0, b"LUKS\xba\xbe", "a LUKS header"),
    (4096, b"\xfc\x4e\x2b\xa9", "an md RAID member (1.2 superblock)"),
    (512, b"EFI PART", "a GPT partition table"),
    (3, b"NTFS    ", "an NTFS file system"),
    (510, b"\x55\xaa", "an MBR partition table or boot sector"),
]


def find_signature(path: str) -> str | None:
    """What an old signature at the start of `path` says is there, or None."""
    try:
        with open(path, "rb", buffering=0) as f:
            head = f.read(65600 + 8)
    except OSError as e:
        raise DeviceError(f"read {path}: {e.strerror}") from e
    for off, magic, what in SIGNATURES:
        if head[off:off + len(magic)] == magic:
            return what
    return None


def refuse_in_use(path: str, *, sysfs: Path = SYS, proc: Path = PROC) -> None:
    """Raise DeviceBusy when anything uses `path` (`device_users`). `open_device`
    calls this on every open for writing; --force never overrides it."""
    users = device_users(path, sysfs=sysfs, proc=proc)
    if users:
        raise DeviceBusy(f"{path} is in use: {'; '.join(map(str, users))}; "
                         "blockxfer will not write to it (--force does not change that)")


def check_writable(path: str, force: bool = False, *, sysfs: Path = SYS,
                   proc: Path = PROC) -> WriteCheck:
    """Refuse a device in use (always) or with a leftover signature (unless forced)."""
    refuse_in_use(path, sysfs=sysfs, proc=proc)
    sig = find_signature(path)
    if sig and not force:
        raise DeviceError(f"{path} holds {sig}; use --force to overwrite it")
    return WriteCheck(path, (), sig, forced=bool(sig and force))
