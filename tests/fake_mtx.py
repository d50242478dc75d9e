"""A fake tape library for the changer tests: slots hold virtual tape files, and a
drive is a path that a load symlinks to the slot's file (an unload removes it).

It answers mtx's command line (`-f DEV status|load S D|unload S D`) with mtx's
own output and error lines, so `drivers.changer` parses and maps them as it
would a real changer's. State lives in a JSON file, so the same library runs
in-process (`FakeMtx(state)` as the runner) and as an `mtx` script on PATH
(`python -m tests.fake_mtx` with FAKE_MTX_STATE) for the CLI tests.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def make_library(state: Path, drives: list[str], slots: list[tuple[str, str] | None]) -> None:
    """drives: the drive paths; slots: (tape file, barcode) or None for an empty slot."""
    data = {"drives": [{"path": p, "tape": None} for p in drives],
            "slots": [None if s is None else {"file": s[0], "barcode": s[1]} for s in slots]}
    state.write_text(json.dumps(data))


class FakeMtx:
    def __init__(self, state: Path):
        self.state = state
        self.calls: list[list[str]] = []

    def __call__(self, args: list[str]) -> tuple[int, str, str]:
        self.calls.append(args)
        if len(args) < 3 or args[0] != "-f":
            return 1, "", "Usage: mtx -f <scsi-generic-device> <command>"
        lib = json.loads(self.state.read_text())
        cmd, rest = args[2], [int(x) for x in args[3:]]
        if cmd == "status":
            return 0, _status(args[1], lib), ""
        if cmd not in ("load", "unload") or len(rest) != 2:
            return 1, "", f"unknown command {cmd}"
        rc, out, err = (_load if cmd == "load" else _unload)(lib, *rest)
        if rc == 0:
            self.state.write_text(json.dumps(lib))
        return rc, out, err


def _status(dev: str, lib: dict) -> str:
    lines = [f"  Storage Changer {dev}:{len(lib['drives'])} Drives, {len(lib['slots'])} Slots "
             "( 0 Import/Export )"]
    for i, d in enumerate(lib["drives"]):
        t = d["tape"]
        lines.append(f"Data Transfer Element {i}:" + (
            "Empty" if t is None
            else f"Full (Storage Element {t['source']} Loaded):VolumeTag = {t['barcode']}"))
    for n, s in enumerate(lib["slots"], 1):
        lines.append(f"      Storage Element {n}:" + (
            "Empty" if s is None else f"Full :VolumeTag={s['barcode']}"))
    return "\n".join(lines) + "\n"


def _load(lib: dict, slot: int, drive: int) -> tuple[int, str, str]:
    if not 1 <= slot <= len(lib["slots"]):
        return 1, "", f"Invalid <storage-element-number> argument '{slot}' to 'load' command"
    d = lib["drives"][drive]
    if d["tape"] is not None:
        return 1, "", f"Drive {drive} Full (Storage Element {d['tape']['source']} loaded)"
    s = lib["slots"][slot - 1]
    if s is None:
        return 1, f"Loading media from Storage Element {slot} into drive {drive}...", \
            f"Source Element Address {1000 + slot - 1} is Empty"
    os.symlink(s["file"], d["path"])
    d["tape"] = dict(s, source=slot)
    lib["slots"][slot - 1] = None
    return 0, f"Loading media from Storage Element {slot} into drive {drive}...done\n", ""


def _unload(lib: dict, slot: int, drive: int) -> tuple[int, str, str]:
    d = lib["drives"][drive]
    if d["tape"] is None:
        return 1, "", f"Data Transfer Element {drive} is Empty"
    if lib["slots"][slot - 1] is not None:
        return 1, "", f"Storage Element {slot} is Already Full"
    os.unlink(d["path"])
    t = d["tape"]
    lib["slots"][slot - 1] = {"file": t["file"], "barcode": t["barcode"]}
    d["tape"] = None
    return 0, f"Unloading drive {drive} into Storage Element {slot}...done\n", ""


def main() -> int:
    rc, out, err = FakeMtx(Path(os.environ["FAKE_MTX_STATE"]))(sys.argv[1:])
    sys.stdout.write(out)
    sys.stderr.write(err)
    return rc


if __name__ == "__main__":
    sys.exit(main())
