"""A SCSI media changer driven through the `mtx` command, and a `next_tape` from it.

`Changer` runs `mtx -f /dev/sgN status|load|unload` and parses `status` into
storage slots (full or empty, with their barcodes) and drives (with the slot the
loaded tape came from). The runner is injectable, so unit tests feed captured
`mtx status` output. `changer_next_tape` turns a changer into the
`next_tape(set_name, seq) -> path` that dump and restore call at the end of a
tape. It does not talk SCSI itself (mtx does) and never writes to a tape; the
set's label checks stay in `blockxfer.transfer`.
"""

from __future__ import annotations

import fnmatch
import re
import subprocess
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

from blockxfer.errors import DeviceBusy, DeviceError, EndOfMedium, FormatError, VolumeError

MtxRunner = Callable[[list[str]], "tuple[int, str, str]"]

# mtx status lines (mtx.c Status()): drives say "VolumeTag = X", slots "VolumeTag=X".
_DRIVE = re.compile(r"^Data Transfer Element (\d+):(Full|Empty)"
                    r"(?: \((?:Storage Element (\d+)|Unknown Storage Element) Loaded\))?(.*)$")
_SLOT = re.compile(r"^Storage Element (\d+)( IMPORT/EXPORT)?:(Full|Empty)\s*(.*)$")
_TAG = re.compile(r":VolumeTag\s*=\s*(\S*)")
CLEANING_PREFIX = "CLN"        # LTO cleaning cartridges: never loaded for data


@dataclass(frozen=True, slots=True)
class Slot:
    number: int                # mtx's 1-based storage slot number
    full: bool
    barcode: str | None
    import_export: bool = False


@dataclass(frozen=True, slots=True)
class Drive:
    index: int                 # mtx's 0-based data transfer element
    full: bool
    source: int | None         # the slot the loaded tape came from, if the changer knows
    barcode: str | None


@dataclass(frozen=True, slots=True)
class ChangerStatus:
    drives: list[Drive]
    slots: list[Slot]

    def drive(self, index: int) -> Drive:
        for d in self.drives:
            if d.index == index:
                return d
        raise DeviceError(f"the changer has no drive {index} (it has {len(self.drives)})")


def _tag(rest: str) -> str | None:
    m = _TAG.search(rest)
    return m.group(1) or None if m else None


def parse_status(text: str) -> ChangerStatus:
    """Parse `mtx status`; anything that is not a drive or slot line is ignored."""
    drives, slots = [], []
    for line in text.splitlines():
        line = line.strip()
        if m := _DRIVE.match(line):
            full = m.group(2) == "Full"
            drives.append(Drive(int(m.group(1)), full, int(m.group(3)) if m.group(3) else None,
                                _tag(m.group(4)) if full else None))
        elif m := _SLOT.match(line):
            full = m.group(3) == "Full"
            slots.append(Slot(int(m.group(1)), full, _tag(m.group(4)) if full else None,
                              bool(m.group(2))))
    if not drives and not slots:
        raise DeviceError("mtx status listed no drives and no slots: is this a media changer?")
    return ChangerStatus(drives, slots)


def run_mtx(args: list[str]) -> tuple[int, str, str]:
    """Run mtx; the one place its process is started."""
    try:
        r = subprocess.run(["mtx", *args], capture_output=True, text=True, timeout=900)
    except FileNotFoundError as e:
        raise DeviceError("the media changer needs the mtx command (apt install mtx)") from e
    except subprocess.TimeoutExpired as e:
        raise DeviceError(f"mtx {' '.join(args)} did not finish in 15 minutes") from e
    return r.returncode, r.stdout, r.stderr


def _mtx_error(what: str, rc: int, out: str, err: str) -> DeviceError:
    """mtx's reason is the last line on stderr (its progress goes to stdout)."""
    lines = ([x.strip() for x in err.splitlines() if x.strip()]
             or [x.strip() for x in out.splitlines() if x.strip()])
    reason = lines[-1] if lines else f"exit status {rc}"
    low = reason.lower()
    if "permission denied" in low or "resource busy" in low:
        return DeviceBusy(f"{what}: {reason}")
    return DeviceError(f"{what}: {reason}")


