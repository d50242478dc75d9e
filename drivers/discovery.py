"""What is attached: block devices and tape drives, through pyudev, as plain data.

Block devices: type (loop, md, nbd, disk, partition, dm), size, who uses them
(`drivers.safety`) and where they are mounted. Tape drives: the no-rewind st
node, the matching sg node, vendor, model and serial from udev properties.
Media changers: SCSI devices of type 8 and their `/dev/sgN` node, read from
sysfs (the root is a parameter, so tests use a captured tree).
Read-only; it never opens a device for I/O.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from blockxfer.errors import DeviceError

from .safety import users_of_block


@dataclass(frozen=True, slots=True)
class BlockInfo:
    path: str
    name: str
    type: str               # disk, partition, loop, md, nbd, dm, ...
    size: int               # bytes
    users: list[str]        # empty: nobody uses it
    mountpoints: list[str]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class TapeInfo:
    path: str               # /dev/nstN
    sg: str | None          # /dev/sgN
    vendor: str
    model: str
    serial: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True, slots=True)
class ChangerInfo:
    path: str               # /dev/sgN, what mtx -f takes
    address: str            # H:C:T:L
    vendor: str
    model: str

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


TYPE_MEDIUM_CHANGER = 8     # SPC peripheral device type 08h (scsi/scsi_proto.h TYPE_MEDIUM_CHANGER)


def _context() -> Any:
    try:
        import pyudev
    except ImportError as e:
        raise DeviceError("device discovery needs pyudev") from e
    return pyudev.Context()


def _kind(dev: Any) -> str:
    name = dev.sys_name
    for prefix in ("loop", "md", "nbd", "dm-", "zram", "ram"):
        if name.startswith(prefix):
            return prefix.rstrip("-")
    return dev.device_type or "disk"


def block_devices(context: Any = None) -> list[BlockInfo]:
    ctx = context or _context()
    out = []
    for dev in ctx.list_devices(subsystem="block"):
        if not dev.device_node:
            continue
        attrs = dev.attributes
        size = int(attrs.asint("size")) * 512 if "size" in attrs.available_attributes else 0
        if size == 0 and _kind(dev) in ("loop", "nbd", "ram", "zram"):
            continue                        # an unattached loop/nbd slot
        users = users_of_block(dev.sys_name)
        mounts = [u.detail for u in users if u.kind == "mounted"]
        out.append(BlockInfo(dev.device_node, dev.sys_name, _kind(dev), size,
                             [str(u) for u in users if u.kind != "mounted"], mounts))
    return out


def tape_drives(context: Any = None) -> list[TapeInfo]:
    ctx = context or _context()
    out = []
    for dev in ctx.list_devices(subsystem="scsi_tape"):
        if not dev.sys_name.startswith("nst") or not dev.sys_name[3:].isdigit():
            continue                        # skip stN and the mode variants nstNl/m/a
        scsi = dev.find_parent("scsi", "scsi_device")
        sg = None
        if scsi is not None:
            for g in ctx.list_devices(subsystem="scsi_generic", parent=scsi):
                sg = g.device_node
        props = dev.properties

        def attr(d: Any, key: str) -> str:
            try:
                return str(d.attributes.asstring(key)).strip()
            except (KeyError, AttributeError, UnicodeDecodeError):
                return ""

        out.append(TapeInfo(
            dev.device_node, sg,
            props.get("ID_VENDOR") or (attr(scsi, "vendor") if scsi else ""),
            props.get("ID_MODEL") or (attr(scsi, "model") if scsi else ""),
            props.get("ID_SCSI_SERIAL") or props.get("ID_SERIAL_SHORT") or ""))
    return out


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def changers(*, sysfs: Path = Path("/sys")) -> list[ChangerInfo]:
    """Media changers: every scsi_generic node whose SCSI device has type 8.

    The changer has no block or tape node of its own (the `ch` driver's
    /dev/schN is rarely loaded); mtx drives it through its sg node.
    """
    out = []
    root = sysfs / "class" / "scsi_generic"
    names = sorted(root.iterdir(), key=lambda p: (len(p.name), p.name)) if root.is_dir() else []
    for sg in names:
        dev = sg / "device"
        if _read(dev / "type") != str(TYPE_MEDIUM_CHANGER):
            continue
        out.append(ChangerInfo(f"/dev/{sg.name}", dev.resolve().name if dev.exists() else "",
                               _read(dev / "vendor"), _read(dev / "model")))
    return out


def discover() -> dict[str, list[dict[str, Any]]]:
    """Everything, as plain dicts (for `blockxfer devices --json`)."""
    ctx = _context()
    return {"block": [b.as_dict() for b in block_devices(ctx)],
            "tape": [t.as_dict() for t in tape_drives(ctx)],
            "changer": [c.as_dict() for c in changers()]}
