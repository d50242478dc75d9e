"""`blockxfer demo`: the main job on an embedded default, a file-backed volume and a
virtual tape. It grows with each transfer technique that lands."""

from __future__ import annotations

import contextlib
import os
import shutil

from blockxfer.drivers.blockdev import open_device
from blockxfer.drivers.tapes import open_tape_handle
from blockxfer.drivers.vtape import create_virtual_tape
from blockxfer.errors import UsageError
from blockxfer.image import evaluate
from blockxfer.transfer.dump import dump_image
from blockxfer.transfer.restore import restore_images
from blockxfer.transfer.tapeset import list_tape
from blockxfer.units import human
from blockxfer.volume import Volume
from blockxfer.volume.check import check_volume

DAYS = ["june1", "june2", "june3", "june4", "june5"]


def _say(text: str) -> None:
    print(f"demo: {text}", flush=True)


MARK = ".blockxfer-demo"                 # a folder the demo made and may clear again
OWN = (MARK, "volume.img", "tape0.vtape", "restored.img", "from-s3.img")
OWN_DIRS = ("seaweedfs",)                  # the embedded object store's data and log


def _prepare(directory: str) -> None:
    """Use a new or empty folder, or clear one an earlier demo made (its own files
    only); never delete what an operator keeps there."""
    if os.path.exists(directory) and not os.path.isdir(directory):
        raise UsageError(f"--dir {directory} is not a folder")
    if os.path.isdir(directory) and os.listdir(directory):
        if not os.path.exists(os.path.join(directory, MARK)):
            raise UsageError(f"--dir {directory} holds files that the demo did not make; "
                             "give a new or empty folder")
        stray = sorted(set(os.listdir(directory)) - set(OWN) - set(OWN_DIRS))
        if stray:
            raise UsageError(f"--dir {directory} holds {stray[0]!r}, which the demo did not "
                             "make; move it away or give a new folder")
        for name in OWN:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(directory, name))
        for name in OWN_DIRS:
            shutil.rmtree(os.path.join(directory, name), ignore_errors=True)
    os.makedirs(directory, exist_ok=True)
    open(os.path.join(directory, MARK), "wb").close()


def run_demo(directory: str) -> int:
    _prepare(directory)
    path = os.path.join(directory, "volume.img")
    vol = Volume.create(open_device(path, write=True, create_size=256 << 20))
    _say(f"volume {path}: {human(vol.virtual_size)} virtual disk, block {vol.block_size}")
    for day, name in enumerate(DAYS):
        vol.write(day * (4 << 20), os.urandom(8 << 20))      # each day changes 8 MiB
        vol.create_snapshot(name, master=name == "june5")
        _say(f"snapshot {name}: {vol.resolve(name).blocks} blocks in its plane")
    vol.set_pointer("master", "june5")
    for expr in ("june3 + june2 + june1", "june5 + june4 - june3", "master - june4"):
        img = evaluate(expr, vol, vol.block_size).as_dict()
        _say(f"image {expr!r}: {img['blocks']} blocks ({human(int(img['bytes']))}), "  # type: ignore[call-overload]
             f"base {img['base'] or 'none'}")
    report = check_volume(vol)
    _say(f"check: {'clean' if report.clean else report.problems}, "
         f"{report.blocks_verified} blocks verified")
    tape = os.path.join(directory, "tape0.vtape")
    create_virtual_tape(tape, 1 << 30)
    opener = lambda p, w: open_tape_handle(p, write=w)  # noqa: E731
    for expr in ("june3 + june2 + june1", "june5 + june4 - june3"):
        res = dump_image(vol, expr, tape, open_tape=opener, label="DEMO01")
        _say(f"dump {expr!r} to {tape}: image {res.image}, {res.blocks} blocks, "
             f"{human(res.bytes)}")
    vol.close()
    for on_tape in list_tape(opener(tape, False)).images:
        _say(f"tape image {on_tape.number}: {on_tape.descriptor.expression!r} "
             f"{'complete' if on_tape.complete else 'INCOMPLETE'}")
    copy = os.path.join(directory, "restored.img")
    restore_images(tape, copy, open_tape=opener, open_device=open_device, snapshot="june5")
    src = Volume.open(open_device(path), writable=False)
    dst = Volume.open(open_device(copy), writable=False)
    same = all(src.read(0, src.virtual_size, snapshot=n) == dst.read(0, dst.virtual_size,
                                                                      snapshot=n)
               for n in DAYS[:5])
    _say(f"restored {copy} from tape: june1..june5 {'identical' if same else 'DIFFER'}; "
         f"check {'clean' if check_volume(dst).clean else 'FAILED'}")
    src.close()
    dst.close()
    from blockxfer.transfer.objstore.demo import run_objstore_leg
    stored = run_objstore_leg(path, DAYS[:5], directory, _say, open_device)
    return 0 if report.clean and same and stored else 1