class Changer:
    """A media changer at a SCSI generic node (/dev/sgN), through mtx."""

    def __init__(self, device: str, *, run: MtxRunner = run_mtx):
        self.device, self._run = device, run

    def _mtx(self, *args: str) -> str:
        rc, out, err = self._run(["-f", self.device, *args])
        if rc != 0:
            raise _mtx_error(f"changer {self.device}: mtx {' '.join(args)}", rc, out, err)
        return out

    def status(self) -> ChangerStatus:
        return parse_status(self._mtx("status"))

    def load(self, slot: int, drive: int) -> None:
        self._mtx("load", str(slot), str(drive))

    def unload(self, slot: int, drive: int) -> None:
        self._mtx("unload", str(slot), str(drive))


class LabelReader(Protocol):
    """(set name, sequence number) of the tape at a path, or None when it is blank."""

    def __call__(self, path: str) -> tuple[str, int] | None: ...


def parse_tapes(text: str | None) -> list[str] | None:
    """`--changer-tapes`: barcodes and pools (shell patterns like BXP*), comma-separated."""
    if not text:
        return None
    return [t.strip() for t in text.split(",") if t.strip()] or None


class ChangerNextTape:
    """next_tape(set_name, seq) through a changer: put the drive's tape back in its
    slot, load the next candidate, return the drive's path.

    The candidate is the slot holding the barcode `barcodes[(set_name, seq)]` when
    that mapping has it; else, with `tapes` (barcodes and pool patterns such as
    "BXP*", in the order to use them), each full slot whose barcode matches, tried
    in that order; else the next full slot after the one just unloaded (cleaning
    cartridges skipped). With `label_of`, a tape labelled for another set or
    sequence is refused here, naming its slot; from `tapes` such a tape (and, for a
    restore, a blank one) is put back and the next one tried. The dump's and
    restore's own label checks (set id, blank -> labelled) then run as for any
    other tape. `used` records the barcode of each tape of the set it saw.
    """

    def __init__(self, changer: Changer, drive_index: int, drive_path: str, *,
                 barcodes: Mapping[tuple[str, int], str] | None = None,
                 eject: Callable[[str], None] | None = None,
                 label_of: LabelReader | None = None,
                 tapes: Sequence[str] | None = None, restore: bool = False):
        self.changer, self.drive_index, self.drive_path = changer, drive_index, drive_path
        self.barcodes = dict(barcodes or {})
        self.eject, self.label_of = eject, label_of
        self.tapes, self.restore = list(tapes or []), restore
        self.slot: int | None = None      # the slot of the tape last loaded
        self.used: dict[int, str] = {}    # sequence number -> barcode, as seen

    def _where(self, slot: Slot) -> str:
        tag = f" ({slot.barcode})" if slot.barcode else ""
        return f"changer {self.changer.device} slot {slot.number}{tag}"

    def _put_back(self, status: ChangerStatus) -> int:
        """Unload the drive to the slot its tape came from; return that slot (0: none)."""
        drive = status.drive(self.drive_index)
        if not drive.full:
            return self.slot or 0
        home = drive.source or self.slot
        if home is None:
            home = next((s.number for s in status.slots if not s.full and not s.import_export),
                        None)
            if home is None:
                raise DeviceError(f"changer {self.changer.device}: no empty slot to unload "
                                  f"drive {self.drive_index} into")
        if self.eject is not None:
            self.eject(self.drive_path)        # a real drive must let go of the tape first
        self.changer.unload(home, self.drive_index)
        return home

    def _candidate(self, status: ChangerStatus, after: int, set_name: str, seq: int) -> Slot:
        full = [s for s in status.slots if s.full and not s.import_export]
        want = self.barcodes.get((set_name, seq))
        if want is not None:
            for s in full:
                if s.barcode == want:
                    return s
            raise EndOfMedium(f"changer {self.changer.device}: no slot holds {want}, tape "
                              f"{seq} of set {set_name!r}")
        for s in full:
            if s.number > after and not (s.barcode or "").startswith(CLEANING_PREFIX):
                return s
        raise EndOfMedium(f"changer {self.changer.device}: no full slot after slot {after} "
                          f"for tape {seq} of set {set_name!r}")

    def __call__(self, set_name: str, seq: int) -> str:
        status = self.changer.status()
        before = status.drive(self.drive_index)
        if before.full and before.barcode and seq - 1 not in self.used:
            self.used[seq - 1] = before.barcode
        after = self._put_back(status)
        if self.tapes and (set_name, seq) not in self.barcodes:
            return self._from_tapes(set_name, seq)
        slot = self._candidate(self.changer.status(), after, set_name, seq)
        self.changer.load(slot.number, self.drive_index)
        self.slot = slot.number
        if self.label_of is not None:
            label = self.label_of(self.drive_path)
            if label is not None and label != (set_name, seq):
                raise VolumeError(f"{self._where(slot)} holds tape {label[1]} of set "
                                  f"{label[0]!r}, not tape {seq} of set {set_name!r}; it is "
                                  f"left in drive {self.drive_index}")
        if slot.barcode:
            self.used[seq] = slot.barcode
        return self.drive_path

    def _pool(self, status: ChangerStatus) -> list[Slot]:
        """Full slots matching `tapes`, in its order (slot order within a pattern)."""
        full = [s for s in status.slots if s.full and not s.import_export and s.barcode]
        out: list[Slot] = []
        for pattern in self.tapes:
            out += [s for s in full if fnmatch.fnmatchcase(s.barcode or "", pattern)
                    and s not in out]
        return out

    def _from_tapes(self, set_name: str, seq: int) -> str:
        """Try the matching tapes in order; keep the first that fits (see the class doc)."""
        tried: list[str] = []
        for slot in self._pool(self.changer.status()):
            if slot.barcode in self.used.values():
                continue                          # already a tape of this set
            self.changer.load(slot.number, self.drive_index)
            self.slot = slot.number
            try:
                label = self.label_of(self.drive_path) if self.label_of is not None else None
            except (FormatError, DeviceError) as e:   # not a blockxfer tape: try the next
                tried.append(f"{slot.barcode} (unreadable: {e})")
            else:
                # without label_of the dump's and restore's own label checks decide
                if (self.label_of is None or label == (set_name, seq)
                        or (label is None and not self.restore)):
                    self.used[seq] = slot.barcode or ""
                    return self.drive_path
                what = "blank" if label is None else f"tape {label[1]} of set {label[0]!r}"
                tried.append(f"{slot.barcode} ({what})")
            if self.eject is not None:
                self.eject(self.drive_path)
            self.changer.unload(slot.number, self.drive_index)
        wanted = ("holds" if self.restore else "is blank or holds")
        raise EndOfMedium(f"changer {self.changer.device}: none of the tapes "
                          f"{','.join(self.tapes)} {wanted} tape {seq} of set {set_name!r}"
                          + (f" (tried {', '.join(tried)})" if tried else
                             " (no full slot matches)"))


def changer_next_tape(changer: Changer, drive_index: int, drive_path: str, *,
                      barcodes: Mapping[tuple[str, int], str] | None = None,
                      eject: Callable[[str], None] | None = None,
                      label_of: LabelReader | None = None,
                      tapes: Sequence[str] | None = None,
                      restore: bool = False) -> ChangerNextTape:
    """The `next_tape` provider of a changer (see `ChangerNextTape`)."""
    return ChangerNextTape(changer, drive_index, drive_path, barcodes=barcodes, eject=eject,
                           label_of=label_of, tapes=tapes, restore=restore)
