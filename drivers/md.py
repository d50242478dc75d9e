"""md RAID geometry and nbd state, read from sysfs (the root is a parameter).

`md_geometry` gives what the parallel reader needs to keep every member busy:
level, chunk size, layout and the members by role. `member_of` maps a byte
offset of the array to the member slot that serves it (first copy for
raid10). `nbd_info` says whether an nbd device is connected, its size and
backend. Nothing here opens a device.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from blockxfer.errors import DeviceError

SYS = Path("/sys")

# mdadm maps.c r5layout: left-asymmetric 0, right-asymmetric 1, left-symmetric 2,
# right-symmetric 3 (parity rotates; "left" puts parity on the last disk first)
RAID5_LAYOUTS = {0: "left-asymmetric", 1: "right-asymmetric", 2: "left-symmetric",
                 3: "right-symmetric"}


@dataclass(frozen=True, slots=True)
class MdMember:
    slot: int           # role in the array; -1 for a spare
    name: str           # block device name (sdb, vdc1)
    state: str          # in_sync, faulty, spare ...


@dataclass(frozen=True, slots=True)
class MdGeometry:
    name: str
    level: str          # raid0, raid1, raid10, raid5, raid6 ...
    raid_disks: int
    chunk_size: int     # bytes
    layout: int
    members: tuple[MdMember, ...]
    size: int           # bytes of the array

    @property
    def data_disks(self) -> int:
        """Members holding distinct data in one stripe."""
        if self.level == "raid5":
            return self.raid_disks - 1
        if self.level == "raid6":
            return self.raid_disks - 2
        if self.level == "raid10":
            return max(1, self.raid_disks // self.near_copies)
        if self.level == "raid1":
            return 1
        return self.raid_disks

    @property
    def near_copies(self) -> int:
        return (self.layout & 0xFF) if self.level == "raid10" else 1

    @property
    def stripe_width(self) -> int:
        return self.chunk_size * self.data_disks


def _text(p: Path) -> str:
    try:
        return p.read_text().strip()
    except OSError as e:
        raise DeviceError(f"{p}: {e.strerror}") from e


def md_geometry(name: str, *, sysfs: Path = SYS) -> MdGeometry:
    md = sysfs / "block" / name / "md"
    if not md.is_dir():
        raise DeviceError(f"{name} is not an md array")
    members = []
    for d in sorted(md.glob("dev-*")):
        slot = _text(d / "slot")
        members.append(MdMember(int(slot) if slot.isdigit() else -1, d.name[4:],
                                _text(d / "state")))
    layout = _text(md / "layout") if (md / "layout").exists() else "0"
    return MdGeometry(
        name=name, level=_text(md / "level"), raid_disks=int(_text(md / "raid_disks")),
        chunk_size=int(_text(md / "chunk_size") or 0), layout=int(layout or 0),
        members=tuple(sorted(members, key=lambda m: (m.slot < 0, m.slot))),
        size=int(_text(sysfs / "block" / name / "size")) * 512)


def member_of(g: MdGeometry, offset: int) -> int:
    """The member slot serving byte `offset` of the array (raid0/10/5; else 0)."""
    if not g.chunk_size or g.level not in ("raid0", "raid10", "raid5"):
        return 0
    n, chunk = g.raid_disks, offset // g.chunk_size
    if g.level == "raid0":
        return chunk % n
    if g.level == "raid10":                 # near layout: copies sit on adjacent slots
        return (chunk * g.near_copies) % n
    stripe, k = divmod(chunk, n - 1)
    # left layouts put parity on the last disk first, right ones on the first
    parity = n - 1 - stripe % n if g.layout in (0, 2) else stripe % n
    if g.layout in (2, 3):                  # symmetric: data continues after parity
        return (parity + 1 + k) % n
    return k + 1 if k >= parity else k


@dataclass(frozen=True, slots=True)
class NbdInfo:
    name: str
    connected: bool
    size: int           # bytes; 0 when not connected
    backend: str | None
    pid: int | None     # the process that set it up (nbd-client), while connected


def nbd_info(name: str, *, sysfs: Path = SYS) -> NbdInfo:
    d = sysfs / "block" / name
    if not d.is_dir():
        raise DeviceError(f"{name}: no such block device")
    pid_file = d / "pid"
    pid = int(_text(pid_file)) if pid_file.exists() else None
    backend = _text(d / "backend") if (d / "backend").exists() else None
    size = int(_text(d / "size")) * 512
    return NbdInfo(name, pid is not None, size if pid is not None else 0, backend or None, pid)
